"""Autograd functions whose backward keeps an activation in bf16 instead of fp32: half the memory of what fp32
training saves for the backward, for gradients computed from values rounded to 8 bits of mantissa (as bf16
autocast's are). Used where a run approximates already: fp32 LoRA/adapter training on int8 copies of a quantized
base (`train.int8_base`, `llmlab.precision` sets `lean_activations` on the modules that offer it). The forward
results are exact; only what the backward reads is rounded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up of gate_up (..., 2 I), keeping gate_up in bf16 for the backward: the widest activation a
    block saves (4 x 128 tokens of SmolLM2: 189 MB -> 94 MB over 30 blocks)."""

    @staticmethod
    def forward(ctx, gate_up: Tensor) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up.to(torch.bfloat16))
        ctx.dtype = gate_up.dtype
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (saved,) = ctx.saved_tensors
        gate, up = saved.to(ctx.dtype).chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        return torch.cat([grad * up * sig * (1 + gate * (1 - sig)), grad * gate * sig], dim=-1)


def swiglu_saved_bf16(gate_up: Tensor) -> Tensor:
    """silu(gate) * up, as `llmlab.model.MLP` computes it, its backward reading gate_up rounded to bf16."""
    return _SwiGLU.apply(gate_up)


class _Linear(torch.autograd.Function):
    """x @ w.T keeping x in bf16 for the weight's gradient (the input's gradient needs only w, kept as is)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x.to(torch.bfloat16), w)
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, w = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad
        grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(grad.dtype) if need_w else None
        return grad @ w if need_x else None, grad_w


def linear_saved_bf16(x: Tensor, w: Tensor) -> Tensor:
    """F.linear(x, w) (no bias) whose backward reads x rounded to bf16: a LoRA's A product, whose input (the
    block's normed hidden states, the SwiGLU output) is the one activation it saves."""
    return _Linear.apply(x, w)
