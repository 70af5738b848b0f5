"""Tool calling: describing tools to the model, reading its calls, and the call-execute-respond loop.

The chat templates of small models (SmolLM2's included) have no `tools` support, so the tools are described in the
system message and the model answers a call as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the
Hermes/Qwen convention, which many instruct models were trained on). The call's JSON is produced under a grammar
(llmlab.constrained), so it always parses and matches the tool's schema, even from a 135M-parameter model.
OpenAI-format messages (assistant `tool_calls`, `tool` results) are rendered into that text form for the template.
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from llmlab.constrained import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    GrammarLogitsProcessor,
    check_schema,
    tool_call_processor,
)
from llmlab.errors import LLMLabError
from llmlab.generate import ChatSession
from llmlab.plugins import Plugin, PluginResult, run_plugin
from llmlab.tokenizer import Tokenizer

_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


def tools_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """The system-message text that describes `tools` (OpenAI tool objects) and how to call one."""
    lines = [json.dumps(t["function"], ensure_ascii=False) for t in tools]
    return ("You can call these tools:\n<tools>\n" + "\n".join(lines) + "\n</tools>\n"
            f'To call a tool, reply with only {TOOL_CALL_OPEN}{{"name": <tool name>, "arguments": <arguments '
            f'object>}}{TOOL_CALL_CLOSE}. The result comes back in a message from "tool"; then answer the user.')


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """Validate OpenAI `tools` (function tools with a name and an object schema); raise LLMLabError naming the
    bad entry."""
    if not isinstance(tools, list) or not tools:
        raise LLMLabError("'tools' must be a non-empty list of {\"type\": \"function\", \"function\": {...}}")
    names = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise LLMLabError(f"tools[{i}]: expected {{\"type\": \"function\", \"function\": {{...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise LLMLabError(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if name in names:
            raise LLMLabError(f"tools[{i}]: the tool name '{name}' is used twice")
        names.add(name)
        params = fn.get("parameters")
        if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
            raise LLMLabError(f"tools[{i}].function.parameters must be a JSON schema of type object")
        if params is not None:
            check_schema(params, f"tools[{i}].function.parameters")
    return tools


def select_tools(tools: list[dict[str, Any]] | None, tool_choice: Any) -> tuple[list[dict[str, Any]], bool]:
    """Apply OpenAI's `tool_choice` to `tools`: (the tools the model may call, whether a text reply is allowed).
    "none" -> ([], True); "auto" (default) -> (all, True); "required" -> (all, False); a named function -> (it, False).
    """
    if not tools:
        if tool_choice not in (None, "none"):
            raise LLMLabError("'tool_choice' needs 'tools'")
        return [], True
    check_tools(tools)
    if tool_choice in (None, "auto"):
        return tools, True
    if tool_choice == "none":
        return [], True
    if tool_choice == "required":
        return tools, False
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise LLMLabError(f"tool_choice names the function {name!r}, which is not in 'tools'")
        return chosen, False
    raise LLMLabError(f"'tool_choice' must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", "
                      f"\"function\": {{\"name\": ...}}}}, got {tool_choice!r}")


def _text(content: Any) -> str:
    """OpenAI content: a string, None, or a list of parts ({"type": "text", "text": ...})."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise LLMLabError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


def template_messages(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] = ()
                      ) -> list[dict[str, str]]:
    """OpenAI chat messages -> {"role", "content"} strings for the chat template: assistant tool calls become
    <tool_call> text, `tool` messages keep their role, and the tools' description joins the system message."""
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise LLMLabError(f"messages[{i}] must be an object with a 'role'")
        content = _text(m.get("content"))
        for call in m.get("tool_calls") or []:
            fn = call.get("function", {})
            try:
                args = json.loads(fn.get("arguments") or "{}")
            except json.JSONDecodeError as e:
                raise LLMLabError(f"messages[{i}].tool_calls: arguments are not JSON: {e}") from e
            content += TOOL_CALL_OPEN + json.dumps({"name": fn.get("name"), "arguments": args},
                                                   ensure_ascii=False) + TOOL_CALL_CLOSE
        out.append({"role": m["role"], "content": content})
    if tools:
        prompt = tools_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split a reply into its text and its tool calls (OpenAI `tool_calls` objects, arguments as a JSON string).

    Call blocks that do not parse as {"name", "arguments"} stay in the text (they cannot come from a constrained
    reply)."""
    calls: list[dict[str, Any]] = []

    def take(match: re.Match[str]) -> str:
        try:
            obj = json.loads(match.group(1))
        except json.JSONDecodeError:
            return match.group(0)
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return match.group(0)
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": obj["name"],
                                   "arguments": json.dumps(obj.get("arguments", {}), ensure_ascii=False)}})
        return ""

    rest = _CALL.sub(take, text).strip()
    return (rest or None), calls


def tool_logits_processor(tokenizer: Tokenizer, tools: list[dict[str, Any]] | None, tool_choice: Any,
                          vocab_size: int | None = None, reply_schema: dict[str, Any] | None = None
                          ) -> GrammarLogitsProcessor | None:
    """The processor that makes a reply obey `tool_choice`, or None when no tool may be called (free text). With
    `reply_schema`, a reply that is no call is JSON matching it (OpenAI's `response_format` beside `tools`)."""
    allowed, allow_text = select_tools(tools, tool_choice)
    if not allowed:
        return None
    return tool_call_processor(tokenizer, allowed, allow_text, vocab_size, reply_schema)


class ToolChat:
    """Chat with plug-ins: each reply may call a plug-in; its result goes back to the model, which then answers or
    calls again, at most `max_rounds` calls per user message (then it must answer in text).

    `tool_choice` "required" makes the first reply to each message a call (small models rarely choose one on their
    own); "auto" lets the model choose. `report` receives one line per call and per failure, for the user (the CLI
    prints them to stderr)."""

    def __init__(self, session: ChatSession, plugins: Sequence[Plugin], max_rounds: int = 3,
                 report: Callable[[str], None] | None = None, tool_choice: str = "auto") -> None:
        if tool_choice not in ("auto", "required"):
            raise LLMLabError(f"--tool-choice must be auto or required, got '{tool_choice}'")
        self.tool_choice = tool_choice
        if max_rounds < 1:
            raise LLMLabError(f"--max-tool-rounds must be at least 1, got {max_rounds}")
        if not plugins:
            raise LLMLabError("--plugins: name at least one plug-in")
        self.session, self.max_rounds = session, max_rounds
        self.plugins = {p.name: p for p in plugins}
        self.tools = [p.tool() for p in plugins]
        self.report = report or (lambda line: print(line, file=sys.stderr))
        prompt = tools_prompt(self.tools)
        session.system = f"{session.system}\n\n{prompt}" if session.system else prompt
        session.reset()
        self.results: list[PluginResult] = []  # the calls of the last message

    def reset(self) -> None:
        self.session.reset()

    def _processor(self, may_call: bool, must_call: bool) -> GrammarLogitsProcessor:
        vocab = self.session.model.config.vocab_size
        return tool_call_processor(self.session.tokenizer, self.tools if may_call else [], not must_call, vocab)

    def send(self, text: str) -> Iterator[str]:
        """Stream the final text reply to `text`; plug-in calls in between are run and reported."""
        self.results = []
        role, content = "user", text
        for round_ in range(self.max_rounds + 1):
            pieces: list[str] = []
            is_call: bool | None = None
            must_call = round_ == 0 and self.tool_choice == "required"
            processor = self._processor(round_ < self.max_rounds, must_call)
            for piece in self.session.send(content, role=role, logits_processor=processor):
                pieces.append(piece)
                if is_call is None and piece.strip():
                    is_call = piece.lstrip().startswith("<")
                if is_call is False:
                    yield piece
            _, calls = parse_tool_calls("".join(pieces))
            if not calls:
                return
            result = self._run(calls[0])
            role, content = "tool", result.content

    def _run(self, call: dict[str, Any]) -> PluginResult:
        name, arguments = call["function"]["name"], json.loads(call["function"]["arguments"])
        plugin = self.plugins.get(name)
        if plugin is None:  # cannot happen under the grammar; kept for unconstrained use
            result = PluginResult(name, arguments, False, f"error: there is no plug-in named '{name}'")
        else:
            result = run_plugin(plugin, arguments)
        self.results.append(result)
        shown = json.dumps(arguments, ensure_ascii=False)
        if result.ok:
            self.report(f"[plug-in {name}({shown}) -> {result.content[:300]}]")
        else:
            self.report(f"[plug-in {name}({shown}) failed: {result.content}]")
        return result
