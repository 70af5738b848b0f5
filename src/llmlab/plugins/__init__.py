"""Plug-ins: functions the model may call (as OpenAI "tools"), their registry, and running them safely.

A plug-in is a `Plugin`: a name, a description and a JSON schema of its arguments (what the model sees), and a
Python function. Built-ins: `calculator`, `current_time`, `search_documents` (llmlab.plugins.builtin). Other
packages add their own through the entry-point group `llmlab.plugins`:

    [project.entry-points."llmlab.plugins"]
    weather = "my_package.plugins:make_weather"   # a Plugin, or a function (PluginContext) -> Plugin

`run_plugin` checks the arguments against the schema and runs the function in a worker thread with a timeout:
a plug-in that raises, hangs or returns something unprintable gives a `PluginResult` with `ok=False` and a message
for the model and the user, never an exception in the chat loop. (A hung thread cannot be killed in Python; it is a
daemon thread, so it is abandoned and does not keep the process alive.)
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import jsonschema

from llmlab.errors import LLMLabError

ENTRY_POINT_GROUP = "llmlab.plugins"


@dataclass
class Plugin:
    """A function the model can call. `parameters` is the JSON schema of its keyword arguments."""

    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[..., Any]
    timeout: float = 10.0

    def tool(self) -> dict[str, Any]:
        """The OpenAI `tools` entry that describes this plug-in."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass
class PluginContext:
    """What a plug-in factory may need: the document index (for search_documents) and free-form settings."""

    index: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class PluginResult:
    """The outcome of one call: `content` goes back to the model as the tool message; ok=False marks a failure."""

    name: str
    arguments: dict[str, Any]
    ok: bool
    content: str


PluginFactory = Callable[[PluginContext], Plugin]


def builtin_plugins() -> dict[str, PluginFactory]:
    from llmlab.plugins import builtin  # here: builtin imports this module

    return {"calculator": builtin.calculator, "current_time": builtin.current_time,
            "search_documents": builtin.search_documents}


def available_plugins() -> dict[str, PluginFactory | Plugin]:
    """Built-ins plus every plug-in registered under the `llmlab.plugins` entry-point group, by name.

    A third-party plug-in may not take a built-in's name (it would silently change what the built-in does).
    """
    found: dict[str, PluginFactory | Plugin] = dict(builtin_plugins())
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "an unknown package"
        if ep.name in found:
            raise LLMLabError(f"plug-in '{ep.name}' from {dist} (entry point {ep.value}) clashes with a built-in "
                              "plug-in of the same name; rename it in that package's entry points")
        try:
            found[ep.name] = ep.load()
        except Exception as e:  # a broken third-party package must say which one it is
            raise LLMLabError(f"plug-in '{ep.name}' from {dist}: cannot load entry point {ep.value}: "
                              f"{type(e).__name__}: {e}") from e
    return found


def load_plugins(names: Sequence[str], context: PluginContext | None = None) -> list[Plugin]:
    """The plug-ins called `names`, built for `context`; unknown names raise an error listing the known ones."""
    context = context or PluginContext()
    known = available_plugins()
    plugins = []
    for name in names:
        if name not in known:
            raise LLMLabError(f"--plugins: unknown plug-in '{name}'; available: {', '.join(sorted(known))} "
                              f"(third-party plug-ins register under the entry-point group '{ENTRY_POINT_GROUP}')")
        item = known[name]
        plugin = item if isinstance(item, Plugin) else item(context)
        if not isinstance(plugin, Plugin):
            raise LLMLabError(f"plug-in '{name}': its entry point must be a Plugin or a function returning one, "
                              f"got {type(plugin).__name__}")
        plugins.append(plugin)
    if len({p.name for p in plugins}) != len(plugins):
        raise LLMLabError(f"--plugins: a plug-in is named twice in {list(names)}")
    return plugins


def _check_arguments(plugin: Plugin, arguments: Any) -> str | None:
    if not isinstance(arguments, dict):
        return f"arguments must be a JSON object, got {type(arguments).__name__}"

    try:
        jsonschema.validate(arguments, plugin.parameters)
    except jsonschema.ValidationError as e:
        return f"arguments do not match the schema: {e.message}"
    return None


def run_plugin(plugin: Plugin, arguments: Any, timeout: float | None = None) -> PluginResult:
    """Call `plugin` with `arguments` (a dict); failures (bad arguments, an exception, a timeout) become a result
    with ok=False whose content says what went wrong."""
    args = arguments if isinstance(arguments, dict) else {}
    problem = _check_arguments(plugin, arguments)
    if problem:
        return PluginResult(plugin.name, args, False, f"error: plug-in '{plugin.name}': {problem}")
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = plugin.run(**arguments)
        except BaseException as e:  # reported to the model and the user, whatever the plug-in raised
            box["error"] = e

    worker = threading.Thread(target=target, name=f"plugin-{plugin.name}", daemon=True)
    worker.start()
    limit = plugin.timeout if timeout is None else timeout
    worker.join(limit)
    if worker.is_alive():
        return PluginResult(plugin.name, args, False,
                            f"error: plug-in '{plugin.name}' did not answer within {limit:g} s (timed out)")
    if "error" in box:
        e = box["error"]
        return PluginResult(plugin.name, args, False, f"error: plug-in '{plugin.name}' failed: {type(e).__name__}: {e}")
    value = box.get("value")
    if isinstance(value, str):
        return PluginResult(plugin.name, args, True, value)
    try:
        return PluginResult(plugin.name, args, True, json.dumps(value, ensure_ascii=False))
    except (TypeError, ValueError) as e:
        return PluginResult(plugin.name, args, False,
                            f"error: plug-in '{plugin.name}' returned a {type(value).__name__}, not text or JSON: {e}")
