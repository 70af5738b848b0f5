"""JSON Lines files (one JSON value a line): the one reader, streaming, with errors that name the file and line.

Pretraining corpora (`llmlab.data`), instruction data (`llmlab.instruct`) and evaluation task data
(`llmlab.eval.taskfile`) all read JSONL through `iter_jsonl`; what a record must hold is each reader's own check.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from llmlab.errors import LLMLabError


class Line(NamedTuple):
    """One record of a JSONL file: its line number (from 1), the parsed value, and the bytes of the line."""

    number: int
    record: Any
    nbytes: int


def iter_jsonl(path: str | Path, objects: bool = False) -> Iterator[Line]:
    """The records of a .jsonl file (or .jsonl.gz, decompressed), read one line at a time; blank lines are skipped.

    With `objects`, every record must be a JSON object."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise LLMLabError(f"{path}:{number}: not UTF-8 text: {e}") from e
            except json.JSONDecodeError as e:
                raise LLMLabError(f"{path}:{number}: not valid JSON: {e.msg} (column {e.colno})") from e
            if objects and not isinstance(record, dict):
                raise LLMLabError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield Line(number, record, len(raw))
