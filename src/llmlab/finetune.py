"""Fine-tuning a checkpoint on instruction data through the one training loop, and merging LoRA adapters.

`finetune` = load an HF-format checkpoint + its tokenizer, read the instruction data (`llmlab.instruct`), pick
a method (`METHODS`), and run `llmlab.train.train`. RUN_DIR/final is what the method saves: a full model folder
(full, freeze), an adapter folder (adapter) or a PEFT LoRA folder (lora, qlora). `merge` folds a LoRA adapter into
its base checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from llmlab.args import BottleneckConfig, FreezeConfig, LoRAConfig, TrainConfig
from llmlab.errors import LLMLabError

METHODS = ("full", "freeze", "adapter", "lora", "qlora")


def make_method(name: str, base_model: str | None = None, lora: LoRAConfig | None = None,
                freeze: FreezeConfig | None = None, bottleneck: BottleneckConfig | None = None) -> Any:
    """The training method called `name`, configured from its option group."""
    from llmlab.methods import Adapter, Freeze, Full, LoRA
    from llmlab.methods.qlora import QLoRA

    if name == "full":
        return Full()
    if name == "freeze":
        return Freeze(freeze)
    if name == "adapter":
        return Adapter(bottleneck, base_model=base_model)
    if name == "lora":
        return LoRA(lora or LoRAConfig(), base_model=base_model)
    if name == "qlora":
        return QLoRA(lora or LoRAConfig(), base_model=base_model)
    raise LLMLabError(f"--method must be one of {', '.join(METHODS)}, got {name!r}")


def finetune(checkpoint: str | Path, data: str | Path, out: str | Path, method: str = "lora",
             config: TrainConfig | None = None, lora: LoRAConfig | None = None, freeze: FreezeConfig | None = None,
             bottleneck: BottleneckConfig | None = None, val_data: str | Path | None = None,
             val_fraction: float = 0.1, template: str = "auto", pack: bool = False,
             resume: str | Path | None = "auto") -> Path:
    """Fine-tune CHECKPOINT on instruction data into RUN_DIR; returns RUN_DIR (final/ when the run finished)."""
    from llmlab.checkpoint import load_checkpoint
    from llmlab.instruct import InstructDataset
    from llmlab.tokenizer import Tokenizer
    from llmlab.train import train

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


def apply_adapter(model: Any, folder: str | Path) -> Any:
    """Put the adapter of `folder` (a PEFT LoRA folder or an llmlab bottleneck adapter folder) on `model`, unmerged."""
    import json

    from llmlab.methods.adapter import ADAPTER_TYPE, load_adapters
    from llmlab.methods.lora import ADAPTER_CONFIG, load_adapter

    path = Path(folder) / ADAPTER_CONFIG
    try:
        kind = json.loads(path.read_text()).get("adapter_type") if path.is_file() else None
    except (json.JSONDecodeError, AttributeError) as e:
        raise LLMLabError(f"{path}: not a JSON object: {e}") from e
    return load_adapters(model, folder) if kind == ADAPTER_TYPE else load_adapter(model, folder)


def merge(checkpoint: str | Path, adapter: str | Path, out: str | Path, dtype: str | None = None,
          overwrite: bool = False) -> Path:
    """Write CHECKPOINT with the LoRA adapter folded into its weights, as an HF-format folder (no adapter needed).

    OUT may be missing, empty or an earlier output of `merge`; any other folder is replaced only with `overwrite`."""
    from llmlab.checkpoint import (
        dtype_from_name,
        load_checkpoint,
        load_generation_config,
        output_folder,
        save_checkpoint,
    )
    from llmlab.methods.lora import load_adapter, merge_and_unload
    from llmlab.tokenizer import Tokenizer

    if (Path(adapter) / "adapter_config.json").is_file() and '"bottleneck"' in (Path(adapter) /
                                                                                 "adapter_config.json").read_text():
        raise LLMLabError(f"{adapter} holds bottleneck adapters, which are nonlinear and cannot be merged into the "
                          "weights; use it with --adapter instead")
    with output_folder(out, "merge", overwrite) as tmp:
        model = load_checkpoint(checkpoint)
        stored = next(iter(model.state_dict().values())).dtype
        merge_and_unload(load_adapter(model, adapter))
        save_checkpoint(model, tmp, tokenizer=Tokenizer.from_folder(checkpoint),
                        dtype=dtype_from_name(dtype) if dtype else stored,
                        generation=load_generation_config(checkpoint) or None)
    return Path(out)
