"""benchmarks/bench_finetune.py: option checks, the table and docs block, and a one-step run on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
from _scripts import load_script


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
    results = {"lora": {"tokens_per_s": 300.0, "peak_bytes": 2**20 * 50, "trainable": 10**6, "held_out_loss": 2.02,
                        "autocast": "bfloat16"},
               "lora-fp32": {"tokens_per_s": 150.0, "peak_bytes": 2**20 * 100, "trainable": 10**6,
                             "held_out_loss": 2.0, "autocast": "fp32"},
               "hf-peft-lora": {"tokens_per_s": 200.0, "peak_bytes": 2**20 * 100, "trainable": 10**6,
                                "held_out_loss": 2.1},
               "full": {"tokens_per_s": 130.0, "peak_bytes": 2**20 * 300, "trainable": 10**8, "held_out_loss": 1.9},
               "hf-full": {"tokens_per_s": 100.0, "peak_bytes": 2**20 * 400, "trainable": 10**8}}
    text = bench.table(results)
    assert "| lora | gguf | bfloat16 | 1.00M | 300 | 1.50x | 50 | 0.50x | 2.0200 | +1.00% |" in text
    assert "| full | float | fp32 | 100.00M | 130 | 1.30x | 300 | 0.75x | 1.9000 | -5.00% |" in text  # vs hf-full
    assert "| hf-full | float (HF) | fp32 | 100.00M | 100 | - | 400 | - | - | - |" in text
    doc = tmp_path / "finetune.md"
    doc.write_text("# Fine-tuning\n\nintro\n")
    bench.write_docs(doc, "first")
    bench.write_docs(doc, "second")
    out = doc.read_text()
    assert "intro" in out and "second" in out and "first" not in out and out.count(bench.MARK_BEGIN) == 1


@pytest.mark.slow
def test_the_issue_rows_run_on_a_tiny_gguf_import(tmp_path: Path) -> None:
    from _gguf_writer import tiny_mixed_gguf

    from llmlab.gguf_import import import_gguf

    bench = _bench()
    ckpt = import_gguf(tiny_mixed_gguf(tmp_path / "tiny.gguf"), tmp_path / "ckpt")  # keeps model.gguf
    text = tmp_path / "text.txt"
    text.write_text("the cat and the dog sat on the mat. " * 60)
    doc = tmp_path / "docs" / "finetune.md"
    results = bench.main(["--ckpt", str(ckpt), "--methods", "lora,lora-fp32,hf-peft-lora,full,hf-full",
                          "--steps", "2", "--warmup", "1", "--batch-size", "1", "--seq-len", "8",
                          "--eval-batches", "1", "--text", str(text), "--docs", str(doc)])
    assert list(results) == ["lora", "lora-fp32", "hf-peft-lora", "full", "hf-full"]
    assert all(r["tokens_per_s"] > 0 and r["trainable"] > 0 and r["held_out_loss"] > 0 for r in results.values())
    assert results["lora"]["trainable"] == results["hf-peft-lora"]["trainable"]  # same adapter size on both sides
    assert results["full"]["trainable"] == results["hf-full"]["trainable"]
    assert results["lora-fp32"]["autocast"] == "fp32"
    assert (tmp_path / "docs" / "img" / "finetune-bench.png").stat().st_size > 0
    out = doc.read_text()
    assert "| lora | gguf |" in out and "CPU flags:" in out
