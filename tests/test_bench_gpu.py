"""benchmarks/gpu.py: its arithmetic (MFU, bandwidth bound, GPU table) and a CPU smoke run of every code path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _scripts import load_script

from llmlab.config import ModelConfig

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
gpu = load_script("benchmarks/gpu.py")


def test_mfu_counts_flops_as_the_issue_did():
    # issue 9: HF at 170k tokens/s on smollm2-135m is 21% of 989 TFLOP/s; 53k on tinyllama-1.1b is 39%
    for preset, tps, mfu in (("smollm2-135m", 170e3, 0.21), ("tinyllama-1.1b", 53e3, 0.39)):
        flops = gpu.train_flops_per_token(ModelConfig.from_name(preset), 2048)
        assert tps * flops / 989e12 == pytest.approx(mfu, abs=0.005)


def test_bandwidth_bound_reads_every_weight_and_the_cache():
    cfg = ModelConfig.from_name("tinyllama-1.1b")
    weights = gpu.decode_bytes_per_step(cfg, 1, 0)
    assert weights == pytest.approx(2 * (cfg.num_params() - cfg.vocab_size * cfg.hidden_size), rel=0.001)
    per_token_kv = 2 * 22 * 4 * 64 * 2  # k and v, layers, kv heads, head dim, bf16
    assert gpu.decode_bytes_per_step(cfg, 32, 100) - weights == 32 * 100 * per_token_kv


def test_gpu_specs_by_name_and_overrides():
    args = gpu.parse_args([])
    assert gpu.gpu_specs("NVIDIA H100 80GB HBM3", args) == (989e12, 3.35e12)
    assert gpu.gpu_specs("NVIDIA H200", args) == (989e12, 4.8e12)
    assert gpu.gpu_specs("NVIDIA H100 PCIe", args) == (756e12, 2.0e12)
    assert gpu.gpu_specs("Some Future GPU", args) == (None, None)
    assert gpu.gpu_specs("Some Future GPU", gpu.parse_args(["--peak-tflops", "100", "--bandwidth-tbs", "1"])) == \
        (100e12, 1e12)


def test_table_gives_ratios_against_hf_and_shows_failures():
    rows = [{"model": "m", "case_id": "train-full", "case": "full b8", "label": "HF transformers", "status": "ok",
             "tokens_per_s": 100.0, "peak_gib": 40.0, "mfu": 0.2},
            {"model": "m", "case_id": "train-full", "case": "full b8", "label": "llmlab", "status": "ok",
             "tokens_per_s": 150.0, "peak_gib": 20.0, "mfu": 0.3},
            {"model": "m", "case_id": "decode-1", "label": "HF generate, eager", "status": "ok", "tokens_per_s": 10.0},
            {"model": "m", "case_id": "decode-1-static", "label": "HF static", "status": "ok", "tokens_per_s": 40.0},
            {"model": "m", "case_id": "decode-1", "label": "llmlab", "status": "ok", "tokens_per_s": 100.0},
            {"model": "m", "case_id": "maxbatch", "label": "HF", "status": "OOM"},
            {"model": "m", "case_id": "maxbatch", "label": "llmlab", "status": "skipped (time budget)"}]
    text = gpu.table(rows)
    assert "| m | full b8 | llmlab | 150 | 30.0% | 20.0 | 1.50x | 0.50x |" in text
    assert "| llmlab | 100 | - | - | 2.50x |" in text  # against HF's best decode, the static + compile one
    assert "| HF | OOM |" in text and "skipped (time budget)" in text


@pytest.mark.slow
def test_smoke_run_covers_every_case_on_cpu(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = tmp_path / "rows.json"
    env = {**os.environ, "GPU_BENCH_FORBID": "jsonargparse,gguf"}  # the GPU machine has neither
    proc = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--smoke", "--no-compile", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    rows = json.loads(out.read_text())
    bad = [(r["model"], r["case_id"], r["label"], r["status"]) for r in rows
           if r["status"] != "ok" and not r["status"].endswith("not installed)")]
    assert not bad, proc.stderr[-3000:]
    cases = {(r["case_id"], r["label"].split()[0]) for r in rows}
    for case in ("train-full", "train-lora", "decode-1", "decode-32"):
        assert {(case, "HF"), (case, "llmlab")} <= cases
    assert ("decode-1-static", "HF") in cases and ("maxbatch", "HF") in cases and ("maxbatch", "llmlab") in cases
    assert ("train-qlora", "llmlab") in cases
    assert next(r for r in rows if r["case_id"] == "maxbatch")["max_batch"] == 4  # the simulated memory limit
    assert "| model | case | engine | tokens/s |" in proc.stdout
