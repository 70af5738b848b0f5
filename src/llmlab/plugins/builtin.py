"""The built-in plug-ins: calculator (arithmetic from an AST, never eval), current_time, search_documents."""

from __future__ import annotations

import ast
import math
import operator
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from llmlab.errors import LLMLabError
from llmlab.plugins import Plugin, PluginContext
from llmlab.rag.index import open_index

# -- calculator ----------------------------------------------------------------------------------------
MAX_EXPRESSION = 500  # characters
MAX_EXPONENT = 1000  # |b| in a ** b, so 2 ** 10 ** 10 is refused instead of eating the CPU
MAX_RESULT_DIGITS = 4300  # Python's own int -> str limit
_MAX_RESULT_BITS = int(MAX_RESULT_DIGITS * math.log2(10))

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_WHAT = {ast.Name: "names", ast.Attribute: "attribute access", ast.Call: "function calls",
         ast.Subscript: "indexing", ast.Lambda: "lambdas", ast.Compare: "comparisons", ast.BoolOp: "and/or",
         ast.List: "lists", ast.Tuple: "tuples", ast.Dict: "dicts", ast.Set: "sets"}


def _number(value: int | float | complex) -> int | float:
    if isinstance(value, complex):
        raise LLMLabError("calculator: the result is not a real number (a negative number to a fractional power)")
    if isinstance(value, int) and abs(value).bit_length() > _MAX_RESULT_BITS:
        raise LLMLabError(f"calculator: the result has more than {MAX_RESULT_DIGITS} digits")
    if isinstance(value, float) and not math.isfinite(value):
        raise LLMLabError("calculator: the result is not a finite number (overflow)")
    return value


def _check_power(base: int | float, exponent: int | float) -> None:
    """Refuse a ** b before computing it when the result would be too large: an integer power's size is known in
    advance (|a| >= 2^(bits(a) - 1)), and computing a 12-million-bit one holds the interpreter for seconds."""
    if abs(exponent) > MAX_EXPONENT:
        raise LLMLabError(f"calculator: exponent {exponent} is too large (at most {MAX_EXPONENT} in absolute value)")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if (abs(base).bit_length() - 1) * exponent > _MAX_RESULT_BITS:
            raise LLMLabError(f"calculator: the result has more than {MAX_RESULT_DIGITS} digits")


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise LLMLabError(f"calculator: only numbers are allowed, got {node.value!r}")
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            return _number(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError as e:
            raise LLMLabError("calculator: division by zero") from e
        except OverflowError as e:
            raise LLMLabError("calculator: the result is too large (overflow)") from e
    what = _WHAT.get(type(node), f"'{type(node).__name__}' expressions")
    if isinstance(node, (ast.BinOp, ast.UnaryOp)):
        what = f"the operator '{type(node.op).__name__}'"
    detail = f" ('{node.id}')" if isinstance(node, ast.Name) else ""
    raise LLMLabError(f"calculator: only arithmetic on numbers (+ - * / // % ** and parentheses) is allowed; "
                      f"{what}{detail} are not")


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression, parsed into an AST and walked; anything but numbers, + - * / // % **,
    unary signs and parentheses raises LLMLabError."""
    if len(expression) > MAX_EXPRESSION:
        raise LLMLabError(f"calculator: the expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise LLMLabError(f"calculator: '{expression}' is not an arithmetic expression ({e.msg})") from e
    return _eval(tree)


def calculator(context: PluginContext | None = None) -> Plugin:
    return Plugin(
        name="calculator",
        description="Evaluate an arithmetic expression with + - * / // % ** and parentheses, e.g. '(3 + 4) * 2'.",
        parameters={"type": "object", "properties": {"expression": {"type": "string", "maxLength": MAX_EXPRESSION,
                                                                    "description": "the arithmetic to compute"}},
                    "required": ["expression"], "additionalProperties": False},
        run=lambda expression: str(calculate(expression)))


# -- current time --------------------------------------------------------------------------------------
def now(tz: str = "UTC") -> str:
    """The current date and time in the IANA time zone `tz` (e.g. Europe/Paris), ISO 8601 with the weekday."""
    try:
        zone = timezone.utc if tz.upper() == "UTC" else ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise LLMLabError(f"current_time: unknown time zone '{tz}' (expected an IANA name like Europe/Paris)") from e
    moment = datetime.now(zone)
    return f"{moment.isoformat(timespec='seconds')} ({moment.strftime('%A')}, {tz})"


def current_time(context: PluginContext | None = None) -> Plugin:
    return Plugin(
        name="current_time",
        description="The current date and time, in UTC or in a given IANA time zone such as Europe/Paris.",
        parameters={"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 64,
                                                                  "description": "IANA time zone, default UTC"}},
                    "additionalProperties": False},
        run=lambda timezone="UTC": now(timezone))


# -- search the index ----------------------------------------------------------------------------------
def search_documents(context: PluginContext | None = None) -> Plugin:
    """Search the document index given by the context (`--index`); passages come back numbered with their source."""
    if context is None or context.index is None:
        raise LLMLabError("plug-in search_documents needs a document index: pass --index INDEX_DIR "
                          "(built with `llmlab index`)")

    index = open_index(context.index)

    def run(query: str, k: int = 3) -> str:
        hits = index.search(query, k)
        if not hits:
            return "no matching passages"
        return "\n\n".join(f"[{i}] {hit.location}\n{hit.text}" for i, hit in enumerate(hits, 1))

    schema: dict[str, Any] = {"type": "object",
                              "properties": {"query": {"type": "string", "maxLength": 200},
                                             "k": {"type": "integer", "minimum": 1, "maximum": 10}},
                              "required": ["query"], "additionalProperties": False}
    return Plugin(name="search_documents", description="Search the user's indexed documents; returns the passages "
                  "that best match the query, each with its file and location.", parameters=schema, run=run,
                  timeout=120.0)
