"""The OpenAI-compatible server over real HTTP: uvicorn on a free localhost port, the official `openai` client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest
import torch
from _serve import (
    PROMPTS,
    ServerThread,
    free_port,
    http_json,
    make_fixture,
    one_thread,  # noqa: F401  (a fixture, used through pytestmark)
    raw_request,
    wait_for,
)

from llmlab.serve import load_engine
from llmlab.serve.api import ChatPlan, create_app
from llmlab.serve.engine import GenerationRequest

KEY = "sk-test-0123456789"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return make_fixture(tmp_path_factory.mktemp("serve_api"))


@pytest.fixture(scope="module")
def server(fixture):
    ckpt, adapters = fixture
    engine, tok = load_engine(ckpt, adapters, max_batch=6, max_seq_len=96, queue_size=8)
    srv = ServerThread(create_app(engine, tok, "tiny", api_key=KEY))
    srv.engine, srv.tokenizer = engine, tok
    yield srv
    srv.stop()
    engine.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_and_health(server, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny", "alpha", "beta"]
    status, health = http_json(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["adapters"] == ["alpha", "beta"]


def test_completion_matches_engine_and_reports_usage(server, client):
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    ids = server.tokenizer.encode(PROMPTS[0])
    expected = server.engine.generate(GenerationRequest(ids, 8), 60)[0]
    assert (out.choices[0].text, out.choices[0].finish_reason) == expected
    assert out.object == "text_completion" and out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == 8 and out.usage.total_tokens == len(ids) + 8


def test_completion_prompt_list_gives_choices_in_order(client):
    one = [client.completions.create(model="tiny", prompt=p, max_tokens=5, temperature=0).choices[0].text
           for p in PROMPTS[:2]]
    both = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=5, temperature=0)
    assert [c.text for c in both.choices] == one and [c.index for c in both.choices] == [0, 1]


def test_chat_uses_template_and_streaming_equals_non_streaming(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does the cat say?"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    ids = server.tokenizer.encode_chat(messages)
    assert out.choices[0].message.content == server.engine.generate(GenerationRequest(ids, 12), 60)[0][0]
    assert out.choices[0].message.role == "assistant" and out.usage.prompt_tokens == len(ids)
    pieces, reasons, usage = [], [], None
    for chunk in client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert "".join(pieces) == out.choices[0].message.content
    assert reasons[-1] == out.choices[0].finish_reason and usage.completion_tokens == out.usage.completion_tokens
    assert len([p for p in pieces if p]) > 1, "the answer should arrive in several chunks"


def test_sse_wire_format_ends_with_done(server):
    body = {"model": "tiny", "prompt": "The dog", "max_tokens": 4, "temperature": 0, "stream": True}
    conn, r = raw_request(server, "POST", "/v1/completions", body, KEY)
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.read().decode().split("\n") if line]
    conn.close()
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" for c in chunks)


def test_n_seed_stop(client):
    kw = dict(model="tiny", prompt="The dog", max_tokens=10, temperature=1.0, seed=123, n=3)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 3
    assert len({c.text for c in a.choices}) > 1
    c = client.completions.create(**{**kw, "seed": 124})
    assert [x.text for x in c.choices] != [x.text for x in a.choices]
    greedy = client.completions.create(model="tiny", prompt="The dog", max_tokens=10, temperature=0).choices[0].text
    stop = greedy[4:7]
    cut = client.completions.create(model="tiny", prompt="The dog", max_tokens=10, temperature=0, stop=[stop, "zzz"])
    assert cut.choices[0].text == greedy[:greedy.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_adapter_selection_and_mixed_concurrent_requests(server, client):
    def ask(model: str) -> str:
        return client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=12, temperature=0).choices[0].text

    alone = {m: ask(m) for m in ("tiny", "alpha", "beta")}
    assert len(set(alone.values())) == 3
    order = ["alpha", "tiny", "beta", "alpha", "beta", "tiny"]
    results: dict[int, str] = {}
    with server.engine.lock:  # paused: all six requests join one batch
        threads = [threading.Thread(target=lambda i=i, m=m: results.__setitem__(i, ask(m)))
                   for i, m in enumerate(order)]
        for t in threads:
            t.start()
        assert wait_for(lambda: server.engine.status()["waiting"] == len(order))
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(order))] == [alone[m] for m in order]


def error_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value


def test_errors_have_openai_bodies(server, client):
    e = error_of(lambda: client.completions.create(model="nope", prompt="x", max_tokens=2))
    assert e.status_code == 404 and e.body["code"] == "model_not_found" and "'nope' does not exist" in e.body["message"]
    long = [{"role": "user", "content": "x " * 200}]
    e = error_of(lambda: client.chat.completions.create(model="tiny", messages=long))
    assert e.status_code == 413 and e.body["code"] == "context_length_exceeded" and "context is 96" in e.body["message"]
    e = error_of(lambda: client.completions.create(model="tiny", prompt="hi", max_tokens=500))
    assert e.status_code == 400 and e.body["param"] == "max_tokens" and "at most" in e.body["message"]
    e = error_of(lambda: client.completions.create(model="tiny", prompt="hi", temperature=3))
    assert e.status_code == 400 and e.body["param"] == "temperature" and e.body["type"] == "invalid_request_error"
    e = error_of(lambda: client.completions.create(model="tiny", prompt="hi", n=7))
    assert e.status_code == 400 and "at most 6" in e.body["message"]
    e = error_of(lambda: client.chat.completions.create(model="tiny", messages=[]))
    assert e.status_code == 400 and e.body["param"] == "messages"
    e = error_of(lambda: client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                        tools=[{"type": "function", "function": {"name": "f"}}]))
    assert e.status_code == 400 and e.body["param"] == "tools"
    e = error_of(lambda: client.completions.create(model="tiny", prompt="hi", stop=[""]))
    assert e.status_code == 400 and e.body["param"] == "stop"
    e = error_of(lambda: client.completions.create(model="tiny", prompt="hi", logprobs=2))
    assert e.status_code == 400 and e.body["param"] == "logprobs"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    e = error_of(lambda: bad.models.list())
    assert e.status_code == 401 and e.body["code"] == "invalid_api_key"
    assert http_json(server, "GET", "/v1/models")[0] == 401  # no key at all
    status, err = http_json(server, "POST", "/v1/completions", b"{not json", KEY)
    assert status == 400 and err["error"]["type"] == "invalid_request_error"
    assert http_json(server, "GET", "/v1/nothing-here") == (404, {"error": {"message": "Not Found", "type":
                                                                           "invalid_request_error", "param": None,
                                                                           "code": None}})


def test_queue_full_answers_503(server, client):
    eng = server.engine
    with eng.lock:  # paused: requests stay in the queue (size 8)
        threads = [threading.Thread(target=lambda: client.completions.create(model="tiny", prompt="hi", max_tokens=2))
                   for _ in range(eng.queue_size)]
        for t in threads:
            t.start()
        assert wait_for(lambda: eng.status()["waiting"] == eng.queue_size)
        e = error_of(lambda: client.completions.create(model="tiny", prompt="hi", max_tokens=2))
    for t in threads:
        t.join()
    assert e.status_code == 503 and e.body["code"] == "queue_full" and "--queue-size 8" in e.body["message"]


def test_client_disconnect_stops_streaming_generation(server):
    eng = server.engine
    before = eng.status()
    body = {"model": "tiny", "prompt": "The dog", "max_tokens": 90, "temperature": 0, "stream": True}
    # Each step takes >= 20 ms, so the 90 tokens can't all be decoded before the test pauses the engine (on an idle
    # machine the tiny model once finished between the first chunk and the pause, and nothing was left to cancel).
    slow = eng.model.register_forward_pre_hook(lambda module, args: time.sleep(0.02))
    try:
        conn, r = raw_request(server, "POST", "/v1/completions", body, KEY)
        assert r.status == 200
        assert r.readline().startswith(b"data: ")  # the first chunk arrived: the request is decoding
        eng.lock.acquire()  # pause the engine mid-generation, then hang up
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        try:
            assert wait_for(lambda: any(req.cancelled for req in list(_running(eng))))
        finally:
            eng.lock.release()
    finally:
        slow.remove()
    assert wait_for(lambda: eng.status()["cancelled"] == before["cancelled"] + 1 and eng.status()["running"] == 0)
    assert eng.status()["tokens"] - before["tokens"] < 90
    assert eng.status()["finished"] == before["finished"]


def _running(eng):
    return [row.req for row in eng._rows]


def test_client_disconnect_cancels_a_waiting_non_streaming_request(server):
    eng = server.engine
    before = eng.status()
    body = {"model": "tiny", "prompt": "The dog", "max_tokens": 20, "temperature": 0}
    with eng.lock:  # paused: the request waits; the client gives up and hangs up
        with pytest.raises(TimeoutError):
            raw_request(server, "POST", "/v1/completions", body, KEY, timeout=1.0)
        assert eng.status()["waiting"] == 1
        assert wait_for(lambda: eng._waiting and eng._waiting[0].cancelled)
    assert wait_for(lambda: eng.status()["cancelled"] == before["cancelled"] + 1 and eng.status()["waiting"] == 0)
    assert eng.status()["tokens"] == before["tokens"] and eng.status()["finished"] == before["finished"]


def test_extension_hook_changes_the_reply(fixture):
    ckpt, _ = fixture
    engine, tok = load_engine(ckpt, max_batch=2, max_seq_len=96)

    class Echo:
        def prepare_chat(self, request, plan: ChatPlan) -> ChatPlan:
            plan.messages.insert(0, {"role": "system", "content": "context"})
            plan.finish = lambda text: ({"content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                         "function": {"name": "echo", "arguments": json.dumps({"text": text})}}]},
                                        "tool_calls")
            plan.extra["sources"] = [{"title": "doc"}]
            return plan

    srv = ServerThread(create_app(engine, tok, "tiny", extensions=[Echo()]))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                             temperature=0, tools=[{"type": "function", "function": {"name": "echo"}}])
        call = out.choices[0].message.tool_calls[0]
        assert out.choices[0].finish_reason == "tool_calls" and call.function.name == "echo"
        assert out.model_extra["sources"] == [{"title": "doc"}]
        ids = tok.encode_chat([{"role": "system", "content": "context"}, {"role": "user", "content": "hi"}])
        assert json.loads(call.function.arguments)["text"] == engine.generate(GenerationRequest(ids, 5), 60)[0][0]
    finally:
        srv.stop()
        engine.close()


@pytest.mark.slow  # a subprocess loads torch and the model
def test_cli_serves_until_stopped_and_reports_bad_adapters(fixture, tmp_path):
    ckpt, adapters = fixture
    port = free_port()
    cmd = [sys.executable, "-m", "llmlab.cli", "serve", str(ckpt), "--adapter", f"alpha={adapters['alpha']}",
           "--adapter", f"beta={adapters['beta']}", "--port", str(port), "--max-seq-len", "64"]
    proc = subprocess.Popen(cmd, env={**os.environ, "LLMLAB_API_KEY": KEY, "OMP_NUM_THREADS": "1"},
                            stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=30)

        def up() -> bool:
            try:
                return [m.id for m in client.models.list().data] == ["tiny", "alpha", "beta"]
            except openai.APIConnectionError:
                assert proc.poll() is None, proc.stderr.read()
                return False

        assert wait_for(up, 60)
        out = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert out.choices[0].finish_reason in ("stop", "length") and out.model == "beta"
    finally:
        proc.terminate()
        proc.wait(30)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    bad = subprocess.run(cmd[:5] + ["--adapter", f"x={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "llmlab: error:" in bad.stderr and "peft_type is 'IA3'" in bad.stderr


def test_client_giving_up_mid_generation_stops_it(fixture):
    ckpt, _ = fixture
    engine, tok = load_engine(ckpt, max_batch=2, max_seq_len=96)

    def slow(ids, logits):  # 20 ms a token and no end-of-sequence: generation outlasts the client's patience
        time.sleep(0.02)
        return logits.index_fill(0, torch.tensor([tok.eos_id]), float("-inf"))

    class Slow:
        def prepare_chat(self, request, plan: ChatPlan) -> ChatPlan:
            plan.logits_processor = slow
            return plan

    srv = ServerThread(create_app(engine, tok, "tiny", extensions=[Slow()]))
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 70, "temperature": 0}
        with pytest.raises(TimeoutError):
            raw_request(srv, "POST", "/v1/chat/completions", body, timeout=0.6)
        assert wait_for(lambda: engine.status()["cancelled"] == 1 and engine.status()["running"] == 0)
        assert 0 < engine.status()["tokens"] < 70 and engine.status()["finished"] == 0
    finally:
        srv.stop()
        engine.close()
