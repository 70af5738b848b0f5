"""The command line: every command's --help documents every option without loading torch; bare bool flags and
repeated options reach the commands (tests/test_argv.py tests the argv rewrite itself); output folders and errors:
prepare, convert and merge replace only their own earlier output (anything else needs --overwrite, and never leaves
a half-written folder); bad paths and options are one line."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import docstring_parser
import pytest
import torch
from _corpus import make_text
from _tiny import tiny_checkpoint

from llmlab.args import LoRAConfig
from llmlab.checkpoint import load_checkpoint
from llmlab.cli import COMMANDS, main
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


# -- the command table and the pre-parse step ---------------------------------------------------------
def documented_options(command: Any) -> dict[str, str]:
    """Every option of a command (`name`, or `group.field` of an option dataclass) -> its docstring's help text."""
    def params(obj: Any) -> dict[str, str]:
        return {p.arg_name: p.description or "" for p in docstring_parser.parse(obj.__doc__ or "").params}

    docs, found = params(command), {}
    for name, hint in get_type_hints(command).items():
        if name != "return":
            found[name] = docs.get(name, "")
            if is_dataclass(hint):
                found |= {f"{name}.{field}": text for field, text in params(hint).items()}
    return found


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_shows_every_option_with_its_help_text(name: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    shown = "".join(capsys.readouterr().out.split())  # argparse wraps lines (and words at hyphens); a group's
    # help is its title, without the final period
    options = documented_options(COMMANDS[name])
    assert options
    for option, text in options.items():
        assert text, f"`llmlab {name}`: option {option} has no help text in its docstring"
        assert option in shown and "".join(text.split()).rstrip(".") in shown, f"`llmlab {name} --help` lacks {option}"


def test_help_of_every_command_leaves_torch_unloaded() -> None:
    code = ("import contextlib, io, sys\n"
            "from llmlab.cli import COMMANDS, main\n"
            "for name in ['--help', *COMMANDS]:\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        main([name, '--help'] if name in COMMANDS else [name])\n"
            "print(sorted(m for m in sys.modules if m.partition('.')[0] == 'torch')[:3])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_bare_bool_flag_means_true(inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("x\n")
    assert main([*command("prepare", inputs, out), "--overwrite", "false"]) == 2
    assert (out / "notes.txt").is_file()
    assert main([*command("prepare", inputs, out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists() and (out / "meta.json").is_file()
    capsys.readouterr()
    base = ["pretrain", "--model", "tiny", "--data", str(out), "--out", str(tmp_path / "run"), "--print_config"]
    # unset: null (auto, train.compile_auto decides); bare: true; an explicit value: that value
    for extra, compiled in (([], "null"), (["--train.compile"], "true"), (["--train.compile", "false"], "false")):
        with pytest.raises(SystemExit):
            main([*base[:-1], *extra, base[-1]])
        assert f"compile: {compiled}" in capsys.readouterr().out
    flag = "--train.int8_base"
    for extra, int8 in (([], "null"), ([flag, "true"], "true"), ([flag, "false"], "false")):
        with pytest.raises(SystemExit):
            main([*base[:-1], *extra, base[-1]])
        assert f"int8_base: {int8}" in capsys.readouterr().out
