"""Constrained decoding: the model may only sample tokens that keep its output inside a grammar.

llguidance (Microsoft's grammar engine behind Guidance, also used by vLLM and SGLang) compiles JSON schemas and
Lark grammars against our `tokenizers` vocabulary and, per step, fills a bitmask of the tokens allowed next; the
processor here sets every other logit to -inf. It plugs into `generate_tokens(..., logits_processors=[...])`,
`stream(..., logits_processor=...)` and the server's per-request hook, all with the signature
`(generated_ids, logits) -> logits`. It was chosen over xgrammar and outlines-core because its wheel installs on CPU
with no torch pin, it reads a `tokenizers` JSON directly, and its Lark front end lets one grammar say "either free
text or a tool call whose JSON matches this schema" (what `tool_choice: auto` needs).

JSON is compiled without free whitespace, so a small model cannot loop on spaces inside an object, and strings and
arrays without a bound get one (`bounded_schema`): a call then always ends within a known number of tokens. Both
keep every output valid under the caller's original schema. A schema is first checked against its JSON Schema
meta-schema (`check_schema`, with jsonschema), so a malformed one (`"minLength": "a"`) is a clear error naming the
keyword, never a crash.

A processor keeps the parser state of one sequence; `fork()` gives another sequence (each of a request's `n`
choices) its own copy.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import llguidance
import numpy as np
import torch
from torch import Tensor

from llmlab.errors import LLMLabError
from llmlab.tokenizer import Tokenizer

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_LL_TOKENIZERS: dict[tuple[int, int], Any] = {}
# the keywords whose value is a subschema (or a list of them), and those whose value maps names to subschemas; any
# other keyword's value is data (const, enum, default, ...) or a constraint, and is left as it is
_SUBSCHEMA = {"items", "additionalItems", "additionalProperties", "not", "if", "then", "else", "contains",
              "propertyNames", "unevaluatedItems", "unevaluatedProperties", "allOf", "anyOf", "oneOf", "prefixItems"}
_SUBSCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies"}


def _ll_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> Any:
    """llguidance's view of our tokenizer (about a second to build, so cached per tokenizer and vocabulary size)."""
    key = (id(tokenizer.backend), vocab_size)
    if key not in _LL_TOKENIZERS:
        if tokenizer.eos_id is None:
            raise LLMLabError("constrained decoding needs a tokenizer with an EOS token (tokenizer_config.json "
                              "'eos_token'): the grammar ends the output with it")
        _LL_TOKENIZERS[key] = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                                      eos_token=tokenizer.eos_id)
    return _LL_TOKENIZERS[key]


def check_schema(schema: Any, where: str = "the JSON schema") -> None:
    """Raise LLMLabError naming `where` and the bad keyword's path when `schema` is not a valid JSON Schema (checked
    by jsonschema against the meta-schema its `$schema` names, draft 2020-12 by default)."""
    import jsonschema
    from jsonschema.validators import validator_for

    if not isinstance(schema, dict):
        raise LLMLabError(f"{where} must be a JSON schema object, got {type(schema).__name__}")
    meta = schema.get("$schema")
    default = jsonschema.Draft202012Validator
    validator = validator_for(schema, default=default) if isinstance(meta, str) else default
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path)
        message = e.message if len(e.message) <= 200 else e.message[:200] + "..."
        raise LLMLabError(f"{where}{path}: not a valid JSON schema: {message}") from e


def bounded_schema(schema: dict[str, Any], max_string: int = 100, max_items: int = 8) -> dict[str, Any]:
    """A copy of `schema` in which generation must end soon and cannot wander: free strings (no enum, const,
    pattern or format) get a pattern of at most `max_string` characters (or their maxLength) without braces, angle
    brackets or control characters, unbounded arrays get maxItems, and objects that list their properties allow no
    others.

    Anything the copy accepts the original accepts too (it only narrows). `schema` is checked first (`check_schema`).
    """
    def sub(key: str, value: Any) -> Any:
        if key in _SUBSCHEMA:
            return [walk(x) for x in value] if isinstance(value, list) else walk(value)
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            return {name: walk(x) for name, x in value.items()}
        return value

    def walk(node: Any) -> Any:
        if not isinstance(node, dict):  # a boolean schema, or a `dependencies` list of property names
            return node
        node = {k: sub(k, v) for k, v in node.items()}
        types = node.get("type")
        types = types if isinstance(types, list) else [types]
        free = not any(k in node for k in ("enum", "const", "pattern", "format"))
        if "string" in types and free:
            # no braces, angle brackets or control characters, so a small model that "closes" its object or call
            # early inside a string is made to close the string first; and a length bound
            low = int(node.get("minLength", 0))  # the meta-schema allows 3.0 for 3
            high = int(node.get("maxLength", max(max_string, low)))
            node["pattern"] = "^[^{}<>\\x00-\\x1f]{" + f"{low},{high}" + "}$"
        if "object" in types and "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False  # otherwise any key with any value may follow, without end
        if "array" in types and "maxItems" not in node:
            node["maxItems"] = max(max_items, int(node.get("minItems", 0)))
        return node

    check_schema(schema)
    return walk(copy.deepcopy(schema))


def json_object_schema(depth: int = 2, max_properties: int = 16) -> dict[str, Any]:
    """A JSON object with any keys and values (OpenAI's `json_object` mode), within bounds that make generation end:
    at most `max_properties` keys of 1-40 characters, values that are strings, numbers, booleans, null, arrays, or
    objects of the same kind nested `depth` levels at most (strings and arrays bounded as in `bounded_schema`).
    llguidance has no `propertyNames`, so the keys are bounded through `patternProperties`."""
    scalar: list[dict[str, Any]] = [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]
    value: dict[str, Any] = {"anyOf": [*scalar, {"type": "array", "items": {"anyOf": scalar}}]}
    for _ in range(depth):
        obj = {"type": "object", "maxProperties": max_properties, "additionalProperties": False,
               "patternProperties": {"^[^{}<>\\x00-\\x1f]{1,40}$": value}}
        value = {"anyOf": [*value["anyOf"], obj]}
    return obj


def _compact(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "x-guidance": {**schema.get("x-guidance", {}), "whitespace_flexible": False}}


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """An llguidance grammar for one JSON value matching `schema` (compact: no whitespace between tokens)."""
    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(_compact(bounded_schema(schema))))


def tool_call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The schema of `{"name": ..., "arguments": {...}}` for any of `tools` (OpenAI `function` tool objects)."""
    options = []
    for tool in tools:
        fn = tool["function"]
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def tool_call_grammar(tools: list[dict[str, Any]], allow_text: bool, reply_schema: dict[str, Any] | None = None
                      ) -> str:
    """Lark grammar: `<tool_call>{"name": ..., "arguments": ...}</tool_call>` with JSON matching the named tool's
    parameter schema; with `allow_text`, a reply is the other choice (the only one when `tools` is empty): plain
    text not starting with '<', or with `reply_schema` one JSON value matching it (a structured reply)."""
    if not tools and not allow_text:
        raise LLMLabError("a tool call grammar needs at least one tool, or plain text allowed")
    reply = "TEXT" if reply_schema is None else "reply"
    lines = []
    if tools:
        call = json.dumps(_compact(bounded_schema(tool_call_schema(tools))))
        lines = [f'start: "{TOOL_CALL_OPEN}" call "{TOOL_CALL_CLOSE}"' + (f" | {reply}" if allow_text else ""),
                 f"call: %json {call}"]
    else:  # a reply only, which does not start a tool call
        lines = [f"start: {reply}"]
    if allow_text and reply_schema is not None:
        lines.append(f"reply: %json {json.dumps(_compact(bounded_schema(reply_schema)))}")
    elif allow_text:
        lines.append(r"TEXT: /[^<](.|\n)*/")
    return llguidance.LLMatcher.grammar_from_lark("\n".join(lines))


class GrammarLogitsProcessor:
    """Masks the logits of tokens that would leave `grammar`; one instance per generated sequence (it keeps the
    parser state). Call it as `(generated_ids, logits (V,) or (1, V)) -> logits`; the ids generated since the last
    call are fed to the parser first. When the grammar is complete only EOS stays allowed."""

    def __init__(self, tokenizer: Tokenizer, grammar: str, vocab_size: int | None = None) -> None:
        self.vocab_size = vocab_size or tokenizer.vocab_size
        self.matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, self.vocab_size), grammar, log_level=0)
        if self.matcher.is_error():
            raise LLMLabError(f"constrained decoding: the grammar does not compile: {self.matcher.get_error()}")
        self.consumed = 0

    def fork(self) -> GrammarLogitsProcessor:
        """A processor in this one's state with a parser of its own, for another sequence (each choice of a
        request with `n` > 1 needs one: a parser fed two sequences' tokens accepts neither)."""
        twin = copy.copy(self)
        twin.matcher = self.matcher.deep_copy()
        return twin

    def allowed(self) -> Tensor:
        """Bool (V,) of the tokens the grammar accepts next."""
        # bit j of 32-bit little-endian word i is token 32 * i + j, so the bytes unpack in token order
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return torch.from_numpy(bits[:self.vocab_size].astype(bool))

    def __call__(self, generated_ids: list[int], logits: Tensor) -> Tensor:
        for token in generated_ids[self.consumed:]:
            if not self.matcher.consume_token(token):
                raise LLMLabError(f"constrained decoding: token {token} was sampled outside the grammar "
                                  f"({self.matcher.get_error()})")
        self.consumed = len(generated_ids)
        allowed = self.allowed()
        if logits.size(-1) > allowed.numel():  # logits wider than the tokenizer's vocabulary: padding ids
            allowed = torch.nn.functional.pad(allowed, (0, logits.size(-1) - allowed.numel()))
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    @property
    def done(self) -> bool:
        """The output so far is a complete sentence of the grammar."""
        return self.matcher.is_accepting()


def json_processor(tokenizer: Tokenizer, schema: dict[str, Any], vocab_size: int | None = None
                   ) -> GrammarLogitsProcessor:
    """A processor whose output is one JSON value matching `schema`."""
    return GrammarLogitsProcessor(tokenizer, json_schema_grammar(schema), vocab_size)


def tool_call_processor(tokenizer: Tokenizer, tools: list[dict[str, Any]], allow_text: bool,
                        vocab_size: int | None = None, reply_schema: dict[str, Any] | None = None
                        ) -> GrammarLogitsProcessor:
    """A processor whose output is a tool call for one of `tools` (or, with `allow_text`, a plain reply, or one
    matching `reply_schema`)."""
    return GrammarLogitsProcessor(tokenizer, tool_call_grammar(tools, allow_text, reply_schema), vocab_size)
