"""The RNN the Transformer replaced: an LSTM against a LLaMA of the same size, side by side in one run.

Two measurements, written as a markdown table and a PNG plot (docs/rnn-vs-transformer.md, docs/img/):
1. Training cost against sequence length T at an equal number of tokens per batch (batch = tokens / T), for
   lstm-10m, micro-10m with plain "math" attention (the T x T attention matrix is materialised, so its quadratic
   memory shows) and micro-10m with the default SDPA kernel (on CPU and CUDA a flash kernel that never stores the
   matrix: its memory stays flat although its FLOPs still grow with T). Each measurement runs in its own subprocess
   (peak RSS growth on CPU, `torch.cuda.max_memory_allocated` on CUDA), with `llmlab.train.train_step`.
   At equal tokens per batch a flat curve means a cost linear in T per sequence; a rising one a quadratic term.
2. Validation loss at equal training time on Tiny Shakespeare (8192-token BPE, as examples/ prepares it): each
   model trains through the one loop (`llmlab.train.train`) for the number of steps its measured step time fits
   into --minutes; the plot shows validation loss against training time (the loop's per-step throughput summed,
   validation passes excluded).

    python benchmarks/bench_rnn_vs_transformer.py                        # full grid, 3 minutes each
    python benchmarks/bench_rnn_vs_transformer.py --seq-lens 64 256 1024 --minutes 1
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import rss_bytes  # noqa: E402  (the benchmarks folder is not a package)

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {  # name: (arch, preset, attention backend)
    "lstm": ("lstm", "lstm-10m", None),
    "llama-math": ("llama", "micro-10m", "math"),
    "llama-sdpa": ("llama", "micro-10m", "default"),
}
READING = (
    "Reading it: at equal tokens per batch a flat curve is a cost linear in T per sequence. The LSTM's memory and "
    "time per token stay about flat (each step carries only a (batch, hidden) state). With math attention the "
    "LLaMA's extra memory grows in proportion to T (the batch x heads x T x T attention probabilities kept for the "
    "backward pass: quadratic per sequence) and its tokens/s falls. Flash attention removes the quadratic memory "
    "but not the quadratic FLOPs, so its tokens/s still falls, more slowly. Not measured here: on a GPU the "
    "Transformer runs all T positions in parallel while the LSTM's T steps run one after another, which is the "
    "sequential-vs-parallel half of the argument; on a CPU core there is little parallelism to lose."
)
LR = {"lstm": 2e-3, "llama": 1e-3}  # each architecture at its usual Adam learning rate for this size


def build(arch: str, preset: str, max_len: int):
    """A freshly initialised model of `arch` (the LLaMA's context raised to `max_len`) and its training method."""
    import torch

    from llmlab.config import ModelConfig
    from llmlab.methods import Full
    from llmlab.model import build_model
    from llmlab.rnn import FullLSTM, LSTMConfig, build_lstm

    torch.manual_seed(0)
    if arch == "lstm":
        return build_lstm(LSTMConfig.from_name(preset)), FullLSTM()
    config = ModelConfig.from_name(preset, max_position_embeddings=max(max_len, 512))
    return build_model(config), Full()


def measure(args: argparse.Namespace) -> dict:
    """One (variant, T) point, in this (child) process: tokens/s and peak memory of training steps."""
    from contextlib import nullcontext

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from llmlab.args import TrainConfig
    from llmlab.precision import autocast_dtype
    from llmlab.train import Env, build_optimizer, train_step

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    arch, preset, backend = VARIANTS[args.variant]
    T = args.seq_len
    B = max(1, args.tokens_per_batch // T)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_rss = rss_bytes()
    model, method = build(arch, preset, T)
    vocab = model.config.vocab_size
    model.to(device).train()
    cfg = TrainConfig(lr=1e-3, precision=args.precision)
    named = method.trainable_parameters(method.prepare(model))
    optimizer = build_optimizer(named, cfg, Env(device=device))
    params = [p for _, p in named]
    amp = autocast_dtype(args.precision, device)
    gen = torch.Generator().manual_seed(0)
    attention = sdpa_kernel(SDPBackend.MATH) if backend == "math" else nullcontext()
    t0 = None
    with attention:
        for i in range(args.steps):
            if i == args.warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            tokens = torch.randint(0, vocab, (B, T + 1), generator=gen)
            train_step(model, method, optimizer, params, [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}],
                       cfg.grad_clip, amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    seconds = (time.perf_counter() - t0) / (args.steps - args.warmup)
    return {"variant": args.variant, "seq_len": T, "batch": B, "tokens_per_s": B * T / seconds,
            "step_s": seconds, "peak_bytes": peak, "params": sum(p.numel() for p in params), "device": str(device)}


def scaling(args: argparse.Namespace) -> list[dict]:
    rows = []
    for T in args.seq_lens:
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--child", variant, "--seq-len", str(T),
                   "--tokens-per-batch", str(args.tokens_per_batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--threads", str(args.threads), "--device", args.device,
                   "--precision", args.precision]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{variant} at T={T} failed:\n{proc.stderr[-4000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"T={T:5d} batch={row['batch']:3d} {variant:11s} {row['tokens_per_s']:9,.0f} tok/s  "
                  f"{row['peak_bytes'] / 2**20:8,.0f} MiB", flush=True)
            rows.append(row)
    return rows


def equal_time(args: argparse.Namespace, step_s: dict[str, float], work: Path) -> dict[str, dict]:
    """Train each architecture on Tiny Shakespeare for about --minutes through `llmlab.train.train`."""
    import torch

    from llmlab.args import TrainConfig
    from llmlab.data import TokenDataset, prepare
    from llmlab.metrics import read_metrics
    from llmlab.train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    data = prepare([args.data], work / "data", train_tokenizer=8192, val_fraction=0.1, seed=0, progress=False)
    T = args.train_seq_len
    out = {}
    for variant in ("lstm", "llama-sdpa"):
        arch, preset, _ = VARIANTS[variant]
        steps = max(10, int(args.minutes * 60 / step_s[variant]))
        cfg = TrainConfig(lr=LR[arch], warmup_steps=max(1, steps // 10), max_steps=steps,
                          batch_size=max(1, args.tokens_per_batch // T), seq_len=T, eval_every=max(1, steps // 5),
                          eval_batches=4, save_every=0, keep_last=1, log_every=1, seed=0,
                          device=args.device, precision=args.precision)
        ds = TokenDataset(data, T, 0)
        model, method = build(arch, preset, T)
        print(f"{variant}: {steps} steps of {cfg.batch_size}x{T} tokens (~{args.minutes} min)", flush=True)
        result = train(model, method, ds, cfg, work / variant, tokenizer=ds.tokenizer(), resume="no")
        curve, seconds, seen = [], 0.0, 0
        for r in sorted(read_metrics(work / variant), key=lambda r: r["step"]):
            if r["tokens_per_s"]:  # the loop's throughput of each step, validation passes excluded
                seconds += (r["tokens"] - seen) / r["tokens_per_s"]
                seen = r["tokens"]
            if r["val_loss"] is not None:
                curve.append((seconds, r["val_loss"]))
        out[variant] = {"steps": result.step, "tokens": result.step * cfg.batch_size * T, "lr": cfg.lr,
                        "elapsed_s": seconds, "curve": curve,
                        "val_start": result.val_losses[0], "val_end": result.val_losses[result.step]}
    return out


def time_exponent(rows: list[dict], variant: str) -> float:
    """k in (time per sequence) ~ T^k between the two longest sequence lengths: 1 = linear, 2 = quadratic."""
    (t1, a), (t2, b) = sorted((r["seq_len"], r) for r in rows if r["variant"] == variant)[-2:]
    return math.log((b["step_s"] / b["batch"]) / (a["step_s"] / a["batch"])) / math.log(t2 / t1)


def write_report(args: argparse.Namespace, rows: list[dict], runs: dict[str, dict] | None, seconds: float,
                 missing: str = "not run") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = ROOT / "docs" / "img" / "rnn-vs-transformer.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3 if runs else 2, figsize=(16 if runs else 11, 4.5))
    for variant in VARIANTS:
        mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["seq_len"])
        lens = [r["seq_len"] for r in mine]
        axes[0].plot(lens, [r["tokens_per_s"] for r in mine], "o-", label=variant)
        axes[1].plot(lens, [max(r["peak_bytes"], 1) / 2**20 for r in mine], "o-", label=variant)
    for ax, title in zip(axes[:2], ("training tokens/s", "peak memory (MiB)")):
        ax.set(xscale="log", ylim=(0, None), xlabel=f"sequence length T ({args.tokens_per_batch} tokens per batch)",
               title=title)
        ax.set_xticks(args.seq_lens, [str(t) for t in args.seq_lens])
        ax.legend()
        ax.grid(alpha=0.3)
    if runs:
        for variant, run in runs.items():
            xs, ys = zip(*run["curve"])
            axes[2].plot([x / 60 for x in xs], ys, "o-", label=f"{variant} ({run['steps']} steps)")
        axes[2].set(xlabel="training time (min, validation passes excluded)", ylabel="validation loss",
                    title="Tiny Shakespeare, equal training time")
        axes[2].legend()
        axes[2].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(img, dpi=110)

    device = rows[0]["device"]
    params = {r["variant"]: r["params"] for r in rows}
    lines = [
        "# The RNN baseline: LSTM vs Transformer",
        "",
        "Written by `benchmarks/bench_rnn_vs_transformer.py` (the notebook's first chapter: sequential vs parallel",
        "training, linear vs quadratic cost in sequence length). Command:",
        "",
        "```",
        "python benchmarks/bench_rnn_vs_transformer.py " + " ".join(sys.argv[1:]),
        "```",
        "",
        f"Device: {device}, torch threads: {args.threads or 'default'}, precision {args.precision}; "
        f"total run {seconds / 60:.1f} min. Models: lstm-10m ({params['lstm'] / 1e6:.1f}M parameters: 3 LSTM "
        f"layers, hidden 512, tied embeddings) and micro-10m ({params['llama-sdpa'] / 1e6:.1f}M: 6 LLaMA blocks, "
        "hidden 320, tied embeddings), both with an 8192-token vocabulary.",
        "",
        "![LSTM vs Transformer](img/rnn-vs-transformer.png)",
        "",
        f"## Training cost against sequence length ({args.tokens_per_batch} tokens per batch)",
        "",
        f"Batch = {args.tokens_per_batch} / T sequences, {args.steps - args.warmup} timed steps after {args.warmup}, "
        "random tokens, one subprocess per cell. Peak memory: growth of the peak resident set over the process "
        "before the model was built (CPU) or `max_memory_allocated` (CUDA): weights, AdamW state, activations. "
        "`llama-math` forces SDPA's math backend, which materialises the T x T attention matrix; `llama-sdpa` uses "
        "the default kernel (flash attention on this device), which never stores it.",
        "",
        "| T | batch | " + " | ".join(f"{v} tok/s | {v} MiB" for v in VARIANTS) + " |",
        "|---|---|" + "---|---|" * len(VARIANTS),
    ]
    for T in args.seq_lens:
        cells = {r["variant"]: r for r in rows if r["seq_len"] == T}
        batch = next(iter(cells.values()))["batch"]
        lines.append(f"| {T} | {batch} | " + " | ".join(
            f"{cells[v]['tokens_per_s']:,.0f} | {cells[v]['peak_bytes'] / 2**20:,.0f}" for v in VARIANTS) + " |")
    t0, t1, t2 = min(args.seq_lens), *sorted(args.seq_lens)[-2:]
    lines += ["", "The weights, AdamW state and logits take the same memory at every T (equal tokens), so what "
              f"grows is the part that depends on T. Growth from T={t0} to T={t2} at equal tokens per batch, and "
              f"the exponent k of time per sequence ~ T^k between T={t1} and T={t2} (1 = linear, 2 = quadratic):", "",
              f"| model | tokens/s at T={t2} / at T={t0} | extra peak memory at T={t2} (MiB) | k (time) |",
              "|---|---|---|---|"]
    for v in VARIANTS:
        cell = {r["seq_len"]: r for r in rows if r["variant"] == v}
        lines.append(f"| {v} | {cell[t2]['tokens_per_s'] / cell[t0]['tokens_per_s']:.2f} | "
                     f"{(cell[t2]['peak_bytes'] - cell[t0]['peak_bytes']) / 2**20:+,.0f} | "
                     f"{time_exponent(rows, v):.2f} |")
    lines += ["", READING]
    if runs:
        lines += ["", f"## Validation loss at equal training time ({args.minutes} min each)", "",
                  f"Tiny Shakespeare ({args.data}), 8192-token BPE trained on it, 10% held out; batches of "
                  f"{args.tokens_per_batch // args.train_seq_len} x {args.train_seq_len} tokens; steps = the minutes "
                  "divided by the step time measured above at that T; warmup 10% then cosine; each architecture at "
                  "its usual learning rate. Training time: the loop's own per-step throughput summed, validation "
                  "passes excluded.", "",
                  "| model | LR | steps | tokens | training time (s) | val loss start | val loss end |",
                  "|---|---|---|---|---|---|---|"]
        for v, r in runs.items():
            lines.append(f"| {v} | {r['lr']:g} | {r['steps']} | {r['tokens']:,} | {r['elapsed_s']:.0f} | "
                         f"{r['val_start']:.3f} | {r['val_end']:.3f} |")
    else:
        lines += ["", f"Validation loss at equal training time: {missing}."]
    doc = ROOT / "docs" / "rnn-vs-transformer.md"
    doc.write_text("\n".join(lines) + "\n")
    print(f"saved {doc} and {img}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--tokens-per-batch", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3, help="training steps per measurement, warm-up included")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--minutes", type=float, default=3.0, help="training time of each model on the corpus")
    parser.add_argument("--train-seq-len", type=int, default=256, help="sequence length of the equal-time runs")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", help="auto (bf16 autocast on CUDA), fp32 or bf16")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)  # a child's one measurement
    parser.add_argument("--child", choices=list(VARIANTS), dest="variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must be larger than --warmup")
    if args.variant:
        print(json.dumps(measure(args)))
        return
    if args.train_seq_len not in args.seq_lens:
        parser.error("--train-seq-len must be one of --seq-lens (its step time sets the equal-time step counts)")

    start = time.perf_counter()
    rows = scaling(args)
    runs = None
    if args.data.is_file():
        write_report(args, rows, None, time.perf_counter() - start, "still running when this was written")
        step_s = {r["variant"]: r["step_s"] for r in rows if r["seq_len"] == args.train_seq_len}
        with tempfile.TemporaryDirectory() as work:
            runs = equal_time(args, step_s, Path(work))
        for v, r in runs.items():
            print(f"{v}: {r['steps']} steps, {r['tokens']:,} tokens in {r['elapsed_s']:.0f} s, validation loss "
                  f"{r['val_start']:.3f} -> {r['val_end']:.3f}")
    else:
        print(f"skipping the equal-time comparison: {args.data} not found (pass --data)")
    write_report(args, rows, runs, time.perf_counter() - start, f"skipped ({args.data} not found)")


if __name__ == "__main__":
    main()
