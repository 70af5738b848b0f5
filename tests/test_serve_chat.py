"""Chat completions' `response_format` (structured replies through the grammar) and `logprobs`, through the
official `openai` client: its `parse` and `stream` helpers with a pydantic model, `n` > 1, streaming, beside tools."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from _rag import tiny_long_checkpoint
from _serve import (
    ServerThread,
    one_thread,  # noqa: F401  (a fixture, used through pytestmark)
)
from pydantic import BaseModel, Field

from llmlab.serve import load_engine
from llmlab.serve.api import create_app
from llmlab.serve.copilot import CopilotExtension

pytestmark = pytest.mark.usefixtures("one_thread")


class Weather(BaseModel):
    city: str = Field(max_length=40)
    temperature: int = Field(ge=-60, le=60)
    sky: Literal["sunny", "cloudy", "rainy"]
    warnings: list[str]


def serve(ckpt, max_seq_len: int = 2048) -> tuple[ServerThread, object]:
    engine, tok = load_engine(ckpt, None, max_batch=4, max_seq_len=max_seq_len, queue_size=8, dtype="float32")
    app = create_app(engine, tok, "m", extensions=[CopilotExtension(tok, engine.model.config.vocab_size)])
    return ServerThread(app), engine


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    srv, engine = serve(tiny_long_checkpoint(tmp_path_factory.mktemp("chat") / "tiny"))
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
    srv.stop()
    engine.close()


ASK = [{"role": "user", "content": "What is the weather in Paris? Answer in JSON."}]


@pytest.mark.parametrize("seed", range(2))
def test_parse_with_a_pydantic_model_every_choice(client, seed):
    """A random model's replies match the schema, every one of n = 3 choices (each has its own grammar state)."""
    out = client.chat.completions.parse(model="m", messages=ASK, response_format=Weather, temperature=1.0,
                                        seed=seed, n=3, max_tokens=1000)
    assert len(out.choices) == 3 and all(c.finish_reason == "stop" for c in out.choices)
    assert all(isinstance(c.message.parsed, Weather) for c in out.choices)
    assert len({c.message.content for c in out.choices}) > 1


def test_streamed_structured_reply_with_the_stream_helper(client):
    with client.chat.completions.stream(model="m", messages=ASK, response_format=Weather, temperature=1.0, seed=7,
                                        max_tokens=400) as stream:
        deltas = [e for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Weather) and len(deltas) > 3


def test_json_object_mode_streamed_and_not(client):
    """`json_object`: a JSON object, also streamed with n = 2 (each choice's deltas put together)."""
    kw = dict(model="m", messages=ASK, response_format={"type": "json_object"}, temperature=1.0, max_tokens=400)
    for seed in range(3):
        reply = client.chat.completions.create(**kw, seed=seed).choices[0]
        assert reply.finish_reason == "stop" and isinstance(json.loads(reply.message.content), dict)
    texts = ["", ""]
    for chunk in client.chat.completions.create(**kw, seed=9, n=2, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert all(isinstance(json.loads(t), dict) for t in texts)


def test_response_format_beside_tools(client):
    """With tools and tool_choice "auto" a reply is either a call or JSON matching the format; with "none" it is
    JSON matching the format."""
    from test_copilot_serve import TOOLS, check_calls

    schema = {"type": "object", "properties": {"answer": {"type": "string"}, "sure": {"type": "boolean"}},
              "required": ["answer", "sure"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    kinds = set()
    for seed in range(6):
        reply = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, response_format=fmt,
                                               temperature=1.0, seed=seed, max_tokens=400).choices[0]
        if reply.message.tool_calls:
            check_calls(reply.message)
            kinds.add("call")
        else:
            jsonschema.validate(json.loads(reply.message.content), schema)
            kinds.add("json")
    assert kinds == {"call", "json"}, kinds  # the random model takes both branches over these seeds
    none = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="none",
                                          response_format=fmt, temperature=1.0, seed=1, max_tokens=400).choices[0]
    jsonschema.validate(json.loads(none.message.content), schema)


def _error(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value


def test_bad_response_formats_are_400_naming_the_field(client):
    def ask(fmt):
        return _error(lambda: client.chat.completions.create(model="m", messages=ASK, response_format=fmt))

    cases = [({"type": "xml"}, "response_format", "type must be one of"),
             ({"type": []}, "response_format", "type must be one of"),  # unhashable: was a 500 (found by fuzzing)
             ({"type": {"a": 1}}, "response_format", "type must be one of"),
             ({"type": "json_schema"}, "response_format.json_schema", "Field required"),
             ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema",
              "is required"),
             ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "minLength": "a"}}},
              "response_format.json_schema.schema", "not a valid JSON schema"),
             ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                               "propertyNames": {"maxLength": 3}}}},
              "response_format.json_schema.schema", "propertyNames"),
             ({"type": "json_schema", "json_schema": {"name": "no spaces", "schema": {}}},
              "response_format.json_schema.name", "pattern")]
    for fmt, param, message in cases:
        e = ask(fmt)
        assert e.status_code == 400 and e.body["param"] == param and message in e.body["message"], (fmt, e.body)
    for field, value in (("functions", [{"name": "f"}]), ("audio", {"voice": "alloy", "format": "wav"})):
        e = _error(lambda: client.chat.completions.create(model="m", messages=ASK, extra_body={field: value}))
        assert e.status_code == 400 and e.body["param"] == field


def test_chat_logprobs_streamed_and_not(client):
    kw = dict(model="m", messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=12, logprobs=True,
              top_logprobs=3)
    out = client.chat.completions.create(**kw)
    whole = out.choices[0]
    content = whole.logprobs.content  # every sampled token, the end-of-sequence token included
    assert len(content) == out.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob == t.top_logprobs[0].logprob for t in content)  # greedy
    text = content[:-1] if whole.finish_reason == "stop" else content
    assert bytes(b for t in text for b in t.bytes).decode("utf-8", "replace") == whole.message.content
    streamed = [t for chunk in client.chat.completions.create(**kw, stream=True) for c in chunk.choices
                if c.logprobs for t in c.logprobs.content or []]
    assert [t.token for t in streamed] == [t.token for t in content]  # numbers: the prefix reuse may move a last bit
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-4)
    assert client.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None}).choices[0].logprobs \
        is None
    e = _error(lambda: client.chat.completions.create(**{**kw, "logprobs": False}))
    assert e.status_code == 400 and e.body["param"] == "top_logprobs"


@pytest.mark.slow
def test_default_model_structured_replies(default_ckpt):
    """SmolLM2-135M-Instruct answers with a pydantic model through `parse`, every time."""
    srv, engine = serve(default_ckpt, max_seq_len=1024)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=600)
        cities = ["Paris", "Tokyo", "Cairo", "Oslo", "Lima"]
        for city in cities:
            out = client.chat.completions.parse(
                model="m", messages=[{"role": "user", "content": f"Describe today's weather in {city} as JSON."}],
                response_format=Weather, temperature=0.7, seed=0, max_tokens=200)
            assert isinstance(out.choices[0].message.parsed, Weather), out.choices[0].message.content
    finally:
        srv.stop()
        engine.close()
