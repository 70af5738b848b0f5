"""Training methods: how a model is prepared for the one training loop, and what it saves; and the registry that maps
method names and adapter kinds to their classes.

A method is a small object (`Method`, methods/base.py) that the loop calls at fixed points:
    prepare(model)               once, before wrapping and the optimizer: freeze, swap modules, ...
    trainable_parameters(model)  the (name, parameter) pairs the optimizer updates
    loss(model, batch)           the scalar training loss of a batch (default: next-token cross-entropy)
    save(model, folder, ...)     what a checkpoint and RUN_DIR/final hold (full: an HF-format model folder)
    load_state(model, folder)    read back what `save` wrote, to resume a run
    model_config(model)          the model's config as JSON, stored in checkpoints to check a resume
Pretraining and full fine-tuning use `Full`; partial fine-tuning (`Freeze`), bottleneck adapters (`Bottleneck`),
`LoRA`, `QLoRA` and distillation are further subclasses. The adapter methods share `AddedModulesMethod` and the
adapter folder code of methods/adapters.py.

`METHODS` (name -> class, the names of `llmlab finetune --method`) and `ADAPTER_KINDS` (adapter folder kind -> the
class that reads it) are the registry; `make_method` and `load_adapter` go through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from llmlab.args import BottleneckConfig, FreezeConfig, LoRAConfig
from llmlab.errors import LLMLabError
from llmlab.methods.adapters import BOTTLENECK, LORA, AddedModulesMethod, adapter_kind
from llmlab.methods.base import Method, state_dict_to_model
from llmlab.methods.bottleneck import Bottleneck
from llmlab.methods.freeze import Freeze
from llmlab.methods.full import Full
from llmlab.methods.lora import LoRA
from llmlab.methods.qlora import QLoRA

__all__ = ["ADAPTER_KINDS", "METHODS", "AddedModulesMethod", "Bottleneck", "Freeze", "Full", "LoRA", "Method",
           "QLoRA", "load_adapter", "make_method", "state_dict_to_model"]

# the same names, in the same order, as llmlab.args.METHOD_NAMES (which the command line reads without torch)
METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Full, Freeze, Bottleneck, LoRA, QLoRA)}
ADAPTER_KINDS: dict[str, type[AddedModulesMethod]] = {LORA: LoRA, BOTTLENECK: Bottleneck}


def make_method(name: str, base_model: str | None = None, lora: LoRAConfig | None = None,
                freeze: FreezeConfig | None = None, bottleneck: BottleneckConfig | None = None) -> Method:
    """The training method called `name`, configured from its option group (`--lora.*`, `--freeze.*`,
    `--bottleneck.*`); `base_model` names the checkpoint it starts from, recorded in adapter folders."""
    if name not in METHODS:
        raise LLMLabError(f"--method must be one of {', '.join(METHODS)}, got {name!r}")
    cls = METHODS[name]
    config = {"lora": lora, "freeze": freeze, "bottleneck": bottleneck}.get(cls.option_group or "")
    if issubclass(cls, AddedModulesMethod):
        return cls(config, base_model=base_model)
    return cls(config) if cls.option_group else cls()


def load_adapter(model: nn.Module, folder: str | Path) -> Any:
    """Put the adapter of `folder` (a PEFT LoRA folder or llmlab bottleneck adapters) on `model`, unmerged and
    frozen, after checking it was made for this model; returns the model."""
    return ADAPTER_KINDS[adapter_kind(folder)].load(model, folder)
