"""Every YAML in examples/ parses as the --config of its command (named by the file's prefix: pretrain-x.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llmlab.args import TrainConfig
from llmlab.cli import COMMANDS
from llmlab.config import ModelConfig

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_parses(path: Path, capsys: pytest.CaptureFixture) -> None:
    from jsonargparse import CLI

    command = path.stem.split("-")[0]
    assert command in COMMANDS, f"{path.name}: no command '{command}'"
    with pytest.raises(SystemExit) as exit_info:  # --print_config validates against the signature, then exits
        CLI(COMMANDS, args=[command, "--config", str(path), "--print_config"], as_positional=True)
    assert exit_info.value.code in (0, None)
    parsed = yaml.safe_load(capsys.readouterr().out)
    if command == "pretrain":
        ModelConfig.from_spec(parsed["model"])  # the preset or model file exists
        TrainConfig(**parsed["train"]).validate()


def test_there_are_examples() -> None:
    assert any(p.name.startswith("pretrain-") for p in EXAMPLES)
