"""The packed cache: a GGUF built once into its kernels' layout is read back as the same model (same layers, kernels,
buffers and logits) without decoding the file again; a changed file, a damaged entry or a cache that is off or
unwritable never give a wrong model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _gguf_writer import MIXED_TYPES, tiny_hf_model, tiny_mixed_gguf, write_llama_gguf

from llmlab import gguf_import, packed_cache
from llmlab.packed_cache import cache_key, load_gguf_cached
from llmlab.quantized import FusedQuantLinear, QuantEmbedding, QuantLinear

IDS = torch.tensor([[5, 40, 200, 7, 99, 3, 150, 42]])


@pytest.fixture(scope="module")
def tied_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tied embeddings read from the head's Q8_0 table; fused projections of one format and of mixed ones (F16)."""
    return tiny_mixed_gguf(tmp_path_factory.mktemp("tied") / "tied.gguf", {**MIXED_TYPES, "blk.1.attn_v.weight": "F16"})


@pytest.fixture(scope="module")
def untied_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float embedding and a quantized head of their own."""
    cfg, model = tiny_hf_model(tie=False, seed=1)
    types = {k: v for k, v in MIXED_TYPES.items() if k != "token_embd.weight"} | {"output.weight": "Q8_0"}
    return write_llama_gguf(tmp_path_factory.mktemp("untied") / "untied.gguf", cfg, model.state_dict(), types=types)


@pytest.fixture(scope="module")
def tied_float_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float (F32) embedding that is also the head: one tensor under two names."""
    types = {k: v for k, v in MIXED_TYPES.items() if k != "token_embd.weight"}
    return tiny_mixed_gguf(tmp_path_factory.mktemp("tiedf") / "tiedf.gguf", types, seed=2)


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "packed"
    monkeypatch.setenv("LLMLAB_PACKED_CACHE", str(root))
    return root


def _no_building(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the GGUF was decoded again")

    monkeypatch.setattr(gguf_import, "load_gguf_quantized", fail)


def _layers(model: torch.nn.Module) -> list[tuple[str, str, str]]:
    return [(name, type(m).__name__, m.kernel.name if isinstance(m, QuantLinear) else "")
            for name, m in model.named_modules()]


@pytest.mark.parametrize("which", ["tied_gguf", "untied_gguf", "tied_float_gguf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cached_model_is_the_built_one(which: str, dtype: torch.dtype, cache: Path, request: pytest.FixtureRequest,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = request.getfixturevalue(which)
    built, tok, gen = load_gguf_cached(gguf, "cpu", dtype)
    assert len(list(cache.iterdir())) == 1
    _no_building(monkeypatch)
    cached, tok2, gen2 = load_gguf_cached(gguf, "cpu", dtype)
    assert _layers(cached) == _layers(built)
    mine = dict(built.state_dict(keep_vars=True))
    mine.update({n: b for n, b in built.named_buffers()})
    theirs = dict(cached.state_dict(keep_vars=True))
    theirs.update({n: b for n, b in cached.named_buffers()})
    assert mine.keys() == theirs.keys()
    for name, t in mine.items():
        assert t.dtype == theirs[name].dtype and torch.equal(t, theirs[name]), name
    assert not any(p.requires_grad for p in cached.parameters())
    if which == "tied_gguf":
        emb = cached.model.embed_tokens
        assert isinstance(emb, QuantEmbedding) and emb.source is cached.lm_head  # still one table
        assert isinstance(cached.model.layers[1].self_attn.qkv_proj, FusedQuantLinear)
    elif which == "untied_gguf":
        assert type(cached.model.embed_tokens) is torch.nn.Embedding and isinstance(cached.lm_head, QuantLinear)
    else:
        assert cached.lm_head.weight is cached.model.embed_tokens.weight
    with torch.inference_mode():
        assert torch.equal(built(IDS), cached(IDS))
    assert tok2.encode("hello world") == tok.encode("hello world") and tok2.eos_token == tok.eos_token
    assert tok2.chat_template == tok.chat_template and gen2 == gen


def test_a_changed_file_is_built_again(tied_gguf: Path, cache: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model.gguf"
    copy.write_bytes(tied_gguf.read_bytes())
    key = cache_key(copy, torch.float32, "auto")
    load_gguf_cached(copy, "cpu", torch.float32)
    assert (cache / key / "layout.json").is_file()
    st = copy.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten in place
    assert cache_key(copy, torch.float32, "auto") != key
    assert cache_key(copy, torch.bfloat16, "auto") != cache_key(copy, torch.float32, "auto")
    assert cache_key(copy, torch.float32, "dequant") != cache_key(copy, torch.float32, "auto")


def test_a_damaged_entry_is_rebuilt(tied_gguf: Path, cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    want, _, _ = load_gguf_cached(tied_gguf, "cpu", torch.float32)
    entry = next(cache.iterdir())
    blob = entry / "model.safetensors"
    blob.write_bytes(blob.read_bytes()[:1000])  # a truncated write, a full disk
    got, _, _ = load_gguf_cached(tied_gguf, "cpu", torch.float32)
    assert "unreadable" in caplog.text
    with torch.inference_mode():
        assert torch.equal(want(IDS), got(IDS))
    assert (entry / "layout.json").is_file() and blob.stat().st_size > 1000  # written again, whole


def test_only_the_most_recently_used_entries_are_kept(tied_gguf: Path, cache: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packed_cache, "KEEP", 2)
    copies = {}
    for name in "abc":
        copies[name] = tmp_path / f"{name}.gguf"
        copies[name].write_bytes(tied_gguf.read_bytes())
    entry = {name: cache / cache_key(path, torch.float32, "auto") for name, path in copies.items()}
    load_gguf_cached(copies["a"], "cpu", torch.float32)
    load_gguf_cached(copies["b"], "cpu", torch.float32)
    os.utime(entry["a"] / "layout.json", (1e9, 1e9))  # a was used long ago, b a while ago
    os.utime(entry["b"] / "layout.json", (1e9 + 10, 1e9 + 10))
    load_gguf_cached(copies["a"], "cpu", torch.float32)  # a hit: a is the most recently used now
    load_gguf_cached(copies["c"], "cpu", torch.float32)  # a third entry: b goes
    assert {p.name for p in cache.iterdir()} == {entry["a"].name, entry["c"].name}
    assert not [p for p in cache.iterdir() if p.name.startswith(".building-")]


def test_off_and_unwritable(tied_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMLAB_PACKED_CACHE", "off")
    assert packed_cache.cache_root() is None
    model, _, _ = load_gguf_cached(tied_gguf, "cpu", torch.float32)
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("LLMLAB_PACKED_CACHE", str(blocked / "packed"))  # cannot be created
    again, _, _ = load_gguf_cached(tied_gguf, "cpu", torch.float32)
    with torch.inference_mode():
        assert torch.equal(model(IDS), again(IDS))
