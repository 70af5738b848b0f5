"""The `Method` base class (see `llmlab.methods`), with the helpers methods share: a batch's model inputs
(`model_inputs`), the module inside DDP/compile wrappers (`unwrap`), a model around a state dict
(`state_dict_to_model`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmlab.losses import next_token_loss
from llmlab.model import LLaMA


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        inner = getattr(model, "module", None) if inner is None else inner
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor | None]:
    """The model's keyword inputs of a batch: RoPE `position_ids` and an attention `mask`, which packed batches
    give as `segment_ids` (a block-diagonal causal mask keeps each example's attention to itself)."""
    mask = batch.get("mask")
    if mask is None and "segment_ids" in batch:
        seg = batch["segment_ids"]
        causal = torch.ones(seg.shape[-1], seg.shape[-1], dtype=torch.bool, device=seg.device).tril()
        mask = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]  # (B, 1, T, T)
    return {"position_ids": batch.get("position_ids"), "mask": mask}


class Method:
    """Base class of training methods; the defaults train every parameter with next-token cross-entropy."""

    name = "base"
    option_group: str | None = None  # the command-line option group that configures it (`--lora.*`: "lora")
    saves_frozen = True  # its checkpoints hold the frozen weights too (False: they may be kept in bf16, see train)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Make `model` ready to train (set requires_grad, swap modules) and return it."""
        return model

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The parameters the optimizer updates, with their names (the names key the optimizer state on disk)."""
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Scalar loss of a batch (`input_ids`, `labels`, optional `position_ids` and `mask` or `segment_ids` of
        packed examples); `model` may be wrapped.

        A model that computes its own loss from `labels` (the LLaMA: chunked head + cross-entropy, no full logits
        tensor) is called with them, inside its forward so that DDP, FSDP and compile see the head's weight used;
        other models (the LSTM) return logits for `next_token_loss`."""
        if getattr(unwrap(model), "fused_loss", False):
            return model(batch["input_ids"], labels=batch["labels"], **model_inputs(batch))
        return next_token_loss(model(batch["input_ids"], **model_inputs(batch)), batch["labels"])

    def model_config(self, model: nn.Module) -> dict[str, Any]:
        """The model's config as JSON data; training checkpoints store it so that a resume checks the model is the
        same (default: the LLaMA's HF config.json contents)."""
        return model.config.to_hf_dict()

    def save(self, model: nn.Module, folder: Path, tokenizer: Any = None, state_dict: dict[str, Tensor] | None = None,
             extra_files: Callable[[Path], None] | None = None) -> Path:
        """Write what this method trained into `folder`, atomically; `extra_files(tmp)` adds files to it.

        `state_dict` is the model's full (unsharded, CPU) state dict with llmlab names; under FSDP it is the only
        complete copy of the weights.
        """
        raise NotImplementedError

    def load_state(self, model: nn.Module, folder: Path) -> dict[str, Tensor]:
        """The llmlab-named tensors that `save` wrote into `folder`, to load into `model` on resume."""
        raise NotImplementedError


def state_dict_to_model(config: Any, state_dict: dict[str, Tensor]) -> nn.Module:
    """A LLaMA holding `state_dict`'s tensors without copying them (built on the meta device)."""
    with torch.device("meta"):
        model = LLaMA(config)
    model.load_state_dict(state_dict, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model
