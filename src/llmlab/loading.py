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
from llmlab.methods import load_adapter
from llmlab.model import LLaMA
from llmlab.tokenizer import Tokenizer


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when available, else CPU; otherwise a torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise LLMLabError(f"--device: '{name}' is not a device (expected auto, cpu, cuda or cuda:N)") from e


def load_for_inference(folder: str | Path, adapters: Sequence[str | Path] = (), *, device: str = "auto",
                       dtype: str = "auto") -> tuple[LLaMA, Tokenizer, dict[str, Any]]:
    """Model (eval mode), tokenizer and generation config of an HF-format checkpoint folder.

    Args:
        folder: The checkpoint folder.
        adapters: Adapter folders (PEFT LoRA, llmlab bottleneck) to put on the model, unmerged, in this order.
        device: auto (CUDA when available, else CPU), cpu, cuda or cuda:N.
        dtype: The weights' dtype: auto (bfloat16 on CUDA, float32 elsewhere), float32, bfloat16 or float16.
    Options after `adapters` are keyword-only, so that more of them slot in without touching the callers.
    """
    dev = resolve_device(device)
    torch_dtype = dtype_from_name(dtype, dev)
    model = load_checkpoint(folder, device=dev, dtype=torch_dtype)
    for adapter in adapters:
        load_adapter(model, adapter)
    return model, Tokenizer.from_folder(folder), load_generation_config(folder)
