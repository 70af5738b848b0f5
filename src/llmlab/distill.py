"""`llmlab distill`: knowledge distillation through the one training loop, a frozen teacher and a smaller student.

`distill` loads the teacher (an HF-format checkpoint) and its tokenizer, makes the student, reads the data (a
prepared token corpus or instruction data, prompts masked as in fine-tuning), and runs `llmlab.train.train` with a
`DistillMethod`. RUN_DIR/final is the student as an HF-format model folder with the teacher's tokenizer. The
students, the teacher's top-k cache, the method and the data are in `llmlab.distill_method`, the losses in
`llmlab.distill_losses`.

`distill` is both the library function and the command: its signature and docstring are the command's options and
help (`llmlab.cli`), so this module imports torch only inside it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from llmlab.args import DistillConfig, TrainConfig
from llmlab.errors import LLMLabError


def distill(*, teacher: Path, data: Path, out: Path, student: str | None = None, student_layers: str | None = None,
            kd: DistillConfig = DistillConfig(), train: TrainConfig = TrainConfig(), val_data: Path | None = None,
            val_fraction: float = 0.1, template: str = "auto", pack: bool = False, resume: str = "auto") -> Path:
    """Distill a teacher checkpoint into a smaller student that learns the teacher's next-token distributions.

    The loss is kd.alpha * T^2 * D(teacher, student) + (1 - kd.alpha) * cross-entropy on the labels, D one of
    forward KL, reverse KL or generalized JSD at temperature T (formulas: `llmlab.distill_losses`). The teacher
    runs frozen; RUN_DIR/final is the student as an HF-format model folder with the teacher's tokenizer.

    Args:
        teacher: HF-format checkpoint folder of the teacher (its tokenizer renders the data).
        data: A data folder from `llmlab prepare` made with the teacher's tokenizer, or instruction data (JSONL/JSON
            as for `llmlab finetune`; the loss falls on the responses only).
        out: The run folder: checkpoints/, final/, metrics.csv, tensorboard/ (and the teacher cache, if any).
        student: A preset name or model config file (random weights, the teacher's vocabulary), or a checkpoint
            folder (its tokenizer must be the teacher's).
        student_layers: Build the student from the teacher, keeping these blocks: ids like 0,2,4, every-other or
            every-N; embeddings, final norm and head are copied.
        kd: Distillation options (loss, temperature, alpha, top-k cache, on-policy batches, teacher dtype).
        train: Training options.
        val_data: With instruction data: a separate held-out file (instead of holding out --val-fraction).
        val_fraction: With instruction data: share of the examples held out for the validation loss.
        template: With instruction data: auto (the chat template if the tokenizer has one, else Alpaca), chat or
            alpaca.
        pack: With instruction data: pack several examples into each training sequence.
        resume: auto (continue from RUN_DIR's latest checkpoint, if any), no, or a run or checkpoint folder.
    """
    # torch-heavy imports stay inside: llmlab.cli imports this module to build `llmlab --help` without torch
    from llmlab.checkpoint import load_checkpoint
    from llmlab.distill_method import CACHE_FILE, DistillMethod, load_data, make_student
    from llmlab.tokenizer import Tokenizer
    from llmlab.train import train as train_loop

    cfg = train
    cfg.validate()
    kd.validate()
    teacher_model = load_checkpoint(teacher)
    tokenizer = Tokenizer.from_folder(teacher)
    student_model = make_student(student, student_layers, teacher_model, str(teacher), tokenizer, cfg.seed)
    for who, model in (("teacher", teacher_model), ("student", student_model)):
        if cfg.seq_len > model.config.max_position_embeddings:
            raise LLMLabError(f"training option seq_len {cfg.seq_len} exceeds the {who}'s context of "
                              f"{model.config.max_position_embeddings} (max_position_embeddings)")
    print(f"llmlab: teacher {teacher_model.config.num_params():,} parameters "
          f"({teacher_model.config.num_hidden_layers} blocks), student {student_model.config.num_params():,} "
          f"({student_model.config.num_hidden_layers} blocks)", file=sys.stderr)
    dataset = load_data(data, tokenizer, cfg, str(teacher), val_data, val_fraction, template, pack)
    method = DistillMethod(teacher_model, kd, data=dataset, cache_path=kd.cache_path or Path(out) / CACHE_FILE,
                           pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id,
                           eos_id=tokenizer.eos_id, cache_batch_size=cfg.batch_size)
    result = train_loop(student_model, method, dataset, cfg, out, tokenizer=tokenizer, resume=resume)
    if result.final is not None:
        print(f"saved {result.final} (step {result.step})", file=sys.stderr)
    return Path(out)

