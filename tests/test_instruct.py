"""Instruction data: formats, prompt masking, truncation, the held-out split, packing without leaks, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny import task_records, tiny_tokenizer, write_jsonl

from llmlab.config import ModelConfig
from llmlab.errors import LLMLabError
from llmlab.instruct import InstructDataset, read_conversations, tokenize_conversation
from llmlab.losses import IGNORE_INDEX, next_token_loss
from llmlab.methods import Full
from llmlab.methods.base import model_inputs
from llmlab.model import build_model


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_every_format_becomes_conversations(tmp_path: Path) -> None:
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "1 2", "output": "3"}])
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": "Hi", "output": "Hello"}] * 2))
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "system", "content": "Be brief."},
                                                            {"role": "user", "content": "Hi"},
                                                            {"role": "assistant", "content": "Hello"}]}])
    seed = write_jsonl(tmp_path / "d.jsonl", [{"id": "t", "instruction": "Say", "instances": [
        {"input": "a", "output": "A"}, {"input": "", "output": "B"}]}])
    qa = write_jsonl(tmp_path / "e.jsonl", [{"question": "2+2?", "answer": "4"}])
    assert read_conversations(alpaca)[0][0]["content"] == "Add\n\n1 2"
    assert len(read_conversations(tmp_path / "b.json")) == 2
    assert [m["role"] for m in read_conversations(chat)[0]] == ["system", "user", "assistant"]
    assert [c[1]["content"] for c in read_conversations(seed)] == ["A", "B"]
    assert read_conversations(qa)[0][1]["content"] == "4"


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_labels_mask_every_prompt_token(tok, template: str) -> None:
    conv = [{"role": "user", "content": "What does the cat say?"},
            {"role": "assistant", "content": "The cat says meow."}]
    ids, trained = tokenize_conversation(tok, conv, template)
    response = tok.decode([i for i, t in zip(ids, trained) if t], skip_special_tokens=False)
    assert response.startswith("The cat says meow.<|im_end|>")  # the response and its end-of-turn token train
    assert "What does" not in response and trained[0] is False


def test_loss_ignores_every_prompt_token(tmp_path: Path, tok) -> None:
    data = InstructDataset(write_jsonl(tmp_path / "t.jsonl", task_records(8)), tok, seq_len=64, val_fraction=0.25)
    batch = data.train_batch(0, 3)
    labels = batch["labels"]
    assert (labels == IGNORE_INDEX).any() and (labels != IGNORE_INDEX).any()
    logits = torch.randn(*labels.shape, 300, requires_grad=True)
    next_token_loss(logits, labels).backward()
    grad_per_pos = logits.grad.abs().sum(-1)
    assert torch.all(grad_per_pos[labels == IGNORE_INDEX] == 0)  # prompt and padding positions carry no loss
    assert torch.all(grad_per_pos[labels != IGNORE_INDEX] > 0)
    # changing a prompt token's label target does not change the loss either: they are all IGNORE_INDEX
    row = batch["input_ids"][0].tolist()
    text = tok.decode(row, skip_special_tokens=False)
    assert text.startswith("<|im_start|>user\nWhat does the")
    first_trained = int((labels[0] != IGNORE_INDEX).nonzero()[0])
    assert tok.decode(row[: first_trained + 1], skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_truncation_is_counted_and_split_is_held_out(tmp_path: Path, tok) -> None:
    records = task_records(20)
    records[0] = {"instruction": "Tell a long story.", "output": "once upon a time " * 40}
    records[1] = {"instruction": "word " * 80, "output": "short"}  # the prompt alone fills the window
    data = InstructDataset(write_jsonl(tmp_path / "t.jsonl", records), tok, seq_len=48, val_fraction=0.2, seed=3)
    s = data.stats
    assert s.examples == 20 and s.dropped == 1 and s.truncated == 1 and s.tokens_cut > 0
    assert s.train + s.val == 19 and s.val == 4
    assert all(len(inp) <= 48 for inp, _ in data.val_items)
    assert "truncated" in s.summary()
    a, b = data.train_batch(5, 4), data.train_batch(5, 4)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    val_rows = {tuple(x.tolist()) for x, _ in data.val_items}
    train_rows = {tuple(u[0][0].tolist()) for u in data.train_units}
    assert data.val_batch(0, 2)["input_ids"].shape[0] == 2 and len(val_rows) >= 1 and train_rows


def test_packing_keeps_examples_apart(tmp_path: Path, tok) -> None:
    records = [{"instruction": f"What does the {a} say?", "output": f"The {a} says {s}." * (i % 3 + 1)}
               for i, (a, s) in enumerate([("cat", "meow"), ("dog", "woof"), ("cow", "moo"), ("owl", "hoot"),
                                           ("pig", "oink"), ("bee", "buzz")])]
    path = write_jsonl(tmp_path / "t.jsonl", records)
    data = InstructDataset(path, tok, seq_len=96, val_fraction=0.0, val_path=path, pack=True)
    assert data.stats.sequences < data.stats.train  # several examples share a sequence
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny", vocab_size=300)).eval()
    batch = data.train_batch(0, data.stats.sequences)
    with torch.no_grad():
        packed = model(batch["input_ids"], **model_inputs(batch))
        for b, unit in enumerate(data.train_units_in_order(0, data.stats.sequences)):
            t = 0
            assert len(unit) >= 1
            for inp, _ in unit:
                alone = model(torch.as_tensor(inp)[None])[0]
                torch.testing.assert_close(packed[b, t: t + len(inp)], alone, atol=1e-5, rtol=1e-5)
                t += len(inp)
    assert any(len(u) > 1 for u in data.train_units)
    # the loss of a packed batch is the method's loss: the loop passes the mask through
    loss = Full().loss(model, batch)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("content, expected", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', r"t\.jsonl:2: not valid JSON"),
    ('{"instruction": "a"}\n', r"t\.jsonl:1: missing field\(s\) \['output'\]"),
    ('{"instruction": "a", "output": "  "}\n', r"t\.jsonl:1: empty response 'output'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"t\.jsonl:1: the last message must be the assistant"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}\n',
     r"t\.jsonl:1: message 1: empty response 'content'"),
    ('{"text": "hi"}\n', r"t\.jsonl:1: unknown record format"),
    ('{"instruction": "a", "instances": [{"input": "x"}]}\n', r"t\.jsonl:1: instance 0: missing field 'output'"),
    ('{"question": "a"}\n', r"t\.jsonl:1: missing field 'answer'"),
])
def test_bad_records(tmp_path: Path, tok, content: str, expected: str) -> None:
    (tmp_path / "t.jsonl").write_text(content)
    with pytest.raises(LLMLabError, match=expected):
        InstructDataset(tmp_path / "t.jsonl", tok, seq_len=32)


def test_bad_options(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", task_records(4))
    with pytest.raises(LLMLabError, match="--template must be one of"):
        InstructDataset(path, tok, seq_len=32, template="vicuna")
    with pytest.raises(LLMLabError, match="no held-out examples"):
        InstructDataset(path, tok, seq_len=32, val_fraction=0.0)
    with pytest.raises(LLMLabError, match="not found"):
        InstructDataset(tmp_path / "missing.jsonl", tok, seq_len=32)
    no_chat = tiny_tokenizer(chat=False)
    with pytest.raises(LLMLabError, match="no chat template"):
        InstructDataset(path, no_chat, seq_len=32, template="chat")
