"""benchmarks/bench_finetune.py: option checks, the table and docs block, and a one-step run on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
from _scripts import load_script
from _tiny import tiny_checkpoint


def _bench():
    return load_script("benchmarks/bench_finetune.py")


def test_options_are_checked(capsys: pytest.CaptureFixture) -> None:
    bench = _bench()
    assert bench.parse_args(["--methods", "lora, hf-peft-lora"]).method_list == ["lora", "hf-peft-lora"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "lora,dora"])
    assert "unknown ['dora']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "2", "--warmup", "2"])
    assert "--steps must be larger than --warmup" in capsys.readouterr().err


def test_table_ratios_and_docs_block(tmp_path: Path) -> None:
    bench = _bench()
    results = {"lora": {"tokens_per_s": 300.0, "peak_bytes": 2**20 * 50, "trainable": 10**6},
               "hf-peft-lora": {"tokens_per_s": 200.0, "peak_bytes": 2**20 * 100, "trainable": 10**6}}
    text = bench.table(results)
    assert "| lora | 1.00M | 300 | 1.50x | 50 | 0.50x |" in text
    doc = tmp_path / "finetune.md"
    doc.write_text("# Fine-tuning\n\nintro\n")
    bench.write_docs(doc, "first")
    bench.write_docs(doc, "second")
    out = doc.read_text()
    assert "intro" in out and "second" in out and "first" not in out and out.count(bench.MARK_BEGIN) == 1


@pytest.mark.slow
def test_one_step_run_on_a_tiny_model(tmp_path: Path) -> None:
    bench = _bench()
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    doc = tmp_path / "docs" / "finetune.md"
    results = bench.main(["--ckpt", str(ckpt), "--methods", "lora,hf-peft-lora", "--steps", "2", "--warmup", "1",
                          "--batch-size", "1", "--seq-len", "8", "--docs", str(doc)])
    assert set(results) == {"lora", "hf-peft-lora"}
    assert all(r["tokens_per_s"] > 0 and r["trainable"] > 0 for r in results.values())
    assert results["lora"]["trainable"] == results["hf-peft-lora"]["trainable"]  # same adapter size on both sides
    assert (tmp_path / "docs" / "img" / "finetune-bench.png").stat().st_size > 0
    assert "| lora |" in doc.read_text()
