"""`llmlab evaluate` end to end on a tiny model with task files written by the test, and the lm-evaluation-harness
adapter run offline on local harness task definitions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _tiny import tiny_checkpoint

from llmlab.checkpoint import load_checkpoint
from llmlab.cli import main
from llmlab.errors import LLMLabError
from llmlab.eval import TextModel, load_task, run_task, sandbox
from llmlab.tokenizer import Tokenizer

MC = [{"ctx": "What does the cow say? The cow says", "choices": ["moo.", "woof.", "quack."], "label": 0},
      {"ctx": "What does the dog say? The dog says", "choices": ["meow.", "woof."], "label": 1},
      {"ctx": "What does the owl say? The owl says", "choices": ["hoot.", "baa.", "oink.", "buzz."], "label": "A"},
      {"ctx": "What does the bee say? The bee says", "choices": ["croak.", "buzz."], "label": "buzz."}]
QA = [{"question": "What does the cat say?", "answer": "meow"},
      {"question": "What does the pig say?", "answer": ["oink"]},
      {"question": "What does the duck say?", "answer": "quack"},
      {"question": "What does the frog say?", "answer": "croak"}]
CODE = [{"prompt": "def one():\n", "solution": "    return 1\n", "test": "assert one() == 1", "use_solution": True},
        {"prompt": "def two():\n", "solution": "    return 2\n", "test": "assert two() == 2", "use_solution": False}]
TASKS = {
    "mc.yaml": "name: mc\nkind: multiple_choice\ndata: mc.jsonl\nprompt: '{{ ctx }}'\nanswer: label\nfew_shot: 1\n",
    "qa.yaml": ("name: qa\nkind: generate\ndata: ${data_dir}/qa.jsonl\nprompt: \"{{ question }}\\n\"\nfew_shot: 2\n"
                "max_new_tokens: 6\nstop: ['.']\nextract: first_line\ncategory: closed-book question answering\n"),
    "code.yaml": ("name: code\nkind: code\ndata: code.jsonl\nprompt: '{{ prompt }}'\nmax_new_tokens: 8\ntimeout: 5\n"
                  "program: \"{{ prompt }}{{ solution if use_solution else completion }}\\n{{ test }}\\n\"\n"),
    "pairs.yaml": "name: pairs\nkind: pairs\ndata: pairs.jsonl\nfirst: a\nsecond: b\ngroup: g\nmetric: pct_a\n",
    "ppl.yaml": "name: ppl\nkind: perplexity\ndata: pairs.jsonl\ntext: a\n",
}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("evalrun")
    ckpt = tiny_checkpoint(root / "ckpt", std=0.1)
    tasks = root / "tasks"
    tasks.mkdir()
    for name, text in TASKS.items():
        (tasks / name).write_text(text)
    write_jsonl(tasks / "mc.jsonl", MC)
    write_jsonl(root / "qa.jsonl", QA)  # under the data dir
    write_jsonl(tasks / "code.jsonl", CODE)
    write_jsonl(tasks / "pairs.jsonl", [{"a": "The cat says meow.", "b": "The cat says woof.", "g": "x"},
                                        {"a": "The dog says moo.", "b": "The dog says woof.", "g": "y"}])
    return ckpt, tasks


def test_cli_evaluates_every_task_kind_and_writes_results(setup, capsys):
    try:
        sandbox.check()
    except LLMLabError as e:  # `make test` installs bubblewrap when root; elsewhere say what is missing
        pytest.skip(f"the code task needs the sandbox: {e}")
    ckpt, tasks = setup
    out = tasks.parent / "out"
    names = ",".join(str(tasks / n) for n in TASKS)
    assert main(["evaluate", str(ckpt), "--tasks", names, "--out", str(out), "--data-dir", str(tasks.parent),
                 "--limit", "3", "--progress", "false", "--batch-size", "2"]) == 0
    table = capsys.readouterr().out
    assert "| mc | " in table and "| code | " in table and "pass@1" in table
    results = json.loads((out / "results.json").read_text())
    res = results["tasks"]
    assert set(res) == {"mc", "qa", "code", "pairs", "ppl"} and results["limit"] == 3
    assert res["mc"]["n"] == 3 and res["mc"]["of"] == 4 and res["pairs"]["n"] == 2
    assert 0 <= res["mc"]["metrics"]["acc"] <= 1 and 0 <= res["qa"]["metrics"]["exact_match"] <= 1
    # the first program uses the known solution and passes; the random model's completion does not
    assert res["code"]["metrics"]["pass@1"] == 0.5 and res["code"]["metrics"]["statuses"]["passed"] == 1
    assert set(res["pairs"]["metrics"]) == {"pct_a", "likelihood_diff", "pct_a/x", "pct_a/y"}
    assert res["ppl"]["metrics"]["token_perplexity"] > 1
    samples = [json.loads(line) for line in (out / "samples_mc.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and [s["gold"] for s in samples] == [0, 1, 0]
    assert len(samples[0]["loglikelihoods"]) == 3


def test_results_are_reproducible_and_match_the_python_api(setup, tmp_path):
    ckpt, tasks = setup
    lm = TextModel(load_checkpoint(ckpt), Tokenizer.from_folder(ckpt), progress=False)
    task = load_task(tasks / "qa.yaml")
    first = run_task(task, lm, limit=4, seed=1, data_dir=tasks.parent)
    again = run_task(task, lm, limit=4, seed=1, data_dir=tasks.parent)
    assert [s["output"] for s in first["samples"]] == [s["output"] for s in again["samples"]]
    assert first["metrics"] == again["metrics"] and first["few_shot"] == 2


def test_cli_errors(setup, capsys):
    ckpt, tasks = setup
    assert main(["evaluate", str(ckpt), "--tasks", "gsm8k", "--data-dir", str(tasks / "nowhere")]) == 2
    assert "task 'gsm8k': data file not found" in capsys.readouterr().err
    assert main(["evaluate", str(ckpt), "--tasks", str(tasks / "mc.yaml"), "--limit", "0",
                 "--out", str(tasks.parent / "o")]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err


def test_a_code_task_refuses_to_run_without_a_sandbox(setup, tmp_path, capsys, monkeypatch):
    ckpt, tasks = setup
    monkeypatch.setattr(sandbox, "_PROBE", {})  # forget this machine's answer: bubblewrap is now missing
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    assert main(["evaluate", str(ckpt), "--tasks", str(tasks / "code.yaml"), "--out", str(tmp_path / "o"),
                 "--progress", "false"]) == 2
    assert "the code sandbox needs bubblewrap" in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.json").exists()


def test_chat_prompts_need_a_chat_template(tmp_path, setup):
    _, tasks = setup
    ckpt = tiny_checkpoint(tmp_path / "nochat", chat=False)
    assert main(["evaluate", str(ckpt), "--tasks", str(tasks / "mc.yaml"), "--chat", "true",
                 "--out", str(tmp_path / "o"), "--progress", "false"]) == 2


# -- lm-evaluation-harness ---------------------------------------------------------------------------------
HARNESS_TASKS = {
    "llmlab_t_mc": "output_type: multiple_choice\ndoc_to_text: '{{ctx}}'\ndoc_to_choice: '{{choices}}'\n"
                   "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n",
    "llmlab_t_gen": "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
                    "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 5\nmetric_list:\n  - metric: exact_match\n",
    "llmlab_t_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{ctx}}'\n"
                    "metric_list:\n  - metric: word_perplexity\n",
}


def harness_tasks(folder: Path) -> Path:
    """Local harness task definitions over local JSON files (no download)."""
    folder.mkdir(exist_ok=True)
    mc = [dict(r, label=i % 2) for i, r in enumerate(MC)]  # the harness wants integer labels
    for r in mc:
        r["choices"] = r["choices"][:2]
    write_jsonl(folder / "mc.jsonl", mc)
    write_jsonl(folder / "qa.jsonl", [dict(r, answer=r["answer"] if isinstance(r["answer"], str) else r["answer"][0])
                                      for r in QA])
    for name, body in HARNESS_TASKS.items():
        data = folder / ("qa.jsonl" if name.endswith("gen") else "mc.jsonl")
        (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                             f"    test: {data}\ntest_split: test\n{body}")
    return folder


@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.mark.slow
def test_harness_adapter_runs_local_tasks_and_agrees_with_llmlab_evaluate(setup, tmp_path, offline_hf):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from llmlab.eval.harness import LLMLabLM

    ckpt, _ = setup
    assert get_model("llmlab") is LLMLabLM
    folder = harness_tasks(tmp_path / "harness")
    lm = TextModel(load_checkpoint(ckpt), Tokenizer.from_folder(ckpt), progress=False)
    out = lm_eval.simple_evaluate(model=LLMLabLM(text_model=lm), tasks=list(HARNESS_TASKS),
                                  task_manager=TaskManager(include_path=str(folder)))
    res = out["results"]
    assert set(res) == set(HARNESS_TASKS)
    assert 0 <= res["llmlab_t_gen"]["exact_match,none"] <= 1 and res["llmlab_t_ppl"]["word_perplexity,none"] > 1
    # the same multiple-choice data through llmlab's own runner gives the same accuracy
    (folder / "mc.yaml").write_text("name: mc\nkind: multiple_choice\ndata: mc.jsonl\nprompt: '{{ ctx }}'\n"
                                    "answer: label\n")
    ours = run_task(load_task(folder / "mc.yaml"), lm)
    assert res["llmlab_t_mc"]["acc,none"] == pytest.approx(ours["metrics"]["acc"])


@pytest.mark.slow
def test_harness_command_line_finds_the_llmlab_model(setup, tmp_path):
    pytest.importorskip("lm_eval")
    ckpt, _ = setup
    folder = harness_tasks(tmp_path / "harness")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "llmlab.eval.harness", "--model", "llmlab", "--model_args",
                           f"ckpt={ckpt}", "--batch_size", "2", "--tasks", "llmlab_t_mc", "--include_path", str(folder),
                           "--output_path", str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "llmlab_t_mc" in proc.stdout and "acc" in proc.stdout


def test_adapter_is_applied(setup, tmp_path):
    """--adapter scores with the LoRA adapter on: the perplexity changes and equals the merged checkpoint's."""
    import torch

    from llmlab.args import LoRAConfig
    from llmlab.checkpoint import save_checkpoint
    from llmlab.methods import LoRA
    from llmlab.methods.lora import merge_and_unload

    ckpt, tasks = setup
    method = LoRA(LoRAConfig(), base_model=str(ckpt))
    model = method.prepare(load_checkpoint(ckpt))
    torch.manual_seed(0)
    with torch.no_grad():
        for _, p in method.trainable_parameters(model):
            p.normal_(std=0.2)  # B starts at zero: give the adapter an effect
    adapter = method.save(model, tmp_path / "adapter")
    save_checkpoint(merge_and_unload(model), tmp_path / "merged", tokenizer=Tokenizer.from_folder(ckpt))

    def ppl(*args: str) -> float:
        out = tmp_path / f"o{len(args)}{args[-1][-6:]}"
        assert main(["evaluate", *args, "--tasks", str(tasks / "ppl.yaml"), "--out", str(out),
                     "--progress", "false", "--dtype", "float32"]) == 0
        return json.loads((out / "results.json").read_text())["tasks"]["ppl"]["metrics"]["token_perplexity"]

    base, with_adapter = ppl(str(ckpt)), ppl(str(ckpt), "--adapter", str(adapter))
    assert with_adapter != pytest.approx(base, rel=1e-3)
    assert with_adapter == pytest.approx(ppl(str(tmp_path / "merged")), rel=1e-4)
