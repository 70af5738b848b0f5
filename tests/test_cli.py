"""The command line's output folders and errors: prepare, convert and merge replace only their own earlier output
(anything else needs --overwrite, and never leaves a half-written folder); bad paths and options are one line."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from _corpus import make_text
from _tiny import tiny_checkpoint

from llmlab.args import LoRAConfig
from llmlab.checkpoint import load_checkpoint
from llmlab.cli import main
from llmlab.errors import LLMLabError
from llmlab.methods import LoRA


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli")
    ckpt = tiny_checkpoint(folder / "base")
    method = LoRA(LoRAConfig(r=2, targets="q,v"))
    model = method.prepare(load_checkpoint(ckpt))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    method.save(model, folder / "adapter")
    (folder / "corpus.txt").write_text(make_text(1500))  # several blocks: both splits get text
    return {"ckpt": ckpt, "adapter": folder / "adapter", "corpus": folder / "corpus.txt"}


def command(name: str, inputs: dict[str, Path], out: Path) -> list[str]:
    return {"prepare": ["prepare", str(inputs["corpus"]), "--out", str(out), "--tokenizer", str(inputs["ckpt"])],
            "convert": ["convert", str(inputs["ckpt"]), str(out), "--dtype", "bfloat16"],
            "merge": ["merge", str(inputs["ckpt"]), str(inputs["adapter"]), "--out", str(out)]}[name]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmlab: error: "), err
    return err[0]


@pytest.mark.parametrize("name", ["prepare", "convert", "merge"])
def test_output_folder_of_other_files_is_refused_unless_overwrite(name: str, inputs: dict[str, Path], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "d"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("x\n")
    before = digest(out)
    assert main(command(name, inputs, out)) == 2
    line = error_line(capsys)
    assert f"{out} is not empty and is not an output of `llmlab {name}` (it holds notes.txt, sub/)" in line
    assert "--overwrite true" in line and digest(out) == before  # nothing lost
    assert main([*command(name, inputs, out), "--overwrite", "true"]) == 0
    assert not (out / "notes.txt").exists() and not (out / "sub").exists() and (out / "llmlab_output.json").is_file()
    first = digest(out)
    assert main(command(name, inputs, out)) == 0  # its own earlier output is replaced without asking
    assert digest(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary folder left beside it
    (out / "README.md").write_text("my notes on this run\n")  # a file the command did not write: refused again
    capsys.readouterr()
    assert main(command(name, inputs, out)) == 2 and "it holds README.md" in error_line(capsys)
    assert (out / "README.md").read_text() == "my notes on this run\n"


@pytest.mark.parametrize("name", ["prepare", "convert", "merge"])
def test_output_path_that_is_a_file_is_refused(name: str, inputs: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "existing.txt"
    out.write_text("keep me\n")
    for extra in ([], ["--overwrite", "true"]):
        assert main([*command(name, inputs, out), *extra]) == 2
        assert error_line(capsys) == f"llmlab: error: {out} is a file (expected a folder path)"
        assert out.read_text() == "keep me\n"
    assert main(command(name, inputs, out / "inside")) == 2
    assert f"{out} is a file, so the folder {out / 'inside'} cannot be made under it" in error_line(capsys)


def test_another_commands_output_is_not_an_earlier_output(inputs: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "model"
    assert main(command("convert", inputs, out)) == 0
    capsys.readouterr()
    assert main(command("merge", inputs, out)) == 2
    assert "is not an output of `llmlab merge`" in error_line(capsys)


def test_overwrite_never_leaves_a_half_written_folder(tmp_path: Path) -> None:
    from llmlab.checkpoint import output_folder

    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("x\n")
    with pytest.raises(KeyboardInterrupt):
        with output_folder(out, "prepare", overwrite=True) as tmp:
            (tmp / "train.bin").write_bytes(b"\0" * 10)
            raise KeyboardInterrupt  # killed half way
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"] and (out / "notes.txt").read_text() == "x\n"
    with pytest.raises(LLMLabError, match="is not an output of `llmlab prepare`"):
        with output_folder(out, "prepare") as tmp:
            raise AssertionError("not reached: refused before anything is written")


@pytest.mark.parametrize("name", ["finetune", "pretrain"])
def test_run_folder_that_is_a_file_is_one_line(name: str, inputs: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run.txt"
    out.write_text("keep me\n")
    if name == "finetune":
        data = tmp_path / "task.jsonl"
        data.write_text('{"instruction": "Say hi", "output": "hi"}\n' * 20)
        args = ["finetune", str(inputs["ckpt"]), "--data", str(data), "--train.seq_len", "64"]
    else:
        data = tmp_path / "data"
        assert main(["prepare", str(inputs["corpus"]), "--out", str(data), "--tokenizer", str(inputs["ckpt"])]) == 0
        capsys.readouterr()
        (tmp_path / "model.yaml").write_text("preset: tiny\nvocab_size: 300\n")
        args = ["pretrain", "--model", str(tmp_path / "model.yaml"), "--data", str(data), "--train.seq_len", "16"]
    assert main([*args, "--out", str(out), "--train.max_steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # after the data summary: one error line, no traceback
    assert err[-1] == f"llmlab: error: {out} is a file (expected a folder path)" and "Traceback" not in err[0]
    assert out.read_text() == "keep me\n"


def test_serve_port_out_of_range_is_one_line(inputs: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    for port in ("99999", "-1"):
        assert main(["serve", str(inputs["ckpt"]), "--port", port]) == 2
        assert error_line(capsys) == f"llmlab: error: --port must be a TCP port from 1 to 65535, got {port}"
