"""Task files: evaluation tasks described by small YAML files, so that a user adds a task without writing code.

A task names its data (a JSON Lines file, optionally gzipped), its kind, and how a record becomes a prompt:

    name: nq_open
    kind: generate                        # perplexity | multiple_choice | generate | code | pairs
    data: ${data_dir}/nq_open_dev.jsonl   # ${data_dir} = --data-dir; other relative paths: next to the YAML file
    prompt: "Q: {{ question }}\\nA:"       # a Jinja template over the record's fields
    answer: answer                        # the field with the reference answer(s)
    stop: ["\\n"]

Templates are rendered by Jinja's sandbox with strict undefined variables, so a misspelt field is an error that
names the record, never an empty string, and no template can run code. The tasks shipped with llmlab live next to
this module in `tasks/` (`list_tasks()`); a path to a .yaml file works wherever a task name does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmlab.errors import LLMLabError
from llmlab.eval.scoring import EXTRACTORS
from llmlab.jsonl import iter_jsonl

TASKS_DIR = Path(__file__).parent / "tasks"
KINDS = ("perplexity", "multiple_choice", "generate", "code", "pairs")
DEFAULT_DATA_DIR = Path("../shared/data")
_REQUIRED = {"perplexity": ("text",), "multiple_choice": ("prompt",), "generate": ("prompt",),
             "code": ("prompt", "program"), "pairs": ("first", "second")}


@dataclass
class Task:
    """One evaluation task; the fields are the keys of its YAML file (see the module docstring)."""

    name: str
    kind: str
    data: str
    category: str = ""
    description: str = ""
    prompt: str = ""  # template: the context the model continues
    answer: str = "answer"  # field: gold choice (index, letter or text), reference answer(s), ...
    # few-shot examples, prepended to each prompt
    few_shot: int = 0
    few_shot_data: str | None = None  # default: other records of `data`
    few_shot_separator: str = "\n\n"
    target: str = " {{ answer }}"  # template: how a few-shot example's answer follows its prompt
    chat: bool = False  # send the prompt as a user message through the tokenizer's chat template
    # multiple_choice
    choices: str = "choices"  # field: the list of options
    choice: str = " {{ choice }}"  # template over `choice`, `index`, `letter`: the continuation scored
    # generate / code
    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    extract: str = "none"  # none | first_line | gsm8k
    temperature: float = 0.0
    samples: int = 1  # code: completions per problem (pass@k needs k <= samples)
    k: list[int] = field(default_factory=lambda: [1])
    program: str = ""  # template over the record and `completion`: the Python file the sandbox runs
    timeout: float = 10.0  # code: seconds per program
    # pairs: which of two sentences the model finds more likely
    first: str = ""  # field: the sentence counted (e.g. the stereotypical one)
    second: str = ""
    group: str | None = None  # field to break the pairs metric down by (e.g. bias_type)
    metric: str = "pct_first"  # name of the pairs metric: the share of pairs where `first` is more likely
    # perplexity
    text: str = ""  # field: the text scored
    source: Path | None = None  # the YAML file (set by the loader)

    def __post_init__(self) -> None:
        where = f"task '{self.name}'" + (f" ({self.source})" if self.source else "")
        if self.kind not in KINDS:
            raise LLMLabError(f"{where}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        missing = [k for k in _REQUIRED[self.kind] if not getattr(self, k)]
        if missing:
            raise LLMLabError(f"{where}: a {self.kind} task needs {', '.join(repr(m) for m in missing)}")

        if self.extract not in EXTRACTORS:
            raise LLMLabError(f"{where}: extract must be one of {', '.join(EXTRACTORS)}, got {self.extract!r}")
        if self.few_shot < 0 or self.max_new_tokens < 1 or self.samples < 1 or self.timeout <= 0:
            raise LLMLabError(f"{where}: few_shot must be >= 0, max_new_tokens and samples >= 1, timeout > 0")
        if self.kind == "code" and any(k < 1 or k > self.samples for k in self.k):
            raise LLMLabError(f"{where}: every k of pass@k must be between 1 and samples ({self.samples}), "
                              f"got k: {self.k}")
        if self.kind == "code" and self.samples > 1 and self.temperature == 0:
            raise LLMLabError(f"{where}: samples {self.samples} with temperature 0 would repeat one greedy "
                              "completion; set temperature > 0 (e.g. 0.8) for pass@k")

    def data_path(self, data_dir: str | Path | None = None, which: str = "data") -> Path:
        """The data file `which` ('data' or 'few_shot_data'), with ${data_dir} and relative paths resolved."""
        raw = getattr(self, which)
        data_dir = Path(DEFAULT_DATA_DIR if data_dir is None else data_dir)
        if "${data_dir}" in raw:
            return Path(raw.replace("${data_dir}", str(data_dir)))
        path = Path(raw)
        if not path.is_absolute() and self.source is not None:
            path = self.source.parent / path
        return path

    def check_data(self, data_dir: str | Path | None = None) -> None:
        """Raise a clear error when the task's data (or few-shot data) file is missing."""
        for which in ("data", "few_shot_data") if self.few_shot_data else ("data",):
            path = self.data_path(data_dir, which)
            if not path.is_file():
                hint = (f" (it lies under --data-dir, now {data_dir or DEFAULT_DATA_DIR}; point --data-dir at the "
                        "folder that holds it)") if "${data_dir}" in getattr(self, which) else ""
                raise LLMLabError(f"task '{self.name}': {which} file not found: {path}{hint}")

    def records(self, data_dir: str | Path | None = None, which: str = "data") -> list[dict[str, Any]]:
        """The records of the task's data (or few-shot) file, each a dict."""
        self.check_data(data_dir)
        return read_records(self.data_path(data_dir, which))


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a task's .jsonl or .jsonl.gz file, each a JSON object; there must be some."""
    out = [line.record for line in iter_jsonl(path, objects=True)]
    if not out:
        raise LLMLabError(f"{path}: no records")
    return out


_FIELD_TYPES = {f.name: f.type for f in fields(Task)}


def task_from_dict(spec: dict[str, Any], source: Path | None = None) -> Task:
    """A Task from the keys of a YAML mapping, with an error naming the file and key for anything unexpected."""
    where = str(source) if source else "task"
    if not isinstance(spec, dict):
        raise LLMLabError(f"{where}: a task file must be a YAML mapping of keys, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(_FIELD_TYPES) - {"source"})
    if unknown:
        raise LLMLabError(f"{where}: unknown keys {unknown}; known keys: {', '.join(sorted(_FIELD_TYPES))}")
    for key in ("name", "kind", "data"):
        if key not in spec:
            raise LLMLabError(f"{where}: missing key '{key}'")
    for key, value in spec.items():
        expected = _FIELD_TYPES[key]
        ok = {"str": isinstance(value, str), "int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool),
              "bool": isinstance(value, bool),
              "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
              "list[int]": isinstance(value, list) and all(isinstance(v, int) for v in value),
              "str | None": value is None or isinstance(value, str)}.get(str(expected), True)
        if not ok:
            raise LLMLabError(f"{where}: key '{key}' must be {expected}, got {value!r}")
    return Task(**spec, source=source)


def list_tasks() -> list[str]:
    """Names of the tasks shipped with llmlab."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def load_task(spec: str | Path) -> Task:
    """A shipped task by name (see `list_tasks`) or a task YAML file by path."""
    path = Path(spec)
    if path.suffix not in (".yaml", ".yml"):
        path = TASKS_DIR / f"{spec}.yaml"
        if not path.is_file():
            raise LLMLabError(f"unknown task '{spec}'; shipped tasks: {', '.join(list_tasks())} "
                              "(or give the path of a task .yaml file)")
    elif not path.is_file():
        raise LLMLabError(f"task file not found: {path}")
    try:
        spec_dict = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise LLMLabError(f"{path}: not valid YAML: {e}") from e
    return task_from_dict(spec_dict, path)


def load_tasks(specs: str | list[str]) -> list[Task]:
    """Tasks from a comma-separated string or a list of names/paths; `all` means every shipped task."""
    names = [s.strip() for s in (specs.split(",") if isinstance(specs, str) else specs) if s.strip()]
    if not names:
        raise LLMLabError("--tasks is empty: name at least one task (e.g. --tasks gsm8k,nq_open)")
    if names == ["all"]:
        names = list_tasks()
    return [load_task(n) for n in names]


# -- templates -----------------------------------------------------------------------------------------
_COMPILED: dict[str, Any] = {}


def render(template: str, values: dict[str, Any], where: str) -> str:
    """Render a task template over a record's fields (sandboxed Jinja, undefined fields are errors)."""
    try:
        if template not in _COMPILED:
            env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
            _COMPILED[template] = env.from_string(template)
        return _COMPILED[template].render(**values)
    except TemplateError as e:
        raise LLMLabError(f"{where}: template {template!r}: {e}") from e
