"""LoRA adapters loaded and unloaded while the server runs, with vLLM's routes and request shapes: only with the
API key and `allow_adapter_loading`; requests in flight are unaffected; an adapter that does not fit is a 400 naming
`lora_path`."""

from __future__ import annotations

import threading
import time

import openai
import pytest
import torch
from _serve import (
    ServerThread,
    http_json,
    make_adapter,
    make_fixture,
    one_thread,  # noqa: F401  (a fixture, used through pytestmark)
    raw_request,
    wait_for,
)
from _tiny import tiny_checkpoint

from llmlab.args import LoRAConfig
from llmlab.errors import LLMLabError
from llmlab.methods.lora import save_adapter
from llmlab.serve import load_engine
from llmlab.serve.api import ChatPlan, create_app
from llmlab.serve.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "sk-adapters"


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return make_fixture(tmp_path_factory.mktemp("adapters"))


def post(srv, path: str, body: dict, key: str | None = KEY) -> tuple[int, str]:
    conn, resp = raw_request(srv, "POST", path, body, key)
    try:
        return resp.status, resp.read().decode()
    finally:
        conn.close()


class Slow:
    """An extension that makes each token take 20 ms, so a request is surely in flight while the test acts."""

    def prepare_chat(self, request, plan: ChatPlan) -> ChatPlan:
        def slow(generated, logits):
            time.sleep(0.02)
            return logits

        plan.logits_processor_factory = lambda: slow
        return plan


def test_load_serve_and_unload_while_a_request_runs(fixture):
    ckpt, adapters = fixture
    engine, tok = load_engine(ckpt, max_batch=4, max_seq_len=128)
    srv = ServerThread(create_app(engine, tok, "tiny", api_key=KEY, extensions=[Slow()], allow_adapter_loading=True))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        status, text = post(srv, "/v1/load_lora_adapter", {"lora_name": "alpha", "lora_path": str(adapters["alpha"])})
        assert (status, text) == (200, "Success: LoRA adapter 'alpha' added successfully.")
        assert [m.id for m in client.models.list().data] == ["tiny", "alpha"]
        messages = [{"role": "user", "content": "What does the cat say?"}]
        expected = engine.generate(GenerationRequest(tok.encode_chat(messages), 40, adapter="alpha"), 60)[0][0]
        result: list = []
        tokens = engine.status()["tokens"]
        worker = threading.Thread(target=lambda: result.append(client.chat.completions.create(
            model="alpha", messages=messages, max_tokens=40, temperature=0)))
        worker.start()
        assert wait_for(lambda: engine.status()["tokens"] > tokens)  # the request is decoding
        assert post(srv, "/v1/unload_lora_adapter", {"lora_name": "alpha"}) == (
            200, "Success: LoRA adapter 'alpha' removed successfully.")
        assert [m.id for m in client.models.list().data] == ["tiny"]
        with pytest.raises(openai.NotFoundError):  # new requests: at once
            client.chat.completions.create(model="alpha", messages=messages, max_tokens=2)
        worker.join(60)
        assert result[0].choices[0].message.content == expected  # the request in flight: as if nothing happened
        assert wait_for(lambda: engine.adapters.names == [])
        status, err = http_json(srv, "POST", "/v1/unload_lora_adapter", {"lora_name": "alpha"}, KEY)
        assert status == 404 and err["error"]["param"] == "lora_name"
    finally:
        srv.stop()
        engine.close()


def test_errors_name_the_field(fixture, tmp_path):
    ckpt, adapters = fixture
    engine, tok = load_engine(ckpt, {"beta": adapters["beta"]}, max_batch=2, max_seq_len=128)
    srv = ServerThread(create_app(engine, tok, "tiny", api_key=KEY, allow_adapter_loading=True))
    key = "model.layers.{}.self_attn.qkv_proj.lora_{}.q"
    save_adapter(tmp_path / "narrow", {key.format(0, "A"): torch.zeros(4, 32), key.format(0, "B"): torch.zeros(64, 4)},
                 LoRAConfig(r=4, targets="q"))
    try:
        foreign = make_adapter(tiny_checkpoint(tmp_path / "other", seed=1, std=0.1), tmp_path / "foreign", 3)
        cases = [({"lora_name": "x", "lora_path": str(tmp_path / "narrow")}, 400, "lora_path", "does not fit"),
                 ({"lora_name": "x", "lora_path": str(foreign)}, 400, "lora_path", "made for another base model"),
                 ({"lora_name": "x", "lora_path": str(tmp_path / "nowhere")}, 400, "lora_path", "no adapter_config"),
                 ({"lora_name": "x", "lora_path": "a\u0000b"}, 400, "lora_path", "control characters"),
                 ({"lora_name": "beta", "lora_path": str(adapters["alpha"])}, 400, "lora_name", "loaded already"),
                 ({"lora_name": "tiny", "lora_path": str(adapters["alpha"])}, 400, "lora_name", "serves already"),
                 ({"lora_name": "two words", "lora_path": "x"}, 400, "lora_name", "pattern"),
                 ({"lora_path": "x"}, 400, "lora_name", "Field required")]
        for body, status, param, message in cases:
            got, err = http_json(srv, "POST", "/v1/load_lora_adapter", body, KEY)
            assert (got, err["error"]["param"]) == (status, param) and message in err["error"]["message"], (body, err)
        assert http_json(srv, "POST", "/v1/load_lora_adapter", {"lora_name": "y", "lora_path": "x"})[0] == 401
        assert engine.adapter_names() == ["beta"]
    finally:
        srv.stop()
        engine.close()


def test_loading_is_off_unless_asked_for_and_needs_a_key(fixture):
    ckpt, adapters = fixture
    engine, tok = load_engine(ckpt, max_batch=2, max_seq_len=128)
    srv = ServerThread(create_app(engine, tok, "tiny", api_key=KEY))
    try:
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            status, err = http_json(srv, "POST", path, {"lora_name": "alpha", "lora_path": str(adapters["alpha"])},
                                    KEY)
            assert status == 403 and "--allow-adapter-loading" in err["error"]["message"]
        assert engine.adapter_names() == []
        with pytest.raises(LLMLabError, match="needs an API key"):
            create_app(engine, tok, "tiny", allow_adapter_loading=True)
    finally:
        srv.stop()
        engine.close()
