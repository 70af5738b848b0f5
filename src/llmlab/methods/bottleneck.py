"""Bottleneck adapters (Houlsby et al. 2019), `--method adapter`: a small residual MLP x + up(act(down(x))) on the
output of each block's attention and of its MLP, before the residual add. The base model stays frozen; the
up-projection starts at zero, so training starts exactly from the base model.

The adapters wrap `self_attn.o_proj` and `mlp.down_proj` in place (`AdaptedLinear`), keeping the base `weight`
name, so a base checkpoint still loads. An adapter is not linear in the input and cannot be merged into W; it
is saved alone as an llmlab adapter folder (adapter_config.json with `adapter_type: bottleneck` +
adapter_model.safetensors with HF module names), which `llmlab.methods.load_adapter` puts back on its base model.
The folder plumbing (files, base probe, loading) is `llmlab.methods.adapters`'.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.args import BottleneckConfig
from llmlab.methods.adapters import (
    BOTTLENECK,
    AdapterFiles,
    AddedModulesMethod,
    base_model_reference,
    is_float_linear,
    read_adapter_files,
    wrap_linear,
    write_adapter_files,
)

_ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}
_WRAPPED = (("self_attn", "o_proj"), ("mlp", "down_proj"))


class AdaptedLinear(nn.Module):
    """A linear layer followed by a residual bottleneck: y = W x + b; y + up(act(down(y))). The base is an nn.Linear
    (its `weight` and `bias` kept under the same names) or a quantized layer (GGUF blocks), kept whole as `base`."""

    def __init__(self, base: nn.Module, dim: int, activation: str = "gelu") -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        if is_float_linear(base):
            self.weight, self.bias = base.weight, base.bias
            dev, dt = base.weight.device, base.weight.dtype
        else:
            self.base = base
            dev, dt = base.device, torch.float32  # trainable parameters in fp32 (autocast casts them per matmul)
        self.adapter_down = nn.Linear(self.out_features, dim, device=dev, dtype=dt)
        self.adapter_up = nn.Linear(dim, self.out_features, device=dev, dtype=dt)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.activation = activation

    def adapter_params(self) -> list[str]:
        """The bottleneck's parameters (the base weight and bias stay frozen)."""
        return ["adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias"]

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x) if "base" in self._modules else F.linear(x, self.weight, self.bias)
        h = self.adapter_down(y if torch.is_autocast_enabled(y.device.type) else y.to(self.adapter_down.weight.dtype))
        return y + self.adapter_up(_ACTIVATIONS[self.activation](h)).to(y.dtype)


def apply_bottleneck(model: nn.Module, config: BottleneckConfig) -> nn.Module:
    """Wrap o_proj and down_proj of every block with a bottleneck adapter, in place."""
    config.validate()
    for block in model.model.layers:
        for parent_name, attr in _WRAPPED:
            wrap_linear(getattr(block, parent_name), attr,
                        lambda base: AdaptedLinear(base, config.dim, config.activation))
    return model


class Bottleneck(AddedModulesMethod):
    """Train bottleneck adapters after attention and MLP; the base model stays frozen; saves the adapters alone."""

    name = "adapter"
    option_group = "bottleneck"
    config_class = BottleneckConfig
    kind = BOTTLENECK
    module_class = AdaptedLinear

    def apply(self, model: nn.Module) -> None:
        apply_bottleneck(model, self.config)

    def write(self, folder: Path, tensors: dict[str, Tensor], tokenizer: Any,
              extra_files: Callable[[Path], None] | None, probe: str) -> Path:
        config = {"adapter_type": BOTTLENECK, "library": "llmlab", "dim": self.config.dim,
                  "activation": self.config.activation,
                  "base_model_name_or_path": base_model_reference(self.base_model)}
        return write_adapter_files(folder, tensors, config, probe, tokenizer, extra_files)  # same names as HF's

    @classmethod
    def from_folder(cls, folder: str | Path) -> tuple[Bottleneck, AdapterFiles]:
        files = read_adapter_files(folder, BOTTLENECK)
        raw = files.config
        config = BottleneckConfig(dim=int(raw.get("dim", 0)), activation=str(raw.get("activation", "gelu")))
        return cls(config, base_model=files.base_model), files
