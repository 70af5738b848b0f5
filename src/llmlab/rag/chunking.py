"""Reading documents (text, Markdown, PDF) and splitting them into overlapping token chunks that remember where
they came from (page for PDFs, line range always), so an answer can cite and show the original passage.

Chunks are counted in the embedding model's own tokens, so a chunk never exceeds what the embedder reads
(all-MiniLM-L6-v2 truncates at 256), and each chunk's text is an exact slice of the document (token offsets map back
to characters), not a detokenized approximation.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from llmlab.errors import LLMLabError

SUFFIXES = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown", ".rst": "text",
            ".pdf": "pdf"}


@dataclass
class Chunk:
    """A passage of a document: its exact text, PDF page (1-based, None for text files) and lines (1-based,
    inclusive; within the page for PDFs)."""

    text: str
    page: int | None
    line_start: int
    line_end: int


def is_supported(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES


def read_document(path: Path) -> list[tuple[int | None, str]]:
    """The text of a file as (page, text) pieces: one piece (page None) for text and Markdown, one per PDF page."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise LLMLabError(f"{path}: unsupported file type '{path.suffix}' (expected one of {', '.join(SUFFIXES)})")
    if kind != "pdf":
        try:
            return [(None, path.read_bytes().decode("utf-8", errors="replace"))]
        except OSError as e:
            raise LLMLabError(f"{path}: cannot read: {e}") from e
    from pypdf import PdfReader  # the retrieval extra's (llmlab[rag]); only PDFs need it
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            raise LLMLabError(f"{path}: the PDF is encrypted; decrypt it first")
        return [(i, page.extract_text() or "") for i, page in enumerate(reader.pages, 1)]
    except (PyPdfError, OSError, ValueError) as e:
        raise LLMLabError(f"{path}: cannot read this PDF: {e}") from e


def chunk_text(text: str, tokenizer: HFTokenizer, max_tokens: int = 200, overlap: int = 40,
               page: int | None = None) -> list[Chunk]:
    """Split `text` into windows of at most ~`max_tokens` tokens, each starting `max_tokens - overlap` tokens after
    the previous one (widened to whole words, so a word is never cut in two)."""
    if max_tokens < 8:
        raise LLMLabError(f"--chunk-tokens must be at least 8, got {max_tokens}")
    if not 0 <= overlap < max_tokens:
        raise LLMLabError(f"--overlap must be >= 0 and smaller than --chunk-tokens ({max_tokens}), got {overlap}")
    if tokenizer.truncation is not None or tokenizer.padding is not None:  # model tokenizers ship with both on
        tokenizer.no_truncation()
        tokenizer.no_padding()
    offsets = [o for o in tokenizer.encode(text, add_special_tokens=False).offsets if o[1] > o[0]]
    newlines = [i for i, c in enumerate(text) if c == "\n"]
    chunks: list[Chunk] = []
    start = 0
    while start < len(offsets):
        first = start
        while first > 0 and offsets[first][0] == offsets[first - 1][1] and start - first < 8:
            first -= 1  # a word-piece continuation: begin at its word
        end = min(start + max_tokens, len(offsets))
        while end < len(offsets) and offsets[end][0] == offsets[end - 1][1] and end - start < max_tokens + 8:
            end += 1  # finish the last word
        lo, hi = offsets[first][0], offsets[end - 1][1]
        passage = text[lo:hi].strip()
        if passage:
            chunks.append(Chunk(passage, page, bisect_right(newlines, lo - 1) + 1, bisect_right(newlines, hi - 1) + 1))
        if end == len(offsets):
            break
        start += max_tokens - overlap
    return chunks


def chunk_file(path: Path, tokenizer: HFTokenizer, max_tokens: int = 200, overlap: int = 40) -> list[Chunk]:
    """All chunks of a document, page by page for PDFs."""
    return [c for page, text in read_document(path) for c in chunk_text(text, tokenizer, max_tokens, overlap, page)]
