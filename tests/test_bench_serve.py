"""benchmarks/bench_serve.py: a short load test against a tiny checkpoint runs clean and prints the ratio."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _scripts import load_script
from _serve import make_fixture

ROOT = Path(__file__).parent.parent


def _bench():
    return load_script("benchmarks/bench_serve.py")


@pytest.mark.slow  # starts a server subprocess
def test_short_load_test_has_no_errors(tmp_path, capsys, monkeypatch):
    ckpt, _ = make_fixture(tmp_path)
    monkeypatch.setitem(os.environ, "OMP_NUM_THREADS", "1")
    out = tmp_path / "bench.json"
    code = _bench().main(["--ckpt", str(ckpt), "--settings", "default", "--clients", "3", "--duration", "1",
                          "--warmup", "0.5", "--max-tokens", "4", "--max-seq-len", "64", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["single"]["requests"] >= 1 and result["concurrent"]["requests"] >= 3
    assert result["concurrent"]["errors"] == 0 and result["ratio"] > 0
    printed = capsys.readouterr().out
    assert "default: aggregate throughput ratio, 3 clients / 1 client" in printed and "CPU flags:" in printed


def test_missing_checkpoint_is_reported(tmp_path, capsys):
    assert _bench().main(["--ckpt", str(tmp_path / "nothing")]) == 2
    assert "is not a checkpoint folder" in capsys.readouterr().err
