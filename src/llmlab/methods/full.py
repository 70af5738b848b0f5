"""Full training: every parameter trains (pretraining, full fine-tuning); saves an HF-format model folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from llmlab.checkpoint import hf_to_llmlab, load_safetensors, save_checkpoint
from llmlab.methods.base import Method, state_dict_to_model


class Full(Method):
    """Train all parameters of the model."""

    name = "full"

    def prepare(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def save(self, model: nn.Module, folder: Path, tokenizer: Any = None, state_dict: dict[str, Tensor] | None = None,
             extra_files: Callable[[Path], None] | None = None) -> Path:
        if state_dict is not None:
            model = state_dict_to_model(model.config, state_dict)
        return save_checkpoint(model, folder, tokenizer=tokenizer, extra_files=extra_files)

    def load_state(self, model: nn.Module, folder: Path) -> dict[str, Tensor]:
        sd = hf_to_llmlab(load_safetensors(folder), model.config)
        if model.config.tie_word_embeddings and "model.embed_tokens.weight" in sd:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        return sd
