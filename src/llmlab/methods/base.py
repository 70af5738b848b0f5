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
        """Scalar loss of a batch (`input_ids`, `labels`, optional `position_ids`); `model` may be wrapped."""
        logits = model(batch["input_ids"], position_ids=batch.get("position_ids"))
        return next_token_loss(logits, batch["labels"])

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
