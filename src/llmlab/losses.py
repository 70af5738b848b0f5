"""Next-token cross-entropy fused with the output head, computed in chunks of tokens.

The plain loss, `cross_entropy(lm_head(h).float(), labels)`, holds the whole (B, T, vocab) logits tensor in the
compute dtype, an fp32 copy of it, the fp32 log-softmax and, in backward, an fp32 gradient of the same size: for
SmolLM2 (vocab 49,152) at 16 x 2048 tokens that is 3.2 GB per copy in bf16 and 6.4 GB in fp32, more than the
rest of the activations of a 135M model. `linear_cross_entropy` never builds it:

- only positions whose label is not IGNORE_INDEX go through the head (prompt tokens of instruction data cost
  nothing), unless the function is being compiled (the selection has a data-dependent shape), where ignored
  positions are masked instead;
- the head runs on `chunk` tokens at a time; each chunk's logits are turned into its loss *and* into the
  gradients of its hidden states and of the head weight right away (softmax - one-hot, two matmuls), then freed.
  The backward pass only scales those stored gradients by the incoming gradient, so no matmul is recomputed
  and the work is the same three matmuls as the plain loss; peak extra memory is O(chunk x vocab) plus one
  weight-sized gradient.

Under autocast the head runs in the autocast dtype (as `nn.Linear` would) and the softmax in fp32. The result
is the mean over labelled positions, as `F.cross_entropy(..., ignore_index=-100)` gives, except that a batch
with no labelled position has loss 0 rather than NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # labels with this value carry no loss (e.g. the prompt of an instruction example)
CHUNK_ELEMENTS = 1 << 27  # logits per chunk (512 MiB in fp32): a few chunks per batch, large matmuls
# on a CPU (32 MiB in fp32): the chunk's logits are the loss's peak memory, and ~170 rows of SmolLM2's 49,152-wide
# head already run its GEMM at full speed (a 512-token batch in one chunk held ~70 MiB more at the step's peak)
CPU_CHUNK_ELEMENTS = 1 << 23


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of logits (B, T, V) against labels (B, T), skipping labels equal to IGNORE_INDEX: the
    plain loss, for models that return logits (and the reference `linear_cross_entropy` is tested against).

    Labels are already aligned with the logits (label t is the token after input t); the loss is computed in
    fp32 whatever the autocast dtype of the logits.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1), ignore_index=IGNORE_INDEX)


def default_chunk(vocab_size: int, device: torch.device | None = None) -> int:
    """Tokens per chunk for a vocabulary: CHUNK_ELEMENTS logits (CPU_CHUNK_ELEMENTS on a CPU), at least 64 tokens."""
    elements = CPU_CHUNK_ELEMENTS if device is not None and device.type == "cpu" else CHUNK_ELEMENTS
    return max(64, elements // vocab_size)


def softmax_rows(vocab_size: int, device: torch.device) -> int:
    """Rows of logits whose softmax is computed together. On a CPU, as many as keep their fp32 copy within ~2 MB
    (the core's cache): the five passes of the softmax and its gradient then run from the cache instead of memory,
    3x faster than over the whole chunk (measured on 512 x 49,152). On other devices, the whole chunk."""
    return max(1, (1 << 21) // (4 * vocab_size)) if device.type == "cpu" else 1 << 62


UPCAST_ROWS = 4096  # rows of a narrower head widened to the hidden states' dtype at a time (9 MiB in fp32 at 576)


def _times_wt(h: Tensor, w: Tensor) -> Tensor:
    """h @ w.T in h's dtype; a head stored narrower (bf16 beside fp32 hidden states) is widened a slice of rows at a
    time, so no full-precision copy of it is ever built."""
    if w.dtype == h.dtype:
        return h @ w.t()
    out = h.new_empty(h.shape[0], w.shape[0])
    for a in range(0, w.shape[0], UPCAST_ROWS):
        out[:, a:a + UPCAST_ROWS] = h @ w[a:a + UPCAST_ROWS].to(h.dtype).t()
    return out


def _times_w(g: Tensor, w: Tensor) -> Tensor:
    """g @ w in g's dtype, a narrower w widened a slice of rows at a time (as `_times_wt`)."""
    if w.dtype == g.dtype:
        return g @ w
    out = None
    for a in range(0, w.shape[0], UPCAST_ROWS):
        part, wide = g[:, a:a + UPCAST_ROWS], w[a:a + UPCAST_ROWS].to(g.dtype)
        out = part @ wide if out is None else out.addmm_(part, wide)
    return out


def _chunk_loss(h: Tensor, w: Tensor, y: Tensor, scale: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Summed cross-entropy of one chunk (h (C, H), labels y (C,)); with `scale` also the gradient of the summed
    loss times `scale` with respect to the chunk's logits, in the compute dtype (written over the logits)."""
    logits = _times_wt(h, w)  # (C, V) in the compute dtype
    valid = y != IGNORE_INDEX
    target = y.clamp(min=0)[:, None]
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    step = softmax_rows(w.shape[0], h.device)
    for s in range(0, logits.shape[0], step):
        rows = logits[s:s + step].float()  # (rows, V) fp32 (the logits themselves when they are fp32)
        t, v = target[s:s + step], valid[s:s + step]
        picked = rows.gather(1, t).squeeze(1)
        top = rows.amax(-1, keepdim=True)
        ex = rows.sub_(top).exp_()  # one exp per logit, in place: exp(x - max)
        total = ex.sum(-1)
        loss += ((top.squeeze(1) + total.log() - picked) * v).sum()  # log-sum-exp - the target's logit
        if scale is not None:  # softmax - one-hot, times the mean's scale, for labelled rows
            vs = v.to(ex.dtype) * scale
            ex.mul_((vs / total)[:, None])
            ex.scatter_add_(1, t, -vs[:, None])
            if ex.dtype != logits.dtype:  # fp32 logits were modified in place already
                logits[s:s + step] = ex
    return loss, (logits if scale is not None else None)


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients per chunk in forward; backward scales the stored gradients."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, y: Tensor, chunk: int, need_h: bool, need_w: bool) -> Tensor:
        count = (y != IGNORE_INDEX).sum().clamp(min=1).to(torch.float32)
        scale = 1.0 / count
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start:start + chunk], y[start:start + chunk]
            loss, g = _chunk_loss(hc, w, yc, scale)
            total += loss
            if need_h:
                grad_h[start:start + chunk] = _times_w(g, w)
            if need_w:
                if w.dtype == torch.float32:
                    grad_w.addmm_(g.t(), hc)
                else:  # bf16 product, accumulated in fp32 without an fp32 temporary
                    grad_w.add_(g.t() @ hc)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(w.dtype))
        return total * scale

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int | None = None) -> Tensor:
    """Mean cross-entropy of `hidden @ weight.T` (hidden (..., H), weight (V, H)) against `labels` (...),
    skipping labels equal to IGNORE_INDEX, without materialising the logits of all positions (module doc).

    Equal (to rounding) to `F.cross_entropy(F.linear(hidden, weight).float().flatten(0, -2), labels.flatten(),
    ignore_index=-100)`, gradients included. `chunk`: tokens per chunk (default: `default_chunk(vocab, device)`).
    """
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if h.shape[0] != y.shape[0]:
        raise ValueError(f"hidden states for {h.shape[0]} positions but {y.shape[0]} labels")
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        h, weight = h.to(dtype), weight.to(dtype)
    elif h.dtype != weight.dtype and (weight.requires_grad or weight.element_size() >= h.element_size()):
        h = h.to(weight.dtype)  # else a frozen head stored narrower: products in h's dtype (_times_wt)
    if not torch.compiler.is_compiling():
        keep = (y != IGNORE_INDEX).nonzero().squeeze(1)  # one host sync; shapes become data-dependent
        if keep.numel() < y.numel():
            h, y = h[keep], y[keep]
    chunk = chunk or default_chunk(weight.shape[0], h.device)
    with torch.autocast(device_type, enabled=False):
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(h, weight, y, chunk, h.requires_grad, weight.requires_grad)
        count = (y != IGNORE_INDEX).sum().clamp(min=1)
        total = sum(_chunk_loss(h[s:s + chunk], weight, y[s:s + chunk], None)[0] for s in range(0, h.shape[0], chunk))
        return total / count if h.shape[0] else torch.zeros((), device=h.device)
