"""Knowledge-distillation losses: forward KL, reverse KL and generalized Jensen-Shannon, as small modules.

Notation, per position: P = softmax(t / tau) is the teacher's next-token distribution at temperature tau,
Q = softmax(s / tau) the student's. Every divergence is averaged over the positions whose label is not
IGNORE_INDEX (-100): the prompt of an instruction example and padding carry no loss, as in fine-tuning. It is
multiplied by tau^2 so that its gradients keep the same scale whatever the temperature (Hinton et al. 2015).

The teacher is given either as full logits (..., V), or as its top-k (`TopK`): the log-probabilities at
temperature tau of its k most likely tokens and their ids, which is what a teacher-logit cache stores. With
top-k targets the divergence is taken over k + 1 outcomes: the k tokens and "any other token", whose probability
is 1 - (the k probabilities) for either model. It is exact for that coarser distribution, zero when the student
equals the teacher, and equals the full-vocabulary divergence when k = V.

`DistillLoss` mixes a divergence with the ordinary next-token cross-entropy on the labels:
    loss = alpha * tau^2 * D(P, Q) + (1 - alpha) * CE(labels, softmax(s)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.args import LOSS_NAMES
from llmlab.errors import LLMLabError
from llmlab.losses import IGNORE_INDEX, next_token_loss

MIN_LOG_PROB = math.log(1e-30)  # floor of the teacher's "other tokens" log-probability (see log_distributions)


@dataclass
class TopK:
    """The teacher's k most likely tokens at each position: `logprobs` (..., k) float, log P of each at
    `temperature` (normalised over the whole vocabulary), and their token `indices` (..., k) int64."""

    logprobs: Tensor
    indices: Tensor
    temperature: float

    @classmethod
    def from_logits(cls, logits: Tensor, k: int, temperature: float = 1.0) -> TopK:
        """Top-k of full teacher logits (..., V) at `temperature`."""
        if not isinstance(k, int) or k < 1:
            raise LLMLabError(f"top_k must be a positive integer, got {k!r}")
        logp = F.log_softmax(_upcast(logits) / temperature, dim=-1)
        values, indices = logp.topk(min(k, logp.size(-1)), dim=-1)
        return cls(values, indices, temperature)


def _upcast(x: Tensor) -> Tensor:
    """fp16/bf16 -> fp32 for the softmaxes; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and very negative x (Maechler 2012); -inf at x = 0."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_distributions(student_logits: Tensor, teacher: Tensor | TopK, temperature: float) -> tuple[Tensor, Tensor]:
    """(log P, log Q) over a common support: the vocabulary (full teacher logits) or top-k + "other" (`TopK`)."""
    s = _upcast(student_logits) / temperature
    if isinstance(teacher, TopK):
        if abs(teacher.temperature - temperature) > 1e-6:
            raise LLMLabError(f"the teacher's top-k log-probabilities were computed at temperature "
                              f"{teacher.temperature}, but the loss uses temperature {temperature} (rebuild the cache)")
        if teacher.indices.shape[:-1] != s.shape[:-1]:
            raise LLMLabError(f"teacher top-k of shape {tuple(teacher.indices.shape)} does not match student logits "
                              f"of shape {tuple(s.shape)}")
        log_z = torch.logsumexp(s, dim=-1, keepdim=True)
        log_q_top = s.gather(-1, teacher.indices) - log_z  # (..., k)
        k = teacher.indices.size(-1)
        if k == s.size(-1):  # the whole vocabulary: no "other" outcome
            return _upcast(teacher.logprobs).to(s.dtype), log_q_top
        rest = s.scatter(-1, teacher.indices, float("-inf"))
        log_q_rest = torch.logsumexp(rest, dim=-1, keepdim=True) - log_z
        log_p_top = _upcast(teacher.logprobs).to(s.dtype)
        # floored: when the k probabilities round to 1, an exact 0 would make the reverse KL infinite
        log_p_rest = _log1mexp(torch.logsumexp(log_p_top, dim=-1, keepdim=True)).clamp(min=MIN_LOG_PROB)
        return torch.cat([log_p_top, log_p_rest], -1), torch.cat([log_q_top, log_q_rest], -1)
    if teacher.shape != student_logits.shape:
        raise LLMLabError(f"teacher logits of shape {tuple(teacher.shape)} do not match student logits of shape "
                          f"{tuple(student_logits.shape)} (teacher and student need the same vocabulary)")
    return F.log_softmax(_upcast(teacher).to(s.dtype) / temperature, dim=-1), F.log_softmax(s, dim=-1)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(A || B) = sum_i A_i (log A_i - log B_i) over the last dimension, with 0 log 0 = 0."""
    a = log_a.exp()
    # the where() keeps an outcome of A-probability 0 from turning -inf - -inf into NaN, in values and gradients
    return (a * torch.where(a > 0, log_a - log_b, torch.zeros_like(a))).sum(-1)


class Divergence(nn.Module):
    """Base of the divergences: temperature, top-k or full teacher, masking of ignored positions, tau^2 scale.

    `forward(student_logits (..., V), teacher (..., V) or TopK, labels (...) or None)` returns the mean over the
    positions whose label is not -100 (all positions when labels is None) of tau^2 * D(P, Q).
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise LLMLabError(f"distillation temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        """D(P, Q) per position, from log-probabilities over the last dimension."""
        raise NotImplementedError

    def forward(self, student_logits: Tensor, teacher: Tensor | TopK, labels: Tensor | None = None) -> Tensor:
        log_p, log_q = log_distributions(student_logits, teacher, self.temperature)
        per_position = self.divergence(log_p, log_q) * self.temperature ** 2
        if labels is None:
            return per_position.mean()
        keep = labels != IGNORE_INDEX
        # a batch with no scored position contributes 0 (and a zero gradient), not NaN
        return torch.where(keep, per_position, 0.0).sum() / keep.sum().clamp(min=1)


class ForwardKL(Divergence):
    """Forward KL, the classic distillation loss (mean-seeking: the student covers all of the teacher's mass):

        KL(P || Q) = sum_i P_i (log P_i - log Q_i)
    """

    def divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        return _kl(log_p, log_q)


class ReverseKL(Divergence):
    """Reverse KL (mode-seeking: the student puts its mass where the teacher is confident; MiniLLM):

        KL(Q || P) = sum_i Q_i (log Q_i - log P_i)
    """

    def divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        return _kl(log_q, log_p)


class GeneralizedJSD(Divergence):
    """Generalized Jensen-Shannon divergence with weight beta in (0, 1) (GKD, Agarwal et al. 2024):

        M = beta P + (1 - beta) Q
        JSD_beta(P, Q) = beta KL(P || M) + (1 - beta) KL(Q || M)

    beta = 0.5 is the symmetric JSD (at most log 2). Towards the ends it behaves like the KLs:
    JSD_beta / beta -> KL(P || Q) as beta -> 0, and JSD_beta / (1 - beta) -> KL(Q || P) as beta -> 1.
    """

    def __init__(self, temperature: float = 1.0, beta: float = 0.5) -> None:
        super().__init__(temperature)
        if not 0 < beta < 1:
            raise LLMLabError(f"JSD beta must be strictly between 0 and 1, got {beta!r} (use forward_kl or "
                              "reverse_kl for the ends)")
        self.beta = float(beta)

    def divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        b = self.beta
        log_m = torch.logaddexp(log_p + math.log(b), log_q + math.log(1 - b))
        return b * _kl(log_p, log_m) + (1 - b) * _kl(log_q, log_m)


def make_divergence(name: str, temperature: float = 1.0, beta: float = 0.5) -> Divergence:
    """The divergence called `name` (forward_kl, reverse_kl or jsd)."""
    if name == "forward_kl":
        return ForwardKL(temperature)
    if name == "reverse_kl":
        return ReverseKL(temperature)
    if name == "jsd":
        return GeneralizedJSD(temperature, beta)
    raise LLMLabError(f"distillation loss must be one of {', '.join(LOSS_NAMES)}, got {name!r}")


class DistillLoss(nn.Module):
    """alpha * tau^2 * D(P, Q) + (1 - alpha) * cross-entropy on the labels, both over the labelled positions.

    alpha = 1 is pure distillation, alpha = 0 ordinary next-token training. Batches whose labels are not
    ground truth (the student's own samples, on-policy) pass `use_labels=False`: only the divergence counts.
    """

    def __init__(self, divergence: Divergence, alpha: float = 0.5) -> None:
        super().__init__()
        if not 0 <= alpha <= 1:
            raise LLMLabError(f"distillation alpha (weight of the divergence against the label loss) must be in "
                              f"[0, 1], got {alpha!r}")
        self.divergence, self.alpha = divergence, float(alpha)

    def forward(self, student_logits: Tensor, teacher: Tensor | TopK, labels: Tensor,
                use_labels: bool = True) -> Tensor:
        kd = self.divergence(student_logits, teacher, labels)
        if not use_labels or self.alpha == 1:
            return kd
        return self.alpha * kd + (1 - self.alpha) * next_token_loss(student_logits, labels)
