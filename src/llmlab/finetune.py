"""Fine-tuning a checkpoint on instruction data through the one training loop, and merging LoRA adapters.

`finetune` = load the base model + its tokenizer, read the instruction data (`llmlab.instruct`), pick a method
(`llmlab.methods.make_method`, the registry), and run `llmlab.train.train`. RUN_DIR/final is what the method saves:
a full model folder (full, freeze), a bottleneck adapter folder (adapter) or a PEFT LoRA folder (lora, qlora).
`merge` folds a LoRA adapter into its base checkpoint.

Which weights the base is (`base_weights`): the adapter methods (lora, adapter) freeze the base, so they train on a
GGUF's quantized blocks where there is one (a .gguf file, or a folder that keeps its GGUF: `gguf_import.kept_gguf`)
through `llmlab.quantized.QuantLinear`, never building a float copy of the base; the adapter they save applies to
the float import of the same GGUF as well (its weights are the GGUF's, dequantized), in llmlab or in HF + PEFT.
full and freeze train the float weights, and qlora quantizes the float weights to NF4 itself.

`finetune` and `merge` are both the library functions and the commands: their signatures and docstrings are the
commands' options and help (`llmlab.cli`), so this module imports torch only inside its functions.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from llmlab.args import METHOD_NAMES, BottleneckConfig, FreezeConfig, LoRAConfig, TrainConfig
from llmlab.errors import LLMLabError

BASE_WEIGHTS = ("auto", "gguf", "float")  # `finetune --base_weights`
QUANTIZED_BASE_METHODS = ("lora", "adapter")  # the methods that train on a GGUF's quantized blocks


def finetune(checkpoint: Path, *, data: Path, out: Path,
             method: Literal[METHOD_NAMES] = "lora", lora: LoRAConfig = LoRAConfig(),
             freeze: FreezeConfig = FreezeConfig(), bottleneck: BottleneckConfig = BottleneckConfig(),
             train: TrainConfig = TrainConfig(), val_data: Path | None = None, val_fraction: float = 0.1,
             template: str = "auto", pack: bool = False, resume: str = "auto",
             base_weights: Literal[BASE_WEIGHTS] = "auto") -> Path:
    """Fine-tune a checkpoint on instruction data (loss on the responses only) through the training loop.

    RUN_DIR/final is an HF-format model folder (full, freeze), a PEFT LoRA adapter folder (lora, qlora; use it
    with `llmlab generate CKPT --adapter RUN_DIR/final` or fold it in with `llmlab merge`) or a bottleneck
    adapter folder (adapter; use it with --adapter).

    Args:
        checkpoint: HF-format checkpoint folder to start from (its tokenizer renders the data), or a GGUF file
            (with lora and adapter: trained on its quantized blocks).
        data: Instruction data: JSONL or JSON list of Alpaca records (instruction, input, output), chat records
            (messages with roles), Self-Instruct seed tasks (instruction, instances) or prompt/completion and
            question/answer pairs.
        out: The run folder: checkpoints/, final/, metrics.csv, tensorboard/.
        method: full (every weight trains), freeze (only the top blocks train), adapter (bottleneck adapters after
            attention and MLP), lora (low-rank updates W0 + (alpha/r) B A) or qlora (lora on a base whose block
            weights are 4-bit NF4 via bitsandbytes); with adapter, lora and qlora the base model stays frozen.
        lora: LoRA options (with --method lora or qlora).
        freeze: Partial fine-tuning options (with --method freeze).
        bottleneck: Bottleneck adapter options (with --method adapter).
        train: Training options; train.seq_len is the longest example (longer ones are cut, and counted).
        val_data: A separate held-out file (instead of holding out --val-fraction of --data).
        val_fraction: Share of the examples held out for the validation loss.
        template: auto (the tokenizer's chat template if it has one, else Alpaca), chat, or alpaca.
        pack: Pack several examples into each training sequence (attention stays within each example).
        resume: auto (continue from RUN_DIR's latest checkpoint, if any), no, or a run or checkpoint folder.
        base_weights: The frozen base of lora and adapter: auto (a GGUF's quantized blocks when CHECKPOINT is a
            .gguf file or a folder keeping its GGUF as model.gguf, as `llmlab download` and `convert` of a GGUF
            write it: least memory, no float copy; else the float weights), gguf (the blocks; an error without a
            GGUF) or float (the folder's float weights). full, freeze and qlora always train the float weights.
    """
    # torch-heavy imports stay inside: llmlab.cli imports this module to build `llmlab --help` without torch
    from llmlab.instruct import InstructDataset
    from llmlab.methods import make_method
    from llmlab.train import train as train_loop

    cfg = train
    cfg.validate()
    trainer = make_method(method, str(checkpoint), lora, freeze, bottleneck)
    model, tokenizer = load_base(checkpoint, method, base_weights, cfg.device)
    if cfg.seq_len > model.config.max_position_embeddings:
        raise LLMLabError(f"training option seq_len {cfg.seq_len} exceeds the context of {checkpoint} "
                          f"({model.config.max_position_embeddings}, max_position_embeddings)")
    dataset = InstructDataset(data, tokenizer, cfg.seq_len, val_fraction=val_fraction, seed=cfg.seed, pack=pack,
                              template=template, val_path=val_data)
    print(f"llmlab: {data}: {dataset.stats.summary()}", file=sys.stderr)
    result = train_loop(model, trainer, dataset, cfg, out, tokenizer=tokenizer, resume=resume)
    if result.final is not None:
        print(f"saved {result.final} (step {result.step})", file=sys.stderr)
    return Path(out)


def gguf_base(checkpoint: Path, method: str, base_weights: str = "auto") -> Path | None:
    """The GGUF file whose quantized blocks `method` trains on (None: the float weights of the folder), by the rules
    of `finetune`'s `base_weights` option; raises for a combination that cannot train."""
    if base_weights not in BASE_WEIGHTS:
        raise LLMLabError(f"--base_weights: expected one of {', '.join(BASE_WEIGHTS)}, got {base_weights!r}")
    checkpoint = Path(checkpoint)
    is_file = checkpoint.is_file()
    if method not in QUANTIZED_BASE_METHODS:
        if is_file:
            raise LLMLabError(f"--method {method} trains float weights; {checkpoint} is a GGUF file: import it into a "
                              f"checkpoint folder first (`llmlab convert {checkpoint} DIR`), or train lora or adapter "
                              "on its blocks")
        if base_weights == "gguf":
            raise LLMLabError(f"--base_weights gguf: --method {method} trains float weights; only "
                              f"{' and '.join(QUANTIZED_BASE_METHODS)} train on a GGUF's quantized blocks")
        return None
    if is_file:
        if base_weights == "float":
            raise LLMLabError(f"--base_weights float: {checkpoint} is a GGUF file; give its imported folder instead")
        return checkpoint
    from llmlab.gguf_import import kept_gguf

    kept = kept_gguf(checkpoint) if base_weights != "float" else None
    if base_weights == "gguf" and kept is None:
        raise LLMLabError(f"--base_weights gguf: {checkpoint} keeps no GGUF (model.gguf of a GGUF import); use "
                          "--base_weights float, or import the GGUF again with `llmlab convert`")
    return kept


def load_base(checkpoint: Path, method: str, base_weights: str = "auto", device: str = "auto") -> tuple:
    """The model to fine-tune (the float weights, or a GGUF's quantized blocks: `gguf_base`) and its tokenizer."""
    import torch

    from llmlab.checkpoint import load_checkpoint
    from llmlab.packed_cache import load_gguf_cached
    from llmlab.tokenizer import Tokenizer
    from llmlab.train import training_device

    gguf = gguf_base(checkpoint, method, base_weights)
    if gguf is None:
        return load_checkpoint(checkpoint), Tokenizer.from_folder(checkpoint)
    model, tokenizer, _ = load_gguf_cached(gguf, training_device(device), torch.float32)  # CPU: packed once
    print(f"llmlab: training on the quantized blocks of {gguf} (--base_weights float: on the float weights)",
          file=sys.stderr)
    if Path(checkpoint).is_dir():
        tokenizer = Tokenizer.from_folder(checkpoint)
    return model.train(), tokenizer


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
    from llmlab.methods import LoRA
    from llmlab.methods.adapters import BOTTLENECK, adapter_kind
    from llmlab.methods.lora import merge_and_unload
    from llmlab.tokenizer import Tokenizer

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
