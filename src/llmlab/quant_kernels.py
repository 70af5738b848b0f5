"""Group-wise integer weights and the kernels that multiply by them, chosen by measurement on the machine at hand.

Every quantized weight llmlab holds is `Groups`: integer codes q (N, K) and, per group of `group` consecutive
inputs of a row, a scale and an optional zero, so that w[n, k] = q[n, k] * scale[n, g] + zero[n, g]. Each GGUF
block format (Q4_0 ... Q6_K, see `llmlab.ggml_blocks`) and llmlab's own int8/int4 quantization is exactly such a
set of groups, which is what lets one layer serve them all.

A `Kernel` stores groups in the layout its matmul wants and multiplies by them without making a float copy of
the weight:
- `int4pack`: torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`, w = (u - 8) * scale + zero, u in 0..15,
  bf16 activations, scales and zeros); any 4-bit group format of group 32..256 maps onto it exactly, up to the
  bf16 rounding of scale and zero. Its packed layout depends on the CPU's vector width, so `dequantize` reads it
  back through a layout found by probing torch's own packing (a kernel whose layout is not recognised is not
  used);
- `int8split`: torch's int8 weight-only kernel (`_weight_int8pack_mm`, one bf16 scale per output row) applied
  once per group column and summed in fp32, which keeps every group's own scale (Q8_0's per-32 scales) exactly
  up to bf16 rounding; one call when the group spans the row (per-channel int8);
- `dequant`: any device, any format: dequantize a slice of rows to the activation dtype and `F.linear` it;
  the correct path where a fast kernel is missing (CUDA, other torch versions).
Both torch kernels are private ops whose names and signatures moved between releases; a kernel is used only after
a small probe on this device reproduces the reference product, so a missing or changed op falls back to `dequant`
instead of computing wrong numbers. With `kernel="auto"` the eligible kernels are timed once per weight shape on
batch-1 input (what decoding does), the winner is cached per CPU, torch build and thread count in llmlab's cache
folder, and the choice is logged.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from llmlab.errors import LLMLabError

log = logging.getLogger("llmlab.quantized")

_DEQUANT_CHUNK = 1 << 22  # weights dequantized at a time by the fallback path (8 MB in bf16)


# -- the weights -----------------------------------------------------------------------------------------
@dataclass
class Groups:
    """w[n, k] = q[n, k] * scale[n, k // group] + zero[n, k // group]; codes span [qmin, qmin + 2**bits - 1].

    q: (N, K) int8 codes; scale, zero: (N, K // group) float32 (zero None = 0). `qmin` and `bits` describe the
    format's code range (not the data's), so a kernel's choice never depends on the values.
    """

    q: Tensor
    scale: Tensor
    zero: Tensor | None
    group: int
    bits: int
    qmin: int

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.q.shape[0]), int(self.q.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weights (N, K), computed in fp32 (exact for every GGUF format) and returned in `dtype`."""
        n, k = self.shape
        w = self.q.view(n, k // self.group, self.group).float() * self.scale.float()[..., None]
        if self.zero is not None:
            w = w + self.zero.float()[..., None]
        return w.view(n, k).to(dtype)

    def take_rows(self, rows: Tensor | slice) -> Groups:
        """The groups of some output rows (a row permutation, a slice)."""
        zero = None if self.zero is None else self.zero[rows]
        return Groups(self.q[rows], self.scale[rows], zero, self.group, self.bits, self.qmin)

    @staticmethod
    def cat(parts: list[Groups]) -> Groups:
        """Stack the rows of several weights with the same format (a fused projection keeps each part's groups)."""
        first = parts[0]
        if any((p.group, p.bits, p.qmin, p.shape[1]) != (first.group, first.bits, first.qmin, first.shape[1])
               for p in parts):
            raise LLMLabError("cannot fuse quantized weights of different formats or widths: "
                              f"{[(p.group, p.bits, p.qmin, p.shape) for p in parts]}")
        zero = None
        if any(p.zero is not None for p in parts):
            zero = torch.cat([p.zero if p.zero is not None else torch.zeros_like(p.scale) for p in parts])
        return Groups(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), zero, first.group,
                      first.bits, first.qmin)


@dataclass(frozen=True)
class QuantSpec:
    """What a kernel needs to know about a weight to store it and to be timed on it."""

    out_features: int
    in_features: int
    group: int
    bits: int
    qmin: int
    has_zero: bool

    @staticmethod
    def of(g: Groups) -> QuantSpec:
        n, k = g.shape
        return QuantSpec(n, k, g.group, g.bits, g.qmin, g.zero is not None)

    def ints(self) -> list[int]:
        """The fields as ints (has_zero 0/1): how the training ops and the packed cache carry a spec."""
        return [self.out_features, self.in_features, self.group, self.bits, self.qmin, int(self.has_zero)]

    @staticmethod
    def from_ints(values: list[int]) -> QuantSpec:
        """The spec `ints` gave (has_zero read as a truth value, so a stored true/false works too)."""
        return QuantSpec(*values[:5], bool(values[5]))


def _op(name: str):
    """A private aten op by name, or None where this torch build lacks it (the compatibility shim)."""
    return getattr(torch.ops.aten, name, None)


# -- kernels ----------------------------------------------------------------------------------------------
class Kernel:
    """Stores `Groups` in its own buffers and multiplies activations by them. Stateless: buffers live in the layer."""

    name = ""

    def eligible(self, spec: QuantSpec, device: torch.device) -> bool:
        raise NotImplementedError

    def pack(self, g: Groups) -> dict[str, Tensor]:
        raise NotImplementedError

    def matmul(self, x: Tensor, buffers: dict[str, Tensor], spec: QuantSpec) -> Tensor:
        """x (M, K) -> x @ W.T (M, N), in the dtype the kernel accumulates or returns (x's, bf16 or fp32): the
        caller casts, so a layer that wants fp32 out (an LM head's logits) keeps the fp32 sums."""
        raise NotImplementedError

    def rows(self, buffers: dict[str, Tensor], spec: QuantSpec, index: Tensor) -> Groups:
        """The groups of output rows `index` (1-D int64), as this layout holds them."""
        raise NotImplementedError

    def dequantize(self, buffers: dict[str, Tensor], spec: QuantSpec, dtype: torch.dtype, start: int = 0,
                   end: int | None = None) -> Tensor:
        """The weights of output rows [start, end) as a dense (end - start, K) tensor in `dtype`, computed in fp32
        (exactly the weights `matmul` multiplies by) and rounded once. A kernel overrides it where its layout
        gives contiguous rows without gathering them one index at a time (what training does twice a step)."""
        end = spec.out_features if end is None else end
        index = torch.arange(start, end, device=next(iter(buffers.values())).device)
        return self.rows(buffers, spec, index).dequantize(dtype)


class Int4PackCPU(Kernel):
    name = "int4pack"

    def eligible(self, spec: QuantSpec, device: torch.device) -> bool:
        return (device.type == "cpu" and spec.bits <= 4 and spec.group in (32, 64, 128, 256)
                and spec.in_features % spec.group == 0 and spec.out_features % 16 == 0
                and _int4_cpu_layout() is not None)

    def pack(self, g: Groups) -> dict[str, Tensor]:
        u = (g.q.to(torch.int32) - g.qmin)  # 0..15
        # w = (u + qmin) * s + z = (u - 8) * s + (z + (qmin + 8) * s)
        zero = g.scale * (g.qmin + 8) + (g.zero if g.zero is not None else 0)
        packed = _op("_convert_weight_to_int4pack_for_cpu")(u.contiguous(), 1)
        scales_zeros = torch.stack([g.scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return {"packed": packed, "scales_zeros": scales_zeros}  # (N, K/2) uint8, (K/group, N, 2)

    def matmul(self, x: Tensor, buffers: dict[str, Tensor], spec: QuantSpec) -> Tensor:
        # the kernel's fp32-activation path is scalar code, 10-30x slower: always feed it bf16
        return _op("_weight_int4pack_mm_for_cpu")(x.to(torch.bfloat16), buffers["packed"], spec.group,
                                                  buffers["scales_zeros"])

    def rows(self, buffers: dict[str, Tensor], spec: QuantSpec, index: Tensor) -> Groups:
        sz = buffers["scales_zeros"][:, index].float()  # (K/group, R, 2)
        u = _int4_cpu_rows(buffers["packed"], spec.out_features, spec.in_features, index)
        return Groups(u.to(torch.int8) - 8, sz[..., 0].t(), sz[..., 1].t(), spec.group, 4, -8)

    def dequantize(self, buffers: dict[str, Tensor], spec: QuantSpec, dtype: torch.dtype, start: int = 0,
                   end: int | None = None) -> Tensor:
        # Whole blocks straight out of the packed layout, as W^T (K, R) returned transposed: byte c of block row k
        # holds rows c (low nibble) and c + block/2 (high) of the block, so the two nibble halves, written as floats
        # side by side, are the rows in order; then one multiply-add per group in fp32, rounded once into `dtype`.
        # Every pass is contiguous: 2.6x the strided multiply-add over nibble views, 5x the gather of `rows`.
        n, k, g = spec.out_features, spec.in_features, spec.group
        end = n if end is None else end
        block, scheme = _int4_cpu_layout()
        if scheme != "halves" or start % block or end % block:
            return super().dequantize(buffers, spec, dtype, start, end)
        r, nb, half = end - start, (end - start) // block, block // 2
        codes = buffers["packed"][start:end].view(nb, k, half).permute(1, 0, 2)  # (K, blocks, block/2)
        if dtype == torch.bfloat16:  # training's case: every pass in bf16, half the bytes of the fp32 one below
            # u ^ 8, sign-extended from 4 bits, is u - 8 (-8..7, exact in bf16); bf16 addcmul computes in fp32 and
            # rounds once, and the scales and zeros are bf16 already, so the weights are the fp32 path's
            c = codes.view(torch.int8) ^ -120  # 0x88: both nibbles' u -> u ^ 8
            u = torch.empty(k, nb, 2, half, dtype=dtype, device=codes.device)
            u[:, :, 0] = (c << 4) >> 4  # arithmetic shifts of int8
            u[:, :, 1] = c >> 4
            sz = buffers["scales_zeros"][:, start:end]  # (K/group, R, 2) bf16
            scale, zero = sz[..., 0].contiguous(), sz[..., 1].contiguous()  # strided operands: 3x slower
            wt = torch.empty(k // g, g, r, dtype=dtype, device=codes.device)
            torch.addcmul(zero[:, None], u.view(k // g, g, r), scale[:, None], out=wt)
            return wt.view(k, r).t()
        u = torch.empty(k, nb, 2, half, dtype=torch.float32, device=codes.device)
        u[:, :, 0] = codes & 15
        u[:, :, 1] = codes >> 4
        sz = buffers["scales_zeros"][:, start:end].float()  # (K/group, R, 2)
        scale = sz[..., 0]
        zero = sz[..., 1] - 8 * scale  # w = (u - 8) * s + z = u * s + (z - 8 s)
        wt = torch.empty(k // g, g, r, dtype=dtype, device=codes.device)
        torch.addcmul(zero[:, None], u.view(k // g, g, r), scale[:, None], out=wt)
        return wt.view(k, r).t()


class Int8Split(Kernel):
    name = "int8split"

    def eligible(self, spec: QuantSpec, device: torch.device) -> bool:
        return (spec.qmin >= -128 and spec.qmin + 2 ** spec.bits - 1 <= 127 and spec.in_features % spec.group == 0
                and _op("_weight_int8pack_mm") is not None and spec.in_features // spec.group <= 128)

    @staticmethod
    def center(spec: QuantSpec) -> int:
        """The code subtracted before scaling (the middle of the code range, 0 for signed formats): the bf16
        rounding of a scale then errs by at most half the code range times it, as in the int4 kernel."""
        return spec.qmin + 2 ** (spec.bits - 1)

    def pack(self, g: Groups) -> dict[str, Tensor]:
        n, k = g.shape
        nb = k // g.group
        c = self.center(QuantSpec.of(g))
        out = {"qweight": (g.q - c).view(n, nb, g.group).transpose(0, 1).contiguous(),  # (K/group, N, group) int8
               "scales": g.scale.t().contiguous().to(torch.bfloat16)}  # (K/group, N)
        if g.zero is not None or c:  # w = (q - c) * s + (zero + c * s)
            zero = (g.zero if g.zero is not None else 0) + c * g.scale
            out["zeros"] = zero.t().contiguous().float()
        return out

    def matmul(self, x: Tensor, buffers: dict[str, Tensor], spec: QuantSpec) -> Tensor:
        mm = _op("_weight_int8pack_mm")
        q, s = buffers["qweight"], buffers["scales"]
        nb, g = q.size(0), q.size(2)
        xb = x.to(torch.bfloat16)
        if nb == 1:
            y = mm(xb, q[0], s[0]).float()
        else:
            xs = xb.view(-1, nb, g)
            y = mm(xs[:, 0].contiguous(), q[0], s[0]).float()
            for j in range(1, nb):  # one group column at a time keeps its own scales; sums in fp32
                y += mm(xs[:, j].contiguous(), q[j], s[j])
        if "zeros" in buffers:  # sum_k x_k * zero[n, g(k)] = (sum of x over each group) @ zeros
            y += xb.view(-1, nb, g).float().sum(-1) @ buffers["zeros"]
        return y

    def rows(self, buffers: dict[str, Tensor], spec: QuantSpec, index: Tensor) -> Groups:
        q = buffers["qweight"][:, index].transpose(0, 1).reshape(len(index), -1)
        zero = buffers["zeros"][:, index].t() if "zeros" in buffers else None
        return Groups(q, buffers["scales"][:, index].t().float(), zero, spec.group, spec.bits,
                      spec.qmin - self.center(spec))

    def dequantize(self, buffers: dict[str, Tensor], spec: QuantSpec, dtype: torch.dtype, start: int = 0,
                   end: int | None = None) -> Tensor:
        end = spec.out_features if end is None else end
        q = buffers["qweight"][:, start:end]  # (K/group, R, group)
        w = torch.empty(end - start, spec.in_features, dtype=dtype, device=q.device)
        out = w.view(end - start, q.size(0), q.size(2)).transpose(0, 1)  # written in place, in fp32 then rounded
        scale = buffers["scales"][:, start:end, None].float()
        if "zeros" in buffers:
            torch.addcmul(buffers["zeros"][:, start:end, None], q, scale, out=out)
        else:
            torch.mul(q, scale, out=out)
        return w


class Dequant(Kernel):
    name = "dequant"

    def eligible(self, spec: QuantSpec, device: torch.device) -> bool:
        return spec.qmin >= -128 and spec.qmin + 2 ** spec.bits - 1 <= 127

    def pack(self, g: Groups) -> dict[str, Tensor]:
        out = {"scales": g.scale.float().contiguous()}
        if g.zero is not None:
            out["zeros"] = g.zero.float().contiguous()
        if g.bits <= 4 and g.shape[1] % 2 == 0:  # two codes a byte: low nibble = even input
            u = (g.q.to(torch.int16) - g.qmin).to(torch.uint8)
            out["nibbles"] = u[:, 0::2] | (u[:, 1::2] << 4)
        else:
            out["qweight"] = g.q.contiguous()
        return out

    def matmul(self, x: Tensor, buffers: dict[str, Tensor], spec: QuantSpec) -> Tensor:
        n = spec.out_features
        step = max(16, _DEQUANT_CHUNK // spec.in_features)
        parts = []
        for start in range(0, n, step):
            parts.append(F.linear(x, self.dequantize(buffers, spec, x.dtype, start, min(n, start + step))))
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)

    def rows(self, buffers: dict[str, Tensor], spec: QuantSpec, index: Tensor | slice) -> Groups:
        if "nibbles" in buffers:
            b = buffers["nibbles"][index]
            u = torch.stack([b & 15, b >> 4], -1).view(b.shape[0], -1)
            q = (u.to(torch.int16) + spec.qmin).to(torch.int8)
        else:
            q = buffers["qweight"][index]
        zero = buffers["zeros"][index] if "zeros" in buffers else None
        return Groups(q, buffers["scales"][index], zero, spec.group, spec.bits, spec.qmin)

    def dequantize(self, buffers: dict[str, Tensor], spec: QuantSpec, dtype: torch.dtype, start: int = 0,
                   end: int | None = None) -> Tensor:
        return self.rows(buffers, spec, slice(start, end)).dequantize(dtype)  # a slice: no gather


KERNELS: dict[str, Kernel] = {k.name: k for k in (Int4PackCPU(), Int8Split(), Dequant())}


# -- torch's CPU int4 layout ------------------------------------------------------------------------------
# `_convert_weight_to_int4pack_for_cpu` stores blocks of BLOCK_N output rows, k-major: for AVX-512 (64 rows) and
# AVX2 (32 rows) byte c of a block row holds rows c and c + BLOCK_N/2 ("halves"); a short last block, and builds
# without those ISAs, pair neighbouring rows ("pairs"). Which one this build uses is found by probing.
_LAYOUTS = ((64, "halves"), (32, "halves"), (32, "pairs"), (16, "pairs"))


def _int4_cpu_rows(packed: Tensor, n: int, k: int, index: Tensor, layout: tuple[int, str] | None = None) -> Tensor:
    """The 0..15 codes (R, K) of rows `index` of a CPU-packed int4 weight of N rows (uint8)."""
    block, scheme = layout or _int4_cpu_layout()
    full = n // block * block
    index = index.to(packed.device)
    in_full = index < full
    # rows of full blocks
    blocks = packed[:full].view(-1, k, block // 2) if full else packed.new_zeros(1, k, block // 2)
    i = index % block
    col = i % (block // 2) if scheme == "halves" else i // 2
    high = i >= block // 2 if scheme == "halves" else i % 2 == 1
    b = torch.where(in_full, index // block, 0)
    kk = torch.arange(k, device=packed.device)
    byte = blocks[b[:, None], kk[None, :], col[:, None]]  # (R, K)
    if full < n:  # the short last block pairs neighbouring rows
        tail = packed[full:].view(k, (n - full) // 2)
        j = (index - full).clamp(min=0)
        tail_byte = tail[:, j // 2].t()
        byte = torch.where(in_full[:, None], byte, tail_byte)
        high = torch.where(in_full, high, j % 2 == 1)
    return torch.where(high[:, None], byte >> 4, byte & 15)


@functools.cache
def _int4_cpu_layout() -> tuple[int, str] | None:
    """The packing this torch build uses, from packing a probe with it; None if the op is missing or unknown."""
    convert, mm = _op("_convert_weight_to_int4pack_for_cpu"), _op("_weight_int4pack_mm_for_cpu")
    if convert is None or mm is None:
        return None
    n, k = 112, 64  # a full 64-row block and a 48-row tail (or 3 + a half of 32-row blocks)
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    try:
        packed = convert(q, 1)
    except RuntimeError:
        return None
    rows = torch.arange(n)
    for layout in _LAYOUTS:
        if torch.equal(_int4_cpu_rows(packed, n, k, rows, layout), q.to(torch.uint8)):
            return layout
    log.warning("torch %s packs int4 weights in a layout llmlab does not know; int4 weights use the dequantize "
                "path", torch.__version__)
    return None


# -- choosing a kernel ------------------------------------------------------------------------------------
def _random_groups(spec: QuantSpec, device: torch.device, seed: int = 0) -> Groups:
    gen = torch.Generator().manual_seed(seed)
    n, k = spec.out_features, spec.in_features
    q = torch.randint(spec.qmin, spec.qmin + 2 ** spec.bits, (n, k), generator=gen).to(torch.int8)
    scale = torch.rand(n, k // spec.group, generator=gen) * 0.01 + 0.001
    zero = (torch.rand(n, k // spec.group, generator=gen) - 0.5) * 0.01 if spec.has_zero else None
    return Groups(q.to(device), scale.to(device), None if zero is None else zero.to(device), spec.group, spec.bits,
                  spec.qmin)


@functools.cache
def _works(name: str, device_type: str, group: int, bits: int, qmin: int, has_zero: bool) -> bool:
    """Whether kernel `name` reproduces the reference product on a small weight of this format on this device."""
    kernel, device = KERNELS[name], torch.device(device_type)
    spec = QuantSpec(64, 4 * group if group < 256 else group, group, bits, qmin, has_zero)
    if not kernel.eligible(spec, device):
        return False
    try:
        g = _random_groups(spec, device)
        x = torch.randn(3, spec.in_features, generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
        buffers = kernel.pack(g)
        got = kernel.matmul(x, buffers, spec).float()
        back = kernel.rows(buffers, spec, torch.arange(spec.out_features, device=device)).dequantize()
    except (RuntimeError, NotImplementedError, TypeError) as e:
        log.info("quantized kernel %s does not run on %s (%s: %s)", name, device_type, type(e).__name__, e)
        return False
    ref = x.float() @ g.dequantize().t()
    tol = 0.02 * ref.abs().max().item() + 1e-3
    ok = (got - ref).abs().max().item() <= tol and (back - g.dequantize()).abs().max().item() <= 0.01 * (
        g.dequantize().abs().max().item() + 1e-3)
    if not ok:
        log.warning("quantized kernel %s gives wrong results on %s with torch %s; not used", name, device_type,
                    torch.__version__)
    return ok


def usable_kernels(spec: QuantSpec, device: torch.device) -> list[str]:
    """Names of the kernels that can hold this weight on `device` and compute correctly there."""
    return [name for name, k in KERNELS.items()
            if k.eligible(spec, device) and _works(name, device.type, spec.group, spec.bits, spec.qmin, spec.has_zero)]


def choose_kernel(spec: QuantSpec, device: torch.device, requested: str = "auto") -> Kernel:
    """The kernel for a weight: `requested` by name, or with "auto" the fastest usable one, measured once."""
    usable = usable_kernels(spec, device)
    if requested != "auto":
        if requested not in KERNELS:
            raise LLMLabError(f"unknown quantized kernel '{requested}'; expected auto or one of {', '.join(KERNELS)}")
        if requested not in usable:
            raise LLMLabError(f"quantized kernel '{requested}' cannot run a {spec.out_features}x{spec.in_features} "
                              f"{spec.bits}-bit group-{spec.group} weight on {device.type} (usable: {usable})")
        return KERNELS[requested]
    if len(usable) == 1:
        return KERNELS[usable[0]]
    key = _verdict_key(spec, device)
    verdicts = _read_verdicts()
    if verdicts.get(key, {}).get("kernel") in usable:
        return KERNELS[verdicts[key]["kernel"]]
    times = time_kernels(spec, device, usable)
    best = min(times, key=times.get)
    log.info("quantized %dx%d %d-bit group-%d weights on %s: %s (%s)", spec.out_features, spec.in_features,
             spec.bits, spec.group, device, best, ", ".join(f"{k} {v:.3f} ms" for k, v in times.items()))
    _write_verdict(key, {"kernel": best, "ms": {k: round(v, 4) for k, v in times.items()}})
    return KERNELS[best]


def _verdict_key(spec: QuantSpec, device: torch.device) -> str:
    """What a measured verdict is valid for: this CPU and torch build, the device, the thread count, the format."""
    from llmlab.hardware import machine_key

    return (f"{machine_key()}|{device}|threads={torch.get_num_threads()}|{spec.out_features}x{spec.in_features}"
            f"|g{spec.group}|b{spec.bits}|q{spec.qmin}|z{int(spec.has_zero)}")


# -- batches: from how many rows a dense copy multiplies faster ----------------------------------------------
DENSE_PROBE_ROWS = (2, 4, 8, 16, 32, 64)  # batch sizes at which the dense copy is timed against the kernel


def dense_plan(spec: QuantSpec, device: torch.device, kernel: Kernel, act_dtype: torch.dtype,
               dtypes: tuple[torch.dtype, ...]) -> tuple[int, torch.dtype] | None:
    """Whether and how a layer should keep a dense copy of its weight for batches: (the fewest rows from which the
    copy multiplies faster than `kernel`, at that batch size and every larger one probed (`DENSE_PROBE_ROWS`), the
    copy's dtype), or None when the kernel stays as fast. Inputs arrive in `act_dtype`; the copy's dtype is the one
    of `dtypes` fastest at the largest probe. Measured once per shape, kernel and dtypes, cached beside the kernel
    choice.

    Why: the weight-only kernels are built for decoding's one row, and their cost grows with the rows (torch's CPU
    int4 kernel and the per-group int8 one about linearly from 4 rows on), while the dense GEMM's barely does; a
    serving batch of 16 rows, a prefill or a scoring batch is where a dense copy pays for its memory. Which dtype: on
    a CPU with AVX-512 BF16 but no AMX, a batch's fp32 GEMM measured ~1.5x faster than the bf16 one (a whole
    8x128-token forward of the default model, shared machine), though bf16 halves the bytes; so both are timed."""
    names = [str(d).removeprefix("torch.") for d in dtypes]
    act = str(act_dtype).removeprefix("torch.")
    key = f"{_verdict_key(spec, device)}|{kernel.name}|act-{act}|dense-{'+'.join(names)}"
    times = _read_verdicts().get(key, {}).get("ms")
    if not isinstance(times, dict) or any(str(m) not in times for m in DENSE_PROBE_ROWS):
        times = _time_dense(spec, device, kernel, act_dtype, dtypes)
        _write_verdict(key, {"ms": times})
    largest = str(DENSE_PROBE_ROWS[-1])
    best = min(range(len(dtypes)), key=lambda i: times[largest][names[i]])
    wins = [times[str(m)][names[best]] < times[str(m)]["kernel"] for m in DENSE_PROBE_ROWS]
    first = len(wins)  # the start of the run of probes where the dense copy wins, up to the largest
    while first and wins[first - 1]:
        first -= 1
    return (DENSE_PROBE_ROWS[first], dtypes[best]) if first < len(wins) else None


def _time_dense(spec: QuantSpec, device: torch.device, kernel: Kernel, act_dtype: torch.dtype,
                dtypes: tuple[torch.dtype, ...], rounds: int = 3) -> dict[str, dict[str, float]]:
    """Best-of-`rounds` ms of the kernel's product and of a dense copy's in each of `dtypes` (the input cast to it)
    at each of DENSE_PROBE_ROWS rows of `act_dtype` inputs."""
    g = _random_groups(spec, device)
    packed, dense = kernel.pack(g), {d: g.dequantize(d) for d in dtypes}
    del g
    out = {}
    for m in DENSE_PROBE_ROWS:
        x = torch.randn(m, spec.in_features).to(device, act_dtype)
        calls = {"kernel": lambda: kernel.matmul(x, packed, spec)}
        for d in dtypes:
            calls[str(d).removeprefix("torch.")] = lambda d=d: F.linear(x.to(d), dense[d])
        out[str(m)] = {k: round(v, 4) for k, v in _best_ms(calls, device, rounds).items()}
    return out


def time_kernels(spec: QuantSpec, device: torch.device, names: list[str], rounds: int = 5) -> dict[str, float]:
    """Best-of-`rounds` milliseconds of a batch-1 product with each kernel (rounds interleaved, so a busy moment
    of a shared machine hits every kernel alike)."""
    g = _random_groups(spec, device)
    x = torch.randn(1, spec.in_features).to(device, torch.bfloat16)
    packed = {name: KERNELS[name].pack(g) for name in names}
    del g
    return _best_ms({name: lambda name=name: KERNELS[name].matmul(x, packed[name], spec) for name in names}, device,
                    rounds)


def _best_ms(calls: dict[str, Callable[[], Any]], device: torch.device, rounds: int) -> dict[str, float]:
    """Best-of-`rounds` milliseconds of each call, after one warm-up call each; the rounds are interleaved, so a busy
    moment of a shared machine hits every call alike."""
    best = dict.fromkeys(calls, float("inf"))
    with torch.inference_mode():
        for f in calls.values():  # warm-up
            f()
        for _ in range(rounds):
            for name, f in calls.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                f()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
    return best


def _verdict_file() -> Path:
    from llmlab.hub import cache_dir

    return cache_dir() / "quant_kernels.json"


def _read_verdicts() -> dict:
    try:
        data = json.loads(_verdict_file().read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_verdict(key: str, verdict: dict) -> None:
    """Add one verdict to the cache file (temp file + rename: a crash never leaves half a file)."""
    path = _verdict_file()
    data = _read_verdicts()
    data[key] = verdict
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".quant_kernels.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache only costs a re-measurement next time
        log.info("could not cache the kernel choice in %s: %s", path, e)
