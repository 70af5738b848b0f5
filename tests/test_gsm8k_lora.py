"""benchmarks/gsm8k_lora.py: the missing-data message (its answer extraction is the library's, tested in
test_eval_scoring.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _scripts import load_script

ROOT = Path(__file__).parent.parent


def _script():
    return load_script("benchmarks/gsm8k_lora.py")


def test_missing_data_exits_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        _script().main(["--data", str(tmp_path)])
    assert "gsm8k_train.jsonl not found" in str(info.value)
