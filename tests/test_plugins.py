"""Plug-ins: the calculator's arithmetic-only parser, current_time, safe execution (errors, hangs), discovery through
the `llmlab.plugins` entry-point group, and the call-execute-respond loop on a tiny model."""

from __future__ import annotations

import ast
import json
import sys
import time

import pytest
from _rag import tiny_long_checkpoint

from llmlab.errors import LLMLabError
from llmlab.generate import ChatSession, SamplingParams
from llmlab.loading import load_for_inference
from llmlab.plugins import Plugin, PluginContext, available_plugins, builtin, load_plugins, run_plugin
from llmlab.plugins.builtin import calculate, now
from llmlab.plugins.calling import ToolChat, parse_tool_calls, select_tools, template_messages


# -- calculator ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("expr, value", [("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("2 ** 10", 1024), ("-7 // 2", -4),
                                         ("7 % 3", 1), ("1 / 4", 0.25), ("+3 - -2", 5), ("1.5e3 * 2", 3000.0)])
def test_calculator_arithmetic(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize("expr, message", [
    ("__import__('os').system('true')", "function calls"),
    ("x + 1", "names ('x')"),
    ("(1).__class__", "attribute access"),
    ("[1, 2][0]", "indexing"),
    ("2 ** 10 ** 10", "exponent 10000000000 is too large"),
    ("9 ** 9 ** 9", "too large"),
    ("'a' * 3", "only numbers"),
    ("True + 1", "only numbers"),
    ("1 < 2", "comparisons"),
    ("1 / 0", "division by zero"),
    ("2.0 ** 1000 * 2.0 ** 1000", "overflow"),
    ("(-8) ** 0.5", "not a real number"),
    ("1 +", "not an arithmetic expression"),
    ("1 " * 300, "longer than 500"),
])
def test_calculator_rejects_everything_but_arithmetic(expr, message):
    with pytest.raises(LLMLabError, match="calculator: .*" + message.replace("(", r"\(").replace(")", r"\)")
                       .replace("*", r"\*")):
        calculate(expr)


def test_calculator_sizes_a_power_before_computing_it(monkeypatch):
    """(9**999 * ...)**999 is 34 characters and would take seconds holding the interpreter: the result's size is
    known from the operands, so it is refused before the power is computed; powers that fit are still exact."""
    power = builtin._BINARY[ast.Pow]

    def watched(a, b):
        if isinstance(a, int) and isinstance(b, int) and (abs(a).bit_length() - 1) * b > 100_000:
            raise AssertionError(f"computing a {abs(a).bit_length()}-bit integer to the power {b}")
        return power(a, b)

    monkeypatch.setitem(builtin._BINARY, ast.Pow, watched)
    with pytest.raises(LLMLabError, match="more than 4300 digits"):
        calculate("(9**999*9**999*9**999*9**999)**999")
    with pytest.raises(LLMLabError, match="more than 4300 digits"):
        calculate("(2**1000)**15")
    assert calculate("(2**1000)**14") == 2**14000 and calculate("(-3)**3") == -27 and calculate("2**-2") == 0.25


def test_calculator_plugin_reports_rejections_to_the_model():
    calc = load_plugins(["calculator"])[0]
    assert run_plugin(calc, {"expression": "6 * 7"}).content == "42"
    bad = run_plugin(calc, {"expression": "open('x')"})
    assert not bad.ok and "function calls" in bad.content


def test_current_time():
    assert now("UTC").endswith("(" + time.strftime("%A", time.gmtime()) + ", UTC)")
    assert "+09:00" in now("Asia/Tokyo")
    with pytest.raises(LLMLabError, match="unknown time zone 'Mars/Base'"):
        now("Mars/Base")


# -- running plug-ins safely -----------------------------------------------------------------------------
def _plugin(run, timeout: float = 5.0, schema: dict | None = None) -> Plugin:
    return Plugin("probe", "a test plug-in", schema or {"type": "object", "properties": {}}, run, timeout)


def test_raising_hanging_and_bad_plugins_become_results():
    def boom():
        raise RuntimeError("the backend is down")

    failed = run_plugin(_plugin(boom), {})
    assert not failed.ok and failed.content == "error: plug-in 'probe' failed: RuntimeError: the backend is down"
    hung = run_plugin(_plugin(lambda: time.sleep(30), timeout=0.3), {})  # returns after the timeout, not the sleep
    assert not hung.ok and "did not answer within 0.3 s (timed out)" in hung.content
    odd = run_plugin(_plugin(lambda: object()), {})
    assert not odd.ok and "returned a object, not text or JSON" in odd.content
    assert run_plugin(_plugin(lambda: {"a": [1, 2]}), {}).content == '{"a": [1, 2]}'
    typed = _plugin(lambda n: n, schema={"type": "object", "properties": {"n": {"type": "integer"}},
                                         "required": ["n"]})
    wrong = run_plugin(typed, {"n": "three"})
    assert not wrong.ok and "do not match the schema: 'three' is not of type 'integer'" in wrong.content
    assert "must be a JSON object" in run_plugin(typed, [1]).content


# -- the registry -------------------------------------------------------------------------------------------
def _install_fake_distribution(root, name: str, entry: str, module_source: str) -> None:
    """A real installed distribution (dist-info with entry_points.txt) on sys.path, found by importlib.metadata."""
    dist = root / f"{name}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[llmlab.plugins]\n{entry}\n")
    (root / f"{name.replace('-', '_')}.py").write_text(module_source)


def test_third_party_plugins_are_discovered_through_entry_points(tmp_path, monkeypatch):
    _install_fake_distribution(tmp_path, "llmlab-weather", "weather = llmlab_weather:make", """
from llmlab.plugins import Plugin

def make(context):
    return Plugin("weather", "Weather in a city", {"type": "object", "properties": {"city": {"type": "string"}},
                  "required": ["city"]}, lambda city: f"sunny in {city}")
""")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "weather" in available_plugins()
    weather, calc = load_plugins(["weather", "calculator"])
    assert run_plugin(weather, {"city": "Oslo"}).content == "sunny in Oslo"
    assert calc.name == "calculator"
    sys.modules.pop("llmlab_weather", None)


def test_registry_errors(tmp_path, monkeypatch):
    with pytest.raises(LLMLabError, match="unknown plug-in 'nope'; available: calculator, current_time, "
                                          "search_documents"):
        load_plugins(["nope"])
    with pytest.raises(LLMLabError, match="needs a document index: pass --index"):
        load_plugins(["search_documents"])
    with pytest.raises(LLMLabError, match="named twice"):
        load_plugins(["calculator", "calculator"])
    _install_fake_distribution(tmp_path, "llmlab-clash", "calculator = llmlab_clash:make", "make = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(LLMLabError, match="'calculator' from llmlab-clash .* clashes with a built-in"):
        available_plugins()


def test_broken_entry_point_names_its_package(tmp_path, monkeypatch):
    _install_fake_distribution(tmp_path, "llmlab-broken", "broken = llmlab_broken:missing", "x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(LLMLabError, match="plug-in 'broken' from llmlab-broken: cannot load entry point"):
        available_plugins()
    sys.modules.pop("llmlab_broken", None)


# -- messages and tool_choice ----------------------------------------------------------------------------
def test_openai_messages_render_for_the_template():
    tools = [load_plugins(["calculator"])[0].tool()]
    msgs = template_messages([
        {"role": "user", "content": [{"type": "text", "text": "6 times 7?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "calculator", "arguments": '{"expression": "6*7"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}], tools)
    assert msgs[0]["role"] == "system" and '"name": "calculator"' in msgs[0]["content"]
    assert msgs[2] == {"role": "assistant",
                       "content": '<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>'}
    assert msgs[1]["content"] == "6 times 7?" and msgs[3] == {"role": "tool", "content": "42"}
    content, calls = parse_tool_calls(msgs[2]["content"] + " done")
    assert content == "done" and json.loads(calls[0]["function"]["arguments"]) == {"expression": "6*7"}


def test_tool_choice_errors():
    tools = [load_plugins(["calculator"])[0].tool()]
    assert select_tools(tools, "none") == ([], True)
    assert select_tools(tools, {"type": "function", "function": {"name": "calculator"}}) == (tools, False)
    with pytest.raises(LLMLabError, match="names the function 'sqrt', which is not in 'tools'"):
        select_tools(tools, {"type": "function", "function": {"name": "sqrt"}})
    with pytest.raises(LLMLabError, match="'tool_choice' must be"):
        select_tools(tools, "always")
    with pytest.raises(LLMLabError, match="'tool_choice' needs 'tools'"):
        select_tools(None, "required")
    with pytest.raises(LLMLabError, match=r"tools\[0\].function.name must be"):
        select_tools([{"type": "function", "function": {"name": "a b"}}], "auto")


# -- the loop ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_session(tmp_path_factory):
    model, tok, _ = load_for_inference(tiny_long_checkpoint(tmp_path_factory.mktemp("p") / "m"))
    return lambda: ChatSession(model, tok, max_new_tokens=60, sampling=SamplingParams(temperature=1.0, seed=0))


@pytest.mark.parametrize("kind", ["raises", "hangs"])
def test_failing_plugin_is_reported_to_model_and_user_and_the_chat_goes_on(tiny_session, kind):
    def run():
        if kind == "hangs":
            time.sleep(30)
        raise ValueError("no data")

    lines: list[str] = []
    chat = ToolChat(tiny_session(), [_plugin(run, timeout=0.3)], max_rounds=1, report=lines.append,
                    tool_choice="required")
    reply = "".join(chat.send("What does the cat say?"))
    expected = "timed out" if kind == "hangs" else "failed: ValueError: no data"
    assert len(lines) == 1 and "[plug-in probe({}) failed: error: plug-in 'probe'" in lines[0] and expected in lines[0]
    roles = [m["role"] for m in chat.session.messages]
    assert roles[-4:] == ["user", "assistant", "tool", "assistant"]
    assert chat.session.messages[-3]["content"].startswith("<tool_call>")
    assert expected in chat.session.messages[-2]["content"]
    assert chat.session.messages[-1]["content"] == reply and not reply.lstrip().startswith("<")
    assert chat.results[0].ok is False


def test_round_limit_and_options(tiny_session):
    calls = []
    chat = ToolChat(tiny_session(), [_plugin(lambda: calls.append(1) or "ok")], max_rounds=2, report=lambda s: None,
                    tool_choice="required")
    list(chat.send("hi"))
    assert 1 <= len(calls) <= 2  # the first reply must call; after two calls the model must answer in text
    with pytest.raises(LLMLabError, match="--max-tool-rounds must be at least 1"):
        ToolChat(tiny_session(), [_plugin(lambda: "")], max_rounds=0)
    with pytest.raises(LLMLabError, match="--tool-choice must be auto or required"):
        ToolChat(tiny_session(), [_plugin(lambda: "")], tool_choice="always")
    assert load_plugins(["calculator"], PluginContext())[0].timeout == 10.0
