"""benchmarks/gsm8k_lora.py: the final-number extraction that exact match rests on, and the missing-data message."""

from __future__ import annotations

from pathlib import Path

import pytest
from _scripts import load_script

ROOT = Path(__file__).parent.parent


def _script():
    return load_script("benchmarks/gsm8k_lora.py")


@pytest.mark.parametrize("text, number", [
    ("48/2 = <<48/2=24>>24 clips in May.\n48+24 = <<48+24=72>>72 in all.\n#### 72", "72"),
    ("She earned $1,234 in total.", "1234"),
    ("#### $18.00", "18"),
    ("It costs 2.5 dollars", "2.5"),
    ("#### -3", "-3"),
    ("I do not know.", None),
])
def test_final_number(text: str, number: str | None) -> None:
    assert _script().final_number(text) == number


def test_missing_data_exits_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        _script().main(["--data", str(tmp_path)])
    assert "gsm8k_train.jsonl not found" in str(info.value)
