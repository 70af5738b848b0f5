"""/v1/completions' `logprobs` and `echo` through the official `openai` client, and lm-evaluation-harness's
`local-completions` model against a running `llmlab serve`, which must score a multiple-choice task exactly as
`llmlab evaluate` does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch
from _rag import tiny_long_checkpoint
from _serve import (
    ServerThread,
    free_port,
    make_fixture,
    one_thread,  # noqa: F401  (a fixture, used through pytestmark)
    wait_for,
)

from llmlab.checkpoint import load_checkpoint
from llmlab.eval.scoring import loglikelihoods
from llmlab.methods import load_adapter
from llmlab.serve import load_engine
from llmlab.serve.api import create_app

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "sk-test-completions"


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return make_fixture(tmp_path_factory.mktemp("completions"))


@pytest.fixture(scope="module")
def server(fixture):
    ckpt, adapters = fixture
    engine, tok = load_engine(ckpt, adapters, max_batch=6, max_seq_len=96, queue_size=8, dtype="float32")
    srv = ServerThread(create_app(engine, tok, "tiny", api_key=KEY))
    srv.engine, srv.tokenizer = engine, tok
    yield srv
    srv.stop()
    engine.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_echo_scores_the_prompt_as_llmlab_evaluate_does(fixture, server, client):
    """echo + max_tokens 0 + logprobs (what lm-evaluation-harness sends): the prompt comes back with each token's
    log-probability (none for the first), summing to `llmlab.eval.scoring.loglikelihoods`, adapters included."""
    ckpt, adapters = fixture
    prompt = "What does the owl say? The owl says hoot."
    ids = server.tokenizer.encode(prompt)
    for model_name in ("tiny", "beta"):
        out = client.completions.create(model=model_name, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
        choice = out.choices[0]
        lp = choice.logprobs
        assert choice.text == prompt and choice.finish_reason == "length" and out.usage.completion_tokens == 0
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
        assert "".join(lp.tokens) == prompt
        assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids))]
        assert all(len(top) <= 3 and top[tok] == score for tok, score, top in
                   zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]))
        model = load_checkpoint(ckpt).eval()
        if model_name != "tiny":
            load_adapter(model, adapters[model_name])
        (want, _), = loglikelihoods(model, [(ids[:1], ids[1:])])
        assert sum(lp.token_logprobs[1:]) == pytest.approx(want, abs=1e-3)


def test_logprobs_of_generated_tokens_streamed_and_not(client):
    kw = dict(model="tiny", prompt="The dog", max_tokens=10, temperature=0, logprobs=3)
    whole = client.completions.create(**kw).choices[0]
    lp = whole.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    for score, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert score == max(top.values()) and 3 <= len(top) <= 4  # greedy: each token is the most likely
    text, tokens, scores, offsets = "", [], [], []
    for chunk in client.completions.create(**kw, stream=True, echo=True):
        c = chunk.choices[0]
        text += c.text
        if c.logprobs:
            tokens += c.logprobs.tokens
            scores += c.logprobs.token_logprobs
            offsets += c.logprobs.text_offset
    assert text == "The dog" + whole.text
    assert tokens[-10:] == lp.tokens and scores[-10:] == lp.token_logprobs and scores[0] is None
    assert offsets[-10:] == [o + len("The dog") for o in lp.text_offset]


def test_echo_of_token_ids_and_errors(server, client):
    ids = server.tokenizer.encode("The cat says")
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=2, echo=True, temperature=0)
    assert out.choices[0].text.startswith("The cat says") and out.choices[0].logprobs is None
    for kw, param in ((dict(max_tokens=0), "max_tokens"), (dict(logprobs=21), "logprobs"),
                      (dict(best_of=2), "best_of"), (dict(suffix="x"), "suffix")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="hi", **kw)
        assert e.value.body["param"] == param


# -- lm-evaluation-harness against a running server ---------------------------------------------------------
LM_EVAL_TASK = """\
task: llmlab_commonsense
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_local_completions_scores_as_llmlab_evaluate(tmp_path):
    """`lm_eval --model local-completions` against `llmlab serve` (subprocesses, offline, the tokenizer from the
    checkpoint folder) gives `llmlab evaluate`'s accuracy on the same 30 multiple-choice items, and the same
    log-likelihood for each of their 90 choices."""
    from llmlab.cli import evaluate
    from llmlab.eval.taskfile import TASKS_DIR

    ckpt = tiny_long_checkpoint(tmp_path / "tiny")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "commonsense.yaml").write_text(LM_EVAL_TASK.format(
        data=TASKS_DIR / "data" / "commonsense.jsonl"))
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMLAB_API_KEY": KEY, "OPENAI_API_KEY": KEY,
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "llmlab.cli", "serve", str(ckpt), "--port", str(port),
                               "--max-seq-len", "512", "--max-batch", "8"], env=env, stderr=subprocess.PIPE,
                              text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=30)

        def up() -> bool:
            try:
                return bool(client.models.list().data)
            except openai.APIConnectionError:
                assert server.poll() is None, server.stderr.read()
                return False

        assert wait_for(up, 120)
        args = f"model=tiny,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer={ckpt}," \
               "tokenizer_backend=huggingface,max_length=512"
        harness = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
                                  "--model_args", args, "--batch_size", "8", "--tasks", "llmlab_commonsense",
                                  "--include_path", str(tmp_path / "tasks"), "--output_path", str(tmp_path / "lm"),
                                  "--log_samples"], env=env, capture_output=True, text=True, timeout=300)
        assert harness.returncode == 0, harness.stderr[-3000:]
    finally:
        server.terminate()
        server.wait(30)
    ours = evaluate(ckpt, tasks="commonsense", out=tmp_path / "ours", progress=False)
    theirs = json.loads(next((tmp_path / "lm").rglob("results_*.json")).read_text())
    accuracy = ours["tasks"]["commonsense"]["metrics"]["acc"]
    assert theirs["results"]["llmlab_commonsense"]["acc,none"] == pytest.approx(accuracy)
    samples = [json.loads(line) for line in next((tmp_path / "lm").rglob("samples_*.jsonl")).read_text().split("\n")
               if line]
    served = {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples}
    local = [json.loads(line)["loglikelihoods"] for line in (tmp_path / "ours" / "samples_commonsense.jsonl")
             .read_text().split("\n") if line]
    assert len(served) == len(local) == 30
    for i, scores in enumerate(local):
        torch.testing.assert_close(torch.tensor(served[i]), torch.tensor(scores), atol=1e-3, rtol=1e-5)
        assert max(range(3), key=served[i].__getitem__) == max(range(3), key=scores.__getitem__)


def test_the_harness_task_file_is_its_own(tmp_path):
    """The lm-evaluation-harness task above reads the same records as llmlab's `commonsense` task (so the
    comparison compares like with like)."""
    from llmlab.eval.taskfile import TASKS_DIR, load_tasks

    task = load_tasks("commonsense")[0]
    assert (task.prompt, task.choice, task.answer) == ("{{ ctx }}", " {{ choice }}", "label")
    assert Path(TASKS_DIR / "data" / "commonsense.jsonl").is_file()
