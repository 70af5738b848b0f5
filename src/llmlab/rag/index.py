"""`llmlab index`: build or update a document index folder, and open one for search.

The index mirrors the PATHs of the latest run: new and changed files are (re)chunked and embedded, unchanged ones
are skipped (same size and mtime, or same SHA-256 after a touch), files no longer found are dropped. The whole
update is one SQLite transaction, so an interrupted run (Ctrl-C, a crash, a kill) leaves the previous index
exactly as it was, and searches keep working while a run is in progress.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from llmlab.errors import LLMLabError
from llmlab.rag.chunking import chunk_file, is_supported
from llmlab.rag.embed import Embedder, EmbedderLike
from llmlab.rag.store import Hit, Store

INDEX_FILE = "index.sqlite"
_SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", ".mypy_cache", ".pytest_cache"}


@dataclass
class IndexStats:
    """What a run did, and the index's size after it."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    chunks_embedded: int = 0
    files: int = 0
    chunks: int = 0

    def summary(self) -> str:
        return (f"{self.files} files, {self.chunks} chunks ({self.added} added, {self.updated} updated, "
                f"{self.unchanged} unchanged, {self.removed} removed; {self.chunks_embedded} chunks embedded)")


def collect_files(paths: list[Path]) -> list[Path]:
    """The supported documents under `paths` (files are taken as given, folders searched recursively, hidden and
    tool folders skipped), resolved and sorted."""
    found: set[Path] = set()
    for path in paths:
        if path.is_file():
            if not is_supported(path):
                raise LLMLabError(f"{path}: unsupported file type '{path.suffix}' "
                                  "(llmlab index reads .txt, .md, .markdown, .rst and .pdf)")
            found.add(path.resolve())
        elif path.is_dir():
            for f in path.rglob("*"):
                parts = f.relative_to(path).parts
                if any(p in _SKIP_DIRS or p.startswith(".") for p in parts[:-1]) or parts[-1].startswith("."):
                    continue
                if f.is_file() and is_supported(f):
                    found.add(f.resolve())
        else:
            raise LLMLabError(f"{path}: no such file or folder")
    return sorted(found)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_settings(store: Store, settings: dict[str, object], out: Path) -> bool:
    """True when the index was built with other chunk settings (every file is then re-chunked); a different
    embedding model is an error, since its vectors cannot be mixed with the old ones."""
    old = store.meta("settings")
    if old is None:
        return False
    old_settings = json.loads(old)
    if old_settings.get("embedder") != settings["embedder"]:
        raise LLMLabError(f"{out}: this index was built with the embedding model {old_settings.get('embedder')}, "
                          f"not {settings['embedder']}; build a new index with another --out")
    return old_settings != settings


def build_index(paths: list[Path], out: Path, embedder: EmbedderLike | None = None, chunk_tokens: int = 200,
                overlap: int = 40, progress: bool = True) -> IndexStats:
    """Create or update the index in folder `out` from the documents under `paths`."""
    if not paths:
        raise LLMLabError("llmlab index: give at least one file or folder to index")
    files = collect_files([Path(p) for p in paths])
    if not files:
        raise LLMLabError(f"no .txt, .md, .markdown, .rst or .pdf files under {', '.join(map(str, paths))}")
    embedder = embedder or Embedder()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = Store(out / INDEX_FILE, dim=embedder.dim)
    if store.dim != embedder.dim:
        raise LLMLabError(f"{out}: the index holds {store.dim}-dim vectors, the embedder makes {embedder.dim}")
    settings = {"embedder": embedder.name, "chunk_tokens": chunk_tokens, "overlap": overlap}
    stats = IndexStats()
    try:
        rechunk_all = _check_settings(store, settings, out)
        known = store.files()
        todo: list[tuple[Path, str, int, int, bool]] = []  # path, sha, mtime, size, replaces an old entry
        with store.transaction():
            for path in files:
                st = path.stat()
                old = known.get(str(path))
                if old is not None and not rechunk_all and (old[2], old[3]) == (st.st_mtime_ns, st.st_size):
                    stats.unchanged += 1
                    continue
                sha = _sha256(path)
                if old is not None and not rechunk_all and old[1] == sha:
                    store.touch_file(old[0], st.st_mtime_ns, st.st_size)
                    stats.unchanged += 1
                    continue
                todo.append((path, sha, st.st_mtime_ns, st.st_size, old is not None))
            current = {str(p) for p in files}
            for gone in sorted(set(known) - current):
                store.remove_file(gone)
                stats.removed += 1
            bar = _progress(len(todo), progress)
            for path, sha, mtime, size, replaces in todo:
                chunks = chunk_file(path, embedder.tokenizer, chunk_tokens, overlap)
                vectors = embedder.encode([c.text for c in chunks])
                if replaces:
                    store.remove_file(str(path))
                store.add_file(str(path), sha, mtime, size, chunks, vectors)
                stats.updated += replaces
                stats.added += not replaces
                stats.chunks_embedded += len(chunks)
                if bar is not None:
                    bar.set_postfix_str(path.name[-30:])
                    bar.update(1)
            if bar is not None:
                bar.close()
            store.set_meta("settings", json.dumps(settings))
        stats.files, stats.chunks = store.count()
    finally:
        store.close()
    return stats


def _progress(total: int, enabled: bool):  # noqa: ANN202 - a tqdm bar or None
    if not enabled or total == 0:
        return None

    return tqdm(total=total, unit="file", desc="indexing")


class Index:
    """An index folder opened for search; the embedder loads on the first query. Searches from several threads (the
    server's workers) take turns on the one connection and model."""

    def __init__(self, folder: Path, embedder: EmbedderLike | None = None) -> None:
        self.folder = Path(folder)
        path = self.folder / INDEX_FILE
        if not path.is_file():
            raise LLMLabError(f"{self.folder}: no index here (no {INDEX_FILE}); build one with "
                              f"`llmlab index PATH... --out {self.folder}`")
        self.store = Store(path)
        settings = json.loads(self.store.meta("settings") or "{}")
        self.embedder_name = settings.get("embedder")
        if embedder is not None and self.embedder_name not in (None, embedder.name):
            raise LLMLabError(f"{self.folder}: built with {self.embedder_name}, queried with {embedder.name}")
        self._embedder = embedder
        self._lock = threading.Lock()

    @property
    def embedder(self) -> EmbedderLike:
        if self._embedder is None:
            if self.embedder_name not in (None, Embedder.name):
                raise LLMLabError(f"{self.folder}: built with the embedding model {self.embedder_name}, which "
                                  "llmlab cannot load by name; open it with that embedder")
            self._embedder = Embedder()
        return self._embedder

    def search(self, query: str, k: int = 5, max_per_file: int | None = 2) -> list[Hit]:
        """The k passages that best match `query` (hybrid: vector similarity + BM25 keywords, fused by rank), at
        most `max_per_file` of one file while other files match (None: no limit; see `Store.search`)."""
        if not query.strip():
            raise LLMLabError("the search query is empty")
        with self._lock:
            vector = self.embedder.encode([query])[0]
            return self.store.search(query, vector, k, max_per_file=max_per_file)

    def close(self) -> None:
        self.store.close()


def open_index(folder: Path, embedder: EmbedderLike | None = None) -> Index:
    """Open an index folder written by `llmlab index` (or `build_index`)."""
    return Index(folder, embedder)
