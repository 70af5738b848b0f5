"""The copilot extension of the API server: OpenAI `tools` / `tool_choice` with schema-constrained tool calls,
and, with `llmlab serve --index DIR`, answers grounded in the index with their sources.

It plugs into `create_app(..., extensions=[CopilotExtension(...)])` (see llmlab.serve.api). For each chat request:
- messages are rendered for the chat template (assistant `tool_calls` and `tool` results included), the tools are
  described in the system message, and a grammar (llmlab.constrained) makes the reply a call that matches a tool's
  schema ("required" or a named function) or either a call or text ("auto"); the reply comes back as OpenAI
  `tool_calls` with finish_reason "tool_calls". Each of the `n` choices gets its own grammar state. A call cut short
  (`max_tokens`, the context) is reported as OpenAI reports one: finish_reason "length", `tool_calls` with the
  function's name and the arguments written so far (not valid JSON), or no call at all when even the name was cut;
  the internal `<tool_call>` markup never reaches the client;
- with an index and a last message from the user (no tools): the top passages are put in that message, numbered,
  and the response carries them in the extra top-level field `sources` (list of {index, path, page, line_start,
  line_end, location, text, score}); each choice's message has `citations`, the passage numbers its text cites
  (not in streamed replies, which would otherwise be held back to the end: the chunks carry `sources`).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from llmlab.constrained import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from llmlab.errors import LLMLabError
from llmlab.plugins.calling import parse_tool_calls, select_tools, template_messages, tool_logits_processor
from llmlab.rag.grounded import INSTRUCTIONS, fit_passages, grounded_message, sources_payload
from llmlab.serve.api import ChatPlan
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
            processor = tool_logits_processor(self.tokenizer, request.tools, choice, self.vocab_size)
        except LLMLabError as e:
            raise APIError(400, str(e), param="tools") from e
        plan.messages = messages
        if processor is not None:
            plan.logits_processor_factory = processor.fork  # a fresh parser for each choice
            plan.finish = _finish_tool_calls
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


def _finish_tool_calls(text: str) -> tuple[dict[str, Any], str | None]:
    """The reply message fields of a constrained reply: a call, a plain text ("auto"), or a call cut short."""
    content, calls = parse_tool_calls(text)
    if calls:
        return {"content": content, "tool_calls": calls}, "tool_calls"
    if not text.startswith(TOOL_CALL_OPEN[0]):  # the grammar starts a text reply with anything but '<'
        return {"content": content or ""}, None
    try:  # the call's JSON is whole and only its closing tag was cut
        end = json.JSONDecoder().raw_decode(text, len(TOOL_CALL_OPEN))[1]
        calls = parse_tool_calls(text[:end] + TOOL_CALL_CLOSE)[1]
    except json.JSONDecodeError:
        calls = []
    if calls:
        return {"content": None, "tool_calls": calls}, "tool_calls"
    head = _CALL_HEAD.match(text)
    if head is None:  # cut before the function's name was complete: nothing usable
        return {"content": None}, None
    call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": head[1], "arguments": head[2]}}
    return {"content": None, "tool_calls": [call]}, None
