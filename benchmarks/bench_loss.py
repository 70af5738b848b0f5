"""Memory and time of the output head + next-token loss: plain (full logits) against llmlab's chunked one.

Forward and backward of `lm_head(h) -> cross-entropy` for N positions, each variant in its own subprocess so that
its peak is its own: on CPU the growth of the peak resident set over the size before the loss ran, on CUDA
`torch.cuda.max_memory_allocated` over what was allocated before. Hidden states and weight are allocated first
and are not counted.

    python benchmarks/bench_loss.py --tokens 8192 --hidden 576 --vocab 49152         # SmolLM2's head, 4 x 2048
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import rss_bytes  # noqa: E402

VARIANTS = ("plain", "chunked")


def run_variant(args: argparse.Namespace) -> dict:
    import torch

    from llmlab.losses import IGNORE_INDEX, linear_cross_entropy, next_token_loss

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(args.tokens, args.hidden, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden**0.5).to(device, dtype).requires_grad_()
    y = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)
    y[: int(args.tokens * args.prompt_fraction)] = IGNORE_INDEX
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
    t0 = time.perf_counter()
    if args.variant == "plain":
        loss = next_token_loss((h @ w.t())[None], y[None])
    else:
        loss = linear_cross_entropy(h, w, y)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"seconds": time.perf_counter() - t0, "peak_bytes": peak, "loss": float(loss)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt-fraction", type=float, default=0.0, help="share of positions labelled IGNORE_INDEX")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    res = {}
    for v in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", v], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            sys.exit(f"{v} failed:\n{proc.stderr[-3000:]}")
        res[v] = json.loads(proc.stdout.strip().splitlines()[-1])
    logits = args.tokens * args.vocab
    print(f"head + loss, {args.tokens} positions ({args.prompt_fraction:.0%} unlabelled), hidden {args.hidden}, "
          f"vocab {args.vocab}, {args.dtype} on {args.device}; one logits tensor = {logits * 4 / 2**20:,.0f} MiB fp32")
    print("| variant | peak memory (MiB) | seconds (fwd + bwd) | loss |\n|---|---:|---:|---:|")
    for v, r in res.items():
        print(f"| {v} | {r['peak_bytes'] / 2**20:,.0f} | {r['seconds']:.2f} | {r['loss']:.4f} |")
    print(f"chunked / plain: memory {res['chunked']['peak_bytes'] / max(res['plain']['peak_bytes'], 1):.2f}x, "
          f"time {res['chunked']['seconds'] / res['plain']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
