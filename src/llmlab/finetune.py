"""Fine-tuning a checkpoint on instruction data through the one training loop, and merging LoRA adapters.

`finetune` = load an HF-format checkpoint + its tokenizer, read the instruction data (`llmlab.instruct`), pick
a method (`llmlab.methods.make_method`, the registry), and run `llmlab.train.train`. RUN_DIR/final is what the
method saves: a full model folder (full, freeze), a bottleneck adapter folder (adapter) or a PEFT LoRA folder (lora,
qlora). `merge` folds a LoRA adapter into its base checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

from llmlab.args import BottleneckConfig, FreezeConfig, LoRAConfig, TrainConfig
from llmlab.checkpoint import (
    dtype_from_name,
    load_checkpoint,
    load_generation_config,
    output_folder,
    save_checkpoint,
)
from llmlab.errors import LLMLabError
from llmlab.instruct import InstructDataset
from llmlab.methods import LoRA, make_method
from llmlab.methods.adapters import BOTTLENECK, adapter_kind
from llmlab.methods.lora import merge_and_unload
from llmlab.tokenizer import Tokenizer
from llmlab.train import train


def finetune(checkpoint: str | Path, data: str | Path, out: str | Path, method: str = "lora",
             config: TrainConfig | None = None, lora: LoRAConfig | None = None, freeze: FreezeConfig | None = None,
             bottleneck: BottleneckConfig | None = None, val_data: str | Path | None = None,
             val_fraction: float = 0.1, template: str = "auto", pack: bool = False,
             resume: str | Path | None = "auto") -> Path:
    """Fine-tune CHECKPOINT on instruction data into RUN_DIR; returns RUN_DIR (final/ when the run finished)."""
    cfg = config or TrainConfig()
    cfg.validate()
    trainer = make_method(method, str(checkpoint), lora, freeze, bottleneck)
    model = load_checkpoint(checkpoint)
    if cfg.seq_len > model.config.max_position_embeddings:
        raise LLMLabError(f"training option seq_len {cfg.seq_len} exceeds the context of {checkpoint} "
                          f"({model.config.max_position_embeddings}, max_position_embeddings)")
    tokenizer = Tokenizer.from_folder(checkpoint)
    dataset = InstructDataset(data, tokenizer, cfg.seq_len, val_fraction=val_fraction, seed=cfg.seed, pack=pack,
                              template=template, val_path=val_data)
    print(f"llmlab: {data}: {dataset.stats.summary()}", file=sys.stderr)
    result = train(model, trainer, dataset, cfg, out, tokenizer=tokenizer, resume=resume)
    if result.final is not None:
        print(f"saved {result.final} (step {result.step})", file=sys.stderr)
    return Path(out)


def merge(checkpoint: str | Path, adapter: str | Path, out: str | Path, dtype: str | None = None,
          overwrite: bool = False) -> Path:
    """Write CHECKPOINT with the LoRA adapter folded into its weights, as an HF-format folder (no adapter needed).

    OUT may be missing, empty or an earlier output of `merge`; any other folder is replaced only with `overwrite`."""
    if adapter_kind(adapter) == BOTTLENECK:
        raise LLMLabError(f"{adapter} holds bottleneck adapters, which are nonlinear and cannot be merged into the "
                          "weights; use it with --adapter instead")
    with output_folder(out, "merge", overwrite) as tmp:
        model = load_checkpoint(checkpoint)
        stored = next(iter(model.state_dict().values())).dtype
        merge_and_unload(LoRA.load(model, adapter))
        save_checkpoint(model, tmp, tokenizer=Tokenizer.from_folder(checkpoint),
                        dtype=dtype_from_name(dtype) if dtype else stored,
                        generation=load_generation_config(checkpoint) or None)
    return Path(out)
