"""`llmlab pretrain`: a model from random weights (a LLaMA preset or config file, or the LSTM baseline) trained on a
prepared token folder through the one loop (`llmlab.train.train`).

What only pretraining needs lives here: resolving the model spec (ModelConfig, or LSTMConfig from `llmlab.rnn`),
checking it against the data's tokenizer and the sequence length, and building the randomly initialised model with
the same weights on every process. `pretrain` is both the library function and the command: its signature and
docstring are the command's options and help (`llmlab.cli`), so this module imports torch only inside it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from llmlab.args import TrainConfig
from llmlab.config import ModelConfig
from llmlab.errors import LLMLabError

ARCHS = ("llama", "lstm")


def pretrain(*, model: str, data: Path, out: Path, train: TrainConfig = TrainConfig(), resume: str = "auto",
             arch: str = "llama") -> Path:
    """Pretrain a model from random weights on a prepared data folder; RUN_DIR/final is an HF-format checkpoint
    (with --arch lstm: an LSTM model folder, see llmlab.rnn).

    Runs on one process, or data-parallel under torchrun (`torchrun --nproc_per_node N -m llmlab.cli pretrain
    ... --train.strategy ddp|fsdp`). Metrics go to RUN_DIR/metrics.csv and RUN_DIR/tensorboard.

    Args:
        model: A preset name (e.g. micro-10m) or a model config file (YAML of ModelConfig fields, a `preset:`
            key to start from a preset, or an HF config.json).
        data: A data folder written by `llmlab prepare`.
        out: The run folder: checkpoints/, final/, metrics.csv, tensorboard/.
        train: Training options.
        resume: auto (continue from RUN_DIR's latest checkpoint, if any), no, or a run or checkpoint folder.
        arch: llama (the transformer) or lstm (the recurrent baseline: --model takes an LSTM preset, lstm-10m or
            lstm-tiny, or a YAML of LSTMConfig fields).
    """
    # torch-heavy imports stay inside: llmlab.cli imports this module to build `llmlab --help` without torch
    import torch

    from llmlab.data import TokenDataset
    from llmlab.methods import Full
    from llmlab.model import build_model
    from llmlab.rnn import LSTM_PRESETS, FullLSTM, LSTMConfig, build_lstm
    from llmlab.train import train as train_loop

    cfg = train
    cfg.validate()
    if arch not in ARCHS:
        raise LLMLabError(f"unknown --arch '{arch}'; expected one of {', '.join(ARCHS)}")
    if arch == "llama" and str(model) in LSTM_PRESETS:
        raise LLMLabError(f"model preset '{model}' is an LSTM preset: add --arch lstm, or use a LLaMA preset")
    mcfg = ModelConfig.from_spec(model) if arch == "llama" else LSTMConfig.from_spec(model)
    dataset = TokenDataset(data, cfg.seq_len, cfg.seed)
    tokenizer = dataset.tokenizer()
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise LLMLabError(f"the tokenizer of {data} has {tokenizer.vocab_size} tokens but model '{mcfg.name}' has "
                          f"vocab_size {mcfg.vocab_size}: prepare the data with --train-tokenizer {mcfg.vocab_size} "
                          "or use a model config with a larger vocab_size")
    if arch == "llama" and cfg.seq_len > mcfg.max_position_embeddings:
        raise LLMLabError(f"training option seq_len {cfg.seq_len} exceeds model '{mcfg.name}' context of "
                          f"{mcfg.max_position_embeddings} (max_position_embeddings)")
    # the checkpoint's special token ids are the tokenizer's, so generation stops where documents ended
    mcfg.bos_token_id, mcfg.eos_token_id, mcfg.pad_token_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    torch.manual_seed(cfg.seed)  # the same initial weights on every process (FSDP shards them in place)
    net, method = (build_model(mcfg), Full()) if arch == "llama" else (build_lstm(mcfg), FullLSTM())
    result = train_loop(net, method, dataset, cfg, out, tokenizer=tokenizer, resume=resume)
    if result.final is not None:
        print(f"saved {result.final} (step {result.step})", file=sys.stderr)
    return Path(out)
