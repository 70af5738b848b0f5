"""Loading a checkpoint to run it: the one function (`load_for_inference`) that `generate`, `chat`, `serve`,
`evaluate` and the lm-evaluation-harness adapter call to get a model on its device in its dtype, with its adapters,
its tokenizer and its generation config; `load_for_generation` adds what the generate, chat and evaluate commands
need besides (sampling parameters, EOS ids, stop strings, the speculative-decoding draft). Training loads through
`llmlab.checkpoint.load_checkpoint` instead (its own device and precision rules live in `llmlab.train`).

It also owns the fast path's defaults, so every command that runs a model gets the same one (`docs/benchmarks.md`
has the measurements behind them):
- `quantize="auto"` (`weights_source`): a GGUF file, or a folder that keeps the GGUF it was imported from
  (`gguf_import.kept_gguf`), runs on the file's own quantized blocks (`llmlab.quantized`: a quarter of bf16's bytes,
  the fastest decoding on AVX-512 and AVX2 CPUs alike); any other folder runs on its own float weights, which are
  never quantized unless asked (`--quantize int8|int4`): a fine-tuned model stays what was trained. On CUDA a folder
  always runs on its float weights (the quantized kernels are CPU kernels).
- `dtype="auto"` (`checkpoint.default_dtype`): bfloat16 on CUDA and on a CPU that computes bf16 natively (AVX-512
  BF16, AMX: `hardware.native_bf16`), float32 elsewhere, where bf16 arithmetic is emulated and slower than fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llmlab.checkpoint import dtype_from_name, load_checkpoint, load_generation_config
from llmlab.errors import LLMLabError
from llmlab.gguf_import import kept_gguf
from llmlab.methods import load_adapter
from llmlab.model import LLaMA
from llmlab.packed_cache import load_gguf_cached
from llmlab.quantized import QUANTIZE_MODES, quantize_model
from llmlab.tokenizer import Tokenizer

QUANTIZE_CHOICES = ("auto", "none", *QUANTIZE_MODES)


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when available, else CPU; otherwise a torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise LLMLabError(f"--device: '{name}' is not a device (expected auto, cpu, cuda or cuda:N)") from e


def weights_source(path: str | Path, quantize: str, device: torch.device) -> tuple[str, Path | None]:
    """Which weights `load_for_inference` runs: ("gguf", file) for a GGUF's own blocks, ("float", None) for a
    folder's float weights, ("int8" | "int4", None) for a folder's weights quantized at load (see the module
    docstring for what `auto` chooses)."""
    if quantize not in QUANTIZE_CHOICES:
        raise LLMLabError(f"--quantize: expected one of {', '.join(QUANTIZE_CHOICES)}, got '{quantize}'")
    path = Path(path)
    if path.is_file():
        if quantize != "auto":  # none too: silently running the blocks anyway would not be what was asked
            raise LLMLabError(f"--quantize {quantize}: {path} is a GGUF file, which runs on its own quantization; "
                              "--quantize applies to HF-format checkpoint folders (`llmlab convert` makes one)")
        return "gguf", path
    if quantize in QUANTIZE_MODES:
        return quantize, None
    kept = kept_gguf(path) if quantize == "auto" and device.type == "cpu" else None
    return ("gguf", kept) if kept is not None else ("float", None)


def load_for_inference(path: str | Path, adapters: Sequence[str | Path] = (), *, device: str = "auto",
                       dtype: str = "auto", quantize: str = "auto",
                       kernel: str = "auto") -> tuple[LLaMA, Tokenizer, dict[str, Any]]:
    """Model (eval mode), tokenizer and generation config of an HF-format checkpoint folder or a GGUF file.

    Args:
        path: The checkpoint folder, or a GGUF file (loaded with its quantized tensors kept in their block formats,
            `llmlab.quantized`).
        adapters: Adapter folders (PEFT LoRA, llmlab bottleneck) to put on the model, unmerged, in this order.
        device: auto (CUDA when available, else CPU), cpu, cuda or cuda:N.
        dtype: The dtype of the float weights and activations: auto (bfloat16 on CUDA and on CPUs that compute it
            natively, float32 elsewhere), float32, bfloat16 or float16.
        quantize: auto (a GGUF file, or a folder keeping the GGUF it was imported from, runs on the GGUF's blocks;
            other folders on their float weights), none (a folder's float weights), int8 or int4 (quantize a
            folder's float weights, `quantize_model`). A GGUF file takes auto only.
        kernel: The quantized matmul kernel (auto: measured on this machine, `llmlab.quant_kernels`).
    Options after `adapters` are keyword-only, so that more of them slot in without touching the callers.
    """
    dev = resolve_device(device)
    torch_dtype = dtype_from_name(dtype, dev, bf16_if_native=True)
    source, gguf = weights_source(path, quantize, dev)
    path = Path(path)
    if source == "gguf":
        model, tokenizer, gen_config = load_gguf_cached(gguf, dev, torch_dtype, kernel)  # CPU: packed once
        if path.is_dir():  # the folder's own tokenizer and generation config, as for its float weights
            tokenizer, gen_config = Tokenizer.from_folder(path), load_generation_config(path)
    else:
        if source == "float":
            model = load_checkpoint(path, device=dev, dtype=torch_dtype)
        else:
            model = quantize_model(load_checkpoint(path, device=dev), source, kernel=kernel).to(torch_dtype)
        tokenizer, gen_config = Tokenizer.from_folder(path), load_generation_config(path)
    for adapter in adapters:
        load_adapter(model, adapter)
    return model, tokenizer, gen_config


def load_for_generation(checkpoint: Path, dtype: str, quantize: str, device: str, temperature: float | None,
                         top_k: int | None, top_p: float | None, repetition_penalty: float | None, seed: int | None,
                         stop: str | list[str] | None, adapter: Path | None = None, draft: Path | None = None,
                         draft_tokens: int = 4) -> tuple:
    """Model (with its adapter, if any), tokenizer, sampling parameters, EOS ids, stop strings and the speculative
    decoding draft (None without --draft) for the `generate`, `chat` and `evaluate` commands; a bad
    --draft or --draft-tokens is reported before anything is loaded."""
    from llmlab.generate import SamplingParams, eos_token_ids
    from llmlab.speculative import check_draft_options, load_draft

    stops = [stop] if isinstance(stop, str) else list(stop or [])
    check_draft_options(draft, draft_tokens)  # before loading anything
    model, tokenizer, gen_config = load_for_inference(checkpoint, [adapter] if adapter else [], device=device,
                                                      dtype=dtype, quantize=quantize)
    sampling = SamplingParams.from_generation_config(gen_config, temperature=temperature, top_k=top_k, top_p=top_p,
                                                     repetition_penalty=repetition_penalty, seed=seed)
    drafter = None
    if draft is not None:
        drafter = load_draft(draft, model, tokenizer, draft_tokens, dtype=dtype)
    return model, tokenizer, sampling, eos_token_ids(tokenizer, gen_config), stops, drafter
