"""The LSTM baseline: it learns through the one training loop, saves and loads, resumes exactly, bad input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _corpus import make_text

from llmlab.cli import main
from llmlab.data import TokenDataset, prepare
from llmlab.errors import LLMLabError
from llmlab.metrics import read_metrics
from llmlab.pretrain import pretrain
from llmlab.rnn import FullLSTM, LSTMConfig, build_lstm, load_lstm, save_lstm
from llmlab.train import TrainConfig, checkpoints, train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("rnn-data")
    (folder / "corpus.txt").write_text(make_text(2000))
    return prepare([folder / "corpus.txt"], folder / "data", train_tokenizer=300, val_fraction=0.1, progress=False)


def small_config(**overrides: object) -> TrainConfig:
    base = dict(lr=1e-2, warmup_steps=2, max_steps=30, batch_size=8, seq_len=32, eval_every=10, eval_batches=2,
                save_every=0, keep_last=0, log_every=1, seed=0, device="cpu")
    return TrainConfig(**{**base, **overrides})


def run(data_dir: Path, out: Path, **overrides: object):
    cfg = small_config(**overrides)
    ds = TokenDataset(data_dir, cfg.seq_len, cfg.seed)
    torch.manual_seed(0)
    model = build_lstm(LSTMConfig.from_name("lstm-tiny", vocab_size=300))
    return train(model, FullLSTM(), ds, cfg, out, tokenizer=ds.tokenizer())


def test_lstm_learns_through_the_loop_and_final_loads_with_the_same_logits(data_dir: Path, tmp_path: Path) -> None:
    result = run(data_dir, tmp_path / "run")
    assert result.val_losses[0] > 5.0  # ~ln(300) at the start
    assert result.val_losses[30] < 0.5 * result.val_losses[0]
    config = json.loads((result.final / "config.json").read_text())
    assert config["model_type"] == "llmlab-lstm" and config["hidden_size"] == 64
    assert (result.final / "tokenizer.json").is_file()

    model = load_lstm(result.final)
    assert model.lm_head.weight is model.embed_tokens.weight  # still tied after loading
    ids = TokenDataset(data_dir, 32).val_batch(0, 2)["input_ids"]
    saved_again = save_lstm(model, tmp_path / "copy")
    with torch.no_grad():
        torch.testing.assert_close(load_lstm(saved_again)(ids), model(ids))
        # the loaded model predicts as well as training measured
        logits = model(ids)
    labels = TokenDataset(data_dir, 32).val_batch(0, 2)["labels"]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    assert float(loss) < 0.6 * result.val_losses[0]


def test_untied_save_load_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_lstm(LSTMConfig(vocab_size=50, hidden_size=16, num_layers=3, tie_word_embeddings=False)).eval()
    assert sum(p.numel() for p in model.parameters()) == model.config.num_params()
    loaded = load_lstm(save_lstm(model, tmp_path / "m"))
    assert loaded.lm_head.weight is not loaded.embed_tokens.weight
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(data_dir: Path, tmp_path: Path) -> None:
    run(data_dir, tmp_path / "full", max_steps=8, save_every=4)
    run(data_dir, tmp_path / "split", max_steps=8, save_every=4, stop_at=4)
    assert [p.name for p in checkpoints(tmp_path / "split")] == ["step-000004"]
    resumed = run(data_dir, tmp_path / "split", max_steps=8, save_every=4)
    assert resumed.final is not None
    full = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full") if r["loss"] is not None}
    split = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "split") if r["loss"] is not None}
    assert split.keys() == full.keys() and len(full) == 8
    for step in full:
        assert split[step] == pytest.approx(full[step], rel=1e-5)


def test_resume_refuses_a_different_lstm(data_dir: Path, tmp_path: Path) -> None:
    run(data_dir, tmp_path / "run", max_steps=4, save_every=2, stop_at=2)
    cfg = small_config(max_steps=4)
    ds = TokenDataset(data_dir, cfg.seq_len)
    other = build_lstm(LSTMConfig(vocab_size=300, hidden_size=32, num_layers=2))
    with pytest.raises(LLMLabError, match=r"different model: config fields \['hidden_size'\]"):
        train(other, FullLSTM(), ds, cfg, tmp_path / "run")


def test_cli_pretrain_arch_lstm(data_dir: Path, tmp_path: Path) -> None:
    spec = tmp_path / "lstm.yaml"
    spec.write_text("preset: lstm-tiny\nvocab_size: 300\nhidden_size: 32\n")
    out = tmp_path / "run"
    assert main(["pretrain", "--arch", "lstm", "--model", str(spec), "--data", str(data_dir), "--out", str(out),
                 "--train.max_steps", "3", "--train.seq_len", "16", "--train.batch_size", "2",
                 "--train.eval_batches", "1", "--train.device", "cpu"]) == 0
    model = load_lstm(out / "final")
    assert model.config.hidden_size == 32 and model.config.eos_token_id is not None  # ids come from the tokenizer


def test_bad_input_errors(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["pretrain", "--data", str(data_dir), "--out", str(tmp_path / "x"), "--train.max_steps", "1"]
    assert main([*base, "--arch", "gru", "--model", "lstm-tiny"]) == 2
    assert "unknown --arch 'gru'; expected one of llama, lstm" in capsys.readouterr().err
    assert main([*base, "--arch", "lstm", "--model", "micro-10m"]) == 2
    assert "'micro-10m' is a LLaMA preset, not an LSTM one: use --arch llama" in capsys.readouterr().err
    assert main([*base, "--model", "lstm-10m"]) == 2
    assert "'lstm-10m' is an LSTM preset: add --arch lstm" in capsys.readouterr().err
    assert main([*base, "--arch", "lstm", "--model", "lstm-huge"]) == 2
    assert "unknown LSTM preset 'lstm-huge'; known LSTM presets: lstm-10m, lstm-tiny" in capsys.readouterr().err
    with pytest.raises(LLMLabError, match=r"has \d+ tokens but model 'lstm-tiny' has vocab_size 256"):
        pretrain(model="lstm-tiny", data=data_dir, out=tmp_path / "y", train=small_config(), arch="lstm")

    with pytest.raises(LLMLabError, match=r"unknown LSTM config keys \['num_hidden_layers'\]"):
        LSTMConfig.from_dict({"num_hidden_layers": 2})
    with pytest.raises(LLMLabError, match="'num_layers' must be a positive integer, got 0"):
        LSTMConfig(num_layers=0)
    with pytest.raises(LLMLabError, match=r"'dropout' must be in \[0, 1\), got 1.5"):
        LSTMConfig(dropout=1.5)

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(LLMLabError, match="model_type 'llama' is not an LSTM"):
        load_lstm(llama)
    with pytest.raises(LLMLabError, match="no config.json"):
        load_lstm(tmp_path / "nothing")
    model = build_lstm(LSTMConfig(vocab_size=20, hidden_size=8, num_layers=1))
    folder = save_lstm(model, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 16}))
    with pytest.raises(LLMLabError, match="LSTM tensors do not match its config.json"):
        load_lstm(folder)
    with pytest.raises(LLMLabError, match="cannot keep packed examples apart"):
        model(torch.zeros(1, 4, dtype=torch.long), mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))
