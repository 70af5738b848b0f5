"""The `make demo` data and script: the Kelvaro set parses with the instruction loader, every response is real."""

from __future__ import annotations

from pathlib import Path

from _scripts import load_script
from _tiny import tiny_tokenizer

from llmlab.instruct import InstructDataset, read_conversations

EXAMPLES = Path(__file__).parent.parent / "examples"
DATA = EXAMPLES / "data" / "kelvaro.jsonl"
VAL = EXAMPLES / "data" / "kelvaro-val.jsonl"


def test_demo_data_parses_with_nonempty_responses() -> None:
    train, val = read_conversations(DATA), read_conversations(VAL)
    assert 30 <= len(train) <= 80 and len(val) >= 5
    for conv in train + val:
        assert conv[-1]["role"] == "assistant" and conv[-1]["content"].strip()
        assert "Kelvaro" in conv[0]["content"] + conv[-1]["content"]
    questions = {c[0]["content"] for c in train}
    assert not questions & {c[0]["content"] for c in val}, "held-out questions must not be trained on"


def test_demo_data_tokenizes_whole() -> None:
    data = InstructDataset(DATA, tiny_tokenizer(), seq_len=512, val_path=VAL)
    assert (data.stats.train, data.stats.val) == (len(read_conversations(DATA)), len(read_conversations(VAL)))
    assert data.stats.truncated == 0


def test_demo_questions_are_the_held_out_ones() -> None:
    demo = load_script("examples/demo.py")
    qs = demo.questions()
    assert qs and qs == [c[0]["content"] for c in read_conversations(VAL)][: len(qs)]
    assert demo.CONFIG.is_file()
