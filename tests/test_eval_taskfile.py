"""Task YAML files: the shipped ones load and their data is well formed; bad files fail with messages that name the
file, the key or the record."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmlab.errors import LLMLabError
from llmlab.eval.taskfile import list_tasks, load_task, load_tasks, render, task_from_dict

OWN_DATA = ["bias_pairs", "commonsense", "multitask", "paragraphs", "reading", "toxicity_pairs", "truthful"]


def write(tmp_path: Path, text: str, name: str = "task.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_tasks_load():
    names = list_tasks()
    assert {"gsm8k", "humaneval", "nq_open", *OWN_DATA} <= set(names)
    kinds = {load_task(n).kind for n in names}
    assert kinds == {"perplexity", "multiple_choice", "generate", "code", "pairs"}


@pytest.mark.parametrize("name", OWN_DATA)
def test_our_small_tasks_have_well_formed_records(name):
    from llmlab.eval.runner import _choices, _continuations, _gold_index

    task = load_task(name)
    records = task.records()
    assert len(records) >= 8
    for i, rec in enumerate(records):
        where = f"{name} record {i}"
        if task.kind == "multiple_choice":
            choices = _choices(task, rec, where)
            assert 0 <= _gold_index(task, rec, choices, where) < len(choices)
            assert len(set(_continuations(task, rec, choices, where))) == len(choices)
            assert render(task.prompt, rec, where).strip()
        elif task.kind == "pairs":
            assert rec[task.first] != rec[task.second]
        else:
            assert rec[task.text].strip()


def test_data_dir_placeholder_and_missing_data_error(tmp_path):
    task = load_task("gsm8k")
    assert task.data_path(tmp_path) == tmp_path / "gsm8k_test.jsonl"
    with pytest.raises(LLMLabError, match=r"task 'gsm8k': data file not found: .*gsm8k_test.jsonl.*--data-dir"):
        task.records(tmp_path)
    (tmp_path / "gsm8k_test.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    with pytest.raises(LLMLabError, match="few_shot_data file not found: .*gsm8k_train.jsonl"):
        task.check_data(tmp_path)


def test_relative_data_paths_resolve_next_to_the_yaml_file(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n\n{"text": "world"}\n')
    task = load_task(write(tmp_path, "name: t\nkind: perplexity\ndata: d.jsonl\ntext: text\n"))
    assert [r["text"] for r in task.records()] == ["hello", "world"]


@pytest.mark.parametrize(("text", "message"), [
    ("- a\n- b\n", "must be a YAML mapping"),
    ("name: t\nkind: generate\ndata: d.jsonl\nprompt: x\npromt: y\n", r"unknown keys \['promt'\]"),
    ("name: t\nkind: generate\nprompt: x\n", "missing key 'data'"),
    ("name: t\nkind: essay\ndata: d.jsonl\n", "kind must be one of perplexity, multiple_choice"),
    ("name: t\nkind: generate\ndata: d.jsonl\n", "a generate task needs 'prompt'"),
    ("name: t\nkind: generate\ndata: d.jsonl\nprompt: x\nfew_shot: two\n", "key 'few_shot' must be int"),
    ("name: t\nkind: generate\ndata: d.jsonl\nprompt: x\nstop: \"\\n\"\n", "key 'stop' must be list"),
    ("name: t\nkind: generate\ndata: d.jsonl\nprompt: x\nextract: regex\n", "extract must be one of"),
    ("name: t\nkind: code\ndata: d.jsonl\nprompt: x\nprogram: y\nk: [1, 10]\n", "between 1 and samples"),
    ("name: t\nkind: code\ndata: d.jsonl\nprompt: x\nprogram: y\nsamples: 5\n", "temperature 0 would repeat"),
    ("name: t\nkind: pairs\ndata: d.jsonl\nfirst: a\n", "a pairs task needs 'second'"),
    ("name: [t\n", "not valid YAML"),
])
def test_bad_task_files_are_refused_with_a_clear_message(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(LLMLabError, match=message) as info:
        load_task(path)
    assert str(path) in str(info.value) or "YAML" in str(info.value)


def test_unknown_task_names_and_files():
    with pytest.raises(LLMLabError, match="unknown task 'gsm9k'; shipped tasks: .*gsm8k"):
        load_tasks("gsm9k")
    with pytest.raises(LLMLabError, match="task file not found: nowhere.yaml"):
        load_task("nowhere.yaml")
    with pytest.raises(LLMLabError, match="--tasks is empty"):
        load_tasks(" , ")
    assert [t.name for t in load_tasks("all")] == list_tasks()


def test_bad_data_files(tmp_path):
    task = task_from_dict({"name": "t", "kind": "perplexity", "data": str(tmp_path / "d.jsonl"), "text": "text"})
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(LLMLabError, match=r"d.jsonl:2: not valid JSON"):
        task.records()
    (tmp_path / "d.jsonl").write_text('["a"]\n')
    with pytest.raises(LLMLabError, match="d.jsonl:1: expected a JSON object, got list"):
        task.records()
    (tmp_path / "d.jsonl").write_text("\n")
    with pytest.raises(LLMLabError, match="no records"):
        task.records()


def test_templates_name_a_missing_field_and_cannot_reach_python_internals():
    with pytest.raises(LLMLabError, match="record 3: template .*'questoin' is undefined"):
        render("Q: {{ questoin }}", {"question": "hi"}, "task 't', record 3")
    with pytest.raises(LLMLabError, match="record 0"):
        render("{{ x.__class__.__mro__[1].__subclasses__() }}", {"x": "s"}, "task 't', record 0")
    assert render("{{ 'ABCD'[1] }}. {{ q }}\n", {"q": "why"}, "t") == "B. why\n"
