"""Constrained decoding: whatever a (random) model prefers, the output parses and matches the schema."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from _rag import tiny_long_checkpoint

from llmlab.constrained import bounded_schema, check_schema, json_processor, tool_call_processor
from llmlab.errors import LLMLabError
from llmlab.generate import SamplingParams, generate_tokens, stream
from llmlab.loading import load_for_inference
from llmlab.plugins.calling import parse_tool_calls, template_messages

SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 14},
                         "units": {"enum": ["metric", "imperial"]},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}}},
          "required": ["city", "days", "units"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
             "required": ["a", "b"]}}}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tok, _ = load_for_inference(tiny_long_checkpoint(tmp_path_factory.mktemp("c") / "tiny"))
    return model, tok


def test_bounded_schema_only_narrows():
    b = bounded_schema(SCHEMA, max_string=20, max_items=3)
    assert b["properties"]["tags"]["maxItems"] == 3
    assert b["properties"]["city"]["pattern"] == "^[^{}<>\\x00-\\x1f]{0,20}$"
    assert "pattern" not in b["properties"]["units"]  # enums are bounded already
    assert "pattern" not in SCHEMA["properties"]["city"]  # the caller's schema is untouched
    jsonschema.validate({"city": "Oslo", "days": 3, "units": "metric", "tags": ["a"]}, b)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"city": "x" * 21, "days": 3, "units": "metric"}, b)


def test_bounded_schema_leaves_data_keywords_alone():
    """const/enum/default values are data, not schemas: one that looks like a schema is not rewritten."""
    schema = {"type": "object", "properties": {"x": {"const": {"type": "string", "minLength": 2}},
                                               "default": {"type": "string"}}}
    b = bounded_schema(schema)
    assert b["properties"]["x"] == schema["properties"]["x"]
    assert "pattern" in b["properties"]["default"]  # a property named like a keyword is still a schema


@pytest.mark.parametrize("schema, where", [
    ({"type": "object", "properties": {"x": {"type": "string", "minLength": "a"}}}, "S.properties.x.minLength"),
    ({"type": "object", "properties": {"x": {"type": "strin"}}}, "S.properties.x.type"),
    ({"type": "array", "maxItems": -1}, "S.maxItems"),
    ({"anyOf": [{"type": "integer"}, {"minimum": "0"}]}, "S.anyOf[1].minimum"),
])
def test_invalid_schemas_are_named_errors(schema, where):
    with pytest.raises(LLMLabError, match=f"^{re.escape(where)}: not a valid JSON schema"):
        check_schema(schema, "S")
    with pytest.raises(LLMLabError, match="not a valid JSON schema"):
        bounded_schema(schema)
    check_schema(SCHEMA, "S")


def test_a_fork_has_its_own_parser(tiny):
    _, tok = tiny
    proc = json_processor(tok, {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"]})
    ids = tok.encode('{"a":"x"}')
    other = proc.fork()
    logits = torch.zeros(tok.vocab_size)
    for i in range(len(ids) + 1):  # one fork consumes a whole object; the original has not moved
        other(ids[:i], logits)
    assert other.done and not proc.done
    assert torch.isfinite(proc(ids[:1], logits)).any()


@pytest.mark.parametrize("seed", range(4))
def test_random_model_emits_schema_valid_json(tiny, seed):
    model, tok = tiny
    proc = json_processor(tok, SCHEMA, model.config.vocab_size)
    prompt = tok.encode("What does the cat say?")
    text = "".join(stream(model, tok, prompt, 400, SamplingParams(temperature=1.0, seed=seed),
                          logits_processor=proc))
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    assert proc.done


@pytest.mark.parametrize("choice", ["required", "add"])
def test_random_model_tool_call_parses_and_validates(tiny, choice):
    model, tok = tiny
    tools = TOOLS if choice == "required" else TOOLS[1:]
    proc = tool_call_processor(tok, tools, allow_text=False, vocab_size=model.config.vocab_size)
    ids = tok.encode_chat(template_messages([{"role": "user", "content": "What does the dog say?"}], tools))
    text = "".join(stream(model, tok, ids, 400, SamplingParams(temperature=1.0, seed=3), logits_processor=proc))
    content, calls = parse_tool_calls(text)
    assert content is None and len(calls) == 1
    fn = calls[0]["function"]
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in tools}[fn["name"]]
    jsonschema.validate(json.loads(fn["arguments"]), schema)


def test_auto_allows_text_that_does_not_start_a_call(tiny):
    model, tok = tiny
    proc = tool_call_processor(tok, TOOLS, allow_text=True, vocab_size=model.config.vocab_size)
    allowed = proc.allowed()
    assert allowed[tok.encode("<")[0]] and allowed[tok.encode("a")[0]]
    text_only = tool_call_processor(tok, [], allow_text=True, vocab_size=model.config.vocab_size)
    assert not text_only.allowed()[tok.encode("<")[0]]


def test_batched_processors_apply_per_row(tiny):
    model, tok = tiny
    prompts = [tok.encode("The cat"), tok.encode("What does the owl say?")]
    procs = [json_processor(tok, {"type": "integer", "minimum": 0, "maximum": 99}, model.config.vocab_size), None]
    rows: list[list[int]] = [[], []]
    for step in generate_tokens(model, prompts, 12, SamplingParams(temperature=1.0, seed=0), [tok.eos_id],
                                logits_processors=procs):
        for r, t in enumerate(step):
            if t is not None:
                rows[r].append(t)
    assert 0 <= int(tok.decode(rows[0])) <= 99
    with pytest.raises(LLMLabError, match="2 logits processors for 1 prompts"):
        list(generate_tokens(model, prompts[:1], 4, logits_processors=procs))


def test_processor_masks_logits_and_rejects_foreign_tokens(tiny):
    model, tok = tiny
    proc = json_processor(tok, {"enum": ["yes", "no"]}, model.config.vocab_size)
    logits = proc([], torch.zeros(model.config.vocab_size))
    assert torch.isinf(logits[tok.encode("x")[0]]) and not torch.isinf(logits[tok.encode('"')[0]])
    with pytest.raises(LLMLabError, match="outside the grammar"):
        proc(tok.encode("x"), torch.zeros(model.config.vocab_size))
