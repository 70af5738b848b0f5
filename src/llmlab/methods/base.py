"""The `Method` base class and the default next-token loss (see `llmlab.methods`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100  # labels with this value carry no loss (e.g. the prompt of an instruction example)


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of logits (B, T, V) against labels (B, T), skipping labels equal to IGNORE_INDEX.

    Labels are already aligned with the logits (label t is the token after input t); the loss is computed in
    fp32 whatever the autocast dtype of the logits.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1), ignore_index=IGNORE_INDEX)


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

    def prepare(self, model: nn.Module) -> nn.Module:
        """Make `model` ready to train (set requires_grad, swap modules) and return it."""
        return model

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The parameters the optimizer updates, with their names (the names key the optimizer state on disk)."""
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Scalar loss of a batch (`input_ids`, `labels`, optional `position_ids` and `mask` or `segment_ids` of
        packed examples); `model` may be wrapped."""
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
    from llmlab.model import LLaMA

    with torch.device("meta"):
        model = LLaMA(config)
    model.load_state_dict(state_dict, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model
