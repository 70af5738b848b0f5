"""The distillation losses: closed-form values on hand-made distributions, zero when the student equals the teacher,
gradients against autograd on reference formulas, temperature, masking, top-k targets and the alpha mix."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmlab.distill_losses import (
    DistillLoss,
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    TopK,
    log_distributions,
    make_divergence,
)
from llmlab.errors import LLMLabError

P = [0.7, 0.2, 0.1]  # teacher
Q = [0.2, 0.5, 0.3]  # student


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()[None]  # (1, V): softmax gives probs back


def kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b))


def test_closed_form_values_on_hand_made_distributions() -> None:
    s, t = logits_of(Q), logits_of(P)
    assert ForwardKL()(s, t).item() == pytest.approx(kl(P, Q), rel=1e-9)
    assert ReverseKL()(s, t).item() == pytest.approx(kl(Q, P), rel=1e-9)
    for beta in (0.5, 0.2, 0.9):
        m = [beta * p + (1 - beta) * q for p, q in zip(P, Q)]
        expected = beta * kl(P, m) + (1 - beta) * kl(Q, m)
        assert GeneralizedJSD(beta=beta)(s, t).item() == pytest.approx(expected, rel=1e-9)
    # the symmetric JSD is bounded by log 2, reached by disjoint distributions
    disjoint = GeneralizedJSD(beta=0.5)(torch.tensor([[0.0, -1e4]]), torch.tensor([[-1e4, 0.0]])).item()
    assert disjoint == pytest.approx(math.log(2), rel=1e-6)


def test_jsd_tends_to_the_kls_at_the_ends_of_beta() -> None:
    s, t = logits_of(Q), logits_of(P)
    assert (GeneralizedJSD(beta=1e-4)(s, t) / 1e-4).item() == pytest.approx(kl(P, Q), rel=1e-3)
    assert (GeneralizedJSD(beta=1 - 1e-4)(s, t) / 1e-4).item() == pytest.approx(kl(Q, P), rel=1e-3)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_zero_when_student_equals_teacher(name: str) -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 50) * 3
    loss = make_divergence(name, temperature=2.0)
    assert loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    top = TopK.from_logits(logits, 7, temperature=2.0)
    assert loss(logits, top).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(logits + 1.0, logits).item() == pytest.approx(0.0, abs=1e-6)  # a shift does not change softmax
    assert loss(logits * 1.5, logits).item() > 1e-3


def test_forward_kl_gradient_is_student_minus_teacher_probabilities() -> None:
    """d/ds tau^2 KL(softmax(t/tau) || softmax(s/tau)) = tau (Q - P), per position, divided by the positions."""
    torch.manual_seed(1)
    s = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 10, dtype=torch.float64)
    tau = 2.0
    ForwardKL(tau)(s, t).backward()
    expected = tau * ((s / tau).softmax(-1) - (t / tau).softmax(-1)) / 4
    torch.testing.assert_close(s.grad, expected.detach())


def reference(name: str, s: torch.Tensor, t: torch.Tensor, tau: float, beta: float) -> torch.Tensor:
    """The formulas written directly in probabilities, mean over positions, times tau^2."""
    p, q = (t / tau).softmax(-1), (s / tau).softmax(-1)
    if name == "forward_kl":
        d = (p * (p / q).log()).sum(-1)
    elif name == "reverse_kl":
        d = (q * (q / p).log()).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        d = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    return d.mean() * tau**2


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_values_and_gradients_match_autograd_on_the_reference_formula(name: str) -> None:
    torch.manual_seed(2)
    t = torch.randn(3, 6, 11, dtype=torch.float64)
    s = torch.randn(3, 6, 11, dtype=torch.float64, requires_grad=True)
    ours = make_divergence(name, temperature=1.7, beta=0.3)(s, t)
    (g_ours,) = torch.autograd.grad(ours, s)
    ref = reference(name, s, t, 1.7, 0.3)
    (g_ref,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)
    assert torch.autograd.gradcheck(lambda x: make_divergence(name, 1.7, 0.3)(x, t), (s,))


def test_temperature_scales_both_distributions_and_the_loss_by_its_square() -> None:
    torch.manual_seed(3)
    s, t = torch.randn(5, 9, dtype=torch.float64), torch.randn(5, 9, dtype=torch.float64)
    plain = ForwardKL(1.0)(s / 3.0, t / 3.0)
    assert ForwardKL(3.0)(s, t).item() == pytest.approx(9.0 * plain.item(), rel=1e-9)


def test_positions_labelled_minus_100_carry_no_loss_and_no_gradient() -> None:
    torch.manual_seed(4)
    s = torch.randn(2, 4, 8, requires_grad=True)
    t = torch.randn(2, 4, 8)
    labels = torch.tensor([[-100, 1, 2, -100], [3, -100, -100, -100]])
    loss = ReverseKL()(s, t, labels)
    keep = labels != -100
    expected = ReverseKL()(s[keep], t[keep])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.all(s.grad[~keep] == 0) and torch.all(s.grad[keep].abs().sum(-1) > 0)
    none = ForwardKL()(s, t, torch.full((2, 4), -100))
    assert none.item() == 0.0  # nothing scored: 0, not NaN


def test_top_k_targets_equal_the_full_loss_when_k_is_the_vocabulary() -> None:
    torch.manual_seed(5)
    s, t = torch.randn(2, 3, 12), torch.randn(2, 3, 12)
    for name in ("forward_kl", "reverse_kl", "jsd"):
        loss = make_divergence(name, temperature=1.5)
        full, top = loss(s, t), loss(s, TopK.from_logits(t, 12, temperature=1.5))
        assert top.item() == pytest.approx(full.item(), rel=1e-5)


def test_top_k_targets_are_the_divergence_over_k_tokens_plus_the_rest() -> None:
    t = logits_of([0.5, 0.3, 0.15, 0.05])
    s = logits_of([0.25, 0.25, 0.25, 0.25])
    top = TopK.from_logits(t, 2)
    torch.testing.assert_close(top.indices, torch.tensor([[0, 1]]))
    coarse_p, coarse_q = [0.5, 0.3, 0.2], [0.25, 0.25, 0.5]
    assert ForwardKL()(s, top).item() == pytest.approx(kl(coarse_p, coarse_q), rel=1e-6)
    assert ReverseKL()(s, top).item() == pytest.approx(kl(coarse_q, coarse_p), rel=1e-6)
    log_p, log_q = log_distributions(s, top, 1.0)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(1), check_dtype=False)
    torch.testing.assert_close(log_q.exp().sum(-1), torch.ones(1), check_dtype=False)


def test_top_k_covering_all_mass_stays_finite() -> None:
    t = torch.tensor([[30.0, 0.0, -50.0, -50.0]])  # the top-1 probability rounds to 1 in float32
    s = torch.zeros(1, 4, requires_grad=True)
    loss = ReverseKL()(s, TopK.from_logits(t, 1))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_alpha_mixes_the_divergence_with_label_cross_entropy() -> None:
    torch.manual_seed(6)
    s, t = torch.randn(2, 5, 10), torch.randn(2, 5, 10)
    labels = torch.randint(0, 10, (2, 5))
    labels[0, :2] = -100
    kd = ForwardKL(2.0)(s, t, labels)
    ce = F.cross_entropy(s.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert DistillLoss(ForwardKL(2.0), alpha=1.0)(s, t, labels).item() == pytest.approx(kd.item())
    assert DistillLoss(ForwardKL(2.0), alpha=0.0)(s, t, labels).item() == pytest.approx(ce.item(), rel=1e-6)
    mixed = DistillLoss(ForwardKL(2.0), alpha=0.3)(s, t, labels).item()
    assert mixed == pytest.approx(0.3 * kd.item() + 0.7 * ce.item(), rel=1e-6)
    on_policy = DistillLoss(ForwardKL(2.0), alpha=0.3)(s, t, labels, use_labels=False)
    assert on_policy.item() == pytest.approx(kd.item())


def test_bad_options_and_inputs_raise_clear_errors() -> None:
    with pytest.raises(LLMLabError, match="temperature must be > 0"):
        ForwardKL(0.0)
    with pytest.raises(LLMLabError, match="beta must be strictly between 0 and 1"):
        GeneralizedJSD(beta=1.0)
    with pytest.raises(LLMLabError, match="alpha .* must be in \\[0, 1\\]"):
        DistillLoss(ForwardKL(), alpha=1.5)
    with pytest.raises(LLMLabError, match="loss must be one of forward_kl, reverse_kl, jsd, got 'kl'"):
        make_divergence("kl")
    with pytest.raises(LLMLabError, match="do not match student logits"):
        ForwardKL()(torch.randn(2, 3, 10), torch.randn(2, 3, 12))
    with pytest.raises(LLMLabError, match="computed at temperature 1.0, but the loss uses temperature 2.0"):
        ForwardKL(2.0)(torch.randn(2, 10), TopK.from_logits(torch.randn(2, 10), 3))
    with pytest.raises(LLMLabError, match="top_k must be a positive integer"):
        TopK.from_logits(torch.randn(2, 10), 0)
