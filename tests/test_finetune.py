"""Fine-tuning end to end on a tiny model: every method lowers held-out loss, LoRA merge, generate --adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _tiny import task_records, tiny_checkpoint, write_jsonl

from llmlab.checkpoint import load_checkpoint
from llmlab.cli import main
from llmlab.errors import LLMLabError
from llmlab.finetune import finetune
from llmlab.methods import load_adapter, make_method
from llmlab.metrics import read_metrics

TRAIN = ["--train.max_steps", "40", "--train.warmup_steps", "2", "--train.batch_size", "8", "--train.seq_len", "64",
         "--train.eval_every", "0", "--train.eval_batches", "2", "--train.save_every", "0", "--train.log_every", "5"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("finetune")
    return tiny_checkpoint(folder / "base"), write_jsonl(folder / "task.jsonl", task_records(80))


def val_losses(run_dir: Path) -> list[float]:
    return [r["val_loss"] for r in read_metrics(run_dir) if r.get("val_loss") is not None]


def ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.mark.slow
def test_lora_cli_finetune_merge_generate(setup: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    ckpt, data = setup
    run = tmp_path / "run"
    assert main(["finetune", str(ckpt), "--data", str(data), "--out", str(run), "--method", "lora",
                 "--lora.r", "8", "--lora.alpha", "16", "--lora.targets", "all", "--train.lr", "1e-2", *TRAIN]) == 0
    vals = val_losses(run)
    assert vals[-1] < vals[0] - 0.5, vals  # the held-out loss falls
    final = run / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()  # the adapter alone is saved

    assert main(["merge", str(ckpt), str(final), "--out", str(tmp_path / "merged")]) == 0
    merged = load_checkpoint(tmp_path / "merged")
    adapted = load_adapter(load_checkpoint(ckpt), final)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids()), adapted(ids()), atol=1e-5, rtol=0)
        assert (merged(ids()) - load_checkpoint(ckpt)(ids())).abs().max() > 1e-3

    capsys.readouterr()
    assert main(["generate", str(ckpt), "--prompt", "What does the cat say?", "--adapter", str(final),
                 "--max-new-tokens", "12", "--temperature", "0"]) == 0
    with_adapter = capsys.readouterr().out
    assert main(["generate", str(tmp_path / "merged"), "--prompt", "What does the cat say?",
                 "--max-new-tokens", "12", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == with_adapter  # unmerged adapter and merged checkpoint agree
    assert with_adapter.startswith("The")  # every response of the task starts so


@pytest.mark.slow
def test_full_finetune_lowers_held_out_loss(setup: tuple[Path, Path], tmp_path: Path) -> None:
    from llmlab.args import TrainConfig

    ckpt, data = setup
    cfg = TrainConfig(lr=3e-3, max_steps=25, warmup_steps=2, batch_size=8, seq_len=64, eval_every=0,
                      eval_batches=2, save_every=0, log_every=5)
    finetune(ckpt, data=data, out=tmp_path / "run", method="full", train=cfg, pack=True)
    vals = val_losses(tmp_path / "run")
    assert vals[-1] < vals[0] - 0.5, vals
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_finetune_errors(setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt, data = setup
    with pytest.raises(LLMLabError, match="--method must be one of full, freeze, adapter, lora, qlora"):
        make_method("dora")
    assert main(["finetune", str(ckpt), "--data", str(data), "--out", str(tmp_path / "r"),
                 "--lora.targets", "q,lm_head"]) == 2
    assert "match no module" in capsys.readouterr().err
    assert main(["finetune", str(ckpt), "--data", str(data), "--out", str(tmp_path / "r"),
                 "--train.seq_len", "4096"]) == 2
    assert "exceeds the context" in capsys.readouterr().err
    assert main(["merge", str(ckpt), str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


@pytest.mark.parametrize("native", [True, False])
def test_finetune_auto_precision_follows_the_cpu(native: bool, setup: tuple[Path, Path], tmp_path: Path,
                                                 monkeypatch) -> None:
    from _tiny import record_autocast

    from llmlab.args import TrainConfig

    ckpt, data = setup
    chosen = record_autocast(monkeypatch, native)
    cfg = TrainConfig(max_steps=1, batch_size=2, seq_len=64, eval_every=0, eval_batches=1, save_every=0)
    assert cfg.precision == "auto"
    finetune(ckpt, data=data, out=tmp_path / "run", method="lora", train=cfg)
    assert chosen == [torch.bfloat16 if native else None]


def test_lora_on_a_gguf_file_trains_its_blocks_and_the_adapter_gives_the_same_logits_in_peft(
        setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    """`llmlab finetune tiny.gguf --method lora` trains on the file's quantized blocks (no float checkpoint is
    loaded), and its PEFT adapter on the float import of the same GGUF in HF transformers + PEFT gives the logits
    llmlab gives on the quantized base: exactly the same weights with the dequant kernel (fp32 scales), within the
    bf16 rounding of scales with the fast kernels."""
    from _gguf_writer import tiny_mixed_gguf

    import llmlab.checkpoint as checkpoint
    from llmlab.gguf_import import import_gguf, load_gguf_quantized

    _, data = setup
    gguf = tiny_mixed_gguf(tmp_path / "tiny.gguf")
    run = tmp_path / "run"
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("a float copy was loaded"))
    assert main(["finetune", str(gguf), "--data", str(data), "--out", str(run), "--method", "lora",
                 "--lora.r", "4", "--lora.targets", "all", "--train.lr", "1e-2", TRAIN[0], "12",
                 *TRAIN[2:]]) == 0
    assert "training on the quantized blocks of" in capsys.readouterr().err
    vals = val_losses(run)
    assert vals[-1] < vals[0], vals
    final = run / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    monkeypatch.undo()

    peft = pytest.importorskip("peft", reason="the PEFT parity check needs peft")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(import_gguf(gguf, tmp_path / "float"), torch_dtype=torch.float32)
    x = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = hf(x).logits
        theirs = peft.PeftModel.from_pretrained(hf, final).eval()(x).logits
    assert (theirs - base_logits).abs().max() > 1e-3  # the adapter changes the logits
    # dequant computes with the exact fp32 weights; auto is whichever kernel this machine measured fastest (int4pack
    # rounds the activations and scales to bf16 inside, ~2% of the largest logit through a random tiny model)
    for kernel, tol in (("dequant", 1e-4), ("auto", 5e-2)):
        model, _, _ = load_gguf_quantized(gguf, dtype=torch.float32, kernel=kernel)
        with torch.no_grad():
            ours = load_adapter(model, final)(x)
        assert (ours - theirs).abs().max() <= tol * theirs.abs().max(), kernel


def test_base_weights_choose_the_gguf_blocks_only_for_adapter_methods(setup: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    from _gguf_writer import tiny_mixed_gguf

    from llmlab.finetune import gguf_base
    from llmlab.gguf_import import import_gguf

    ckpt, _ = setup
    gguf = tiny_mixed_gguf(tmp_path / "tiny.gguf")
    folder = import_gguf(gguf, tmp_path / "imported")  # keeps model.gguf
    assert gguf_base(folder, "lora") == folder / "model.gguf" == gguf_base(folder, "adapter", "gguf")
    assert gguf_base(gguf, "lora") == gguf
    assert gguf_base(folder, "lora", "float") is None and gguf_base(folder, "full") is None
    assert gguf_base(folder, "qlora") is None  # QLoRA quantizes the float weights to NF4 itself
    assert gguf_base(ckpt, "lora") is None  # a folder written by training keeps no GGUF
    with pytest.raises(LLMLabError, match="--base_weights gguf: .* keeps no GGUF"):
        gguf_base(ckpt, "lora", "gguf")
    with pytest.raises(LLMLabError, match="--method full trains float weights; .* is a GGUF file"):
        gguf_base(gguf, "full")
    with pytest.raises(LLMLabError, match="--base_weights gguf: --method freeze trains float weights"):
        gguf_base(folder, "freeze", "gguf")
    with pytest.raises(LLMLabError, match="--base_weights float: .* is a GGUF file"):
        gguf_base(gguf, "lora", "float")
    with pytest.raises(LLMLabError, match="--base_weights: expected one of auto, gguf, float, got 'nf4'"):
        gguf_base(folder, "lora", "nf4")
