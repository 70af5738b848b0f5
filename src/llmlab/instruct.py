"""Instruction data for fine-tuning: prompt-response examples -> token batches with the loss on responses only.

Formats read (one file; `.jsonl` = one record a line, `.json` = a list of records):
- Alpaca: `{"instruction", "input" (optional), "output"}`;
- prompt/response pairs: `{"prompt", "completion"}` or `{"question", "answer"}` (GSM8K);
- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`, ending with an assistant turn;
- Self-Instruct seed tasks: `{"instruction", "instances": [{"input", "output"}, ...]}`, one example per instance.
Every record becomes a conversation (a list of messages) and is rendered with the tokenizer's chat template
(the default when it has one) or the Alpaca prompt template. Labels are IGNORE_INDEX (-100) on every prompt token,
so the loss falls on the assistant's tokens only, including the end-of-turn / EOS token that teaches it to stop.

Examples longer than seq_len + 1 tokens are cut at the end (counted in `stats`); one whose response is cut away
entirely is dropped. With `pack`, several examples share one sequence: each restarts its RoPE positions at 0 and
a block-diagonal causal mask (built from `segment_ids` by `llmlab.methods.base.model_inputs`) keeps attention
inside each example, so a packed example gets exactly the logits it would get alone.

`InstructDataset` serves the loop's data protocol: `train_batch(start, size)` is sample `start..start+size-1` of an
endless stream, epoch e shuffled by (seed, e); `val_batch` reads the held-out examples in order. Both are pure
functions of their arguments, which exact resume and data parallelism need.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmlab.errors import LLMLabError
from llmlab.jsonl import iter_jsonl
from llmlab.losses import IGNORE_INDEX
from llmlab.tokenizer import Tokenizer

Message = dict[str, str]

ALPACA_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.\n\n")
ALPACA_HEADER_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n")
TEMPLATES = ("auto", "chat", "alpaca")
_PAIRS = (("prompt", "completion"), ("question", "answer"))


# -- reading records ---------------------------------------------------------------------------------
def _records(path: Path) -> list[tuple[int, Any]]:
    """(line number, record) of a JSONL file, or (index + 1, record) of a JSON list."""
    if not path.is_file():
        raise LLMLabError(f"instruction data file not found: {path}")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LLMLabError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e
        if not isinstance(data, list):
            raise LLMLabError(f"{path}: a .json instruction file must hold a list of records, got "
                              f"{type(data).__name__}")
        return list(enumerate(data, 1))
    return [(line.number, line.record) for line in iter_jsonl(path)]


def _text(record: dict, key: str, where: str, allow_empty: bool = False) -> str:
    value = record.get(key, "")
    if not isinstance(value, str):
        raise LLMLabError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        what = "response" if key in ("output", "completion", "answer", "content") else "field"
        raise LLMLabError(f"{where}: empty {what} '{key}'")
    return value


def _alpaca_messages(instruction: str, inp: str, output: str) -> list[Message]:
    user = instruction if not inp.strip() else f"{instruction}\n\n{inp}"
    return [{"role": "user", "content": user, "instruction": instruction, "input": inp},
            {"role": "assistant", "content": output}]


def record_to_conversations(record: Any, where: str) -> list[list[Message]]:
    """The conversations of one record (a Self-Instruct seed task gives one per instance)."""
    if not isinstance(record, dict):
        raise LLMLabError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise LLMLabError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise LLMLabError(f"{where}: message {i} needs 'role' and 'content' fields, got {m!r}")
            if m["role"] not in ("system", "user", "assistant"):
                raise LLMLabError(f"{where}: message {i} has role {m['role']!r}; expected system, user or assistant")
            content = _text(m, "content", f"{where}: message {i}", allow_empty=m["role"] != "assistant")
            out.append({"role": m["role"], "content": content})
        if out[-1]["role"] != "assistant":
            raise LLMLabError(f"{where}: the last message must be the assistant's response (role 'assistant')")
        return [out]
    if "instances" in record:
        instruction = _text(record, "instruction", where)
        instances = record["instances"]
        if not isinstance(instances, list) or not instances:
            raise LLMLabError(f"{where}: 'instances' must be a non-empty list of {{input, output}} objects")
        convs = []
        for i, inst in enumerate(instances):
            here = f"{where}: instance {i}"
            if not isinstance(inst, dict) or "output" not in inst:
                raise LLMLabError(f"{here}: missing field 'output'")
            convs.append(_alpaca_messages(instruction, _text(inst, "input", here, True), _text(inst, "output", here)))
        return convs
    if "instruction" in record or "output" in record:
        missing = [k for k in ("instruction", "output") if k not in record]
        if missing:
            raise LLMLabError(f"{where}: missing field(s) {missing} (Alpaca records need instruction, input, output)")
        return [_alpaca_messages(_text(record, "instruction", where), _text(record, "input", where, True),
                                 _text(record, "output", where))]
    for prompt_key, response_key in _PAIRS:
        if prompt_key in record:
            if response_key not in record:
                raise LLMLabError(f"{where}: missing field '{response_key}'")
            return [[{"role": "user", "content": _text(record, prompt_key, where)},
                     {"role": "assistant", "content": _text(record, response_key, where)}]]
    raise LLMLabError(f"{where}: unknown record format (fields {sorted(record)}); expected instruction/input/output "
                      "(Alpaca), messages (chat), instruction/instances (Self-Instruct), prompt/completion or "
                      "question/answer")


def read_conversations(path: str | Path) -> list[list[Message]]:
    """Every conversation of an instruction data file (see the module doc for the formats)."""
    path = Path(path)
    convs = []
    for n, record in _records(path):
        convs += record_to_conversations(record, f"{path}:{n}")
    if not convs:
        raise LLMLabError(f"{path}: no examples")
    return convs


# -- rendering ---------------------------------------------------------------------------------------
def _alpaca_segments(messages: Sequence[Message]) -> list[tuple[str, bool]]:
    """(text, trained) pieces in the Alpaca prompt format; a system message replaces the header."""
    segments: list[tuple[str, bool]] = []
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    first = True
    for m in messages:
        if m["role"] == "user":
            inp = m.get("input", "")
            header = (system + "\n\n") if system else (ALPACA_HEADER_INPUT if inp.strip() else ALPACA_HEADER)
            body = (f"### Instruction:\n{m.get('instruction', m['content'])}\n\n"
                    + (f"### Input:\n{inp}\n\n" if inp.strip() else "") + "### Response:\n")
            segments.append(((header if first else "\n\n") + body, False))
            first = False
        elif m["role"] == "assistant":
            segments.append((m["content"], True))
    return segments


def _chat_segments(tokenizer: Tokenizer, messages: Sequence[Message]) -> list[tuple[str, bool]]:
    """(text, trained) pieces rendered by the chat template: each assistant turn (with its end-of-turn) trains."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(plain):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(plain[:i], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(plain[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise LLMLabError("the chat template does not render a conversation as a prefix of its continuation; "
                              "use --template alpaca")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return segments


def tokenize_conversation(tokenizer: Tokenizer, messages: Sequence[Message], template: str = "auto"
                          ) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered conversation and, per token, whether it is a response token (carries loss)."""
    use_chat = template == "chat" or (template == "auto" and tokenizer.chat_template)
    if use_chat:
        segments = _chat_segments(tokenizer, messages)
        ids: list[int] = []
        trained: list[bool] = []
    else:
        segments = _alpaca_segments(messages)
        ids = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
        trained = [False] * len(ids)
    for text, train in segments:
        piece = tokenizer.encode(text, add_bos=False) if text else []
        ids += piece
        trained += [train] * len(piece)
    if tokenizer.eos_id is not None and tokenizer.eos_id not in ids[-3:]:
        ids.append(tokenizer.eos_id)  # the Alpaca format (or a template without one): the response ends with EOS
        trained.append(True)
    return ids, trained


# -- examples -> (input_ids, labels) -----------------------------------------------------------------
@dataclass
class Stats:
    """What tokenization did to a data file: examples kept, cut at seq_len + 1 tokens, or dropped."""

    examples: int = 0
    truncated: int = 0
    tokens_cut: int = 0
    dropped: int = 0  # cut so short that no response token was left
    train: int = 0
    val: int = 0
    sequences: int = 0  # training sequences (fewer than examples when packed)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"{self.examples} examples: {self.train} train, {self.val} held out; {self.truncated} truncated "
                f"({self.tokens_cut} tokens cut), {self.dropped} dropped (no response left)")
        return text + (f"; {self.sequences} packed training sequences" if self.sequences != self.train else "")


def shifted(ids: Sequence[int], trained: Sequence[bool], max_len: int) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(inputs, labels, tokens cut) with labels[t] = ids[t + 1] where that token is a response token, else -100;
    None when truncation to max_len + 1 tokens leaves no response token."""
    cut = max(0, len(ids) - (max_len + 1))
    ids, trained = list(ids[: max_len + 1]), list(trained[: max_len + 1])
    inputs = np.asarray(ids[:-1], dtype=np.int64)
    labels = np.where(np.asarray(trained[1:], dtype=bool), np.asarray(ids[1:], dtype=np.int64), IGNORE_INDEX)
    if not (labels != IGNORE_INDEX).any():
        return None
    return inputs, labels, cut


def _pack(items: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> list[list[int]]:
    """Groups of item indices whose lengths fit in seq_len, by first-fit over the items in the given order."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i, (inp, _) in enumerate(items):
        n = len(inp)
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(seq_len - n)
    return bins


class InstructDataset:
    """Tokenized instruction examples served as deterministic batches (see the module doc)."""

    def __init__(self, path: str | Path, tokenizer: Tokenizer, seq_len: int, val_fraction: float = 0.1,
                 seed: int = 0, pack: bool = False, template: str = "auto", val_path: str | Path | None = None
                 ) -> None:
        if template not in TEMPLATES:
            raise LLMLabError(f"--template must be one of {', '.join(TEMPLATES)}, got {template!r}")
        if template == "chat" and not tokenizer.chat_template:
            raise LLMLabError("--template chat: the tokenizer has no chat template (use auto or alpaca)")
        if not 0 <= val_fraction < 1:
            raise LLMLabError(f"--val-fraction must be in [0, 1), got {val_fraction}")
        self.seq_len, self.seed, self.pack = seq_len, seed, pack
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.stats = Stats()
        train_items = self._tokenize(read_conversations(path), tokenizer, template)
        if val_path is not None:
            val_items = self._tokenize(read_conversations(val_path), tokenizer, template)
        else:
            order = list(range(len(train_items)))
            random.Random(seed).shuffle(order)
            n_val = int(round(val_fraction * len(order)))
            if val_fraction > 0 and len(order) >= 2:
                n_val = min(max(n_val, 1), len(order) - 1)
            held = set(order[:n_val])
            val_items = [it for i, it in enumerate(train_items) if i in held]
            train_items = [it for i, it in enumerate(train_items) if i not in held]
        if not train_items:
            raise LLMLabError(f"{path}: no training examples left after truncation and the held-out split")
        if not val_items:
            raise LLMLabError(f"{path}: no held-out examples: set --val-fraction > 0 (with 2+ examples) or --val-data")
        self.stats.train, self.stats.val = len(train_items), len(val_items)
        self.val_items = val_items
        if pack:
            order = list(range(len(train_items)))
            random.Random(seed + 1).shuffle(order)
            shuffled = [train_items[i] for i in order]
            self.train_units = [[shuffled[i] for i in group] for group in _pack(shuffled, seq_len)]
        else:
            self.train_units = [[it] for it in train_items]
        self.stats.sequences = len(self.train_units)
        self._perms: dict[int, np.ndarray] = {}

    def _tokenize(self, convs: list[list[Message]], tokenizer: Tokenizer, template: str
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
        items = []
        for conv in convs:
            self.stats.examples += 1
            out = shifted(*tokenize_conversation(tokenizer, conv, template), self.seq_len)
            if out is None:
                self.stats.dropped += 1
                continue
            inputs, labels, cut = out
            if cut:
                self.stats.truncated += 1
                self.stats.tokens_cut += cut
            items.append((inputs, labels))
        return items

    def _batch(self, units: list[list[tuple[np.ndarray, np.ndarray]]]) -> dict[str, Tensor]:
        """Right-padded batch of units (one example each, or several packed); packed batches carry
        position_ids and segment_ids (padding is a segment of its own, so no row is fully masked)."""
        T = max(sum(len(inp) for inp, _ in unit) for unit in units)
        B = len(units)
        ids = np.full((B, T), self.pad_id, dtype=np.int64)
        labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        pos = np.tile(np.arange(T, dtype=np.int64), (B, 1))
        seg = np.zeros((B, T), dtype=np.int64)
        for b, unit in enumerate(units):
            t = 0
            for s, (inp, lab) in enumerate(unit):
                n = len(inp)
                ids[b, t: t + n], labels[b, t: t + n] = inp, lab
                pos[b, t: t + n], seg[b, t: t + n] = np.arange(n), s
                t += n
            pos[b, t:], seg[b, t:] = np.arange(T - t), len(unit)
        batch = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
        if self.pack:
            batch["position_ids"], batch["segment_ids"] = torch.from_numpy(pos), torch.from_numpy(seg)
        return batch

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 1:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.train_units))
        return self._perms[epoch]

    def train_units_in_order(self, start: int, size: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """The units (lists of (inputs, labels) examples) of training samples start .. start + size - 1."""
        n = len(self.train_units)
        return [self.train_units[self._perm(p // n)[p % n]] for p in range(start, start + size)]

    def train_batch(self, start: int, size: int) -> dict[str, Tensor]:
        """Training samples start .. start + size - 1 of the endless, epoch-shuffled stream."""
        return self._batch(self.train_units_in_order(start, size))

    def val_batch(self, start: int, size: int) -> dict[str, Tensor]:
        """Held-out examples start .. start + size - 1, in order (wrapping around), one per row."""
        n = len(self.val_items)
        return self._batch([[self.val_items[p % n]] for p in range(start, start + size)])
