"""QLoRA (Dettmers et al. 2023): the frozen base linear weights of every block stored 4-bit NormalFloat (NF4) with
double quantization (the per-block absmax scales are themselves quantized to 8 bits), LoRA trained on top.

Storage is bitsandbytes' (`quantize_4bit`): NF4 codes with one absmax per 64 consecutive values of a projection's
flattened weight. Each projection is quantized on its own, also inside the fused `qkv_proj` / `gate_up_proj`
modules (which keep q, k, v or gate, up as separate NF4 tensors side by side), so the codes and scales are the ones
transformers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")` holds for the same model, and an
adapter trained here meets the same base weights under HF + PEFT.

bitsandbytes is checked before it is trusted: once per process and device type, `nf4_backend` quantizes a small
tensor whose rows are not a multiple of the block and compares bitsandbytes with NF4 as the paper defines it.
bitsandbytes 0.50.2's CPU dequantize on AVX-512 hosts applies the wrong block scale to such rows; where it disagrees,
llmlab asks it to dequantize the same storage described as rows of one block (which it gets right), or else
dequantizes with `dequantize_nf4_reference` (plain torch, the definition), and says which on stderr.

W0 x dequantizes the weight to the compute dtype (bf16 on CUDA, fp32 on CPU) in the forward pass and again in the
backward pass, keeping only the 4-bit weight in between, as bitsandbytes' `matmul_4bit` does when training.
Embeddings, norms and the output head stay in full precision. The adapter saves as a normal PEFT LoRA folder, to use
on the full-precision base (`--adapter`, `llmlab merge`).
"""

from __future__ import annotations

import copy
import functools
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.args import LoRAConfig
from llmlab.errors import LLMLabError
from llmlab.methods.adapters import set_trainable
from llmlab.methods.lora import LoRA, LoRALinear, apply_lora, projection_slices

BLOCKSIZE = 64  # weights per absmax scale (bitsandbytes' and QLoRA's default)
# The NF4 code book: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (QLoRA paper, appendix E).
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
            1.0)
PROBE_SHAPE = (4, 96)  # rows of 1.5 blocks: the shape class bitsandbytes 0.50.2 gets wrong on AVX-512 CPUs


def _bnb():
    try:
        import bitsandbytes
    except ImportError as e:
        raise LLMLabError("--method qlora needs bitsandbytes (pip install 'llmlab[qlora]' or bitsandbytes)") from e
    return bitsandbytes


# -- NF4 by definition -------------------------------------------------------------------------------
def nf4_codes(packed: Tensor, numel: int) -> Tensor:
    """The 4-bit code indices (0..15) of a packed NF4 tensor, in the order of the flattened weight (two per byte,
    high nibble first, as bitsandbytes packs them)."""
    b = packed.reshape(-1).view(torch.uint8)
    return torch.stack((b >> 4, b & 15), dim=1).reshape(-1)[:numel].long()


def nf4_scales(state: Any) -> Tensor:
    """The fp32 absmax of every block of a bitsandbytes QuantState (dequantizing the 8-bit scales of double
    quantization: code2[q] * absmax2[block of 256] + offset)."""
    absmax = state.absmax
    if state.nested:
        s2 = state.state2
        scale2 = s2.absmax.float().repeat_interleave(s2.blocksize)[: absmax.numel()]
        absmax = s2.code.float().to(absmax.device)[absmax.long()] * scale2 + state.offset
    return absmax.float()


def dequantize_nf4_reference(packed: Tensor, state: Any) -> Tensor:
    """The weight a packed NF4 tensor stands for, computed from the definition in plain torch: code book value of
    each code times its block's absmax, blocks of `state.blocksize` over the flattened weight."""
    numel = int(torch.Size(state.shape).numel())
    code = torch.tensor(NF4_CODE, device=packed.device)
    scales = nf4_scales(state).repeat_interleave(state.blocksize)[:numel]
    return (code[nf4_codes(packed, numel)] * scales).view(tuple(state.shape)).to(state.dtype)


def follows_nf4(w: Tensor, packed: Tensor, state: Any, blocksize: int = BLOCKSIZE) -> bool:
    """Whether packed NF4 storage of `w` is what the definition gives: each block's stored scale within 1% of its
    absmax (8-bit double quantization), and each code a nearest code of the value / absmax (ties either way)."""
    flat = w.detach().float().reshape(-1)
    pad = (-flat.numel()) % blocksize
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scales = nf4_scales(state)
    if scales.shape != absmax.shape or not torch.allclose(scales, absmax, rtol=0.01, atol=0):
        return False
    code = torch.tensor(NF4_CODE, device=w.device)
    dist = (blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).unsqueeze(-1).sub(code).abs()
    codes = torch.cat([nf4_codes(packed, flat.numel()), flat.new_zeros(pad, dtype=torch.long)]).view(-1, blocksize)
    chosen = dist.gather(-1, codes.unsqueeze(-1)).squeeze(-1)
    return bool((chosen - dist.amin(dim=-1)).max() <= 1e-5)


# -- bitsandbytes, checked ---------------------------------------------------------------------------
def compute_dtype(device_type: str) -> torch.dtype:
    """The dtype the 4-bit weights are quantized from and dequantized to: bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if device_type == "cuda" else torch.float32


def quantize_nf4(weight: Tensor, blocksize: int = BLOCKSIZE) -> tuple[Tensor, Any]:
    """(packed uint8 weight, bitsandbytes QuantState) of `weight` in NF4 with double quantization."""
    _bnb()
    import bitsandbytes.functional as bf

    return bf.quantize_4bit(weight.detach(), blocksize=blocksize, compress_statistics=True, quant_type="nf4")


def _as_block_rows(state: Any) -> Any:
    """A copy of a QuantState that describes its weight as rows of one block each: (numel / blocksize, blocksize)."""
    rows = copy.copy(state)
    rows.shape = torch.Size((torch.Size(state.shape).numel() // state.blocksize, state.blocksize))
    return rows


def _bnb_dequantize(packed: Tensor, state: Any, as_rows: bool) -> Tensor:
    import bitsandbytes.functional as bf

    if not as_rows:
        return bf.dequantize_4bit(packed, state)
    return bf.dequantize_4bit(packed, _as_block_rows(state)).view(tuple(state.shape))


@functools.cache
def nf4_backend(device_type: str) -> str:
    """How this process dequantizes NF4 on `device_type`, checked once (and said once on stderr) on a probe whose rows
    are not a multiple of the block: "bitsandbytes" where it agrees with the definition; else "bitsandbytes-rows" where
    it agrees once told that the weight is rows of one block (same storage: the blocks run over the flattened weight);
    else "reference" (plain torch).

    Raises when bitsandbytes' quantization itself (codes or scales) disagrees: no correct path would be left."""
    bnb = _bnb()
    dtype = compute_dtype(device_type)
    w = torch.randn(PROBE_SHAPE, generator=torch.Generator().manual_seed(0)).to(device_type, dtype)
    packed, state = quantize_nf4(w)
    if not follows_nf4(w, packed, state):
        raise LLMLabError(f"bitsandbytes {bnb.__version__} quantizes NF4 wrongly on this {device_type} (codes or block "
                          "scales differ from the NF4 definition); install another bitsandbytes version for QLoRA")
    want = dequantize_nf4_reference(packed, state)
    errors = [float((_bnb_dequantize(packed, state, rows) - want).abs().max()) for rows in (False, True)]
    right = [e <= 4 * torch.finfo(dtype).eps * float(w.abs().max()) for e in errors]  # rounding apart, equal
    name = f"llmlab: NF4: bitsandbytes {bnb.__version__}"
    if right[0]:
        print(f"{name} agrees with the NF4 definition on {device_type}; dequantizing with it", file=sys.stderr)
        return "bitsandbytes"
    wrong = (f"{name} dequantizes rows that are not a multiple of {BLOCKSIZE} wrongly on this {device_type} (max "
             f"error {errors[0]:.3g} on a {PROBE_SHAPE[0]}x{PROBE_SHAPE[1]} probe)")
    if right[1]:
        print(f"{wrong}; dequantizing with it as rows of one block each (same storage, right), or with llmlab's "
              "reference NF4 where a weight is not whole blocks", file=sys.stderr)
        return "bitsandbytes-rows"
    print(f"{wrong}; dequantizing with llmlab's reference NF4 instead (same storage, plain torch)", file=sys.stderr)
    return "reference"


def dequantize_nf4(packed: Tensor, state: Any) -> Tensor:
    """The weight a packed NF4 tensor stands for, in the dtype it was quantized from (by the checked backend)."""
    backend = nf4_backend(packed.device.type)
    if backend == "bitsandbytes":
        return _bnb_dequantize(packed, state, as_rows=False)
    if backend == "bitsandbytes-rows" and torch.Size(state.shape).numel() % state.blocksize == 0:
        return _bnb_dequantize(packed, state, as_rows=True)
    return dequantize_nf4_reference(packed, state)


# -- modules -----------------------------------------------------------------------------------------
class _NF4Matmul(torch.autograd.Function):
    """x W^T (+ b) with W dequantized from NF4 in the forward and again in the backward (nothing weight-sized kept)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, module: _NF4Base, bias: Tensor | None) -> Tensor:
        ctx.module = module
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, module.dequantized().to(x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        with torch.autocast(grad.device.type, enabled=False):
            return grad @ ctx.module.dequantized().to(grad.dtype), None, None


class _NF4Base:
    """Mixin: the base weight is packed NF4 (frozen), one QuantState per projection; W0 x through `_NF4Matmul`.

    `weight` holds the projections' packed bytes one after another (q, k, v for qkv_proj), so the parameter keeps
    its name; `quant_states[i]` and `packed_sizes[i]` describe projection i."""

    def quantize(self, rows: list[int]) -> None:
        """Replace the full-precision weight by NF4, each block of `rows` output rows (one projection) on its own."""
        w = self.weight
        self.compute_dtype = compute_dtype(w.device.type)
        nf4_backend(w.device.type)  # check bitsandbytes (and say which path is used) before the first weight
        parts = [quantize_nf4(piece) for piece in w.detach().to(self.compute_dtype).split(rows, dim=0)]
        self.quant_states = [state for _, state in parts]
        self.packed_sizes = [packed.shape[0] for packed, _ in parts]
        self.weight = nn.Parameter(torch.cat([packed for packed, _ in parts]), requires_grad=False)  # same name

    def dequantized(self) -> Tensor:
        pieces = self.weight.split(self.packed_sizes, dim=0)
        return torch.cat([dequantize_nf4(p, s) for p, s in zip(pieces, self.quant_states)])

    def base_forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return _NF4Matmul.apply(x.to(self.compute_dtype), self, bias).to(x.dtype)


class Linear4bit(_NF4Base, nn.Module):
    """A frozen nn.Linear stored in NF4 (the block projections QLoRA does not adapt)."""

    def __init__(self, base: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.base_forward(x)


class LoRALinear4bit(_NF4Base, LoRALinear):
    """LoRALinear whose frozen base weight is NF4; cannot merge (merge into the full-precision base instead)."""

    def merge(self, sign: float = 1.0) -> None:
        raise LLMLabError("a QLoRA model's 4-bit base cannot take a merged adapter; merge the saved adapter into the "
                          "full-precision checkpoint with `llmlab merge`")


def quantize_blocks(model: nn.Module) -> nn.Module:
    """Store every linear layer inside the blocks in NF4, in place: plain nn.Linear modules become Linear4bit,
    LoRALinear4bit modules quantize their base weight; a fused module quantizes each of its projections alone."""
    for block in model.model.layers:
        for name, module in list(block.named_modules()):
            if type(module) is nn.Linear:
                parent, _, attr = name.rpartition(".")
                module = Linear4bit(module)
                setattr(block.get_submodule(parent) if parent else block, attr, module)
            if isinstance(module, _NF4Base):
                spans = projection_slices(model, name.rpartition(".")[2])
                module.quantize([hi - lo for lo, hi in spans])
    return model


class QLoRA(LoRA):
    """LoRA on a base model whose block weights are NF4 (double-quantized); saves a normal PEFT adapter."""

    name = "qlora"

    def __init__(self, config: LoRAConfig | None = None, base_model: str | None = None) -> None:
        super().__init__(config, base_model)
        _bnb()

    def prepare(self, model: nn.Module) -> nn.Module:
        apply_lora(model, self.config, cls=LoRALinear4bit)
        quantize_blocks(model)
        set_trainable(model, self.params(model))
        return model
