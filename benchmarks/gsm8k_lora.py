"""GSM8K before and after LoRA: exact match of the final number on a fixed test subset, greedy, batched.

Trains LoRA on the first --train-examples problems of ../shared/data/gsm8k_train.jsonl (question -> the worked
answer ending in its `#### N` line, rendered with the model's chat template, loss on the answer only) and scores
the first --test-examples problems of gsm8k_test.jsonl before and after: the number after the model's `####`
(or, without one, the last number it wrote) must equal the reference's `#### N`, read as `llmlab evaluate` reads
GSM8K answers (`llmlab.eval.scoring.extract_gsm8k_answer`). The data stays outside the repo.

    python benchmarks/gsm8k_lora.py --ckpt checkpoints/smollm2-135m-instruct --out runs/gsm8k-lora
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import islice
from pathlib import Path

from llmlab.eval.scoring import extract_gsm8k_answer
from llmlab.jsonl import iter_jsonl

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def read_jsonl(path: Path, n: int) -> list[dict]:
    """The first `n` records of a JSONL file."""
    return [line.record for line in islice(iter_jsonl(path), n)]


def exact_match(ckpt: Path, problems: list[dict], adapter: Path | None, max_new_tokens: int,
                batch: int) -> tuple[float, list[str]]:
    """Share of `problems` whose greedy answer's final number equals the reference; and the answers."""
    from llmlab.generate import SamplingParams, eos_token_ids, generate
    from llmlab.loading import load_for_inference

    model, tokenizer, gen_config = load_for_inference(ckpt, [adapter] if adapter else [], device="cpu",
                                                      dtype="float32", quantize="none")
    texts: list[str] = []
    for i in range(0, len(problems), batch):
        ids = [tokenizer.encode_chat([{"role": "user", "content": p["question"]}]) for p in problems[i: i + batch]]
        out = generate(model, tokenizer, ids, max_new_tokens, SamplingParams(temperature=0.0),
                       eos_token_ids(tokenizer, gen_config))
        texts += [c.text for c in out]
        print(f"  scored {len(texts)}/{len(problems)}", file=sys.stderr, flush=True)
    hits = sum(extract_gsm8k_answer(t) == extract_gsm8k_answer(p["answer"]) for t, p in zip(texts, problems))
    return hits / len(problems), texts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=Path("checkpoints/smollm2-135m-instruct"))
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding gsm8k_train.jsonl, gsm8k_test.jsonl")
    parser.add_argument("--out", type=Path, default=Path("runs/gsm8k-lora"))
    parser.add_argument("--train-examples", type=int, default=256)
    parser.add_argument("--test-examples", type=int, default=50)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=384)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--eval-batch", type=int, default=25)
    args = parser.parse_args(argv)
    train_file, test_file = args.data / "gsm8k_train.jsonl", args.data / "gsm8k_test.jsonl"
    for f in (train_file, test_file):
        if not f.is_file():
            sys.exit(f"gsm8k_lora: {f} not found; this script needs the GSM8K JSONL files in --data "
                     f"(default ../shared/data beside the checkout)")

    from llmlab.args import LoRAConfig, TrainConfig
    from llmlab.finetune import finetune

    test = read_jsonl(test_file, args.test_examples)
    t0 = time.perf_counter()
    before, _ = exact_match(args.ckpt, test, None, args.max_new_tokens, args.eval_batch)
    t_before = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    subset = args.out / "train-subset.jsonl"
    subset.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(train_file, args.train_examples)))
    cfg = TrainConfig(lr=args.lr, warmup_steps=max(1, args.steps // 10), max_steps=args.steps,
                      batch_size=args.batch_size, seq_len=args.seq_len, weight_decay=0.0, eval_every=0,
                      eval_batches=2, save_every=0, log_every=1, seed=0)
    t1 = time.perf_counter()
    finetune(args.ckpt, data=subset, out=args.out, method="lora", train=cfg, val_fraction=0.05, pack=True,
             lora=LoRAConfig(r=16, alpha=32.0, targets="all"))
    t_train = time.perf_counter() - t1
    t2 = time.perf_counter()
    after, texts = exact_match(args.ckpt, test, args.out / "final", args.max_new_tokens, args.eval_batch)
    result = {"train_examples": args.train_examples, "test_examples": len(test), "steps": args.steps,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "exact_match_before": before,
              "exact_match_after": after, "seconds_eval_before": t_before, "seconds_train": t_train,
              "seconds_eval_after": time.perf_counter() - t2, "sample_after": texts[0]}
    (args.out / "gsm8k-result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
