"""HF-format checkpoint folders: `config.json` + `model.safetensors` (or shards + index), HF tensor names.

The model fuses q/k/v and gate/up projections; `hf_to_llmlab` and `llmlab_to_hf` are the one place that maps
between its names and the names on disk. Model, adapter and teacher-cache safetensors files are read through
`read_safetensors` (one error for a truncated or corrupt file), and every dtype name (`--dtype`, `teacher_dtype`,
stored dtypes) becomes a dtype in `dtype_from_name`. Loading a checkpoint to run it (device, dtype, adapters) is
`llmlab.loading`'s.

Writing folders, the one place for it: a folder is written into a temporary sibling `.NAME.tmp-*` and renamed into
place (`atomic_folder`), and deleted by renaming it to a hidden `.NAME.old-*` sibling first (`remove_folder`), so a
kill -9 never leaves a half-written or half-deleted folder under a name that looks complete; `sweep_leftovers` removes
such hidden siblings later. Every saved model or adapter folder ends the same way (`write_folder`: the tokenizer's files
and any extra files, then the rename). A command's output folder (`output_folder`) also carries a small manifest
(`llmlab_output.json`: the command and the files it wrote), which is how an earlier output of the same command is told
apart from a folder of someone else's files that must not be replaced without --overwrite.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from llmlab.config import ModelConfig
from llmlab.errors import LLMLabError
from llmlab.hardware import native_bf16
from llmlab.model import LLaMA

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_QKV = ("q_proj", "k_proj", "v_proj")
_GATE_UP = ("gate_proj", "up_proj")


def default_dtype(device: torch.device, bf16_if_native: bool = False) -> torch.dtype:
    """What dtype `auto` means for a model run on `device`: bfloat16 on CUDA, float32 elsewhere, or with
    `bf16_if_native` bfloat16 on a CPU that computes it natively (`llmlab.hardware.native_bf16`)."""
    if device.type == "cuda" or (bf16_if_native and device.type == "cpu" and native_bf16("cpu")):
        return torch.bfloat16
    return torch.float32


def dtype_from_name(name: str, device: torch.device | None = None, bf16_if_native: bool = False) -> torch.dtype:
    """The torch dtype called `name`: float32, bfloat16 or float16, as stored in a folder; with the `device` a model
    will run on, also `auto` (`default_dtype`), as the --dtype option of the commands that run one takes it. The one
    place dtype names become dtypes."""
    if device is not None and name == "auto":
        return default_dtype(device, bf16_if_native)
    if name in DTYPES:
        return DTYPES[name]
    if device is not None:
        raise LLMLabError(f"--dtype: expected auto, {', '.join(DTYPES)}; got '{name}'")
    raise LLMLabError(f"unknown dtype '{name}'; expected one of {', '.join(DTYPES)}")


# -- name mapping ------------------------------------------------------------------------------------
def hf_to_llmlab(sd: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """HF `LlamaForCausalLM` tensor names -> this model's (fuses q/k/v into qkv_proj, gate/up into gate_up_proj)."""
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[str, Tensor]] = {}
    for name, t in sd.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # older HF checkpoints saved this buffer
        parts = name.rsplit(".", 2)  # prefix, proj, weight|bias
        if len(parts) == 3 and parts[1] in _QKV + _GATE_UP:
            target = "qkv_proj" if parts[1] in _QKV else "gate_up_proj"
            fused.setdefault(f"{parts[0]}.{target}.{parts[2]}", {})[parts[1]] = t
        else:
            out[name] = t
    for name, pieces in fused.items():
        order = _QKV if ".qkv_proj." in name else _GATE_UP
        missing = [p for p in order if p not in pieces]
        if missing:
            prefix = name.rsplit(".", 2)[0]
            raise LLMLabError(f"checkpoint is missing tensors {[f'{prefix}.{p}' for p in missing]}")
        out[name] = torch.cat([pieces[p] for p in order], dim=0)
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def llmlab_to_hf(sd: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """This model's tensor names -> HF names (splits the fused projections; drops a tied lm_head)."""
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    out: dict[str, Tensor] = {}
    for name, t in sd.items():
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith(".qkv_proj"):
            base = prefix[: -len("qkv_proj")]
            for proj, piece in zip(_QKV, t.split([q, kv, kv], dim=0)):
                out[f"{base}{proj}.{leaf}"] = piece
        elif prefix.endswith(".gate_up_proj"):
            base = prefix[: -len("gate_up_proj")]
            for proj, piece in zip(_GATE_UP, t.chunk(2, dim=0)):
                out[f"{base}{proj}.{leaf}"] = piece
        else:
            out[name] = t
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


# -- reading -----------------------------------------------------------------------------------------
def _weight_files(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise LLMLabError(f"{index}: not a valid safetensors index (expected a 'weight_map' object): {e}") from e
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise LLMLabError(f"{index} lists shard files that are missing: {missing}")
        return files
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise LLMLabError(f"{folder}: only pickle weights (.bin/.pt) found; llmlab loads safetensors only "
                          "(convert them with transformers' `save_pretrained(safe_serialization=True)`)")
    raise LLMLabError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def read_safetensors(path: str | Path, with_metadata: bool = False) -> Any:
    """The tensors of one safetensors file (memory-mapped), and its metadata with `with_metadata`: the one place a
    truncated or corrupt file becomes a clear error."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            return (tensors, fh.metadata() or {}) if with_metadata else tensors
    except (SafetensorError, OSError, ValueError) as e:
        raise LLMLabError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from e


def load_safetensors(folder: str | Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint folder (memory-mapped by safetensors), with HF names."""
    sd: dict[str, Tensor] = {}
    for f in _weight_files(Path(folder)):
        sd.update(read_safetensors(f))
    return sd


def load_config(folder: str | Path) -> ModelConfig:
    folder = Path(folder)
    if not folder.is_dir():
        raise LLMLabError(f"checkpoint folder not found: {folder}")
    path = folder / "config.json"
    if not path.is_file():
        raise LLMLabError(f"{folder}: no config.json (expected an HF-format checkpoint folder)")
    return ModelConfig.from_file(path)


def load_into(model: LLaMA, hf_sd: dict[str, Tensor], source: str, dtype: torch.dtype | None = None) -> LLaMA:
    """Load HF-named tensors into `model` (which may live on the meta device), checking every name and shape."""
    config = model.config
    sd = hf_to_llmlab(hf_sd, config)
    expected = {k: v for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise LLMLabError(f"{source}: tensors do not match the config: missing {missing[:5]}"
                          f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                          f"{'...' if len(unexpected) > 5 else ''}")
    for k, ref in expected.items():
        if tuple(sd[k].shape) != tuple(ref.shape):
            raise LLMLabError(f"{source}: tensor '{k}' has shape {tuple(sd[k].shape)} but the config implies "
                              f"{tuple(ref.shape)} (does config.json match the weights?)")
        if dtype is not None:
            sd[k] = sd[k].to(dtype)
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def load_checkpoint(folder: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> LLaMA:
    """Build the model of an HF-format folder on the meta device and assign its weights (no double allocation)."""
    folder = Path(folder)
    config = load_config(folder)
    hf_sd = load_safetensors(folder)
    with torch.device("meta"):
        model = LLaMA(config)
    load_into(model, hf_sd, str(folder), dtype)
    return model.to(device).eval()


# -- writing -----------------------------------------------------------------------------------------
OUTPUT_MANIFEST = "llmlab_output.json"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-\w+$")  # what atomic_folder and remove_folder leave when killed


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `target` in one rename, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _publish_permissions(tmp)
        old = _set_aside(target) if target.exists() else None
        os.replace(tmp, target)
        if old is not None:
            _discard(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def write_folder(folder: str | Path, tokenizer: Any = None,
                 extra_files: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Write a model or adapter folder atomically: the caller puts its own files into the temporary folder this yields;
    then the tokenizer's files and `extra_files(tmp)` (e.g. a training checkpoint's state) join them, and the folder
    replaces `folder` in one rename. The one ending every saved folder shares."""
    with atomic_folder(folder) as tmp:
        yield tmp
        if tokenizer is not None:
            tokenizer.save(tmp)
        if extra_files is not None:
            extra_files(tmp)


def _set_aside(path: Path) -> Path:
    """Rename `path` to a hidden `.NAME.old-*` sibling (one atomic step) and return the new path."""
    aside = path.parent / f".{path.name}.old-{os.getpid()}_{secrets.token_hex(4)}"
    os.replace(path, aside)
    return aside


def _discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_folder(path: str | Path) -> None:
    """Delete a folder and never leave it half deleted under its own name: rename it out of the way, then delete."""
    _discard(_set_aside(Path(path)))


def sweep_leftovers(folder: str | Path, names: str | re.Pattern[str]) -> list[Path]:
    """Remove the `.NAME.tmp-*` / `.NAME.old-*` siblings that interrupted writes and deletes left in `folder`, for the
    NAMEs that fully match `names`; returns what was removed."""
    folder, pattern = Path(folder), re.compile(names)
    removed = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = _LEFTOVER.match(path.name)
        if m and pattern.fullmatch(m.group("name")):
            _discard(path)
            removed.append(path)
    return removed


def check_folder_path(target: str | Path) -> None:
    """Raise when a folder cannot be made at `target` because a file is there or where one of its parents should be."""
    target = Path(target)
    for path in (target, *target.parents):
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                where = "is a file" if path == target else f"is a file, so the folder {target} cannot be made under it"
                raise LLMLabError(f"{path} {where} (expected a folder path)")
            return


def _entries(folder: Path) -> set[str]:
    """Every file and folder under `folder`, as relative POSIX paths (symbolic links are not followed)."""
    out = set()
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out.update((rel / name).as_posix() for name in dirs + files)
    return out


def _is_output_of(folder: Path, command: str) -> bool:
    """Whether `folder` is an earlier output of `command`: its manifest names the command and lists every file there."""
    try:
        manifest = json.loads((folder / OUTPUT_MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(manifest, dict) or manifest.get("command") != command:
        return False
    files = {f for f in manifest.get("files", []) if isinstance(f, str)}
    allowed = files | {OUTPUT_MANIFEST} | {p.as_posix() for f in files for p in Path(f).parents if p != Path(".")}
    return _entries(folder) <= allowed


def check_output(target: str | Path, command: str, overwrite: bool = False) -> None:
    """Raise unless `llmlab COMMAND` may write its output folder at `target`: nothing there, an empty folder, an earlier
    output of the same command, or (with `overwrite`) any folder. A file is never replaced by a folder."""
    target = Path(target)
    check_folder_path(target)
    if overwrite or not target.is_dir() or not any(target.iterdir()) or _is_output_of(target, command):
        return
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in target.iterdir())
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    raise LLMLabError(f"{target} is not empty and is not an output of `llmlab {command}` (it holds {shown}); choose "
                      "another folder, or pass --overwrite true to replace it")


@contextmanager
def output_folder(target: str | Path, command: str, overwrite: bool = False) -> Iterator[Path]:
    """Write `llmlab COMMAND`'s output folder: `check_output`, then a temporary sibling folder to fill, which gets the
    manifest and replaces `target` in one rename; on error (or a refusal) `target` is left as it was."""
    check_output(target, command, overwrite)
    with atomic_folder(target) as tmp:
        yield tmp
        files = sorted(f for f in _entries(tmp) if not (tmp / f).is_dir())
        write_json(tmp / OUTPUT_MANIFEST, {"command": command, "files": files})
        check_output(target, command, overwrite)  # still true just before the swap


def _publish_permissions(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; give the checkpoint the permissions of any file the user creates."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def generation_config(config: ModelConfig, **overrides: Any) -> dict[str, Any]:
    return {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id, **overrides}


def load_generation_config(folder: str | Path) -> dict[str, Any]:
    """generation_config.json of a checkpoint folder, or {} when it has none."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LLMLabError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise LLMLabError(f"{path}: expected a JSON object")
    return data


def save_checkpoint(model: LLaMA, folder: str | Path, tokenizer: Any = None, dtype: torch.dtype | None = None,
                    generation: dict[str, Any] | None = None,
                    extra_files: Callable[[Path], None] | None = None) -> Path:
    """Write an HF-format folder atomically: config.json, model.safetensors, generation_config.json, tokenizer."""
    config = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    hf_sd = llmlab_to_hf(sd, config)
    hf_sd = {k: (v.to(dtype) if dtype is not None else v).contiguous().cpu() for k, v in hf_sd.items()}
    with write_folder(folder, tokenizer, extra_files) as tmp:
        save_file(hf_sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        out_config = config.to_hf_dict()
        out_config["torch_dtype"] = str(next(iter(hf_sd.values())).dtype).removeprefix("torch.")
        write_json(tmp / "config.json", out_config)
        write_json(tmp / "generation_config.json", generation or generation_config(config))
    return Path(folder)
