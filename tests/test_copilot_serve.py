"""The server's copilot extension over real HTTP with the official `openai` client: `tools` / `tool_choice` give
`tool_calls` whose arguments validate against their schemas, the conversation goes on after a `tool` message, and
`--index` adds the passages as `sources`."""

from __future__ import annotations

import openai
import pytest
from _rag import HashEmbedder, tiny_long_checkpoint
from _scripts import load_script
from _serve import ServerThread, one_thread  # noqa: F401  (a fixture, used through pytestmark)

from llmlab.rag.index import build_index, open_index
from llmlab.serve import load_engine
from llmlab.serve.api import create_app
from llmlab.serve.copilot import CopilotExtension

pytestmark = pytest.mark.usefixtures("one_thread")

tools_demo = load_script("examples/copilot_tools.py")
TOOLS, check_calls = tools_demo.TOOLS, tools_demo.check_calls


def serve(ckpt, index=None, max_seq_len: int = 2048) -> tuple[ServerThread, object]:
    engine, tok = load_engine(ckpt, None, max_batch=4, max_seq_len=max_seq_len, queue_size=8, dtype="float32")
    app = create_app(engine, tok, "m", extensions=[CopilotExtension(tok, engine.model.config.vocab_size, index)])
    return ServerThread(app), engine


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    srv, engine = serve(tiny_long_checkpoint(tmp_path_factory.mktemp("copilot") / "tiny"))
    yield srv
    srv.stop()
    engine.close()


@pytest.fixture
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.mark.parametrize("seed", range(3))
def test_random_model_tool_calls_validate(client, seed):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "What does the cat say?"}],
                                       tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed,
                                       max_tokens=300)
    assert r.choices[0].finish_reason == "tool_calls"
    check_calls(r.choices[0].message)


def test_named_tool_choice_and_continuation_after_a_tool_message(client):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Add 2 and 3"}], tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "add"}},
                                       max_tokens=300)
    msg = r.choices[0].message
    assert msg.tool_calls[0].function.name == "add"
    check_calls(msg)
    history = [{"role": "user", "content": "Add 2 and 3"},
               {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in msg.tool_calls]},
               {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "5"}]
    after = client.chat.completions.create(model="m", messages=history, tools=TOOLS, tool_choice="none",
                                           max_tokens=20)
    assert after.choices[0].message.tool_calls is None
    assert after.choices[0].message.role == "assistant" and after.choices[0].finish_reason in ("stop", "length")
    auto = client.chat.completions.create(model="m", messages=history, tools=TOOLS, max_tokens=300, seed=1,
                                          temperature=1.0)
    choice = auto.choices[0]
    if choice.message.tool_calls:  # "auto": either a valid call or a text reply that is not a broken call
        check_calls(choice.message)
    else:
        assert not (choice.message.content or "").lstrip().startswith("<")


def test_tool_errors_are_400(client):
    with pytest.raises(openai.BadRequestError, match="names the function 'nope', which is not in 'tools'"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match=r"tools\[0\]: expected"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "retrieval"}])


def test_each_of_n_choices_is_a_valid_call(client):
    """Each choice has its own grammar state: with n = 4 at temperature 1 every choice is a complete call."""
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "What does the cat say?"}],
                                       tools=TOOLS, tool_choice="required", temperature=1.0, seed=3, n=4,
                                       max_tokens=300)
    assert len(r.choices) == 4 and [c.finish_reason for c in r.choices] == ["tool_calls"] * 4
    for choice in r.choices:
        check_calls(choice.message)
    assert len({c.message.tool_calls[0].function.arguments for c in r.choices}) > 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_cut_by_max_tokens_is_reported_without_the_internal_markup(client, stream):
    """OpenAI's way: finish_reason "length" and the call as far as it got (its name, then arguments that may not be
    complete JSON yet); before the name is complete there is no call; `<tool_call>` never shows."""
    kw = dict(model="m", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[tools_demo.WEATHER],
              tool_choice="required", temperature=0)
    full = client.chat.completions.create(**kw, max_tokens=300)
    arguments = full.choices[0].message.tool_calls[0].function.arguments  # compact JSON, as the model wrote it
    n = full.usage.completion_tokens
    partial = 0
    for max_tokens in sorted({3, *range(n // 3, n, max(1, n // 8))}):
        if stream:  # the SDK's stream helper puts the fragments together (its final completion raises on "length")
            with client.chat.completions.stream(**kw, max_tokens=max_tokens) as chunks:
                for _ in chunks:
                    pass
                r = chunks.current_completion_snapshot
        else:
            r = client.chat.completions.create(**kw, max_tokens=max_tokens)
        msg = r.choices[0].message
        content, calls, reason = msg.content, msg.tool_calls or [], r.choices[0].finish_reason
        assert not content, (max_tokens, content)  # no markup, no text: a call or nothing
        if reason == "tool_calls":  # only the closing tag was cut: the call is whole
            check_calls(type("Message", (), {"tool_calls": calls})())
            continue
        assert reason == "length"
        if max_tokens == 3:
            assert calls == []
        if calls:
            assert [c.function.name for c in calls] == ["get_weather"]
            assert arguments.startswith(calls[0].function.arguments)
            partial += 1
    assert partial, "some cut should fall inside the arguments"


def test_streamed_tool_call_arrives_as_openai_streams_it(client):
    """The first delta has the call's index, id, type and name; the arguments follow in fragments as they are
    generated; they add up to the non-streamed call; the official SDK's stream helper reads them."""
    kw = dict(model="m", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
              tool_choice="required", temperature=1.0, seed=5, max_tokens=300)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not "".join(d.content or "" for d in deltas)
    first, *rest = [t for d in deltas for t in d.tool_calls or []]
    assert (first.index, first.type, first.function.name, first.function.arguments) == (0, "function",
                                                                                        whole.function.name, "")
    assert first.id.startswith("call_") and len(rest) > 3
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    assert "".join(d.function.arguments for d in rest) == whole.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    with client.chat.completions.stream(**kw) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == (whole.function.name, whole.function.arguments)
    assert events.count("tool_calls.function.arguments.delta") == 1 + len(rest)  # the first delta counts too
    assert events.count("tool_calls.function.arguments.done") == 1


def test_bad_tool_schemas_and_choices_are_400(client):
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "minLength": "a"}}}}}
    e = _error(lambda: client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                      tools=[bad]))
    assert e.status_code == 400 and e.body["param"] == "tools"
    assert "tools[0].function.parameters.properties.x.minLength" in e.body["message"]
    e = _error(lambda: client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                      tools=TOOLS, tool_choice={"type": "function", "function": "x"}))
    assert e.status_code == 400 and e.body["param"] == "tool_choice.function"


def _error(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value


def test_index_adds_sources_and_citations(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "volcano.md").write_text("Mount Keldar erupted in 1887.\n")
    (docs / "tea.txt").write_text("Green tea is steeped at 80 degrees.\n")
    embedder = HashEmbedder()
    build_index([docs], tmp_path / "idx", embedder=embedder, progress=False)
    srv, engine = serve(tiny_long_checkpoint(tmp_path / "tiny"), open_index(tmp_path / "idx", embedder))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="m", max_tokens=8,
                                           messages=[{"role": "user", "content": "When did Mount Keldar erupt?"}])
        sources = r.model_extra["sources"]
        assert sources[0]["index"] == 1 and sources[0]["path"].endswith("volcano.md")
        assert sources[0]["text"] == "Mount Keldar erupted in 1887." and sources[0]["line_start"] == 1
        assert isinstance(r.choices[0].message.model_extra["citations"], list)
        chunks = list(client.chat.completions.create(model="m", max_tokens=8, stream=True, messages=[
            {"role": "user", "content": "When did Mount Keldar erupt?"}]))
        assert chunks[0].model_extra["sources"] == sources
        assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) >= 1
    finally:
        srv.stop()
        engine.close()


@pytest.mark.slow
def test_default_model_tool_calls_validate_on_20_prompts(default_ckpt):
    """SmolLM2-135M-Instruct through the real server: 20 varied prompts (some about none of the tools), each
    answered with a schema-valid call; then a conversation continues after the tool result (examples/copilot_tools.py,
    whose `run` raises on any invalid call)."""
    srv, engine = serve(default_ckpt, max_seq_len=1024)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=600)
        lines: list[str] = []
        assert tools_demo.run(client, log=lines.append) == 20
        assert lines[-1] == "20/20 tool calls parsed and matched their schema"
    finally:
        srv.stop()
        engine.close()
