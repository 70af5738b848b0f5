"""The index store: one SQLite file holding files, chunks, their vectors (sqlite-vec `vec0`) and a keyword index
(FTS5, BM25 with Porter stemming); search ranks by both and fuses the two rankings (reciprocal rank fusion).

Why SQLite + sqlite-vec rather than LanceDB: the whole index is one file in a format every language reads; chunks,
vectors and keywords change together in one ACID transaction, which is what makes re-indexing interruption-safe
(a killed run rolls back, the previous index stays as it was) and lets readers keep searching during a run (WAL);
sqlite-vec is a ~1 MB loadable extension with no other dependency, where LanceDB brings pyarrow and a Rust engine
for scale (millions of vectors) a document copilot does not need. Exact (brute-force) k-NN over a few thousand
384-dim vectors takes milliseconds.

Python builds without loadable-extension support (pyenv's default, some distributions) get the `sqlean.py` build of
the same sqlite3 module, which has it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmlab.errors import LLMLabError
from llmlab.rag.chunking import Chunk

RRF_K = 60  # the constant of reciprocal rank fusion (Cormack et al. 2009): score = sum 1 / (RRF_K + rank)
SCHEMA_VERSION = "1"


def _sqlite() -> Any:
    """A sqlite3 module that can load extensions: the standard library's when it can, else sqlean.py's."""
    import sqlite3

    if hasattr(sqlite3.Connection, "enable_load_extension"):
        return sqlite3
    try:
        import sqlean
    except ImportError as e:
        raise LLMLabError("this Python's sqlite3 cannot load extensions (needed for sqlite-vec); install "
                          "'llmlab[rag]', which brings sqlean.py") from e
    return sqlean


def connect(path: Path) -> Any:
    """A connection to the index file with sqlite-vec loaded, in autocommit mode (transactions are explicit)."""
    try:
        import sqlite_vec
    except ImportError as e:
        raise LLMLabError("sqlite-vec is not installed; install the retrieval extra: pip install 'llmlab[rag]'") from e
    sqlite = _sqlite()
    try:
        conn = sqlite.connect(str(path), isolation_level=None, check_same_thread=False)
        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
        conn.enable_load_extension(False)
        conn.execute("PRAGMA journal_mode=WAL")  # readers see the last committed index while a run writes
        conn.execute("PRAGMA busy_timeout=10000")
    except sqlite.DatabaseError as e:
        raise LLMLabError(f"{path}: not a usable index database: {e}") from e
    return conn


@dataclass
class Hit:
    """A retrieved chunk: where it is, its original text and its fused score."""

    chunk_id: int
    path: str
    page: int | None
    line_start: int
    line_end: int
    text: str
    score: float

    @property
    def display_path(self) -> str:
        """The path relative to the working directory when it is under it."""
        try:
            rel = os.path.relpath(self.path)
        except ValueError:  # another drive on Windows
            return self.path
        return self.path if rel.startswith("..") else rel

    @property
    def location(self) -> str:
        """e.g. `docs/plan.md, lines 10-24` or `report.pdf, page 3, lines 1-9`."""
        lines = f"line {self.line_start}" if self.line_start == self.line_end else \
            f"lines {self.line_start}-{self.line_end}"
        page = f", page {self.page}" if self.page is not None else ""
        return f"{self.display_path}{page}, {lines}"


def _fts_query(text: str) -> str | None:
    """An FTS5 query matching any of the words of `text` (quoted, so user text is never FTS syntax)."""
    words = list(dict.fromkeys(w for w in re.findall(r"\w+", text.lower()) if len(w) > 1))
    return " OR ".join(f'"{w}"' for w in words) or None


def diversify(hits: Sequence[Hit], k: int, max_per_file: int | None) -> list[Hit]:
    """The best `k` of `hits` (best first) taking at most `max_per_file` from one file; when that leaves fewer
    than k, the best of the skipped ones fill the rest (so one matching file still gives k passages). The result
    keeps the score order."""
    if max_per_file is None:
        return list(hits[:k])
    taken: dict[str, int] = {}
    chosen: list[int] = []
    for i, hit in enumerate(hits):
        if taken.get(hit.path, 0) < max_per_file:
            taken[hit.path] = taken.get(hit.path, 0) + 1
            chosen.append(i)
            if len(chosen) == k:
                break
    if len(chosen) < k:
        skipped = sorted(set(range(len(hits))) - set(chosen))
        chosen += skipped[:k - len(chosen)]
    return [hits[i] for i in sorted(chosen)]


class Store:
    """Open (or create, with `dim`) the index database at `path`."""

    def __init__(self, path: Path, dim: int | None = None) -> None:
        self.path = Path(path)
        self.conn = connect(self.path)
        exists = self.conn.execute("SELECT name FROM sqlite_master WHERE name = 'meta'").fetchone() is not None
        if not exists:
            if dim is None:
                raise LLMLabError(f"{self.path}: no index here; build one with `llmlab index PATH... --out DIR`")
            self._create(dim)
        self.dim = int(self.meta("dim"))

    def _create(self, dim: int) -> None:
        # one script, one transaction (executescript commits any open transaction before it runs)
        self.conn.executescript(f"""
                BEGIN;
                CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE files (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, sha256 TEXT NOT NULL,
                                    mtime_ns INTEGER NOT NULL, size INTEGER NOT NULL);
                CREATE TABLE chunks (id INTEGER PRIMARY KEY, file_id INTEGER NOT NULL REFERENCES files(id),
                                     page INTEGER, line_start INTEGER NOT NULL, line_end INTEGER NOT NULL,
                                     text TEXT NOT NULL);
                CREATE INDEX chunks_file ON chunks(file_id);
                CREATE VIRTUAL TABLE chunks_fts USING fts5(text, tokenize = 'porter unicode61');
                CREATE VIRTUAL TABLE chunks_vec USING vec0(embedding float[{int(dim)}] distance_metric=cosine);
                INSERT INTO meta (key, value) VALUES ('dim', '{int(dim)}'), ('schema_version', '{SCHEMA_VERSION}');
                COMMIT;
            """)

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All or nothing: an exception (or a killed process) leaves the database as it was before."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- metadata and files --------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def files(self) -> dict[str, tuple[int, str, int, int]]:
        """path -> (id, sha256, mtime_ns, size) of every indexed file."""
        rows = self.conn.execute("SELECT path, id, sha256, mtime_ns, size FROM files")
        return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}

    def touch_file(self, file_id: int, mtime_ns: int, size: int) -> None:
        self.conn.execute("UPDATE files SET mtime_ns = ?, size = ? WHERE id = ?", (mtime_ns, size, file_id))

    def remove_file(self, path: str) -> None:
        """Drop a file and all its chunks, vectors and keywords."""
        row = self.conn.execute("SELECT id FROM files WHERE path = ?", (path,)).fetchone()
        if row is None:
            return
        ids = [r[0] for r in self.conn.execute("SELECT id FROM chunks WHERE file_id = ?", (row[0],))]
        self.conn.executemany("DELETE FROM chunks_vec WHERE rowid = ?", [(i,) for i in ids])
        self.conn.executemany("DELETE FROM chunks_fts WHERE rowid = ?", [(i,) for i in ids])
        self.conn.execute("DELETE FROM chunks WHERE file_id = ?", (row[0],))
        self.conn.execute("DELETE FROM files WHERE id = ?", (row[0],))

    def add_file(self, path: str, sha256: str, mtime_ns: int, size: int, chunks: Sequence[Chunk],
                 vectors: np.ndarray) -> int:
        """Insert a file with its chunks and their vectors (len(chunks), dim); returns the file id."""
        if vectors.shape != (len(chunks), self.dim):
            raise LLMLabError(f"index: {len(chunks)} chunks need vectors of shape ({len(chunks)}, {self.dim}), "
                              f"got {tuple(vectors.shape)}")
        cur = self.conn.execute("INSERT INTO files (path, sha256, mtime_ns, size) VALUES (?, ?, ?, ?)",
                                (path, sha256, mtime_ns, size))
        file_id = cur.lastrowid
        for chunk, vec in zip(chunks, vectors):
            cur = self.conn.execute("INSERT INTO chunks (file_id, page, line_start, line_end, text) "
                                    "VALUES (?, ?, ?, ?, ?)",
                                    (file_id, chunk.page, chunk.line_start, chunk.line_end, chunk.text))
            cid = cur.lastrowid
            self.conn.execute("INSERT INTO chunks_fts (rowid, text) VALUES (?, ?)", (cid, chunk.text))
            self.conn.execute("INSERT INTO chunks_vec (rowid, embedding) VALUES (?, ?)",
                              (cid, np.asarray(vec, dtype=np.float32).tobytes()))
        return file_id

    def count(self) -> tuple[int, int]:
        """(files, chunks) in the index."""
        files = self.conn.execute("SELECT count(*) FROM files").fetchone()[0]
        return files, self.conn.execute("SELECT count(*) FROM chunks").fetchone()[0]

    # -- search --------------------------------------------------------------------------------------
    def vector_ranking(self, vector: np.ndarray, n: int) -> list[int]:
        """Chunk ids nearest to `vector` by cosine distance, best first."""
        rows = self.conn.execute("SELECT rowid FROM chunks_vec WHERE embedding MATCH ? AND k = ? ORDER BY distance",
                                 (np.asarray(vector, dtype=np.float32).tobytes(), n))
        return [r[0] for r in rows]

    def keyword_ranking(self, text: str, n: int) -> list[int]:
        """Chunk ids matching words of `text`, best BM25 first."""
        query = _fts_query(text)
        if query is None:
            return []
        rows = self.conn.execute("SELECT rowid FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY rank LIMIT ?",
                                 (query, n))
        return [r[0] for r in rows]

    def search(self, text: str, vector: np.ndarray, k: int = 5, candidates: int | None = None,
               max_per_file: int | None = 2) -> list[Hit]:
        """Top-k chunks by reciprocal rank fusion of the vector and keyword rankings, at most `max_per_file` of
        them from one file while chunks of other files are among the candidates (None: no limit).

        The limit is there because neighbouring chunks of one long page share most of their words and their
        topic, so they rank together: without it, three chunks of a page next to the answer can push the page
        that holds it out of the top 3."""
        if k < 1:
            raise LLMLabError(f"the number of passages to retrieve must be at least 1, got {k}")
        if max_per_file is not None and max_per_file < 1:
            raise LLMLabError(f"at most N passages per file: N must be at least 1, got {max_per_file}")
        n = candidates or max(4 * k, 20)
        scores: dict[int, float] = {}
        for ranking in (self.vector_ranking(vector, n), self.keyword_ranking(text, n)):
            for rank, cid in enumerate(ranking, 1):
                scores[cid] = scores.get(cid, 0.0) + 1.0 / (RRF_K + rank)
        ranked = sorted(scores, key=lambda c: -scores[c])
        if not ranked:
            return []
        marks = ",".join("?" * len(ranked))
        rows = self.conn.execute(f"SELECT c.id, f.path, c.page, c.line_start, c.line_end, c.text FROM chunks c "
                                 f"JOIN files f ON f.id = c.file_id WHERE c.id IN ({marks})", ranked)
        by_id = {r[0]: r for r in rows}
        hits = [Hit(cid, *by_id[cid][1:], score=scores[cid]) for cid in ranked if cid in by_id]
        return diversify(hits, k, max_per_file)
