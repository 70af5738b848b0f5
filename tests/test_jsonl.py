"""llmlab.jsonl: the one JSONL reader: line numbers in records and errors, blank lines, gzip, byte counts."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from llmlab.errors import LLMLabError
from llmlab.jsonl import iter_jsonl


def test_records_with_line_numbers_and_bytes(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    text = '{"a": 1}\n\n  \n["x"]\r\n{"s": "one\u2028line"}\n'  # U+2028 inside a string does not end a line
    path.write_text(text, encoding="utf-8")
    lines = list(iter_jsonl(path))
    assert [(n, r) for n, r, _ in lines] == [(1, {"a": 1}), (4, ["x"]), (5, {"s": "one\u2028line"})]
    assert [b for _, _, b in lines] == [9, 7, len('{"s": "one\u2028line"}\n'.encode())]
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    assert [line.record for line in iter_jsonl(gz)] == [line.record for line in lines]


@pytest.mark.parametrize("content, message", [
    (b'{"a": 1}\n{"a": \n', r"d\.jsonl:2: not valid JSON: Expecting value"),
    (b'{"a": 1}\n\n{"a": "\xff"}\n', r"d\.jsonl:3: not UTF-8 text"),
    (b'{"a": 1}\n[1]\n', r"d\.jsonl:2: expected a JSON object, got list"),
])
def test_errors_name_the_file_and_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(LLMLabError, match=message):
        list(iter_jsonl(path, objects=True))
