"""The matmuls of one decoded token, through each way of multiplying by a GGUF's quantized weights.

Decoding one token multiplies one activation row by every weight once, so this runs exactly that sequence with the
GGUF's own weights (default: SmolLM2-135M-Instruct, Q4_1 blocks and a Q8_0 tied head): per block the fused q/k/v,
the output, the fused gate/up and the down projection, then the head, each weight read from memory as in a real
decode. Options: each `llmlab.quant_kernels` kernel usable here; the weights dequantized once into dense bf16 /
fp32 (what the float import computes with); for an 8-bit head two more: torch's per-channel int8 kernel after
re-quantizing each row to a single scale (not exact: its weight error is printed) and a `torch.compile`d
dequantize-matmul. Reported: ms per token for each projection shape, the median of `--rounds` tokens.

    python benchmarks/bench_quant_kernels.py --threads 2
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python ...   # an AVX2 CPU's picture
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmlab.ggml_blocks import decode
from llmlab.gguf_import import config_from_gguf, hf_tensor_name, open_gguf
from llmlab.hardware import cpu_capability, native_bf16
from llmlab.quant_kernels import KERNELS, Groups, QuantSpec, usable_kernels
from llmlab.quantized import quantize_int8

PARTS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
         "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
Matmul = Callable[[torch.Tensor], torch.Tensor]


def load_groups(path: Path) -> tuple[list[dict[str, Groups]], Groups]:
    """Per block, the fused projections' groups; and the head's (the tied embedding when there is no output)."""
    reader = open_gguf(path)
    config = config_from_gguf(reader)
    by_name = {hf_tensor_name(t.name): t for t in reader.tensors}

    def groups(name: str) -> Groups:
        t = by_name[name]
        return decode(torch.from_numpy(np.array(t.data)).reshape(int(t.shape[1]), -1), t.tensor_type.name,
                      int(t.shape[0]))

    blocks = [{part: Groups.cat([groups(f"model.layers.{i}.{p}.weight") for p in names])
               for part, names in PARTS.items()} for i in range(config.num_hidden_layers)]
    head = "lm_head.weight" if "lm_head.weight" in by_name else "model.embed_tokens.weight"
    return blocks, groups(head)


def option(name: str, g: Groups) -> Matmul | None:
    """The product by `g` through option `name`, or None where the option does not apply to g's format."""
    spec = QuantSpec.of(g)
    if name in KERNELS:
        if name not in usable_kernels(spec, torch.device("cpu")):
            return None
        buffers = KERNELS[name].pack(g)
        return lambda x: KERNELS[name].matmul(x, buffers, spec)
    if name.startswith("dense"):
        w = g.dequantize(torch.bfloat16 if name == "dense bf16" else torch.float32)
        return lambda x: F.linear(x.to(w.dtype), w)
    if g.bits != 8:
        return None
    if name == "int8 per-channel":
        requant = quantize_int8(g.dequantize())
        q, s = requant.q, requant.scale[:, 0].to(torch.bfloat16)
        return lambda x: torch._weight_int8pack_mm(x, q, s)
    n, k = g.shape
    codes, scales = g.q.view(n, k // g.group, g.group), g.scale

    @torch.compile(dynamic=False)
    def dequant_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        part = (codes.float() * x.float().view(1, 1, -1, codes.size(-1))).sum(-1)  # (1, N, K/group)
        return (part * scales).sum(-1)

    return lambda x: dequant_mm(x, codes, scales)


def time_tokens(matmuls: list[tuple[str, Matmul, int]], rounds: int) -> dict[str, float]:
    """Median over `rounds` tokens of the ms each shape takes in one token (all its calls summed)."""
    xs = {k: torch.randn(1, k, dtype=torch.bfloat16) for _, _, k in matmuls}
    per_token: dict[str, list[float]] = {}
    for r in range(rounds + 1):  # the first token warms up
        spent: dict[str, float] = {}
        for part, fn, k in matmuls:
            t0 = time.perf_counter()
            fn(xs[k])
            spent[part] = spent.get(part, 0.0) + (time.perf_counter() - t0) * 1e3
        if r:
            for part, ms in spent.items():
                per_token.setdefault(part, []).append(ms)
    return {part: statistics.median(v) for part, v in per_token.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the SmolLM2 GGUF)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from llmlab.hub import ensure_default_gguf

    blocks, head = load_groups(args.gguf or ensure_default_gguf())
    shapes = {part: "x".join(map(str, g.shape)) for part, g in blocks[0].items()}
    print(f"torch {torch.__version__}, CPU dispatch {cpu_capability()}, native bf16 {native_bf16()}, "
          f"{args.threads} threads; ms per token, median of {args.rounds}")
    print(f"\n{len(blocks)} blocks ({blocks[0]['qkv'].bits}-bit groups of {blocks[0]['qkv'].group}): "
          + ", ".join(f"{p} {s}" for p, s in shapes.items()))
    best_blocks = float("inf")
    for name in (*KERNELS, "dense bf16", "dense fp32"):
        fns = [(part, option(name, g), g.shape[1]) for b in blocks for part, g in b.items()]
        if any(fn is None for _, fn, _ in fns):
            continue
        ms = time_tokens(fns, args.rounds)
        total = sum(ms.values())
        best_blocks = min(best_blocks, total) if name in KERNELS else best_blocks
        print(f"  {name:20} {total:8.2f}  (" + ", ".join(f"{p} {v:.2f}" for p, v in ms.items()) + ")")
    print(f"\nhead {'x'.join(map(str, head.shape))} ({head.bits}-bit groups of {head.group}):")
    best_head = float("inf")
    for name in (*KERNELS, "dense bf16", "dense fp32", "int8 per-channel", "compiled dequant-matmul"):
        fn = option(name, head)
        if fn is None:
            continue
        ms = time_tokens([("head", fn, head.shape[1])], args.rounds)["head"]
        note = ""
        if name == "int8 per-channel":
            exact = head.dequantize()
            err = ((quantize_int8(exact).dequantize() - exact).norm() / exact.norm()).item()
            note = f"  (not exact: relative RMS weight error {err:.1e})"
        best_head = min(best_head, ms) if name in KERNELS else best_head
        print(f"  {name:24} {ms:8.2f}{note}")
    print(f"\nmatmuls of one token through the fastest exact llmlab kernels: {best_blocks + best_head:.2f} ms")


if __name__ == "__main__":
    main()
