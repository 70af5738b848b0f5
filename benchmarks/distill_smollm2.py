"""SmolLM2-135M-Instruct distilled into a student with every other block: size, speed and held-out perplexity.

Three models are measured the same way: the teacher, the student before distillation (the teacher's blocks
0, 2, 4, ..., embeddings, final norm and head copied, nothing trained) and the same student after `llmlab distill`
for a fixed number of steps on GSM8K training problems (question -> worked answer, chat template, loss on the
answer only). For each: parameters, greedy batch-1 generation tokens/s (the same prompts, exactly --gen-tokens new
tokens each, fp32), and perplexity and KL(teacher || model) per answer token on the first --eval-examples
problems of gsm8k_test.jsonl (held out: the training problems come from gsm8k_train.jsonl). The data stays outside
the repo (../shared/data); results go to OUT/results.json and a markdown table on stdout.

    flock /tmp/llmlab-cpu.lock python benchmarks/distill_smollm2.py --ckpt checkpoints/smollm2-135m-instruct \
        --out runs/distill-smollm2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from gsm8k_lora import read_jsonl  # the sibling benchmark (this folder is on sys.path when run as a script)

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
PROMPTS = ["Write a short poem about the sea.", "Explain what a prime number is.",
           "Give three tips for learning to cook."]


def held_out_rows(tokenizer, records: list[dict], max_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input ids, labels) of each question/answer pair, rendered as fine-tuning renders it (answer tokens labelled)."""
    from llmlab.instruct import record_to_conversations, shifted, tokenize_conversation

    rows = []
    for i, record in enumerate(records):
        conv = record_to_conversations(record, f"gsm8k_test:{i + 1}")[0]
        out = shifted(*tokenize_conversation(tokenizer, conv), max_len)
        if out is not None:
            rows.append((torch.from_numpy(out[0])[None], torch.from_numpy(out[1])[None]))
    return rows


@torch.inference_mode()
def teacher_log_probs(teacher, rows) -> list[torch.Tensor]:
    """The teacher's log-probabilities at the labelled positions of each row (computed once, reused per model)."""
    return [F.log_softmax(teacher(ids).float()[labels != -100], -1) for ids, labels in rows]


@torch.inference_mode()
def perplexity_and_kl(model, rows, teacher_logp: list[torch.Tensor]) -> tuple[float, float]:
    """exp(mean cross-entropy) and mean KL(teacher || model) over every labelled token of `rows`."""
    nll = kl = 0.0
    count = 0
    for (ids, labels), log_p in zip(rows, teacher_logp):
        keep = labels != -100
        log_q = F.log_softmax(model(ids).float()[keep], -1)
        nll -= log_q.gather(-1, labels[keep][:, None]).sum().item()
        kl += (log_p.exp() * (log_p - log_q)).sum().item()
        count += int(keep.sum())
    return math.exp(nll / count), kl / count


def generation_speed(model, tokenizer, n_tokens: int) -> float:
    """Generated tokens per second, greedy, batch 1, exactly n_tokens per prompt (EOS ignored), after a warm-up."""
    from llmlab.generate import generate

    prompts = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    generate(model, tokenizer, prompts[:1], 4, eos_ids=[])  # warm-up
    t0 = time.perf_counter()
    made = sum(len(generate(model, tokenizer, [p], n_tokens, eos_ids=[])[0].token_ids) for p in prompts)
    return made / (time.perf_counter() - t0)


def quality(name: str, model, teacher_logp, rows) -> dict:
    """Parameters, blocks, held-out perplexity and KL to the teacher of one model."""
    model.eval()
    t0 = time.perf_counter()
    ppl, kl = perplexity_and_kl(model, rows, teacher_logp)
    print(f"{name}: perplexity {ppl:.2f}, KL {kl:.3f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return {"model": name, "params": model.config.num_params(), "blocks": model.config.num_hidden_layers,
            "perplexity": ppl, "kl_to_teacher": kl}


def speeds(models: list, tokenizer, n_tokens: int, rounds: int) -> list[float]:
    """Median generation tokens/s of each model over `rounds` rounds that take the models in turn, so that a
    change in the machine's load during the measurement touches every model alike."""
    runs: list[list[float]] = [[] for _ in models]
    for r in range(rounds):
        for i, model in enumerate(models):
            runs[i].append(generation_speed(model, tokenizer, n_tokens))
        print(f"generation round {r + 1}: " + ", ".join(f"{x[-1]:.1f}" for x in runs) + " tokens/s", file=sys.stderr)
    return [sorted(x)[len(x) // 2] for x in runs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=Path("checkpoints/smollm2-135m-instruct"))
    ap.add_argument("--out", type=Path, default=Path("runs/distill-smollm2"))
    ap.add_argument("--train-examples", type=int, default=2000)
    ap.add_argument("--eval-examples", type=int, default=25)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--loss", default="forward_kl")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--gen-rounds", type=int, default=3)
    args = ap.parse_args()
    if not (DATA / "gsm8k_train.jsonl").is_file():
        print(f"{DATA}/gsm8k_train.jsonl not found: this benchmark needs the shared data folder", file=sys.stderr)
        return 1

    from llmlab.args import DistillConfig, TrainConfig
    from llmlab.checkpoint import load_checkpoint
    from llmlab.distill import distill
    from llmlab.distill_method import parse_layers, student_from_teacher
    from llmlab.tokenizer import Tokenizer

    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_folder(args.ckpt)
    teacher = load_checkpoint(args.ckpt)
    rows = held_out_rows(tokenizer, read_jsonl(DATA / "gsm8k_test.jsonl", args.eval_examples), args.seq_len)
    layers = parse_layers("every-other", teacher.config.num_hidden_layers)
    logp = teacher_log_probs(teacher, rows)
    untrained = student_from_teacher(teacher, layers)
    results = [quality("teacher", teacher, logp, rows),
               quality("student, layer-dropped, untrained", untrained, logp, rows)]

    train_file = args.out / "gsm8k_train_subset.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(DATA / "gsm8k_train.jsonl",
                                                                         args.train_examples)))
    cfg = TrainConfig(lr=args.lr, warmup_steps=max(1, args.steps // 10), max_steps=args.steps,
                      batch_size=args.batch_size, seq_len=args.seq_len, weight_decay=0.0, eval_every=0,
                      eval_batches=1, save_every=0, log_every=1, seed=0)
    run = args.out / "run"
    t0 = time.perf_counter()
    distill(teacher=args.ckpt, data=train_file, out=run, student_layers="every-other", train=cfg,
            kd=DistillConfig(loss=args.loss, alpha=args.alpha), val_fraction=0.02, pack=True, resume="no")
    wall = time.perf_counter() - t0
    rows_csv = (run / "metrics.csv").read_text().splitlines()
    header, last = rows_csv[0].split(","), rows_csv[-1].split(",")
    train_s = float(last[header.index("elapsed_s")])
    tokens = int(float(last[header.index("tokens")]))
    student = load_checkpoint(run / "final")
    results.append(quality("student, distilled", student, logp, rows))
    for r, speed in zip(results, speeds([teacher, untrained, student], tokenizer, args.gen_tokens, args.gen_rounds)):
        r["gen_tokens_per_s"] = speed

    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "train_seconds": train_s, "wall_seconds": wall,
               "train_tokens": tokens, "held_out_answer_tokens": sum(int((lab != -100).sum()) for _, lab in rows),
               "threads": torch.get_num_threads(), "results": results}
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"training: {args.steps} steps, {tokens:,} tokens, {train_s / 60:.1f} min (loop time; "
          f"{wall / 60:.1f} min with loading and evaluation)")
    print("| model | blocks | parameters | generation tokens/s | held-out perplexity | KL to teacher |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['blocks']} | {r['params'] / 1e6:.1f}M | {r['gen_tokens_per_s']:.1f} | "
              f"{r['perplexity']:.2f} | {r['kl_to_teacher']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
