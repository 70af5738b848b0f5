"""The copilot extension of the API server: OpenAI `tools` / `tool_choice` with schema-constrained tool calls,
and, with `llmlab serve --index DIR`, answers grounded in the index with their sources.

It plugs into `create_app(..., extensions=[CopilotExtension(...)])` (see llmlab.serve.api). For each chat request:
- messages are rendered for the chat template (assistant `tool_calls` and `tool` results included), the tools are
  described in the system message, and a grammar (llmlab.constrained) makes the reply a call that matches a tool's
  schema ("required" or a named function) or either a call or text ("auto"); the reply comes back as OpenAI
  `tool_calls` with finish_reason "tool_calls" (the arguments are the JSON text the model wrote, compact). Each of the
  `n` choices gets its own grammar state. Streamed, a call arrives as OpenAI streams one: a first delta with the
  call's `index`, `id`, `type` and function name (once the name is complete), then the arguments in fragments as they
  are generated. A call cut short (`max_tokens`, the context) is reported as OpenAI reports one: finish_reason
  "length", `tool_calls` with the function's name and the arguments written so far (not valid JSON), or no call at
  all when even the name was cut; the internal `<tool_call>` markup never reaches the client. With
  `response_format` too, a reply that is no call matches the format (the grammar's other branch);
- with an index and a last message from the user (no tools): the top passages are put in that message, numbered,
  and the response carries them in the extra top-level field `sources` (list of {index, path, page, line_start,
  line_end, location, text, score}); each choice's message has `citations`, the passage numbers its text cites
  (not in streamed replies, which would otherwise be held back to the end: the chunks carry `sources`).
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from llmlab.constrained import TOOL_CALL_OPEN
from llmlab.errors import LLMLabError
from llmlab.plugins.calling import select_tools, template_messages, tool_logits_processor
from llmlab.rag.grounded import INSTRUCTIONS, fit_passages, grounded_message, sources_payload
from llmlab.serve.chat import ChatPlan
from llmlab.serve.protocol import APIError, ChatCompletionRequest
from llmlab.tokenizer import Tokenizer

# the start of a call as the grammar writes it (compact JSON, "name" first): the name is complete once its closing
# quote and the "arguments" key follow
_CALL_HEAD = re.compile(re.escape(TOOL_CALL_OPEN) + r'\{"name":"([A-Za-z0-9_-]+)","arguments":(.*)', re.DOTALL)


class CopilotExtension:
    """Tool calls for every request with `tools`; grounding when `index` (an llmlab.rag.index.Index) is given."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, index: Any = None, passages: int = 4,
                 context_tokens: int = 1024) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.index, self.passages, self.context_tokens = index, passages, context_tokens

    def prepare_chat(self, request: ChatCompletionRequest, plan: ChatPlan) -> ChatPlan:
        choice = request.tool_choice_value()
        try:
            allowed, _ = select_tools(request.tools, choice)
            messages = template_messages(plan.messages, allowed)
            processor = tool_logits_processor(self.tokenizer, request.tools, choice, self.vocab_size,
                                              plan.json_schema)
        except LLMLabError as e:
            raise APIError(400, str(e), param="tools") from e
        plan.messages = messages
        if processor is not None:
            plan.logits_processor_factory = processor.fork  # a fresh parser for each choice
            plan.finish, plan.stream = _finish_tool_calls, _CallStream
        elif self.index is not None and messages and messages[-1]["role"] == "user":
            self._ground(plan, cite=not request.stream)
        return plan

    def _ground(self, plan: ChatPlan, cite: bool) -> None:
        question = plan.messages[-1]["content"]
        if not question.strip():
            return
        hits = self.index.search(question, self.passages)
        passages = fit_passages(hits, self.tokenizer, self.context_tokens)
        plan.messages[-1] = {"role": "user", "content": grounded_message(question, passages)}
        if plan.messages[0]["role"] == "system":
            plan.messages[0] = {"role": "system", "content": f"{plan.messages[0]['content']}\n\n{INSTRUCTIONS}"}
        else:
            plan.messages.insert(0, {"role": "system", "content": INSTRUCTIONS})
        plan.extra["sources"] = [{k: v for k, v in s.items() if k != "cited"} for s in sources_payload("", passages)]
        if not cite:  # a finish hook holds a streamed reply back until its end; streams keep streaming instead
            return

        def finish(text: str) -> tuple[dict[str, Any], str | None]:
            cited = [s["index"] for s in sources_payload(text, passages) if s["cited"]]
            return {"citations": cited}, None

        plan.finish = finish


def _json_end(text: str, start: int) -> int | None:
    """Where the JSON object or array opening at `text[start]` ends (the index after its closing bracket), or None
    while it is still open."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _split_call(text: str) -> tuple[str, str, bool] | None:
    """(function name, arguments text so far, whether the whole call object is written) of a constrained reply that
    is a call; None until its name is complete."""
    head = _CALL_HEAD.match(text)
    if head is None:
        return None
    start = head.start(2)
    end = _json_end(text, start)
    return head[1], text[start:end or len(text)], end is not None and text[end:end + 1] == "}"


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name,
                                                                                   "arguments": arguments}}


def _finish_tool_calls(text: str) -> tuple[dict[str, Any], str | None]:
    """The reply message fields of a constrained reply: a call (finish_reason "tool_calls" once its JSON is whole,
    even if the closing tag was cut), a text reply ("auto"), or a call cut short (no call before its name)."""
    if not text.startswith(TOOL_CALL_OPEN[0]):  # the grammar starts a text reply with anything but '<'
        return {"content": text}, None
    call = _split_call(text)
    if call is None:  # cut before the function's name was complete: nothing usable
        return {"content": None}, None
    name, arguments, whole = call
    return {"content": None, "tool_calls": [_call(name, arguments)]}, "tool_calls" if whole else None


class _CallStream:
    """One streamed choice of a constrained reply, as OpenAI's deltas: text as it comes for a text reply; for a call,
    `{"index": 0, "id", "type", "function": {"name", "arguments": ""}}` once the name is complete, then the
    arguments' text in fragments as they are generated (the markup around them never shows)."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0  # characters of content (text reply) or of arguments (call) sent
        self.named = False

    def feed(self, piece: str) -> list[dict[str, Any]]:
        self.text += piece
        if not self.text:
            return []
        if not self.text.startswith(TOOL_CALL_OPEN[0]):
            new, self.sent = self.text[self.sent:], len(self.text)
            return [{"content": new}] if new else []
        call = _split_call(self.text)
        if call is None:
            return []
        name, arguments, _ = call
        out = []
        if not self.named:
            self.named = True
            first = _call(name, "")
            out.append({"tool_calls": [{"index": 0, **first}]})
        if len(arguments) > self.sent:
            out.append({"tool_calls": [{"index": 0, "function": {"arguments": arguments[self.sent:]}}]})
            self.sent = len(arguments)
        return out

    def close(self, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        return [], _finish_tool_calls(self.text)[1] or finish_reason
