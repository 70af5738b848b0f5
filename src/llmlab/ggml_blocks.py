"""llama.cpp's (GGML's) quantized block formats, decoded in torch into group-wise integer weights (`Groups`).

Each format stores a row as blocks of 32 or 256 weights: integer codes of 2-8 bits plus fp16 scales (and mins,
or 6-bit sub-block scales for the k-quants). Every one of them is exactly w = q * scale + zero per group of 16 or
32 weights, with the scale and zero computed in fp32 without rounding (an fp16 times a small integer), so the
decoded `Groups` hold the file's numbers, not an approximation, and no fp32 copy of a weight is ever made.

Byte layouts (llama.cpp's ggml-common.h; little-endian; fp16 = IEEE half):
  Q4_0  18 B / 32: d, 16 B of nibbles (low nibbles are weights 0-15, high 16-31)    w = d (u - 8)
  Q4_1  20 B / 32: d, m, 16 B of nibbles                                           w = d u + m
  Q5_0  22 B / 32: d, 4 B of fifth bits (bit j -> weight j), 16 B of nibbles       w = d (u - 16)
  Q5_1  24 B / 32: d, m, 4 B of fifth bits, 16 B of nibbles                         w = d u + m
  Q8_0  34 B / 32: d, 32 int8                                                      w = d q
  Q2_K  84 B / 256: 16 B of (4-bit scale | 4-bit min << 4), 64 B of 2-bit codes, d, dmin; groups of 16
  Q3_K 110 B / 256: 32 B of high bits, 64 B of 2-bit codes, 12 B of 6-bit scales (-32), d; groups of 16
  Q4_K 144 B / 256: d, dmin, 12 B of 6-bit scales and mins, 128 B of nibbles; groups of 32, w = d sc u - dmin m
  Q5_K 176 B / 256: d, dmin, 12 B of scales and mins, 32 B of fifth bits, 128 B of nibbles; groups of 32
  Q6_K 210 B / 256: 128 B of low nibbles, 64 B of 2-bit highs, 16 int8 scales, d; groups of 16, w = d sc (u - 32)
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmlab.errors import LLMLabError
from llmlab.quant_kernels import Groups

# type name -> (weights per block, bytes per block)
BLOCK_SIZES = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
               "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
QUANTIZED_TYPES = tuple(BLOCK_SIZES)
_ROWS_AT_A_TIME = 4096  # bounds the temporaries of a decode


def _f16(b: Tensor) -> Tensor:
    """(..., 2) little-endian fp16 bytes -> (...) float32."""
    return b.contiguous().view(torch.float16)[..., 0].float()


def _bits(b: Tensor, shifts: tuple[int, ...], mask: int) -> Tensor:
    """(..., n) bytes -> (..., len(shifts), n): field `mask` of each byte at each shift (shift-major order)."""
    s = torch.tensor(shifts, dtype=torch.uint8, device=b.device)
    return (b[..., None, :] >> s[:, None]) & mask


def _nibbles(qs: Tensor) -> Tensor:
    """(..., 16) bytes -> (..., 32): the low nibbles, then the high nibbles (Q4_0/Q4_1/Q5_x weight order)."""
    return _bits(qs, (0, 4), 15).flatten(-2)


def _fifth_bits(qh: Tensor) -> Tensor:
    """(..., 4) bytes of a little-endian uint32 -> (..., 32): bit j."""
    return _bits(qh, tuple(range(8)), 1).transpose(-1, -2).flatten(-2)


def _k_scales(s: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins (sub-blocks 0-3 plain, 4-7 split over bytes)."""
    s = s.to(torch.int32)
    lo_sc, lo_mn, packed = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([lo_sc & 63, (packed & 15) | ((lo_sc >> 6) << 4)], -1)
    mn = torch.cat([lo_mn & 63, (packed >> 4) | ((lo_mn >> 6) << 4)], -1)
    return sc, mn


def _decode_blocks(kind: str, b: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """Blocks (R, nb, bytes) -> codes (R, nb * block) int16, scale and zero (R, nb * groups per block) fp32."""
    r, nb = b.shape[:2]
    if kind == "Q8_0":
        return b[..., 2:].contiguous().view(torch.int8).to(torch.int16), _f16(b[..., 0:2]), None
    if kind in ("Q4_0", "Q4_1"):
        d, u = _f16(b[..., 0:2]), _nibbles(b[..., -16:]).to(torch.int16)
        return (u, d, -8 * d) if kind == "Q4_0" else (u, d, _f16(b[..., 2:4]))
    if kind in ("Q5_0", "Q5_1"):
        d = _f16(b[..., 0:2])
        u = (_nibbles(b[..., -16:]) | (_fifth_bits(b[..., -20:-16]) << 4)).to(torch.int16)
        return (u - 16, d, None) if kind == "Q5_0" else (u, d, _f16(b[..., 2:4]))
    if kind in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
        sc, mn = _k_scales(b[..., 4:16])
        # 4 chunks of 32 bytes: low nibbles are sub-block 2c, high nibbles sub-block 2c + 1
        u = _bits(b[..., -128:].reshape(r, nb, 4, 32), (0, 4), 15).reshape(r, nb, 256)
        if kind == "Q5_K":  # bit i of fifth-bit byte j belongs to weight 32 i + j
            u = u | (_bits(b[..., 16:48], tuple(range(8)), 1).reshape(r, nb, 256) << 4)
        return u.to(torch.int16), d * sc, -dmin * mn
    if kind == "Q6_K":
        d = _f16(b[..., 208:210])[..., None]
        low = _bits(b[..., 0:128].reshape(r, nb, 2, 64), (0, 4), 15)  # (R, nb, half, 2, 64)
        high = _bits(b[..., 128:192].reshape(r, nb, 2, 32), (0, 2, 4, 6), 3)  # (R, nb, half, 4, 32)
        u = low.reshape(r, nb, 256) | (high.reshape(r, nb, 256) << 4)
        return u.to(torch.int16) - 32, d * b[..., 192:208].contiguous().view(torch.int8).float(), None
    if kind == "Q2_K":
        d, dmin = _f16(b[..., 80:82])[..., None], _f16(b[..., 82:84])[..., None]
        s = b[..., 0:16]
        u = _bits(b[..., 16:80].reshape(r, nb, 2, 32), (0, 2, 4, 6), 3).reshape(r, nb, 256)
        return u.to(torch.int16), d * (s & 15).float(), -dmin * (s >> 4).float()
    if kind == "Q3_K":
        d = _f16(b[..., 108:110])[..., None]
        s = b[..., 96:108]
        low = _bits(s[..., 0:8], (0, 4), 15).reshape(r, nb, 16)
        high = _bits(s[..., 8:12], (0, 2, 4, 6), 3).reshape(r, nb, 16)
        sc = (low | (high << 4)).float() - 32
        ql = _bits(b[..., 32:96].reshape(r, nb, 2, 32), (0, 2, 4, 6), 3).reshape(r, nb, 256).to(torch.int16)
        hbit = _bits(b[..., 0:32], tuple(range(8)), 1).reshape(r, nb, 256).to(torch.int16)
        return ql - 4 * (1 - hbit), d * sc, None  # a clear high bit subtracts 4
    raise LLMLabError(f"GGML type {kind} has no block decoder (supported: {', '.join(QUANTIZED_TYPES)})")


# (group, bits, lowest code) of each format's Groups
_FORMAT = {"Q4_0": (32, 4, 0), "Q4_1": (32, 4, 0), "Q5_0": (32, 5, -16), "Q5_1": (32, 5, 0), "Q8_0": (32, 8, -128),
           "Q2_K": (16, 2, 0), "Q3_K": (16, 3, -4), "Q4_K": (32, 4, 0), "Q5_K": (32, 5, 0), "Q6_K": (16, 6, -32)}


def decode(raw: Tensor, kind: str, cols: int) -> Groups:
    """The `Groups` of a quantized tensor: `raw` is its bytes as (rows, bytes per row) uint8, `cols` its width."""
    if kind not in BLOCK_SIZES:
        raise LLMLabError(f"GGML type {kind} has no block decoder (supported: {', '.join(QUANTIZED_TYPES)})")
    block, size = BLOCK_SIZES[kind]
    if cols % block or raw.shape[-1] != cols // block * size:
        raise LLMLabError(f"a {kind} row of {cols} weights takes {cols // block * size} bytes "
                          f"({block} weights per {size}-byte block), got rows of {raw.shape[-1]} bytes")
    group, bits, qmin = _FORMAT[kind]
    qs, scales, zeros = [], [], []
    for start in range(0, raw.shape[0], _ROWS_AT_A_TIME):
        b = raw[start:start + _ROWS_AT_A_TIME].reshape(-1, cols // block, size)
        q, scale, zero = _decode_blocks(kind, b)
        qs.append(q.reshape(b.shape[0], cols).to(torch.int8))
        scales.append(scale.reshape(b.shape[0], cols // group).contiguous())
        if zero is not None:
            zeros.append(zero.reshape(b.shape[0], cols // group).contiguous())
    return Groups(torch.cat(qs), torch.cat(scales), torch.cat(zeros) if zeros else None, group, bits, qmin)
