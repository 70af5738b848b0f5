"""Fine-tuning speed and memory: llmlab's full, freeze, adapter, LoRA and QLoRA beside HF transformers + PEFT LoRA.

Every method trains the same checkpoint on the same random token batches with the same step
(`llmlab.train.train_step`: forward, next-token loss, backward, clipping, AdamW with the loop's parameter groups);
HF + PEFT LoRA uses the same LoRA rank, alpha and targets. Each method runs in its own subprocess so that its peak
memory is its own: on CPU the growth of the peak resident set over the process's size before the model was loaded
(weights, gradients, optimizer state and activations together), on CUDA `torch.cuda.max_memory_allocated`.

    python benchmarks/bench_finetune.py --ckpt checkpoints/smollm2-135m-instruct --batch-size 4 --seq-len 128 \\
        --steps 6 --docs docs/finetune.md
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import rss_bytes  # noqa: E402

METHODS = ("full", "freeze", "adapter", "lora", "qlora", "hf-peft-lora")
REFERENCE = "hf-peft-lora"
MARK_BEGIN, MARK_END = "<!-- bench_finetune:begin -->", "<!-- bench_finetune:end -->"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (checked: steps > warmup, known methods)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="checkpoints/smollm2-135m-instruct", help="HF-format checkpoint folder")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, among {', '.join(METHODS)}")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="training steps, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lora-targets", default="q,k,v,o,gate,up,down")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--docs", type=Path, help="write the table into this markdown file (between markers) and "
                        "the bar chart into img/finetune-bench.png beside it")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # a child process's method
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must be larger than --warmup")
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.method_list if m not in METHODS]
    if bad or not args.method_list:
        parser.error(f"--methods: unknown {bad or args.methods!r}; choose among {', '.join(METHODS)}")
    return args


def peft_lora(model, cfg):
    """`model` (HF) with PEFT LoRA adapters of the same rank, alpha, dropout and targets as LoRAConfig `cfg`."""
    import peft

    targets = [f"{t}_proj" for t in cfg.target_list()]
    return peft.get_peft_model(model, peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                      target_modules=targets))


def _hf_peft_lora(ckpt: str, cfg) -> tuple:
    import torch
    import transformers
    from bench_train import hf_method

    model = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa")
    return peft_lora(model, cfg), hf_method()


def run_method(args: argparse.Namespace) -> dict:
    """Train `args.method` for `args.steps` steps in this process; tokens/s, peak memory and losses."""
    import torch

    from llmlab.args import LoRAConfig, TrainConfig
    from llmlab.checkpoint import load_checkpoint
    from llmlab.methods import make_method
    from llmlab.train import Env, build_optimizer, train_step

    if args.threads:
        torch.set_num_threads(args.threads)
    lora = LoRAConfig(r=args.lora_r, alpha=args.lora_alpha, targets=args.lora_targets)
    import peft  # noqa: F401  every side imports the same libraries before the baseline, so none pays for them
    import transformers  # noqa: F401

    if args.method == "qlora":
        import bitsandbytes  # noqa: F401
    base_rss = rss_bytes()
    if args.method == REFERENCE:
        model, method = _hf_peft_lora(args.ckpt, lora)
        vocab = model.config.vocab_size
    else:
        method = make_method(args.method, args.ckpt, lora=lora)
        model = method.prepare(load_checkpoint(args.ckpt, dtype=torch.float32))
        vocab = model.config.vocab_size
    model.train()
    tokens = torch.randint(0, vocab, (args.steps, args.batch_size, args.seq_len + 1),
                           generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": t[:, :-1], "labels": t[:, 1:]} for t in tokens]
    cfg = TrainConfig(lr=1e-4, weight_decay=0.0, grad_clip=1.0, precision="fp32")
    named = method.trainable_parameters(model) if args.method != REFERENCE else \
        [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(named, cfg, Env(device=torch.device("cpu")))
    params = [p for _, p in named]
    losses, t0 = [], 0.0
    for i, batch in enumerate(batches):
        if i == args.warmup:
            t0 = time.perf_counter()
        loss, _ = train_step(model, method, optimizer, params, [batch], cfg.grad_clip, None)
        losses.append(float(loss))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    return {"tokens_per_s": (args.steps - args.warmup) * args.batch_size * args.seq_len / seconds,
            "peak_bytes": peak, "trainable": sum(p.numel() for p in params), "first_loss": losses[0],
            "last_loss": losses[-1]}


def table(results: dict[str, dict]) -> str:
    """Markdown table of the results with ratios against HF + PEFT LoRA (when it ran)."""
    ref = results.get(REFERENCE)
    lines = ["| method | trainable params | tokens/s | vs HF+PEFT LoRA | peak memory (MiB) | vs HF+PEFT LoRA |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        mem = f"{r['peak_bytes'] / max(ref['peak_bytes'], 1):.2f}x" if ref else "-"
        lines.append(f"| {name} | {r['trainable'] / 1e6:,.2f}M | {r['tokens_per_s']:,.0f} | {speed} | "
                     f"{r['peak_bytes'] / 2**20:,.0f} | {mem} |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    """Two bar charts side by side: tokens/s and peak memory per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    colors = ["tab:gray" if n == REFERENCE else "tab:blue" for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(names, [results[n]["tokens_per_s"] for n in names], color=colors)
    a.set_ylabel("training tokens/s (higher is better)")
    b.bar(names, [results[n]["peak_bytes"] / 2**20 for n in names], color=colors)
    b.set_ylabel("peak memory growth, MiB (lower is better)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(doc: Path, block: str) -> None:
    """Put `block` between the markers of `doc` (appended, with the markers, when they are missing)."""
    text = doc.read_text() if doc.is_file() else "# Fine-tuning\n"
    new = f"{MARK_BEGIN}\n{block}\n{MARK_END}"
    if MARK_BEGIN in text and MARK_END in text:
        text = re.sub(re.escape(MARK_BEGIN) + ".*?" + re.escape(MARK_END), lambda _: new, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    if args.method:
        print(json.dumps(run_method(args)))
        return {}
    if not (Path(args.ckpt) / "config.json").is_file():
        sys.exit(f"bench_finetune: no checkpoint at {args.ckpt} (llmlab download smollm2-135m-instruct --out ...)")
    raw = sys.argv[1:] if argv is None else argv
    results = {}
    for name in args.method_list:
        proc = subprocess.run([sys.executable, __file__, *raw, "--method", name], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{name} run failed:\n{proc.stderr[-4000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]['tokens_per_s']:,.0f} tokens/s, "
              f"{results[name]['peak_bytes'] / 2**20:,.0f} MiB", file=sys.stderr, flush=True)
    title = (f"{args.ckpt}, batch {args.batch_size} x {args.seq_len} tokens, {args.steps - args.warmup} timed steps "
             f"after {args.warmup}, fp32 CPU, LoRA r={args.lora_r} alpha={args.lora_alpha} on {args.lora_targets}")
    text = table(results)
    print(title + "\n" + text)
    if args.docs:
        png = args.docs.parent / "img" / "finetune-bench.png"
        plot(results, png, title)
        write_docs(args.docs, f"{title}\n\n{text}\n\n![tokens/s and peak memory per method](img/{png.name})")
    return results


if __name__ == "__main__":
    main()
