"""Training methods: how a model is prepared for the one training loop, and what it saves.

A method is a small object (`Method`) that the loop calls at fixed points:
    prepare(model)               once, before wrapping and the optimizer: freeze, swap modules, ...
    trainable_parameters(model)  the (name, parameter) pairs the optimizer updates
    loss(model, batch)           the scalar training loss of a batch (default: next-token cross-entropy)
    save(model, folder, ...)     what a checkpoint and RUN_DIR/final hold (full: an HF-format model folder)
    load_state(model, folder)    read back what `save` wrote, to resume a run
    model_config(model)          the model's config as JSON, stored in checkpoints to check a resume
Pretraining and full fine-tuning use `Full`; partial fine-tuning, adapters, LoRA, QLoRA and distillation
are further subclasses.
"""

from llmlab.methods.adapter import Adapter
from llmlab.methods.base import IGNORE_INDEX, Method, next_token_loss, state_dict_to_model
from llmlab.methods.freeze import Freeze
from llmlab.methods.full import Full
from llmlab.methods.lora import LoRA

__all__ = ["IGNORE_INDEX", "Adapter", "Freeze", "Full", "LoRA", "Method", "next_token_loss", "state_dict_to_model"]
