"""Helpers for the fine-tuning tests: a tiny tokenizer (with or without a chat template), a tiny checkpoint, and a
small instruction task whose responses follow a pattern a 2-layer model learns in a few dozen steps."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from llmlab.args import TrainConfig
from llmlab.checkpoint import load_checkpoint, save_checkpoint
from llmlab.config import ModelConfig
from llmlab.instruct import InstructDataset
from llmlab.model import build_model
from llmlab.tokenizer import Tokenizer, train_bpe_tokenizer
from llmlab.train import Env, build_optimizer, train_step

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ANIMALS = {"cat": "meow", "dog": "woof", "cow": "moo", "owl": "hoot", "duck": "quack", "pig": "oink",
           "sheep": "baa", "frog": "croak", "lion": "roar", "bee": "buzz"}


def task_records(n: int = 60, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        animal = rng.choice(sorted(ANIMALS))
        out.append({"instruction": f"What does the {animal} say?", "input": "",
                    "output": f"The {animal} says {ANIMALS[animal]}."})
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tiny_tokenizer(chat: bool = True) -> Tokenizer:
    texts = [f"{r['instruction']} {r['output']}" for r in task_records(200)] * 3
    tok = train_bpe_tokenizer(texts, 300, eos_token="<|im_end|>", extra_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML if chat else None
    return tok


def tiny_checkpoint(folder: Path, chat: bool = True, seed: int = 0, preset: str = "tiny",
                    std: float | None = None) -> Path:
    """A randomly initialised tiny model (vocab 300) with the tiny tokenizer, saved as an HF-format folder.

    A larger init `std` gives the blocks' outputs the scale a trained model's have (what adapters act on)."""
    tok = tiny_tokenizer(chat)
    cfg = ModelConfig.from_name(preset, vocab_size=300)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_id, tok.eos_id, tok.pad_id
    torch.manual_seed(seed)
    model = build_model(cfg)
    if std is not None:
        model.init_weights(std)
    return save_checkpoint(model, folder, tokenizer=tok)


def changed_after_steps(ckpt: Path, data: Path, method, steps: int = 2) -> tuple[set[str], set[str]]:
    """(names of parameters that changed, names the method trains) after `steps` optimizer steps."""
    model = method.prepare(load_checkpoint(ckpt).train())
    named = method.trainable_parameters(model)
    cfg = TrainConfig(lr=1e-2, weight_decay=0.0)
    optimizer = build_optimizer(named, cfg, Env())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ds = InstructDataset(data, Tokenizer.from_folder(ckpt), 64)
    for i in range(steps):
        train_step(model, method, optimizer, [p for _, p in named], [ds.train_batch(4 * i, 4)])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    return changed, {n for n, _ in named}


def record_autocast(monkeypatch, native: bool) -> list:
    """Make the CPU look native-bf16 (or not) to `precision: auto`, and record the autocast dtype each training run
    of the loop chooses (None = plain fp32): what `finetune`, `distill` and `pretrain` get on such a CPU."""
    import llmlab.checkpoint as checkpoint
    import llmlab.train as train_module

    monkeypatch.setattr(checkpoint, "native_bf16", lambda device="cpu": native)
    chosen: list = []
    real = train_module.setup_precision

    def spy(*args, **kwargs):
        chosen.append(real(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(train_module, "setup_precision", spy)
    return chosen


def generated_ids(model, prompts, max_new_tokens, **kw) -> list[list[int]]:
    """The token ids `llmlab.generate.generate_tokens` yields for each prompt (keyword options passed through)."""
    from llmlab.generate import generate_tokens

    out: list[list[int]] = [[] for _ in prompts]
    for step in generate_tokens(model, prompts, max_new_tokens, **kw):
        for row, token in enumerate(step):
            if token is not None:
                out[row].append(token)
    return out
