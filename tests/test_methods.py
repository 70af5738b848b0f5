"""freeze and adapter methods: exactly the intended parameters change in a training step, training starts from the
base model, each lowers held-out loss on a tiny task, adapter folders load back, bad options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _tiny import changed_after_steps, task_records, tiny_checkpoint, write_jsonl

from llmlab.args import BottleneckConfig, FreezeConfig, TrainConfig
from llmlab.checkpoint import load_checkpoint
from llmlab.cli import main
from llmlab.errors import LLMLabError
from llmlab.finetune import finetune
from llmlab.methods import Bottleneck, Freeze, load_adapter
from llmlab.metrics import read_metrics


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("methods")
    # init std 0.2: block outputs at a trained model's scale (a bottleneck adapter reads them)
    return tiny_checkpoint(folder / "base", std=0.2), write_jsonl(folder / "task.jsonl", task_records(80))


def test_freeze_changes_exactly_the_top_blocks_norm_and_named_modules(setup: tuple[Path, Path]) -> None:
    ckpt, data = setup
    method = Freeze(FreezeConfig(top_blocks=1, train_norm=True, modules=["model.layers.0.mlp"]))
    changed, trained = changed_after_steps(ckpt, data, method)
    assert changed == trained
    assert all(n.startswith(("model.layers.1.", "model.norm.", "model.layers.0.mlp.")) for n in changed)
    assert "model.layers.1.self_attn.qkv_proj.weight" in changed and "model.norm.weight" in changed
    assert "model.layers.0.mlp.down_proj.weight" in changed
    assert "model.layers.0.self_attn.qkv_proj.weight" not in changed and "lm_head.weight" not in changed


def test_adapter_changes_only_adapters_and_starts_from_the_base(setup: tuple[Path, Path]) -> None:
    ckpt, data = setup
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    base = load_checkpoint(ckpt)
    adapted = Bottleneck(BottleneckConfig(dim=4)).prepare(load_checkpoint(ckpt)).eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids), base(ids), atol=0, rtol=0)  # zero up-projection: the base model
    assert "model.layers.0.self_attn.o_proj.weight" in adapted.state_dict()  # base names kept
    changed, trained = changed_after_steps(ckpt, data, Bottleneck(BottleneckConfig(dim=4)))
    assert changed == trained and len(trained) == 2 * 2 * 4  # 2 blocks x (attn, mlp) x (down, up) x (w, b)
    assert all(".adapter_" in n for n in changed)


@pytest.mark.parametrize("method, options", [
    ("freeze", ["--freeze.top_blocks", "1", "--freeze.train_head", "true"]),
    ("adapter", ["--bottleneck.dim", "16"]),
])
def test_method_lowers_held_out_loss(setup: tuple[Path, Path], tmp_path: Path, method: str,
                                     options: list[str]) -> None:
    ckpt, data = setup
    run = tmp_path / "run"
    assert main(["finetune", str(ckpt), "--data", str(data), "--out", str(run), "--method", method, *options,
                 "--train.lr", "1e-2", "--train.max_steps", "30", "--train.warmup_steps", "2", "--train.batch_size",
                 "8", "--train.seq_len", "64", "--train.eval_every", "0", "--train.eval_batches", "2",
                 "--train.save_every", "0"]) == 0
    vals = [r["val_loss"] for r in read_metrics(run) if r.get("val_loss") is not None]
    assert vals[-1] < vals[0] - 0.5, vals
    if method == "adapter":  # the adapters alone are saved, and load back on the base model
        final = run / "final"
        assert not (final / "model.safetensors").exists()
        model = load_adapter(load_checkpoint(ckpt), final)
        assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".adapter_up." in n)
        assert main(["merge", str(ckpt), str(final), "--out", str(tmp_path / "m")]) == 2
        with pytest.raises(LLMLabError, match="made for another base model"):
            load_adapter(load_checkpoint(tiny_checkpoint(tmp_path / "other", seed=5)), final)


def test_resume_of_an_adapter_run(setup: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, data = setup
    cfg = dict(lr=1e-2, max_steps=6, warmup_steps=1, batch_size=4, seq_len=64, eval_every=0, eval_batches=1,
               save_every=3, log_every=1)
    finetune(ckpt, data=data, out=tmp_path / "a", method="adapter", train=TrainConfig(**cfg))
    finetune(ckpt, data=data, out=tmp_path / "b", method="adapter", train=TrainConfig(**cfg, stop_at=3))
    finetune(ckpt, data=data, out=tmp_path / "b", method="adapter", train=TrainConfig(**cfg))
    loss = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "a") if r.get("loss") is not None}
    resumed = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "b") if r.get("loss") is not None}
    assert resumed[6] == pytest.approx(loss[6], rel=1e-5)


def test_bad_method_options(setup: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, _ = setup
    model = load_checkpoint(ckpt)
    with pytest.raises(LLMLabError, match="'top_blocks' must be between 0 and the model's 2 blocks, got 3"):
        Freeze(FreezeConfig(top_blocks=3)).prepare(model)
    with pytest.raises(LLMLabError, match="'model.layers.9' matches no module"):
        Freeze(FreezeConfig(modules=["model.layers.9"])).prepare(model)
    with pytest.raises(LLMLabError, match="leave nothing to train"):
        Freeze(FreezeConfig(top_blocks=0, train_norm=False)).prepare(model)
    with pytest.raises(LLMLabError, match="'dim' must be a positive integer"):
        Bottleneck(BottleneckConfig(dim=0))
    with pytest.raises(LLMLabError, match="'activation' must be gelu, silu or relu"):
        Bottleneck(BottleneckConfig(activation="tanh"))
