"""Where one LoRA training step spends its time: torch.profiler over a few steps of `llmlab finetune`'s default
(LoRA on the GGUF blocks the checkpoint folder keeps, precision auto), ops grouped into what the step does.

The groups (by aten op name, self CPU time): base matmuls (the dense GEMMs the quantized base's weights go
through, or their int8 GEMMs where train.int8_base takes them, the LoRA A/B products and the LM head's), the per-row
int8 quantization of inputs and gradients when not compiled, dequantize (GGUF blocks to the compute dtype, forward and
backward), attention, loss (softmax, log-sum-exp of the chunked head), optimizer (AdamW, gradient clipping),
norms and activations (RMSNorm, SiLU, RoPE's elementwise ops), data movement (copies, casts, cat, index) and the
rest. Prints the group table and the top ops.

    python benchmarks/profile_lora_step.py [--ckpt FOLDER] [--base-weights gguf|float] [--precision auto|fp32]
"""

from __future__ import annotations

import argparse
from pathlib import Path

# aten op -> group; checked in order, first match wins (substring of the op name)
GROUPS = (
    ("dequantize", ("addcmul", "bitwise_and", "__rshift__", "bitwise_right_shift")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("optimizer", ("_fused_adamw", "adamw", "_foreach", "clip_grad", "norm_")),
    ("loss", ("logsumexp", "exp_", "scatter_add", "gather", "softmax", "log_softmax", "nll_loss")),
    ("base matmuls", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::_int_mm")),
    ("int8 quantization (eager)", ("aten::amax", "aten::round", "aten::abs", "aten::clamp")),
    ("norms, activations, RoPE", ("rsqrt", "pow", "mean", "silu", "aten::mul", "aten::add", "aten::neg", "aten::sub",
                                  "aten::cos", "aten::sin", "aten::div", "aten::sum")),
    ("data movement", ("copy_", "aten::to", "_to_copy", "aten::cat", "index", "clone", "contiguous", "fill_",
                       "zero_", "empty", "transpose", "view", "reshape", "slice", "select", "expand")),
)


def group_of(op: str) -> str:
    for name, keys in GROUPS:
        if any(k in op for k in keys):
            return name
    return "other"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="checkpoint folder (default: the default model's cached import)")
    parser.add_argument("--base-weights", default="auto", choices=("auto", "gguf", "float"))
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="profiled steps")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="compile each block (train.compile) before warming up")
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from llmlab.args import LoRAConfig, TrainConfig
    from llmlab.finetune import load_base
    from llmlab.methods import make_method
    from llmlab.precision import setup_precision
    from llmlab.train import Env, build_optimizer, compile_blocks, train_step

    if args.ckpt is None:
        from llmlab.hub import ensure_default_model

        args.ckpt = str(ensure_default_model())
    method = make_method("lora", args.ckpt, lora=LoRAConfig(r=8, alpha=16, targets="all"))
    model, _ = load_base(Path(args.ckpt), "lora", args.base_weights, "cpu")
    model = method.prepare(model)
    amp = setup_precision(model, method, args.precision, torch.device("cpu"))
    if args.compile:  # as train.compile (auto compiles LoRA under bf16 autocast and on int8 copies)
        compile_blocks(model)
    cfg = TrainConfig(lr=1e-4, weight_decay=0.0)
    named = method.trainable_parameters(model)
    optimizer = build_optimizer(named, cfg, Env(device=torch.device("cpu")))
    params = [p for _, p in named]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (args.warmup + args.steps, args.batch_size, args.seq_len + 1),
                           generator=g)
    batches = [{"input_ids": t[:, :-1], "labels": t[:, 1:]} for t in tokens]
    model.train()
    for b in batches[:args.warmup]:
        train_step(model, method, optimizer, params, [b], cfg.grad_clip, amp)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[args.warmup:]:
            train_step(model, method, optimizer, params, [b], cfg.grad_clip, amp)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    per_group: dict[str, float] = {}
    for e in events:
        per_group[group_of(e.key)] = per_group.get(group_of(e.key), 0.0) + e.self_cpu_time_total
    from llmlab.quantized import trains_in_int8

    int8 = ", int8 copies of the blocks" if trains_in_int8(model) else ""
    print(f"{args.ckpt}, LoRA r=8 on all projections, base {args.base_weights}{int8}, precision {args.precision}, "
          f"{'compiled blocks' if args.compile else 'eager'} "
          f"(autocast {amp}), batch {args.batch_size} x {args.seq_len}, {torch.get_num_threads()} threads: "
          f"{total / 1e3 / args.steps:,.0f} ms of op time per step\n")
    print("| part of the step | ms per step | share |\n|---|---:|---:|")
    for name, us in sorted(per_group.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {us / 1e3 / args.steps:,.0f} | {us / total:.0%} |")
    print("\n| op | calls per step | ms per step | share |\n|---|---:|---:|---:|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"| {e.key} | {e.count // args.steps} | {e.self_cpu_time_total / 1e3 / args.steps:,.1f} | "
              f"{e.self_cpu_time_total / total:.1%} |")


if __name__ == "__main__":
    main()
