"""The copilot extension of the API server: OpenAI `tools` / `tool_choice` with schema-constrained tool calls,
and, with `llmlab serve --index DIR`, answers grounded in the index with their sources.

It plugs into `create_app(..., extensions=[CopilotExtension(...)])` (see llmlab.serve.api). For each chat request:
- messages are rendered for the chat template (assistant `tool_calls` and `tool` results included), the tools are
  described in the system message, and a grammar (llmlab.constrained) makes the reply a call that matches a tool's
  schema ("required" or a named function) or either a call or text ("auto"); the reply comes back as OpenAI
  `tool_calls` with finish_reason "tool_calls";
- with an index and a last message from the user (no tools): the top passages are put in that message, numbered,
  and the response carries them in the extra top-level field `sources` (list of {index, path, page, line_start,
  line_end, location, text, score}); each choice's message has `citations`, the passage numbers its text cites
  (not in streamed replies, which would otherwise be held back to the end: the chunks carry `sources`).
"""

from __future__ import annotations

from typing import Any

from llmlab.errors import LLMLabError
from llmlab.plugins.calling import parse_tool_calls, select_tools, template_messages, tool_logits_processor
from llmlab.rag.grounded import INSTRUCTIONS, fit_passages, grounded_message, sources_payload
from llmlab.serve.api import APIError, ChatCompletionRequest, ChatPlan
from llmlab.tokenizer import Tokenizer


class CopilotExtension:
    """Tool calls for every request with `tools`; grounding when `index` (an llmlab.rag.index.Index) is given."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, index: Any = None, passages: int = 4,
                 context_tokens: int = 1024) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.index, self.passages, self.context_tokens = index, passages, context_tokens

    def prepare_chat(self, request: ChatCompletionRequest, plan: ChatPlan) -> ChatPlan:
        try:
            allowed, _ = select_tools(request.tools, request.tool_choice)
            messages = template_messages(plan.messages, allowed)
            processor = tool_logits_processor(self.tokenizer, request.tools, request.tool_choice, self.vocab_size)
        except LLMLabError as e:
            raise APIError(400, str(e), param="tools") from e
        plan.messages = messages
        if processor is not None:
            plan.logits_processor = processor
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
    content, calls = parse_tool_calls(text)
    if not calls:
        return {"content": content or ""}, None
    return {"content": content, "tool_calls": calls}, "tool_calls"
