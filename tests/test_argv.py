"""`llmlab.argv.preparse`, the one rewrite of the command line before jsonargparse: on the real command table
(which options are bools comes from the signatures) and on a made-up one, to show it reads the table it is given."""

from __future__ import annotations

from dataclasses import dataclass

from llmlab.argv import preparse
from llmlab.cli import COMMANDS


def rewrite(argv: list[str]) -> list[str]:
    return preparse(argv, COMMANDS)


def test_preparse_is_the_one_rewrite_of_argv() -> None:
    # dashes in option names, not in values
    assert rewrite(["generate", "C", "--max-new-tokens", "3", "--prompt", "--a-b", "--system=x-y"]) == \
        ["generate", "C", "--max_new_tokens", "3", "--prompt", "--a-b", "--system=x-y"]
    # a bare bool option is true, in option groups too; an explicit value still works; bool | None too
    assert rewrite(["finetune", "C", "--pack", "--train.activation-checkpointing", "--lora.rslora", "false",
                     "--data", "d", "--train.compile", "--out", "o"]) == \
        ["finetune", "C", "--pack=true", "--train.activation_checkpointing=true", "--lora.rslora=false", "--data",
         "d", "--train.compile=true", "--out", "o"]
    assert rewrite(["generate", "--chat", "C", "--compile", "No", "--prompt", "p"]) == \
        ["generate", "--chat=true", "C", "--compile=No", "--prompt", "p"]
    assert rewrite(["prepare", "c.txt", "--overwrite=false", "--out", "o"]) == \
        ["prepare", "c.txt", "--overwrite=false", "--out", "o"]
    # a repeated list option appends
    assert rewrite(["serve", "C", "--adapter", "a=x", "--adapter=b=y"]) == \
        ["serve", "C", "--adapter+", "a=x", "--adapter+=b=y"]
    assert rewrite(["serve", "C", "--allowed-hosts", "a.example", "--allowed-hosts", "b.example"]) == \
        ["serve", "C", "--allowed_hosts+", "a.example", "--allowed_hosts+", "b.example"]
    # a command's one-letter options
    assert rewrite(["search", "I", "q", "-k", "3"]) == ["search", "I", "q", "--k", "3"]
    # several index paths are one JSON list; an option's value is not a path
    assert rewrite(["index", "a", "--out", "X", "b", "--progress"]) == \
        ["index", '["a", "b"]', "--out", "X", "--progress=true"]
    assert rewrite(["index", "a", "--out", "X"]) == ["index", "a", "--out", "X"]
    assert rewrite(["--help"]) == ["--help"] and rewrite([]) == []


@dataclass
class _Group:
    fast: bool = False
    steps: int = 1


def _command(path: str, *, loud: bool | None = None, opts: _Group = _Group(), name: str = "x") -> None:
    """A command with a bool | None option and an option group."""


def test_preparse_reads_the_bools_of_the_table_it_is_given() -> None:
    table = {"go": _command}
    assert preparse(["go", "p", "--loud", "--opts.fast", "--name", "--n-a"], table) == \
        ["go", "p", "--loud=true", "--opts.fast=true", "--name", "--n-a"]
    assert preparse(["go", "p", "--opts.steps", "3", "--loud", "off"], table) == \
        ["go", "p", "--opts.steps", "3", "--loud=off"]
    # a command not in the table: dashes still become underscores, nothing is a bool
    assert preparse(["other", "--my-flag", "x"], table) == ["other", "--my_flag", "x"]
