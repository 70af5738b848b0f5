"""Rewriting `llmlab`'s command line before jsonargparse parses it (`preparse`): the conveniences a person typing
commands expects and jsonargparse does not give (dashes in option names, bare bool flags, repeated list options,
several positional paths, one-letter options). It reads the command table only to learn which options are bools,
and stays torch-free like the rest of the command line (`llmlab.cli`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import is_dataclass
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

_REPEATABLE = {"serve": ("--adapter", "--allowed_hosts")}  # list options a repeated flag extends, not replaces
_SHORT_OPTIONS = {"search": {"-k": "--k"}}  # one-letter options some commands accept
_PATH_LISTS = ("index",)  # commands whose one positional takes several paths
_BOOL_WORDS = ("true", "false", "yes", "no", "on", "off", "null")  # what jsonargparse reads as a bool (or None)


def preparse(argv: list[str], commands: Mapping[str, Callable[..., Any]]) -> list[str]:
    """The command line as typed -> the one jsonargparse parses; every rewrite of argv happens here. `commands` is
    the command table (`llmlab.cli.COMMANDS`): the signatures say which options are bools.

    - `--max-new-tokens` works as well as jsonargparse's `--max_new_tokens`: dashes in option names (before any
      `=`) become underscores; values are untouched.
    - A bool option given bare (`--overwrite`, `--pack`, `--train.compile`) means true; `--overwrite false` (or
      `=false`) still works. Which options are bools is read from the command's signature and option groups.
    - `serve --adapter A --adapter B` serves both: a repeated list option appends (jsonargparse's `--adapter+`)
      instead of the last one silently winning.
    - `index a b c --out X`: several positional paths become one JSON list (jsonargparse reads one value per
      positional).
    - `search INDEX "question" -k 3`: a command's one-letter options become their long names.
    """
    command = argv[0] if argv and argv[0] in commands else None
    if command in _SHORT_OPTIONS:
        argv = [command, *(_SHORT_OPTIONS[command].get(arg, arg) for arg in argv[1:])]
    bools = _bool_options(commands[command]) if command else set()
    repeatable = _REPEATABLE.get(command, ())
    out, positionals, i = argv[:1] if command else [], [], 1 if command else 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not (arg.startswith("--") and arg[2:3].isalpha()):
            if not arg.startswith("-"):
                positionals.append(len(out))
            out.append(arg)
            continue
        name, eq, value = arg.partition("=")
        name = "--" + name[2:].replace("-", "_")
        if name in bools and not eq:
            eq, value = "=", "true"
            if i < len(argv) and argv[i].lower() in _BOOL_WORDS:
                value, i = argv[i], i + 1
        out.append(name + ("+" if name in repeatable else "") + eq + value)
        if not eq and name not in ("--help", "--print_config") and i < len(argv):  # its value, never a positional
            out.append(argv[i])
            i += 1
    if command in _PATH_LISTS and len(positionals) > 1:
        paths = json.dumps([out[j] for j in positionals])
        out = [command, paths, *(a for j, a in enumerate(out[1:], 1) if j not in positionals)]
    return out


def _bool_options(command: Callable[..., Any]) -> set[str]:
    """The bool options of a command (`--name`, and `--group.field` of its option dataclasses)."""
    found = set()
    for name, hint in get_type_hints(command).items():
        if is_dataclass(hint):
            found |= {f"--{name}.{field}" for field, h in get_type_hints(hint).items() if _is_bool(h)}
        elif _is_bool(hint):
            found.add(f"--{name}")
    return found


def _is_bool(hint: Any) -> bool:
    """bool, or bool | None."""
    return hint is bool or (get_origin(hint) in (Union, UnionType) and set(get_args(hint)) == {bool, type(None)})
