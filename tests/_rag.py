"""A small stand-in embedder for fast index tests: hashed bag of words (no model, no sentence-transformers)."""

from __future__ import annotations

import re
import zlib
from functools import cached_property

import numpy as np
from tokenizers import Tokenizer as HFTokenizer


class HashEmbedder:
    """Unit-length hashed word counts; texts sharing words are close. Counts its encode calls."""

    name = "test/hash-bag-of-words"
    dim = 64

    def __init__(self) -> None:
        self.calls = 0
        self.texts = 0

    @cached_property
    def tokenizer(self) -> HFTokenizer:
        from llmlab.rag.embed import model_path

        return HFTokenizer.from_file(str(model_path() / "tokenizer.json"))

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        self.texts += len(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[i, zlib.crc32(word.encode()) % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-9)


def tiny_long_checkpoint(folder):
    """A random tiny model (the tiny byte-level BPE tokenizer of 300 tokens, chat template) whose context has room
    for tool descriptions and passages: 2048 positions instead of the tiny preset's 128."""
    import torch
    from _tiny import tiny_tokenizer

    from llmlab.checkpoint import save_checkpoint
    from llmlab.config import ModelConfig
    from llmlab.model import build_model

    tok = tiny_tokenizer()
    cfg = ModelConfig.from_name("tiny", vocab_size=300, max_position_embeddings=2048)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_id, tok.eos_id, tok.pad_id
    torch.manual_seed(0)
    return save_checkpoint(build_model(cfg), folder, tokenizer=tok)
