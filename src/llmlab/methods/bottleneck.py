"""Bottleneck adapters (Houlsby et al. 2019): a small residual MLP x + up(act(down(x))) on the output of each
block's attention and of its MLP, before the residual add. The base model stays frozen; the up-projection starts
at zero, so training starts exactly from the base model.

The adapters wrap `self_attn.o_proj` and `mlp.down_proj` in place (`AdaptedLinear`), keeping the base `weight`
name, so a base checkpoint still loads. An adapter is not linear in the input and cannot be merged into W; it
is saved alone as an llmlab adapter folder (adapter_config.json with `adapter_type: bottleneck` +
adapter_model.safetensors with HF module names), which `load_adapter` puts back on its base model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.args import BottleneckConfig
from llmlab.errors import LLMLabError
from llmlab.methods.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PROBE_KEY,
    AddedModulesMethod,
    check_base,
    read_safetensors,
)

ADAPTER_TYPE = "bottleneck"
_ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}
_WRAPPED = (("self_attn", "o_proj"), ("mlp", "down_proj"))


class AdaptedLinear(nn.Module):
    """nn.Linear followed by a residual bottleneck: y = W x + b; y + up(act(down(y)))."""

    def __init__(self, base: nn.Linear, dim: int, activation: str = "gelu") -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        dev, dt = base.weight.device, base.weight.dtype
        self.adapter_down = nn.Linear(self.out_features, dim, device=dev, dtype=dt)
        self.adapter_up = nn.Linear(dim, self.out_features, device=dev, dtype=dt)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y + self.adapter_up(_ACTIVATIONS[self.activation](self.adapter_down(y)))


def apply_adapters(model: nn.Module, config: BottleneckConfig) -> nn.Module:
    """Wrap o_proj and down_proj of every block with a bottleneck adapter, in place."""
    config.validate()
    for block in model.model.layers:
        for parent_name, attr in _WRAPPED:
            parent = getattr(block, parent_name)
            base = getattr(parent, attr)
            if isinstance(base, AdaptedLinear):
                raise LLMLabError("the model already has bottleneck adapters")
            setattr(parent, attr, AdaptedLinear(base, config.dim, config.activation))
    return model


def adapter_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The adapters' parameters, with their names: what trains and what saves."""
    return [(n, p) for n, p in model.named_parameters() if ".adapter_down." in n or ".adapter_up." in n]


def set_trainable(model: nn.Module) -> None:
    """Freeze everything but the adapters."""
    model.requires_grad_(False)
    for _, p in adapter_params(model):
        p.requires_grad_(True)


def save_adapters(folder: str | Path, tensors: dict[str, Tensor], config: BottleneckConfig,
                  base_model: str | None = None, tokenizer: Any = None,
                  extra_files: Callable[[Path], None] | None = None, probe: str | None = None) -> Path:
    """Write an adapter folder atomically (the names are the same in llmlab and HF naming)."""
    from safetensors.torch import save_file

    from llmlab.checkpoint import atomic_folder, write_json
    with atomic_folder(folder) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt", **({PROBE_KEY: probe} if probe else {})})
        write_json(tmp / ADAPTER_CONFIG, {"adapter_type": ADAPTER_TYPE, "library": "llmlab", "dim": config.dim,
                                          "activation": config.activation, "base_model_name_or_path": base_model})
        if tokenizer is not None:
            tokenizer.save(tmp)
        if extra_files is not None:
            extra_files(tmp)
    return Path(folder)


def read_adapters(folder: str | Path) -> tuple[BottleneckConfig, dict[str, Any], dict[str, Tensor]]:
    """(config, raw adapter_config.json + `_metadata` of the weights file, tensors) of a bottleneck adapter folder."""
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LLMLabError(f"{path}: cannot read the adapter config: {e}") from e
    if not isinstance(raw, dict) or raw.get("adapter_type") != ADAPTER_TYPE:
        raise LLMLabError(f"{path}: not a bottleneck adapter (adapter_type '{ADAPTER_TYPE}')")
    config = BottleneckConfig(dim=int(raw.get("dim", 0)), activation=str(raw.get("activation", "gelu")))
    config.validate()
    tensors, raw["_metadata"] = read_safetensors(folder / ADAPTER_WEIGHTS, with_metadata=True)
    return config, raw, tensors


def load_adapters(model: nn.Module, folder: str | Path) -> nn.Module:
    """Put the bottleneck adapters of `folder` on `model`; checks they fit it."""
    config, raw, tensors = read_adapters(folder)
    check_base(model, raw["_metadata"], folder, raw.get("base_model_name_or_path"))
    apply_adapters(model, config)
    expected = dict(adapter_params(model))
    bad = sorted(set(expected) ^ set(tensors)) + sorted(k for k in set(expected) & set(tensors)
                                                         if tensors[k].shape != expected[k].shape)
    if bad:
        raise LLMLabError(f"{folder}: the adapter does not fit this model (tensors {bad[:3]} missing, unexpected or "
                          f"of another shape; it was made for base model {raw.get('base_model_name_or_path')!r})")
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(tensors[k].to(p.dtype))
            p.requires_grad_(False)
    return model


class Adapter(AddedModulesMethod):
    """Train bottleneck adapters after attention and MLP; the base model stays frozen; saves the adapters alone."""

    name = "adapter"
    config_class = BottleneckConfig

    def apply(self, model: nn.Module) -> None:
        apply_adapters(model, self.config)

    def params(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return adapter_params(model)

    def write(self, folder: Path, tensors: dict[str, Tensor], tokenizer: Any,
              extra_files: Callable[[Path], None] | None, probe: str) -> Path:
        return save_adapters(folder, tensors, self.config, self.base_model, tokenizer, extra_files, probe)

    def read(self, folder: Path) -> tuple[Any, dict[str, Any], dict[str, Tensor]]:
        return read_adapters(folder)
