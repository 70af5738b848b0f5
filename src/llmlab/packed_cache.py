"""A machine-local cache of GGUF models as their kernels hold them, so that a GGUF loads in a fraction of a second.

Building a model from a GGUF (`gguf_import.load_gguf_quantized`) parses the file's metadata (a 49k-token vocabulary
is ~100k strings), decodes every block into integer codes and packs them into the layout of the kernel measured
fastest here: ~3 s of a 5 s start for SmolLM2-135M on an idle 2-core CPU (~20 s on a busy one), paid by every
`llmlab generate`; llama.cpp starts in under 0.5 s (docs/generate.md). `load_gguf_cached` pays it once: it saves
what it built (the packed buffers and float tensors as safetensors, the module layout, config, tokenizer and
generation config) in `$LLMLAB_HOME/packed/<key>/`, and later loads read that back. The key covers everything the
packed form depends on: the GGUF's resolved path, size and modification time, the activation dtype, the kernel asked
for, the torch version and the CPU capability torch runs with; a changed file or another torch is a new entry, never
a stale one.

The layout depends on this CPU and this torch, so the cache is never a checkpoint format (checkpoints keep
safetensors / GGUF); it lives under llmlab's cache folder only, is written atomically (a temp folder renamed into
place), and keeps the `KEEP` most recently used entries. `LLMLAB_PACKED_CACHE` overrides where it lives; `off`
turns it off. Only CPU loads are cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from llmlab.config import ModelConfig
from llmlab.model import LLaMA
from llmlab.quant_kernels import QuantSpec
from llmlab.quantized import FusedQuantLinear, QuantEmbedding, QuantLinear
from llmlab.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what is saved changes meaning
KEEP = 4  # entries kept; ~0.1-0.2 GB each for a 135M model


def cache_root() -> Path | None:
    """Where entries live: `$LLMLAB_PACKED_CACHE`, else `$LLMLAB_HOME/packed`; None when the variable says off."""
    from llmlab.hub import cache_dir

    env = os.environ.get("LLMLAB_PACKED_CACHE")
    if env is not None and env.strip().lower() in ("off", "0", "no", "false", ""):
        return None
    return Path(env).expanduser() if env else cache_dir() / "packed"


def cache_key(gguf: Path, dtype: torch.dtype, kernel: str) -> str:
    """A name for what `load_gguf_quantized(gguf, cpu, dtype, kernel)` builds on this machine and this torch."""
    st = Path(gguf).stat()
    parts = {"format": FORMAT, "path": str(Path(gguf).resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
             "dtype": str(dtype), "kernel": kernel, "torch": torch.__version__,
             "cpu": torch.backends.cpu.get_cpu_capability()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def load_gguf_cached(gguf: str | Path, device: torch.device | str, dtype: torch.dtype,
                     kernel: str = "auto") -> tuple[LLaMA, Tokenizer, dict]:
    """`gguf_import.load_gguf_quantized(gguf, device, dtype, kernel)`; on a CPU read from the cache when it holds
    the file's entry, else built and then saved there (a cache that cannot be written only costs the next load its
    time). Other devices (and a cache turned off) always build."""
    from llmlab.gguf_import import load_gguf_quantized

    root = cache_root()
    if root is None or torch.device(device).type != "cpu":
        return load_gguf_quantized(gguf, device, dtype, kernel)
    entry = root / cache_key(Path(gguf), dtype, kernel)
    if (entry / "layout.json").is_file():
        try:
            loaded = _read(entry)
            os.utime(entry / "layout.json")  # most recently used
            return loaded
        except Exception as e:  # a damaged entry is rebuilt, never trusted
            log.warning("packed cache %s unreadable (%s): rebuilding it", entry, e)
            shutil.rmtree(entry, ignore_errors=True)
    t0 = time.perf_counter()
    model, tokenizer, generation = load_gguf_quantized(gguf, "cpu", dtype, kernel)
    log.info("built %s's quantized layers in %.1f s; caching them in %s", gguf, time.perf_counter() - t0, entry)
    try:
        _write(entry, model, tokenizer, generation)
        _evict(root)
    except OSError as e:
        log.info("could not write the packed cache %s: %s", entry, e)
    return model, tokenizer, generation


# -- saving -----------------------------------------------------------------------------------------
_DTYPES = {str(t): t for t in (torch.float32, torch.bfloat16, torch.float16)}


def _describe(module: nn.Module) -> dict[str, Any] | None:
    """How to rebuild one module of the quantized model (None: a module `LLaMA(config)` already has)."""
    if isinstance(module, QuantLinear):
        return {"type": "quant", "kernel": module.kernel.name, "bias": module.bias is not None,
                "out_dtype": None if module.out_dtype is None else str(module.out_dtype), "spec": module.spec.ints()}
    if isinstance(module, FusedQuantLinear):
        return {"type": "fused", "parts": len(module.parts)}
    if isinstance(module, QuantEmbedding):
        return {"type": "qembed", "dtype": str(module.dtype_ref.dtype)}
    if type(module) is nn.Linear:
        return {"type": "linear", "bias": module.bias is not None}
    if type(module) is nn.Embedding:
        return {"type": "embedding"}
    return None


def _write(entry: Path, model: LLaMA, tokenizer: Tokenizer, generation: dict) -> None:
    modules: dict[str, Any] = {}
    first: dict[int, str] = {}  # module id -> its first path (a tied head appears twice)
    for path, m in model.named_modules(remove_duplicate=False):
        if id(m) in first:
            modules[path] = {"type": "alias", "of": first[id(m)]}
            continue
        first[id(m)] = path
        desc = _describe(m)
        if desc is not None:
            modules[path] = desc
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for path, m in model.named_modules():  # each module once; its own tensors (buffers too: the packed ones)
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if t is None or (isinstance(m, QuantLinear) and name == "dense"):
                continue
            key = f"{path}.{name}" if path else name
            if id(t) in seen:
                aliases[key] = seen[id(t)]
            else:
                seen[id(t)] = key
                tensors[key] = t.detach().contiguous()
    layout = {"format": FORMAT, "config": model.config.to_hf_dict(), "name": model.config.name,
              "generation": generation, "modules": modules, "aliases": aliases}
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=entry.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"))
        tokenizer.save(tmp)
        (tmp / "layout.json").write_text(json.dumps(layout) + "\n")  # last: its presence marks a whole entry
        try:
            os.replace(tmp, entry)
        except OSError:  # another process wrote the same entry first
            if not (entry / "layout.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _evict(root: Path) -> None:
    """Keep the `KEEP` most recently used entries."""
    entries = sorted((p for p in root.iterdir() if (p / "layout.json").is_file()),
                     key=lambda p: (p / "layout.json").stat().st_mtime, reverse=True)
    for old in entries[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)


# -- loading ----------------------------------------------------------------------------------------
def _read(entry: Path) -> tuple[LLaMA, Tokenizer, dict]:
    layout = json.loads((entry / "layout.json").read_text())
    if layout.get("format") != FORMAT:
        raise ValueError(f"format {layout.get('format')}, expected {FORMAT}")
    # fresh copies: safetensors places tensors 8-byte aligned in its buffer, and the CPU kernels' vector loads
    # need torch's own (64-byte) alignment (an int4 product on the loaded buffers crashed)
    tensors = {k: t.clone() for k, t in load_file(str(entry / "model.safetensors")).items()}
    for key, of in layout["aliases"].items():
        tensors[key] = tensors[of]
    config = ModelConfig.from_hf_dict(layout["config"], name=layout["name"])
    with torch.device("meta"):
        model = LLaMA(config)
    built: dict[str, nn.Module] = {}
    params: dict[int, nn.Parameter] = {}

    def param(t: Tensor) -> nn.Parameter:
        """One frozen Parameter per tensor: a tied embedding and head share it, as the built model does."""
        if id(t) not in params:
            params[id(t)] = nn.Parameter(t, requires_grad=False)
        return params[id(t)]

    own: dict[str, dict[str, Tensor]] = {}  # module path -> its own tensors by name
    for key, t in tensors.items():
        path, _, name = key.rpartition(".")
        own.setdefault(path, {})[name] = t
    rebuilt = layout["modules"]

    def inside_rebuilt(path: str) -> bool:
        """Whether `path` lies inside a module rebuilt whole (a fused layer's parts, an embedding's table)."""
        return any(path[:i] in rebuilt for i, c in enumerate(path) if c == ".")

    def build(path: str) -> nn.Module:
        if path in built:
            return built[path]
        desc = layout["modules"][path]
        kind, t = desc["type"], own.get(path, {})
        if kind == "quant":
            out = None if desc["out_dtype"] is None else _DTYPES[desc["out_dtype"]]
            buffers = {k: v for k, v in t.items() if k != "bias"}
            m: nn.Module = QuantLinear.from_buffers(desc["kernel"], QuantSpec.from_ints(desc["spec"]), buffers,
                                                    t.get("bias"), out)
        elif kind == "fused":
            m = FusedQuantLinear([build(f"{path}.parts.{i}") for i in range(desc["parts"])])
        elif kind == "qembed":
            m = QuantEmbedding(build(f"{path}.source"), _DTYPES[desc["dtype"]])
        elif kind == "alias":
            m = build(desc["of"])
        elif kind == "linear":
            w = t["weight"]
            m = nn.Linear(w.shape[1], w.shape[0], bias=desc["bias"], device="meta")
            m.weight = param(w)
            if desc["bias"]:
                m.bias = param(t["bias"])
        elif kind == "embedding":
            m = nn.Embedding(*t["weight"].shape, _weight=t["weight"])  # a given table skips the random init
            m.weight = param(t["weight"])  # frozen, and shared with a tied head
        else:
            raise ValueError(f"unknown module type {kind!r} at {path}")
        built[path] = m
        return m

    for path in rebuilt:
        if not inside_rebuilt(path):  # what is inside was built with it
            model.set_submodule(path, build(path))
    for path, named in own.items():  # the rest: norms and any float tensors of modules LLaMA(config) has
        if path in rebuilt or inside_rebuilt(path):
            continue
        module = model.get_submodule(path)
        for name, t in named.items():
            setattr(module, name, t if name in module._buffers else param(t))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ValueError(f"no tensors for {left[:5]}")
    return model.eval(), Tokenizer.from_folder(entry), layout["generation"]

