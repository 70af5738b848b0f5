"""`make demo`: the notebook's fine-tuning story on the default model, in three steps.

1. Ask SmolLM2-135M-Instruct about Kelvaro, an island we made up (examples/data/kelvaro.jsonl): it cannot know.
2. LoRA fine-tune on those 50 examples with `llmlab finetune --config examples/finetune-demo.yaml` (progress bar).
3. Ask again with the adapter applied, unmerged (`--adapter`), plus one unrelated question to see what stayed.
The questions are the held-out phrasings (examples/data/kelvaro-val.jsonl), not the ones trained on.

    python examples/demo.py [--checkpoint checkpoints/smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "finetune-demo.yaml"
CONTROL = "What is the capital of France?"


def questions(path: Path = HERE / "data" / "kelvaro-val.jsonl", n: int = 5) -> list[str]:
    """The first `n` held-out questions of the demo set."""
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["instruction"] for r in lines[:n]]


def answers(checkpoint: Path, prompts: list[str], adapter: Path | None = None, max_new_tokens: int = 40) -> list[str]:
    """Greedy answers to `prompts` as chat messages, in one batch (with the adapter applied if given)."""
    from llmlab.generate import SamplingParams, eos_token_ids, generate
    from llmlab.loading import load_for_inference

    # the defaults, as `llmlab generate/chat` run: the GGUF's own blocks, bf16 where the CPU computes it natively
    model, tokenizer, gen_config = load_for_inference(checkpoint, [adapter] if adapter else [], device="cpu")
    ids = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    out = generate(model, tokenizer, ids, max_new_tokens, SamplingParams(temperature=0.0),
                   eos_token_ids(tokenizer, gen_config))
    return [c.text.strip() for c in out]


def show(title: str, prompts: list[str], replies: list[str]) -> None:
    print(f"\n=== {title} ===", flush=True)
    for p, r in zip(prompts, replies):
        print(f"Q: {p}\nA: {' '.join(r.split())}\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/smollm2-135m-instruct"))
    parser.add_argument("--out", type=Path, default=Path("runs/demo-kelvaro"), help="run folder (replaced)")
    args = parser.parse_args()
    if not (args.checkpoint / "config.json").is_file():
        sys.exit(f"demo: no model at {args.checkpoint}; run `llmlab download smollm2-135m-instruct --out "
                 f"{args.checkpoint}` first (make demo does)")
    prompts = questions() + [CONTROL]
    t0 = time.perf_counter()
    show(f"BEFORE fine-tuning: {args.checkpoint}", prompts, answers(args.checkpoint, prompts))

    print("=== LoRA fine-tuning on examples/data/kelvaro.jsonl (50 examples about a made-up island) ===", flush=True)
    shutil.rmtree(args.out, ignore_errors=True)
    cmd = [str(Path(sys.executable).with_name("llmlab")), "finetune", "--config", str(CONFIG),
           str(args.checkpoint), "--out", str(args.out)]
    print("$ " + " ".join(cmd[1:]).replace(str(HERE.parent) + "/", ""), flush=True)
    subprocess.run(cmd, check=True)

    adapter = args.out / "final"
    show(f"AFTER fine-tuning: {args.checkpoint} --adapter {adapter}", prompts,
         answers(args.checkpoint, prompts, adapter))
    print(f"demo done in {time.perf_counter() - t0:.0f} s. Try: llmlab chat {args.checkpoint} --adapter {adapter}")


if __name__ == "__main__":
    main()
