"""What the machine can compute fast: native bf16 on the CPU, the memory free for optional copies, the weight range
its int8 GEMM multiplies exactly and how much faster than fp32, and a key naming the CPU for cached measurements.

Every `auto` precision choice asks `native_bf16` (generation, chat, evaluation and serving today; training
precision later), and the quantized kernels' measured verdicts are cached under `machine_key`, so a verdict
measured on one CPU is never reused on another or under another torch build.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
from pathlib import Path

import torch

# /proc/cpuinfo flags of CPUs that compute bf16 dot products natively (AVX-512 BF16, AMX tiles)
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (/proc/cpuinfo on Linux); empty where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / arm64
            return frozenset(value.split())
    return frozenset()


def cpu_capability() -> str:
    """The vector ISA torch's CPU kernels dispatch to (AVX512, AVX2, DEFAULT, ...), as torch reports it."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


@functools.cache
def native_bf16(device: str = "cpu") -> bool:
    """Whether `device` computes bf16 matmuls natively, so bf16 is faster than fp32 rather than emulated.

    CUDA: the GPU's own answer (Ampere and later). CPU: the AVX-512 BF16 or AMX flag, and torch's kernels built
    to use it (its dispatch reaches AVX512 or beyond); arm64 CPUs with the `bf16` feature count too. A CPU
    without these converts bf16 to fp32 in software, where fp32 is the faster choice.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return False
    flags = cpu_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    capability = cpu_capability()
    return any(f in flags for f in _BF16_FLAGS) and ("AVX512" in capability or "AMX" in capability)


@functools.cache
def machine_key() -> str:
    """A short key for this CPU and torch build: measured kernel verdicts are valid only under it."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        model = platform.processor()
    raw = "|".join([platform.machine(), model, " ".join(sorted(cpu_flags())), cpu_capability(), torch.__version__])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes `device` can still give without swapping or running out: a CUDA device's free memory; the system's
    MemAvailable on Linux (free + reclaimable caches), else its physical memory not in use where the OS says so;
    None where unknown. For choices that trade memory for speed (`train.dense_base_auto`)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0] if torch.cuda.is_available() else None
    if dev.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend (inductor) would build with (g++, c++ or clang++ on the PATH), or
    None: without one a compiled CPU step fails at its first call, so every `auto` compile choice asks this first."""
    return next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)


def compile_verified_cpu() -> bool:
    """Whether this CPU's torch dispatch reaches AVX-512 or beyond (AVX512, AMX), where the compiled decode step over
    quantized weights was checked. On AVX2-only CPUs it is not yet verified: under an AVX2 emulation one benchmark
    harness aborted inside the compiled step (docs/benchmarks.md), so `auto` stays eager there."""
    capability = cpu_capability()
    return "AVX512" in capability or "AMX" in capability


INT8_MIN_SPEEDUP = 1.3  # train.int8_base auto: _int_mm must beat the fp32 GEMM by this much (int8_matmul_speedup)


@functools.cache
def int8_matmul_limit() -> int | None:
    """The largest weight magnitude (127 or 63) for which this CPU's `torch._int_mm` (int8 x int8 -> int32 GEMM) is
    exact, or None (no CPU kernel, or wrong sums even then). Measured, not read off the flags: without VNNI (AVX2,
    and AVX-512 CPUs before Cascade Lake) oneDNN's int8 GEMM adds pairs of u8 x s8 products in 16 bits with
    saturation, so full-range int8 weights give wrong sums (under ONEDNN_MAX_CPU_ISA=AVX2: errors of ~20% of the
    result) while weights within +-63 are exact; with VNNI the full range is. The probe multiplies extreme values
    with the weight as the second operand in both layouts training uses and compares with an exact int64 product."""
    if not hasattr(torch, "_int_mm"):
        return None
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (64, 576), generator=gen, dtype=torch.int8)
    a[:, ::7] = -127
    g = a[:, :256].contiguous()  # a gradient (M, N) times the weight (N, K): the input gradient's product
    for bound in (127, 63):
        w = torch.randint(-bound, bound + 1, (256, 576), generator=gen, dtype=torch.int8)
        w[::5, ::3] = bound  # extremes in every row: the saturating case
        try:
            ok = (torch.equal(torch._int_mm(a, w.t()).long(), a.long() @ w.long().t())  # the forward's x @ W.T
                  and torch.equal(torch._int_mm(g, w).long(), g.long() @ w.long()))
        except RuntimeError:  # no CPU kernel in this torch build
            return None
        if ok:
            return bound
    return None


@functools.cache
def int8_matmul_speedup() -> float:
    """How many times faster this CPU's int8 GEMM (`torch._int_mm`) is than its fp32 GEMM on a training-sized product
    (256 x 576 x 1536, best of 5, ~0.1 s once per process); 0 where there is no exact int8 GEMM. int8 dot products
    (vpmaddubsw on AVX2, VNNI) run at 2-4x the fp32 rate; a CPU or torch build without a fast path does not."""
    from llmlab.quant_kernels import _best_ms

    limit = int8_matmul_limit()
    if limit is None:
        return 0.0
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(256, 576, generator=gen), torch.randn(1536, 576, generator=gen)
    xq = torch.randint(-127, 128, (256, 576), generator=gen, dtype=torch.int8)
    wq = torch.randint(-limit, limit + 1, (1536, 576), generator=gen, dtype=torch.int8)
    ms = _best_ms({"fp32": lambda: x @ w.t(), "int8": lambda: torch._int_mm(xq, wq.t())}, torch.device("cpu"), 5)
    return ms["fp32"] / ms["int8"]
