"""Run evaluation tasks on a model: build each record's requests, score or generate them in batches, compute the
task's metrics, and write a table and results.json (+ one samples file per task) to the output folder.

`TextModel` is the text-in, numbers-or-text-out view of a model that every task kind needs (log-likelihood of a
continuation, rolling log-likelihood of a text, generation until stop strings); the lm-evaluation-harness adapter
(`llmlab.eval.harness`) wraps the same object, so both paths score text the same way.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from llmlab.errors import LLMLabError
from llmlab.eval import scoring
from llmlab.eval.sandbox import SandboxLimits, check, describe, run_program
from llmlab.eval.taskfile import Task, render
from llmlab.generate import SamplingParams, generate
from llmlab.model import LLaMA
from llmlab.quantized import keep_dense_copies
from llmlab.tokenizer import Tokenizer


class TextModel:
    """A model + tokenizer seen through text: batched log-likelihoods and generation, with a progress bar."""

    def __init__(self, model: LLaMA, tokenizer: Tokenizer, eos_ids: set[int] | None = None, batch_size: int = 8,
                 max_batch_tokens: int = 4096, progress: bool = True) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        with torch.inference_mode():  # scoring batches are many rows: a quantized model's dense GEMM where faster
            keep_dense_copies(self.model)
        self.eos_ids = eos_ids if eos_ids is not None else ({tokenizer.eos_id} if tokenizer.eos_id is not None
                                                            else set())
        self.batch_size, self.max_batch_tokens, self.show_progress = batch_size, max_batch_tokens, progress

    def progress_bar(self, total: int, desc: str) -> Any:
        """A tqdm bar on stderr (disabled when progress is off)."""
        return tqdm(total=total, desc=desc, disable=not self.show_progress, leave=False, file=sys.stderr,
                    dynamic_ncols=True)

    def loglikelihood_ids(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                          desc: str = "scoring") -> list[tuple[float, bool]]:
        with self.progress_bar(len(requests), desc) as bar:
            return scoring.loglikelihoods(self.model, requests, self.batch_size, self.max_batch_tokens, bar.update)

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], desc: str = "scoring") -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is greedy) for each (context, continuation) text pair.

        An empty context means the continuation is scored on its own, after the BOS (or EOS) token.
        """
        requests = []
        for ctx, cont in pairs:
            if ctx:
                requests.append(scoring.encode_pair(self.tokenizer, ctx, cont))
            else:
                requests.append(([scoring.prefix_token(self.tokenizer)], self.tokenizer.encode(cont, add_bos=False)))
        return self.loglikelihood_ids(requests, desc)

    def loglikelihood_rolling(self, texts: Sequence[str], desc: str = "perplexity") -> list[float]:
        """Total log-likelihood of each whole text, every token scored once, windows over long texts."""
        ids = [self.tokenizer.encode(t, add_bos=False) for t in texts]
        max_len = self.model.config.max_position_embeddings
        n = sum(len(scoring.rolling_requests(i, 0, max_len)) for i in ids)
        with self.progress_bar(n, desc) as bar:
            return scoring.rolling_loglikelihood(self.model, ids, scoring.prefix_token(self.tokenizer),
                                                 self.batch_size, self.max_batch_tokens, bar.update)

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 128, stop: Sequence[str] = (),
                 temperature: float = 0.0, seed: int = 0, desc: str = "generating") -> list[str]:
        """The continuation of each prompt until EOS, a stop string (excluded) or max_new_tokens; batched, with
        prompts of similar length together. Prompts too long for the context keep their end."""
        context = self.model.config.max_position_embeddings
        if max_new_tokens >= context:
            raise LLMLabError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context "
                              f"of {context} tokens")
        ids = [self.tokenizer.encode(p)[-(context - max_new_tokens):] for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out: list[str] = [""] * len(ids)
        with self.progress_bar(len(ids), desc) as bar:
            for b, start in enumerate(range(0, len(order), self.batch_size)):
                chunk = order[start:start + self.batch_size]
                sampling = SamplingParams(temperature=temperature, seed=seed + b)
                done = generate(self.model, self.tokenizer, [ids[i] for i in chunk], max_new_tokens, sampling,
                                self.eos_ids, list(stop))
                for i, c in zip(chunk, done):
                    out[i] = c.text
                bar.update(len(chunk))
        return out


# -- prompts -----------------------------------------------------------------------------------------------
def _gold_index(task: Task, rec: dict[str, Any], choices: list[str], where: str) -> int:
    gold = _field(rec, task.answer, where)
    if isinstance(gold, bool):
        raise LLMLabError(f"{where}: answer field '{task.answer}' must be an index, a letter or a choice's text")
    if isinstance(gold, int) and 0 <= gold < len(choices):
        return gold
    if isinstance(gold, str) and len(gold) == 1 and "A" <= gold <= "Z" and ord(gold) - 65 < len(choices):
        return ord(gold) - 65
    if isinstance(gold, str) and gold in choices:
        return choices.index(gold)
    raise LLMLabError(f"{where}: answer {gold!r} is not an index, letter or text of one of the {len(choices)} "
                      "choices")


def _field(rec: dict[str, Any], name: str, where: str) -> Any:
    if name not in rec:
        raise LLMLabError(f"{where}: no field '{name}' (fields: {', '.join(sorted(rec))})")
    return rec[name]


def _choices(task: Task, rec: dict[str, Any], where: str) -> list[str]:
    choices = _field(rec, task.choices, where)
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise LLMLabError(f"{where}: field '{task.choices}' must be a list of at least two strings")
    return choices


def _continuations(task: Task, rec: dict[str, Any], choices: list[str], where: str) -> list[str]:
    return [render(task.choice, {**rec, "choice": c, "index": i, "letter": chr(65 + i)}, where)
            for i, c in enumerate(choices)]


class PromptBuilder:
    """Renders each record's prompt, with the task's few-shot examples in front (fixed per task and seed)."""

    def __init__(self, task: Task, records: list[dict[str, Any]], data_dir: Path | None, seed: int,
                 tokenizer: Tokenizer, chat: bool) -> None:
        self.task, self.tokenizer, self.chat = task, tokenizer, chat
        self.same_pool = task.few_shot_data is None
        pool = records if self.same_pool else task.records(data_dir, "few_shot_data")
        k = task.few_shot
        if k > len(pool) - (1 if self.same_pool else 0):
            raise LLMLabError(f"task '{task.name}': few_shot {k} but only {len(pool)} records to draw examples from")
        picked = random.Random(seed).sample(range(len(pool)), min(len(pool), k + 1)) if k else []
        self.shots = [(i, self._example(pool[i], f"task '{task.name}', few-shot record {i}")) for i in picked]

    def _example(self, rec: dict[str, Any], where: str) -> str:
        task = self.task
        text = render(task.prompt, rec, where)
        if task.kind == "multiple_choice":
            choices = _choices(task, rec, where)
            return text + _continuations(task, rec, choices, where)[_gold_index(task, rec, choices, where)]
        return text + render(task.target, rec, where)

    def __call__(self, index: int, rec: dict[str, Any], where: str) -> str:
        shots = [s for i, s in self.shots if not (self.same_pool and i == index)][:self.task.few_shot]
        sep = self.task.few_shot_separator
        text = "".join(s + sep for s in shots) + render(self.task.prompt, rec, where)
        if self.chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}])
        return text


# -- the task kinds ----------------------------------------------------------------------------------------
def _multiple_choice(task: Task, recs: list[dict], lm: TextModel, prompt: PromptBuilder) -> tuple[dict, list]:
    pairs, spans, golds, conts = [], [], [], []
    for i, rec in enumerate(recs):
        where = f"task '{task.name}', record {i}"
        choices = _choices(task, rec, where)
        golds.append(_gold_index(task, rec, choices, where))
        ctx = prompt(i, rec, where)
        cont = _continuations(task, rec, choices, where)
        spans.append((len(pairs), len(pairs) + len(cont)))
        conts.append(cont)
        pairs += [(ctx, c) for c in cont]
    scores = [s for s, _ in lm.loglikelihood(pairs, task.name)]
    per, samples = [], []
    for (a, b), gold, cont in zip(spans, golds, conts):
        m = scoring.choice_metrics(scores[a:b], [len(c) for c in cont], gold)
        per.append(m)
        samples.append({"gold": gold, "loglikelihoods": scores[a:b], **m})
    return {k: _mean([m[k] for m in per]) for k in ("acc", "acc_norm")}, samples


def _references(task: Task, value: Any, where: str) -> list[str]:
    refs = value if isinstance(value, list) else [value]
    if not refs or not all(isinstance(r, (str, int, float)) for r in refs):
        raise LLMLabError(f"{where}: answer field '{task.answer}' must be a string, a number or a list of them")
    refs = [str(r) for r in refs]
    if task.extract == "gsm8k":  # the reference is a worked solution ending in `#### N`, or a bare number
        refs = [scoring.extract_gsm8k_answer(r) or r for r in refs]
    return refs


def _score_answer(task: Task, prediction: str | None, refs: list[str]) -> float:
    if prediction is None:
        return 0.0
    if task.extract == "gsm8k":  # numbers: compare the normalised strings (normalize_answer would drop '-' and '.')
        return float(prediction in refs)
    return scoring.exact_match(prediction, refs)


def _generate(task: Task, recs: list[dict], lm: TextModel, prompt: PromptBuilder, seed: int) -> tuple[dict, list]:
    prompts, refs = [], []
    for i, rec in enumerate(recs):
        where = f"task '{task.name}', record {i}"
        prompts.append(prompt(i, rec, where))
        refs.append(_references(task, _field(rec, task.answer, where), where))
    outputs = lm.generate(prompts, task.max_new_tokens, task.stop, task.temperature, seed, task.name)
    extract = scoring.EXTRACTORS[task.extract]
    samples = []
    for out, ref in zip(outputs, refs):
        pred = extract(out)
        samples.append({"output": out, "prediction": pred, "references": ref,
                        "exact_match": _score_answer(task, pred, ref)})
    return {"exact_match": _mean([s["exact_match"] for s in samples])}, samples


def _code(task: Task, recs: list[dict], lm: TextModel, prompt: PromptBuilder, seed: int) -> tuple[dict, list]:
    check()  # refuse (LLMLabError: what to install) before generating, rather than run the code unprotected
    prompts = []
    for i, rec in enumerate(recs):
        prompts += [prompt(i, rec, f"task '{task.name}', record {i}")] * task.samples
    outputs = lm.generate(prompts, task.max_new_tokens, task.stop, task.temperature, seed, task.name)
    limits = SandboxLimits(timeout=task.timeout)
    samples, statuses = [], Counter()
    with lm.progress_bar(len(outputs), f"{task.name} tests") as bar:
        for i, rec in enumerate(recs):
            runs = []
            for completion in outputs[i * task.samples:(i + 1) * task.samples]:
                program = render(task.program, {**rec, "completion": completion}, f"task '{task.name}', record {i}")
                result = run_program(program, limits)
                statuses[result.status] += 1
                runs.append({"completion": completion, "status": result.status,
                             "output": result.output[-300:] if not result.passed else ""})
                bar.update(1)
            c = sum(r["status"] == "passed" for r in runs)
            samples.append({"runs": runs, "passed": c, **{f"pass@{k}": scoring.pass_at_k(task.samples, c, k)
                                                           for k in task.k}})
    metrics: dict[str, Any] = {f"pass@{k}": _mean([s[f"pass@{k}"] for s in samples]) for k in task.k}
    metrics["statuses"] = dict(statuses)
    metrics["sandbox"] = describe()
    return metrics, samples


def _pairs(task: Task, recs: list[dict], lm: TextModel) -> tuple[dict, list]:
    pairs, groups = [], []
    for i, rec in enumerate(recs):
        where = f"task '{task.name}', record {i}"
        pairs += [("", str(_field(rec, task.first, where))), ("", str(_field(rec, task.second, where)))]
        groups.append(str(_field(rec, task.group, where)) if task.group else None)
    scores = [s for s, _ in lm.loglikelihood(pairs, task.name)]
    samples = [{"first": scores[2 * i], "second": scores[2 * i + 1], "first_more_likely":
                float(scores[2 * i] > scores[2 * i + 1]), "group": groups[i]} for i in range(len(recs))]
    metrics: dict[str, Any] = {task.metric: _mean([s["first_more_likely"] for s in samples]),
                               "likelihood_diff": _mean([abs(s["first"] - s["second"]) for s in samples])}
    by_group = defaultdict(list)
    for s in samples:
        if s["group"] is not None:
            by_group[s["group"]].append(s["first_more_likely"])
    for g, vals in sorted(by_group.items()):
        metrics[f"{task.metric}/{g}"] = _mean(vals)
    return metrics, samples


def _perplexity(task: Task, recs: list[dict], lm: TextModel) -> tuple[dict, list]:
    texts = [str(_field(rec, task.text, f"task '{task.name}', record {i}")) for i, rec in enumerate(recs)]
    totals = lm.loglikelihood_rolling(texts, task.name)
    n_tokens = sum(len(lm.tokenizer.encode(t, add_bos=False)) for t in texts)
    metrics = scoring.perplexity_metrics(sum(totals), n_tokens, sum(len(t.split()) for t in texts),
                                         sum(len(t.encode()) for t in texts))
    return metrics, [{"loglikelihood": s} for s in totals]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def run_task(task: Task, lm: TextModel, limit: int | None = None, seed: int = 0, data_dir: Path | None = None,
             chat: bool | None = None) -> dict[str, Any]:
    """Evaluate one task on its first `limit` records; returns {"metrics", "samples", "n", ...}."""
    if limit is not None and limit < 1:
        raise LLMLabError(f"--limit must be at least 1, got {limit}")
    records = task.records(data_dir)
    recs = records[:limit] if limit else records
    use_chat = task.chat if chat is None else chat
    if use_chat and not lm.tokenizer.chat_template:
        raise LLMLabError(f"task '{task.name}' asks for the chat template, but the tokenizer has none; "
                          "pass --chat false")
    torch.manual_seed(seed)
    start = time.monotonic()
    if task.kind in ("pairs", "perplexity"):
        metrics, samples = (_pairs if task.kind == "pairs" else _perplexity)(task, recs, lm)
    else:
        prompt = PromptBuilder(task, records, data_dir, seed, lm.tokenizer, use_chat)
        if task.kind == "multiple_choice":
            metrics, samples = _multiple_choice(task, recs, lm, prompt)
        elif task.kind == "generate":
            metrics, samples = _generate(task, recs, lm, prompt, seed)
        else:
            metrics, samples = _code(task, recs, lm, prompt, seed)
    return {"kind": task.kind, "category": task.category, "n": len(recs), "of": len(records),
            "few_shot": task.few_shot, "chat": use_chat, "metrics": metrics, "samples": samples,
            "seconds": round(time.monotonic() - start, 2)}


def evaluate_tasks(tasks: Sequence[Task], lm: TextModel, limit: int | None = None, seed: int = 0,
                   data_dir: Path | None = None, chat: bool | None = None, out: Path | None = None,
                   meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every task; write OUT/results.json and OUT/samples_<task>.jsonl when `out` is given; return the
    results (without the samples). results.json is rewritten after each task, so an interrupted run keeps the
    tasks it finished."""
    for t in tasks:  # fail on a missing data file before spending minutes on the tasks before it
        t.check_data(data_dir)
    results: dict[str, Any] = {**(meta or {}), "limit": limit, "seed": seed, "tasks": {}}
    for t in tasks:
        res = run_task(t, lm, limit, seed, data_dir, chat)
        samples = res.pop("samples")
        results["tasks"][t.name] = res
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            with (out / f"samples_{t.name}.jsonl").open("w") as fh:
                fh.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
            (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return results


def format_table(results: dict[str, Any]) -> str:
    """A plain-text (Markdown) table: one row per task and metric."""
    lines = ["| task | category | n | metric | value |", "|---|---|---:|---|---:|"]
    for name, res in results["tasks"].items():
        for metric, value in res["metrics"].items():
            if isinstance(value, (int, float)):
                lines.append(f"| {name} | {res['category']} | {res['n']} | {metric} | {value:.4g} |")
    return "\n".join(lines)
