"""Partial fine-tuning: the bottom blocks stay frozen; the top N blocks (and optionally the final norm, the output
head, or any named modules) train. The notebook's "freeze the lower layers" recipe: the lower layers hold general
features, the top ones adapt to the task at a fraction of the optimizer memory. Saves a full HF-format model."""

from __future__ import annotations

from torch import nn

from llmlab.args import FreezeConfig
from llmlab.errors import LLMLabError
from llmlab.methods.full import Full


def trainable_prefixes(model: nn.Module, config: FreezeConfig) -> list[str]:
    """Name prefixes of the parameters that train under `config`, checked against the model."""
    n_layers = len(model.model.layers)
    if not isinstance(config.top_blocks, int) or not 0 <= config.top_blocks <= n_layers:
        raise LLMLabError(f"freeze option 'top_blocks' must be between 0 and the model's {n_layers} blocks, got "
                          f"{config.top_blocks!r}")
    prefixes = [f"model.layers.{i}." for i in range(n_layers - config.top_blocks, n_layers)]
    prefixes += ["model.norm."] * config.train_norm + ["lm_head."] * config.train_head
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for module in config.modules or []:
        prefix = module.rstrip(".") + "."
        if not any(n.startswith(prefix) for n in names):
            raise LLMLabError(f"freeze option 'modules': '{module}' matches no module of the model (names look like "
                              "model.embed_tokens, model.layers.0.mlp, lm_head)")
        prefixes.append(prefix)
    if not prefixes:
        raise LLMLabError("freeze options leave nothing to train: set top_blocks > 0, train_norm, train_head or "
                          "modules")
    return prefixes


class Freeze(Full):
    """Train only the top blocks (and the chosen extra modules); everything else keeps its pretrained weights."""

    name = "freeze"
    option_group = "freeze"

    def __init__(self, config: FreezeConfig | None = None) -> None:
        self.config = config or FreezeConfig()

    def prepare(self, model: nn.Module) -> nn.Module:
        prefixes = tuple(trainable_prefixes(model, self.config))
        model.requires_grad_(False)
        for name, p in model.named_parameters(remove_duplicate=False):
            if name.startswith(prefixes):
                p.requires_grad_(True)
        return model
