"""/v1/responses through the official `openai` client: text and message input, `instructions`,
`max_output_tokens`, `text.format`, streamed events (raw and through the SDK's stream helper), and the refusals."""

from __future__ import annotations

import json

import openai
import pytest
from _serve import (
    ServerThread,
    make_fixture,
    one_thread,  # noqa: F401  (a fixture, used through pytestmark)
)
from pydantic import BaseModel, Field

from llmlab.serve import load_engine
from llmlab.serve.api import create_app
from llmlab.serve.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt, adapters = make_fixture(tmp_path_factory.mktemp("responses"))
    engine, tok = load_engine(ckpt, adapters, max_batch=4, max_seq_len=128, queue_size=8)
    srv = ServerThread(create_app(engine, tok, "tiny"))
    srv.engine, srv.tokenizer = engine, tok
    yield srv
    srv.stop()
    engine.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def _greedy(server, messages, max_tokens, adapter=None) -> tuple[str, str]:
    ids = server.tokenizer.encode_chat(messages)
    return server.engine.generate(GenerationRequest(ids, max_tokens, adapter=adapter), 60)[0]


def test_text_input_with_instructions_is_a_chat_turn(server, client):
    r = client.responses.create(model="alpha", input="What does the cat say?", instructions="Be brief.",
                                max_output_tokens=10, temperature=0)
    text, reason = _greedy(server, [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "What does the cat say?"}], 10, "alpha")
    assert r.output_text == text and r.object == "response" and r.model == "alpha"
    assert (r.status, r.incomplete_details and r.incomplete_details.reason) == (
        ("incomplete", "max_output_tokens") if reason == "length" else ("completed", None))
    item = r.output[0]
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert r.usage.output_tokens <= 10 and r.usage.input_tokens == len(server.tokenizer.encode_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does the cat say?"}]))


def test_message_input_and_streamed_events(server, client):
    messages = [{"role": "developer", "content": "Answer."},
                {"role": "user", "content": [{"type": "input_text", "text": "The dog"}]},
                {"role": "assistant", "content": [{"type": "output_text", "text": " says"}]},
                {"role": "user", "content": "and the owl?"}]
    whole = client.responses.create(model="tiny", input=messages, max_output_tokens=20, temperature=0)
    expected = _greedy(server, [{"role": "system", "content": "Answer."}, {"role": "user", "content": "The dog"},
                                {"role": "assistant", "content": " says"}, {"role": "user", "content": "and the owl?"}],
                       20)[0]
    assert whole.output_text == expected
    events = list(client.responses.create(model="tiny", input=messages, max_output_tokens=20, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] == f"response.{whole.status}" and kinds.count("response.output_text.delta") > 1
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == expected
    assert events[-1].response.output_text == expected and events[0].response.id == events[-1].response.id
    with client.responses.stream(model="tiny", input="The cow", max_output_tokens=30, temperature=0) as stream:
        seen = list(stream)  # (its get_final_response wants `response.completed`, and this reply is cut)
    deltas = [e.delta for e in seen if e.type == "response.output_text.delta"]
    assert seen[-1].type == "response.incomplete" and seen[-1].response.output_text == "".join(deltas) != ""


def test_text_format_json_schema(client):
    class Animal(BaseModel):  # short, for the tiny model's context of 128
        name: str = Field(max_length=20)
        legs: int = Field(ge=0, le=100)

    r = client.responses.parse(model="tiny", input="Describe an animal", text_format=Animal, temperature=1.0,
                               max_output_tokens=80)
    assert isinstance(r.output_parsed, Animal)
    with client.responses.stream(model="tiny", input="Another", text_format=Animal, temperature=1.0,
                                 max_output_tokens=80) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and isinstance(final.output_parsed, Animal) and len(deltas) > 1
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    r = client.responses.create(model="tiny", input="JSON please", temperature=1.0, max_output_tokens=80,
                                text={"format": {"type": "json_schema", "name": "ok", "schema": schema}})
    assert r.status == "completed" and isinstance(json.loads(r.output_text)["ok"], bool)
    assert r.text.format.type == "json_schema"


def test_what_is_not_supported_is_refused_naming_the_field(client):
    cases = [(dict(previous_response_id="resp_1"), "previous_response_id"),
             (dict(conversation="conv_1"), "conversation"), (dict(background=True), "background"),
             (dict(tools=[{"type": "function", "name": "f", "parameters": {}}]), "tools"),
             (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
              "input[0].content[0].type"),
             (dict(input=[{"type": "function_call_output", "call_id": "c", "output": "x"}]), "input[0].type"),
             (dict(max_output_tokens=0), "max_output_tokens"), (dict(model="nope"), "model")]
    for kw, param in cases:
        with pytest.raises(openai.APIStatusError) as e:
            client.responses.create(**{"model": "tiny", "input": "hi", **kw})
        assert e.value.status_code in (400, 404) and e.value.body["param"] == param, (kw, e.value.body)
