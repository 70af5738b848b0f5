"""Training speed and memory: llmlab's training step against HF transformers' LlamaForCausalLM, same run.

Both sides run the same `llmlab.train.train_step` (forward, next-token loss, backward, clipping, AdamW with the
loop's parameter groups) on the same batches, with the same config and initial weights; only the model differs.
Each side runs in its own subprocess so that peak memory is its own: on CPU the growth of the peak resident set
over the process's size before the model was built, on CUDA `torch.cuda.max_memory_allocated`.

    python benchmarks/bench_train.py --preset micro-10m --batch-size 8 --seq-len 256 --steps 20
    python benchmarks/bench_train.py --preset smollm2-135m --device cuda --batch-size 16 --seq-len 1024 --compile
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def rss_bytes() -> int:
    """Resident set size now (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hf_method():
    """The HF side's `Method`: next-token loss on the logits HF returns (HF's own loss upcasts them to fp32 the same
    way), so both sides run the same `train_step`."""
    import torch

    from llmlab.losses import next_token_loss
    from llmlab.methods import Method

    class HFMethod(Method):
        def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
            return next_token_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])

    return HFMethod()


def hf_llama(config, state_dict: dict | None = None, device: str = "cpu"):
    """HF transformers' LlamaForCausalLM (SDPA attention) of an llmlab `ModelConfig`, built on `device` with HF's
    random init, or holding an llmlab-named `state_dict`."""
    import torch
    import transformers

    from llmlab.checkpoint import llmlab_to_hf

    hf_config = transformers.LlamaConfig(**config.to_hf_dict())
    hf_config._attn_implementation = "sdpa"
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_config)
    if state_dict is not None:
        model.load_state_dict(llmlab_to_hf(state_dict, config), strict=False)
        if config.tie_word_embeddings:
            model.tie_weights()
    return model


def run_side(args: argparse.Namespace) -> dict:
    import torch

    from llmlab.args import TrainConfig
    from llmlab.config import ModelConfig
    from llmlab.methods import Method
    from llmlab.model import build_model
    from llmlab.precision import autocast_dtype
    from llmlab.train import Env, build_optimizer, train_step

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    config = ModelConfig.from_name(args.preset)
    tokens = torch.randint(0, config.vocab_size, (args.steps, args.batch_size, args.seq_len + 1),
                           generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": t[:, :-1], "labels": t[:, 1:]} for t in tokens]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_rss = rss_bytes()

    torch.manual_seed(0)
    ours = build_model(config)
    if args.side == "llmlab":
        model, method = ours, Method()
    else:
        model, method = hf_llama(config, ours.state_dict()), hf_method()
        del ours
    model.to(device).train()
    cfg = TrainConfig(lr=3e-4, weight_decay=0.1, grad_clip=1.0, precision=args.precision)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(named, cfg, Env(device=device))
    forward = torch.compile(model) if args.compile else model
    amp = autocast_dtype(args.precision, device)
    params = [p for _, p in named]

    losses, t0 = [], None
    for i, batch in enumerate(batches):
        if i == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss, _ = train_step(forward, method, optimizer, params, [batch], cfg.grad_clip, amp)
        losses.append(float(loss))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    timed = args.steps - args.warmup
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    return {"tokens_per_s": timed * args.batch_size * args.seq_len / seconds, "peak_bytes": peak,
            "first_loss": losses[0], "last_loss": losses[-1], "device": str(device),
            "params": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="micro-10m", help="model preset (llmlab.config.PRESETS)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="training steps, warm-up included")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", help="auto (bf16 autocast on CUDA), fp32 or bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--side", choices=["llmlab", "hf"], help=argparse.SUPPRESS)  # a child process's side
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must be larger than --warmup")
    if args.side:
        print(json.dumps(run_side(args)))
        return

    results = {}
    for side in ("llmlab", "hf"):
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", side], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            sys.exit(f"{side} run failed:\n{proc.stderr[-4000:]}")
        results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, hf = results["llmlab"], results["hf"]
    print(f"training step, preset {args.preset} ({ours['params'] / 1e6:.1f}M params), batch {args.batch_size} x "
          f"{args.seq_len} tokens, {args.steps - args.warmup} timed steps after {args.warmup}, device "
          f"{ours['device']}, precision {args.precision}{', compiled' if args.compile else ''}")
    rows = [("tokens/s", f"{ours['tokens_per_s']:,.0f}", f"{hf['tokens_per_s']:,.0f}",
             f"{ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x"),
            ("peak memory (MiB)", f"{ours['peak_bytes'] / 2**20:,.0f}", f"{hf['peak_bytes'] / 2**20:,.0f}",
             f"{ours['peak_bytes'] / max(hf['peak_bytes'], 1):.2f}x"),
            ("loss, first step", f"{ours['first_loss']:.4f}", f"{hf['first_loss']:.4f}", "same weights, same data"),
            ("loss, last step", f"{ours['last_loss']:.4f}", f"{hf['last_loss']:.4f}", "")]
    print(f"{'':20} {'llmlab':>12} {'HF':>12}  llmlab/HF")
    for name, a, b, ratio in rows:
        print(f"{name:20} {a:>12} {b:>12}  {ratio}")


if __name__ == "__main__":
    main()
