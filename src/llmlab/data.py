"""Pretraining token data: a text corpus -> memory-mapped token files, and deterministic batches over them.

`prepare` streams a corpus (text files, folders of them, JSONL with a text field) through a tokenizer and writes
DATA_DIR, atomically (it replaces an earlier `prepare` output, and other files only with overwrite):
    train.bin, val.bin    flat token ids (uint16 when the vocabulary fits, else uint32); EOS ends every document
    meta.json             dtype, vocab size, token counts, tokenizer source, special token ids
    tokenizer.json, tokenizer_config.json
The corpus is never held in memory: text files are read in blocks of lines, and each block (or JSONL document)
goes to the validation split by error diffusion, so val gets `val_fraction` of the tokens spread over the corpus.

`TokenDataset` cuts each split into non-overlapping windows of seq_len + 1 tokens. Training sample number p is
window `perm_e[p % N]` of epoch e = p // N, with `perm_e` a permutation seeded by (seed, e): the batch at any
point of a run is a pure function of the seed and the number of samples seen, which is what exact resume and
data-parallel sharding need. Validation samples are windows in file order, the same at every evaluation.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from llmlab.checkpoint import check_output, output_folder, write_json
from llmlab.errors import LLMLabError
from llmlab.jsonl import iter_jsonl
from llmlab.tokenizer import Tokenizer, train_bpe_tokenizer

Batch = dict[str, Tensor]
"""A training batch: `input_ids` (B, T) and `labels` (B, T) int64, where label -100 means "no loss here"."""

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
BLOCK_CHARS = 8192  # text files are cut into blocks of about this many characters, at line ends
FORMAT = "llmlab-tokens"


# -- reading a corpus --------------------------------------------------------------------------------
@dataclass
class Piece:
    """A unit of text that goes whole to one split: a JSONL document or a block of a text file."""

    text: str
    starts_doc: bool
    ends_doc: bool
    nbytes: int  # bytes of the file it came from, for the progress bar


def corpus_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files of a corpus: given files as they are, folders searched for text and JSONL files."""
    if not paths:
        raise LLMLabError("no corpus given: pass one or more text files, folders or JSONL files")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
                           + JSONL_SUFFIXES and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise LLMLabError(f"corpus folder {p} has no {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise LLMLabError(f"corpus path not found: {p}")
    return files


def iter_pieces(files: Sequence[Path], text_field: str = "text") -> Iterator[Piece]:
    """Stream the corpus as pieces of text; documents are JSONL records or whole text files."""
    for path in files:
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from _jsonl_pieces(path, text_field)
        else:
            yield from _text_pieces(path)


def _jsonl_pieces(path: Path, text_field: str) -> Iterator[Piece]:
    for lineno, record, nbytes in iter_jsonl(path):
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise LLMLabError(f"{path}:{lineno}: no '{text_field}' field (found {keys}); "
                              "name the text field with --text-field")
        text = record[text_field]
        if not isinstance(text, str):
            raise LLMLabError(f"{path}:{lineno}: field '{text_field}' must be a string, "
                              f"got {type(text).__name__}")
        if text:
            yield Piece(text, True, True, nbytes)
        # an empty document adds nothing, not even an EOS


def _text_pieces(path: Path) -> Iterator[Piece]:
    block: list[str] = []
    size = nbytes = 0
    pending: Piece | None = None  # one block of lookahead, so the last block can be marked as the document's end
    first = True
    with path.open("rb") as fh:
        for line in fh:
            block.append(line.decode("utf-8", errors="replace"))
            size += len(block[-1])
            nbytes += len(line)
            if size >= BLOCK_CHARS:
                if pending is not None:
                    yield pending
                pending = Piece("".join(block), first, False, nbytes)
                first, block, size, nbytes = False, [], 0, 0
    if block:
        if pending is not None:
            yield pending
        pending = Piece("".join(block), first, False, nbytes)
    if pending is not None:
        pending.ends_doc = True
        yield pending


# -- prepare -----------------------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in it, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def prepare(corpus: Sequence[str | Path], out_dir: str | Path, tokenizer: str | Path | None = None,
            train_tokenizer: int | None = None, text_field: str = "text", val_fraction: float = 0.05,
            seed: int = 0, progress: bool = True, overwrite: bool = False) -> Path:
    """Tokenize a corpus into DATA_DIR (train.bin, val.bin, meta.json, tokenizer files), written atomically.

    Give exactly one of `tokenizer` (a folder with tokenizer.json, e.g. a checkpoint) and `train_tokenizer`
    (the vocabulary size of a new byte-level BPE trained on this corpus). DATA_DIR may be missing, empty or an
    earlier output of `prepare`; any other folder is replaced only with `overwrite` (`llmlab.checkpoint.check_output`).
    """
    if (tokenizer is None) == (train_tokenizer is None):
        raise LLMLabError("give exactly one of --tokenizer CKPT (reuse its tokenizer) and --train-tokenizer "
                          "VOCAB_SIZE (train a new one on the corpus)")
    if not 0 <= val_fraction < 1:
        raise LLMLabError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    check_output(out_dir, "prepare", overwrite)  # before any work; checked again when the folder is swapped in
    files = corpus_files(corpus)
    total_bytes = sum(f.stat().st_size for f in files)
    if total_bytes == 0:
        raise LLMLabError(f"corpus is empty: {', '.join(map(str, files))} hold no text")
    if not any(piece.text.strip() for piece in iter_pieces(files, text_field)):  # stops at the first text
        raise LLMLabError(f"corpus is empty: {', '.join(map(str, files))} hold only whitespace")

    if tokenizer is not None:
        tok = Tokenizer.from_folder(tokenizer)
        source = str(tokenizer)
    else:
        texts = (p.text for p in iter_pieces(files, text_field))
        tok = train_bpe_tokenizer(texts, train_tokenizer, show_progress=progress)
        source = f"byte-level BPE trained on the corpus (vocab {train_tokenizer})"
    if tok.eos_id is None:
        raise LLMLabError(f"tokenizer {source} has no eos_token (tokenizer_config.json); documents need one "
                          "as a separator")
    dtype = token_dtype(tok.vocab_size)
    rng = random.Random(seed)
    counts = {"train": 0, "val": 0}
    documents = 0
    with output_folder(out_dir, "prepare", overwrite) as tmp:
        files_out = {split: (tmp / f"{split}.bin").open("wb") for split in counts}
        try:
            bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=not progress)
            held: tuple[np.ndarray, str] | None = None  # written one piece late, so val can take the last piece
            for ids, nbytes, ends in _encode(tok, iter_pieces(files, text_field)):
                if held is not None:
                    files_out[held[1]].write(held[0].tobytes())
                # error diffusion: val takes a piece when its share lags val_fraction by a random part of it
                seen = counts["train"] + counts["val"] + len(ids)
                split = "val" if val_fraction * seen - counts["val"] >= rng.random() * len(ids) else "train"
                counts[split] += len(ids)
                held = (ids.astype(dtype), split)
                documents += ends
                bar.update(nbytes)
            if held is not None:
                if val_fraction > 0 and counts["val"] == 0 and counts["train"] > len(held[0]):
                    counts["train"] -= len(held[0])
                    counts["val"] += len(held[0])
                    held = (held[0], "val")
                files_out[held[1]].write(held[0].tobytes())
            bar.close()
        finally:
            for fh in files_out.values():
                fh.close()
        if counts["train"] + counts["val"] == 0:
            raise LLMLabError(f"corpus is empty: no text found in {', '.join(map(str, corpus))}")
        tok.save(tmp)
        write_json(tmp / "meta.json", {
            "format": FORMAT, "version": 1, "dtype": dtype.name, "vocab_size": tok.vocab_size,
            "train_tokens": counts["train"], "val_tokens": counts["val"], "documents": documents,
            "eos_id": tok.eos_id, "bos_id": tok.bos_id, "pad_id": tok.pad_id, "tokenizer": source,
            "corpus": [str(p) for p in corpus], "val_fraction": val_fraction, "seed": seed,
        })
    return Path(out_dir)


def _encode(tok: Tokenizer, pieces: Iterable[Piece], batch: int = 64) -> Iterator[tuple[np.ndarray, int, bool]]:
    """Token ids of each piece (BOS at a document's start if the tokenizer adds one, EOS at its end)."""
    def flush(chunk: list[Piece]) -> Iterator[tuple[np.ndarray, int, bool]]:
        encoded = tok.backend.encode_batch([p.text for p in chunk], add_special_tokens=False)
        for piece, enc in zip(chunk, encoded):
            ids = enc.ids
            if piece.starts_doc and tok.add_bos and tok.bos_id is not None:
                ids = [tok.bos_id, *ids]
            if piece.ends_doc:
                ids = [*ids, tok.eos_id]
            yield np.asarray(ids, dtype=np.int64), piece.nbytes, piece.ends_doc

    chunk: list[Piece] = []
    for piece in pieces:
        chunk.append(piece)
        if len(chunk) == batch:
            yield from flush(chunk)
            chunk = []
    if chunk:
        yield from flush(chunk)


# -- reading prepared data ---------------------------------------------------------------------------
def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """The meta.json of a prepared data folder, checked."""
    data_dir = Path(data_dir)
    path = data_dir / "meta.json"
    if not path.is_file():
        raise LLMLabError(f"{data_dir}: no meta.json (prepare a corpus with `llmlab prepare CORPUS --out "
                          f"{data_dir}`)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LLMLabError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LLMLabError(f"{path}: not an llmlab token data folder (format should be '{FORMAT}')")
    return meta


class TokenSplit:
    """One split (train or val) of a data folder, memory-mapped and cut into windows of seq_len + 1 tokens."""

    def __init__(self, path: Path, dtype: np.dtype, seq_len: int, name: str) -> None:
        if not path.is_file():
            raise LLMLabError(f"{path.parent}: the '{name}' split file {path.name} is missing")
        n_tokens = path.stat().st_size // dtype.itemsize
        self.seq_len, self.name = seq_len, name
        self.num_windows = (n_tokens - 1) // seq_len if n_tokens else 0
        if self.num_windows < 1:
            raise LLMLabError(f"{path.parent}: the '{name}' split has {n_tokens} tokens, shorter than one "
                              f"sequence of seq_len {seq_len} + 1 tokens (lower --seq-len or add text)")
        self.tokens = np.memmap(path, dtype=dtype, mode="r")

    def windows(self, index: np.ndarray) -> Batch:
        """Input and target tokens of windows `index`: (B, T) each, targets shifted by one."""
        T = self.seq_len
        rows = np.stack([self.tokens[i * T: i * T + T + 1] for i in index]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}


class TokenDataset:
    """The train and val splits of a prepared folder, served as deterministic batches (see the module doc)."""

    def __init__(self, data_dir: str | Path, seq_len: int, seed: int = 0) -> None:
        self.data_dir = Path(data_dir)
        self.meta = read_meta(self.data_dir)
        dtype = np.dtype(self.meta["dtype"])
        self.train = TokenSplit(self.data_dir / "train.bin", dtype, seq_len, "train")
        self.val = TokenSplit(self.data_dir / "val.bin", dtype, seq_len, "val")
        self.seq_len, self.seed = seq_len, seed
        self._perms: dict[int, np.ndarray] = {}

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_folder(self.data_dir)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 1:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(self.train.num_windows)
        return self._perms[epoch]

    def train_batch(self, start: int, size: int) -> Batch:
        """Training samples start .. start + size - 1 of the run's endless, epoch-shuffled sample stream."""
        n = self.train.num_windows
        index = np.array([self._perm(p // n)[p % n] for p in range(start, start + size)])
        return self.train.windows(index)

    def val_batch(self, start: int, size: int) -> Batch:
        """Validation samples start .. start + size - 1, in file order (wrapping around a short split)."""
        index = np.arange(start, start + size) % self.val.num_windows
        return self.val.windows(index)
