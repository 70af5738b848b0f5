"""The dtypes a training run computes in, and the copies of a frozen quantized base it keeps for speed.

- `autocast_dtype`: precision auto is bf16 autocast where the device computes bf16 natively, fp32 elsewhere;
- `setup_precision`: gives a prepared model those dtypes, and to LoRA/adapter runs on a quantized base (GGUF blocks)
  the copies of the base that make a step a few GEMMs: dense bf16 copies under autocast (`dense_base_auto`), int8
  copies in fp32 on CPUs whose int8 GEMM outruns their fp32 one (`int8_base_auto`), a dense copy of the head;
- `compile_auto`: whether the blocks are compiled.
Each `auto` is decided from what the machine has (`llmlab.hardware`), never from what the machine that measured it
had; docs/finetune.md has the measurements behind each.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from llmlab.checkpoint import default_dtype
from llmlab.errors import LLMLabError
from llmlab.methods import Method


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision option (None = no autocast: plain fp32, or bf16-true). auto autocasts to
    bf16 where the device computes it natively (CUDA; a CPU with AVX-512 BF16 or AMX, `llmlab.hardware.native_bf16`)
    and trains in plain fp32 elsewhere, where bf16 is converted in software and slower than fp32."""
    amp = {"bf16": torch.bfloat16, "auto": default_dtype(device, bf16_if_native=True)}.get(precision)
    return None if amp == torch.float32 else amp


def setup_precision(model: nn.Module, method: Method, precision: str, device: torch.device,
                    dense_base: bool | None = None, int8_base: bool | None = None) -> torch.dtype | None:
    """Give a prepared model the dtypes of a precision option; returns the autocast dtype (None: no autocast).

    bf16-true casts every floating parameter to bf16 (no fp32 master weights: least memory, fastest, AdamW
    updates rounded to bf16). Under autocast, a method that saves only what it trains (`Method.saves_frozen`
    False: LoRA, adapters, QLoRA) gets its frozen parameters (and floating buffers, such as a quantized
    embedding's output dtype) stored in the autocast dtype: autocast would cast them to it for every matmul
    anyway, so the fp32 copy of the frozen base is pure memory, and its casts pure time; the residual stream then
    runs in that dtype too, as the frozen embedding gives it. A quantized LM head (GGUF blocks) of such a method
    keeps a dense copy in the compute dtype (`QuantLinear.keep_dense`: 57 MB in bf16, 113 MB in fp32 for SmolLM2's
    tied 49152 x 576 head): the fused loss multiplies by the whole head every step, and dequantizing it each time
    cost ~7% of a LoRA step, while the loss held a dequantized copy during the step anyway (so the peak memory
    hardly moves); int8 training keeps it in bf16, widened a slice at a time by the loss (56 MB less, where fp32
    activations are what fills the memory). The quantized blocks keep dense copies in the autocast dtype where
    `dense_base_auto` says so (`quantized.keep_training_copies`), or int8 copies where `int8_base_auto` does
    (`quantized.keep_int8_copies`).
    """
    if precision == "bf16-true":
        model.to(torch.bfloat16)
        return None
    amp = autocast_dtype(precision, device)
    if method.saves_frozen:
        if int8_base:
            raise LLMLabError("--train.int8_base true: only LoRA and adapter training multiply a frozen quantized "
                              "base (this method trains or saves the base weights)")
        return amp
    from llmlab.quantized import DENSE_MIN_ROWS, QuantLinear, keep_int8_copies, keep_training_copies

    if dense_base and int8_base:
        raise LLMLabError("--train.dense_base true and --train.int8_base true: a quantized base trains on one kind "
                          "of copy; choose one (or leave both unset: auto)")
    int8 = None if dense_base else int8_base_auto(int8_base, model, precision, device)
    dense = not int8 and dense_base_auto(dense_base, model, amp, device)
    head = getattr(model, "lm_head", None)
    if isinstance(head, QuantLinear) and getattr(model, "fused_loss", False) and head.dense is None:
        if int8:  # a bf16 copy the fused loss widens a slice at a time, never used for the head's own products
            head.keep_dense(HEAD_COPY_FOR_LOSS_ONLY, torch.bfloat16)
        else:
            head.keep_dense(DENSE_MIN_ROWS, amp or torch.float32)  # the fused loss reads the whole head every step
    if int8:
        for module in model.modules():  # an approximate mode already: activations saved in bf16 (llmlab.lean)
            if hasattr(module, "lean_activations"):
                module.lean_activations = True
        added = keep_int8_copies(model, int8)
        print(f"llmlab: the quantized base keeps int8 copies for training ({added / 2**20:,.1f} MiB, weights within "
              f"+-{int8}; --train.int8_base false: fp32 products)", file=sys.stderr)
    if amp is not None:
        if dense:
            added = keep_training_copies(model, amp)
            if added:
                print(f"llmlab: the quantized base keeps a dense {str(amp).removeprefix('torch.')} copy while "
                      f"training ({added / 2**20:,.1f} MiB; --train.dense_base false: blocks only, slower)",
                      file=sys.stderr)
        with torch.no_grad():
            for p in model.parameters():
                if not p.requires_grad and p.is_floating_point() and p.dtype != amp:
                    p.data = p.data.to(amp)
            for module in model.modules():  # dtype-carrying buffers (a quantized embedding's output dtype)
                if isinstance(module, QuantLinear):
                    continue  # its kernel's buffers keep the dtypes it packed
                for name, b in module.named_buffers(recurse=False):
                    if b is not None and b.is_floating_point() and b.dtype != amp:
                        setattr(module, name, b.to(amp))
    return amp


HEAD_COPY_FOR_LOSS_ONLY = 1 << 62  # keep_dense's from_rows for a copy no product of the layer itself uses
DENSE_BASE_AUTO_SHARE = 4  # train.dense_base auto: the copies may take up to 1/4 of the memory available


def dense_base_auto(dense_base: bool | None, model: nn.Module, amp: torch.dtype | None, device: torch.device) -> bool:
    """Whether a quantized base keeps dense copies in the autocast dtype `amp` while training (`--train.dense_base`):
    as given, but never without autocast (fp32 copies would be the float weights this path exists to avoid; a
    float base is the choice then: `--base_weights float`); None (auto) when the copies take at most
    1/DENSE_BASE_AUTO_SHARE of the memory `device` has available (`hardware.available_memory`)."""
    from llmlab.hardware import available_memory
    from llmlab.quantized import training_copy_bytes

    if dense_base is False:
        return False
    if amp is None:
        if dense_base and training_copy_bytes(model, torch.float32):
            raise LLMLabError("--train.dense_base true needs bf16 autocast (--train.precision bf16, or auto on a "
                              "CPU with native bf16): an fp32 copy of the base is its float weights, which "
                              "--base_weights float trains on directly")
        return False
    need = training_copy_bytes(model, amp)
    if dense_base:
        return need > 0
    free = available_memory(device)
    return need > 0 and free is not None and need * DENSE_BASE_AUTO_SHARE <= free


def int8_base_auto(int8_base: bool | None, model: nn.Module, precision: str, device: torch.device) -> int | None:
    """The weight limit of int8 training copies of a quantized base (`--train.int8_base`, `QuantLinear.keep_int8`),
    or None for none. True: wherever the CPU's int8 GEMM is exact (`hardware.int8_matmul_limit`: +-127, or +-63
    where it saturates), else a clear error, as for a model without quantized projections or a GPU. None (auto):
    only where precision auto chose fp32 (a CPU without native bf16, where bf16 copies would be emulated; an explicit
    `--train.precision fp32` asks for fp32 products and gets them), on a CPU whose int8 GEMM is at least
    `hardware.INT8_MIN_SPEEDUP` times its fp32 one, when the copies take at most 1/DENSE_BASE_AUTO_SHARE of the
    memory available. int8 products approximate the weights the blocks hold (inputs and gradients rounded per row
    too), which is why auto keeps bf16 copies where bf16 is native."""
    from llmlab.hardware import INT8_MIN_SPEEDUP, available_memory, int8_matmul_limit, int8_matmul_speedup
    from llmlab.quantized import int8_copy_bytes

    if int8_base is False:
        return None
    need = int8_copy_bytes(model)
    if int8_base:
        if not need:
            raise LLMLabError("--train.int8_base true: the model has no quantized projections to multiply in int8 "
                              "(LoRA or adapters on a GGUF's blocks, --base_weights gguf)")
        if device.type != "cpu":
            raise LLMLabError(f"--train.int8_base true: int8 training products run on the CPU, not on {device}")
        limit = int8_matmul_limit()
        if limit is None:
            raise LLMLabError("--train.int8_base true: this CPU has no exact int8 GEMM (torch._int_mm gave wrong "
                              "sums or has no CPU kernel in this torch build)")
        return limit
    fp32_by_choice = precision == "auto" and autocast_dtype(precision, device) is None
    if not need or device.type != "cpu" or not fp32_by_choice or int8_matmul_speedup() < INT8_MIN_SPEEDUP:
        return None
    free = available_memory(device)
    return int8_matmul_limit() if free is not None and need * DENSE_BASE_AUTO_SHARE <= free else None


COMPILE_AUTO_MIN_STEPS = 100  # train.compile auto: runs shorter than this stay eager (the compile would not repay)


def compile_auto(compile: bool | None, method: Method, amp: torch.dtype | None, device: torch.device,
                 max_steps: int, model: nn.Module | None = None) -> bool:
    """Whether to compile the blocks: `compile` True/False as given; None (auto) compiles where it was measured to
    pay: adapter-style training (LoRA, adapters: `Method.saves_frozen` False) under bf16 autocast on a CPU, for a run
    of at least COMPILE_AUTO_MIN_STEPS steps, with a C++ compiler for inductor. There a compiled block fuses the
    norms, RoPE, SwiGLU and the casts between bf16 and fp32 around the dense GEMMs (~10% of a LoRA step on the
    default model, docs/finetune.md) for one block's compile time (5-30 s, cached by inductor across runs). The
    same in fp32 when `model` trains on int8 copies of its base (`int8_base_auto`): there the compiled block fuses
    the per-row quantization of inputs and gradients with the norms around it (eager, it is ~15% of the step)."""
    from llmlab.hardware import cpp_compiler

    if compile is not None:
        return compile
    from llmlab.quantized import trains_in_int8

    int8 = model is not None and trains_in_int8(model)
    return (device.type == "cpu" and (amp is not None or int8) and not method.saves_frozen
            and max_steps >= COMPILE_AUTO_MIN_STEPS and cpp_compiler() is not None)
