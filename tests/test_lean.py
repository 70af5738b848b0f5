"""Activations kept in bf16 for the backward (`llmlab.lean`): exact forwards, gradients equal to autograd's taken at
the bf16-rounded activations (computed independently here), close to the exact ones."""

from __future__ import annotations

import torch

from llmlab.config import ModelConfig
from llmlab.lean import linear_saved_bf16, swiglu_saved_bf16


def test_lean_swiglu_gradients_are_the_swiglu_gradients_of_its_input_rounded_to_bf16():
    """MLP.lean_activations (fp32 training on int8 copies): the output is the exact SwiGLU; the input gradient is
    autograd's SwiGLU gradient taken at the bf16-rounded input (an independent computation), and close to the exact
    one."""
    from llmlab.model import MLP

    torch.manual_seed(0)
    mlp = MLP(ModelConfig.from_name("tiny"))
    x = torch.randn(3, 5, mlp.gate_up_proj.in_features)
    grads = {}
    for lean in (False, True):
        mlp.lean_activations = lean
        xi = x.clone().requires_grad_(True)
        mlp(xi).square().sum().backward()
        grads[lean] = xi.grad
    mlp.lean_activations = True
    gu = mlp.gate_up_proj(x).detach()
    rounded = gu.to(torch.bfloat16).float().requires_grad_(True)
    gate, up = rounded.chunk(2, dim=-1)
    h = torch.nn.functional.silu(gate) * up
    upstream = torch.randn_like(h)
    (h * upstream).sum().backward()
    lean_in = gu.clone().requires_grad_(True)
    lean_out = swiglu_saved_bf16(lean_in)
    g0, u0 = gu.chunk(2, dim=-1)
    torch.testing.assert_close(lean_out, torch.nn.functional.silu(g0) * u0)  # the forward is exact
    (lean_out * upstream).sum().backward()
    torch.testing.assert_close(lean_in.grad, rounded.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[True], grads[False], rtol=2e-2, atol=1e-3)


def test_lean_linear_is_exact_forward_and_for_the_input_and_rounds_only_the_weight_gradients_input():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(2, 7, 24, generator=g), torch.randn(5, 24, generator=g)
    upstream = torch.randn(2, 7, 5, generator=g)
    xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = linear_saved_bf16(xl, wl)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w))
    (out * upstream).sum().backward()
    torch.testing.assert_close(xl.grad, upstream @ w)  # exact
    want = upstream.reshape(-1, 5).t() @ x.to(torch.bfloat16).float().reshape(-1, 24)  # x rounded to bf16
    torch.testing.assert_close(wl.grad, want, rtol=1e-5, atol=1e-5)


def test_lean_linear_computes_only_the_gradients_asked_for():
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(9, 24, generator=g), torch.randn(5, 24, generator=g, requires_grad=True)
    linear_saved_bf16(x, w).sum().backward()  # x needs no gradient (a first block's normed embeddings)
    torch.testing.assert_close(w.grad, torch.ones(9, 5).t() @ x.to(torch.bfloat16).float(), rtol=1e-5, atol=1e-5)
    assert x.grad is None
