"""Loading a checkpoint to run it: the one function (`load_for_inference`) that `generate`, `chat`, `serve`,
`evaluate` and the lm-evaluation-harness adapter call to get a model on its device in its dtype, with its adapters,
its tokenizer and its generation config. Training loads through `llmlab.checkpoint.load_checkpoint` instead (its own
device and precision rules live in `llmlab.train`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llmlab.checkpoint import dtype_from_name, load_checkpoint, load_generation_config
from llmlab.errors import LLMLabError
from llmlab.gguf_import import load_gguf_quantized
from llmlab.methods import load_adapter
from llmlab.model import LLaMA
from llmlab.quantized import QUANTIZE_MODES, quantize_model
from llmlab.tokenizer import Tokenizer


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when available, else CPU; otherwise a torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise LLMLabError(f"--device: '{name}' is not a device (expected auto, cpu, cuda or cuda:N)") from e


def load_for_inference(path: str | Path, adapters: Sequence[str | Path] = (), *, device: str = "auto",
                       dtype: str = "auto", quantize: str | None = None, kernel: str = "auto",
                       bf16_if_native: bool = False) -> tuple[LLaMA, Tokenizer, dict[str, Any]]:
    """Model (eval mode), tokenizer and generation config of an HF-format checkpoint folder or a GGUF file.

    Args:
        path: The checkpoint folder, or a GGUF file (loaded with its quantized tensors kept in their block formats,
            `llmlab.quantized`).
        adapters: Adapter folders (PEFT LoRA, llmlab bottleneck) to put on the model, unmerged, in this order.
        device: auto (CUDA when available, else CPU), cpu, cuda or cuda:N.
        dtype: The weights' dtype: auto (bfloat16 on CUDA, float32 elsewhere), float32, bfloat16 or float16.
        quantize: int8 or int4: quantize a folder's float weights the same way (`quantize_model`).
        kernel: The quantized matmul kernel (auto: measured on this machine, `llmlab.quant_kernels`).
        bf16_if_native: Make dtype auto mean bfloat16 on a CPU that computes it natively (`llmlab.hardware`).
    Options after `adapters` are keyword-only, so that more of them slot in without touching the callers.
    """
    dev = resolve_device(device)
    torch_dtype = dtype_from_name(dtype, dev, bf16_if_native)
    path = Path(path)
    if path.is_file():
        if quantize is not None:
            raise LLMLabError(f"--quantize {quantize}: {path} is a GGUF file, which keeps its own quantization; "
                              "--quantize applies to HF-format checkpoint folders")
        model, tokenizer, gen_config = load_gguf_quantized(path, dev, torch_dtype, kernel)
    else:
        if quantize is None:
            model = load_checkpoint(path, device=dev, dtype=torch_dtype)
        elif quantize not in QUANTIZE_MODES:
            raise LLMLabError(f"--quantize: expected one of {', '.join(QUANTIZE_MODES)}, got '{quantize}'")
        else:
            model = quantize_model(load_checkpoint(path, device=dev), quantize, kernel=kernel).to(torch_dtype)
        tokenizer, gen_config = Tokenizer.from_folder(path), load_generation_config(path)
    for adapter in adapters:
        load_adapter(model, adapter)
    return model, tokenizer, gen_config
