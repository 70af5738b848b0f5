"""The chunked head + cross-entropy equals the plain loss (values and gradients) and is what the methods use."""

import pytest
import torch

from llmlab.config import ModelConfig
from llmlab.losses import IGNORE_INDEX, default_chunk, linear_cross_entropy, next_token_loss, softmax_rows
from llmlab.methods import Method
from llmlab.model import build_model


def _inputs(seed: int = 0, vocab: int = 300, hidden: int = 32, shape: tuple[int, int] = (3, 50)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).requires_grad_()
    y = torch.randint(0, vocab, shape, generator=g)
    y[0, :20] = IGNORE_INDEX  # a prompt
    y[2, -3:] = IGNORE_INDEX  # padding
    return h, w, y


def _grads(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_equals_plain_loss_and_gradients_in_fp32(chunk):
    h, w, y = _inputs()
    ref = next_token_loss(h @ w.t(), y)
    out = linear_cross_entropy(h, w, y, chunk=chunk)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(_grads(out, h, w), _grads(ref, h, w)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_gradient_scales_with_the_incoming_gradient_and_only_where_needed():
    h, w, y = _inputs(1)
    w_frozen = w.detach()
    (gh,) = _grads(3.0 * linear_cross_entropy(h, w_frozen, y, chunk=16), h)
    (ref,) = _grads(3.0 * next_token_loss(h @ w_frozen.t(), y), h)
    torch.testing.assert_close(gh, ref, rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(gh[0, :20]) == 0  # ignored positions get no gradient


def test_no_grad_path_and_all_ignored_batch():
    h, w, y = _inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, y, chunk=5), next_token_loss(h @ w.t(), y))
    none = torch.full_like(y, IGNORE_INDEX)
    assert linear_cross_entropy(h, w, none).item() == 0.0  # not NaN: a fully masked micro-batch adds nothing
    with torch.no_grad():
        assert linear_cross_entropy(h, w, none).item() == 0.0


def test_bf16_autocast_matches_the_plain_autocast_loss():
    h, w, y = _inputs(3, vocab=512, hidden=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = next_token_loss(torch.nn.functional.linear(h, w), y)
        out = linear_cross_entropy(h, w, y, chunk=32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    for a, b in zip(_grads(out, h, w), _grads(ref, h, w)):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.05, atol=2e-4)


@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("amp", [False, True])
def test_softmax_in_groups_of_rows_equals_the_plain_loss_and_gradients(rows, amp, monkeypatch):
    """The softmax of a chunk taken a few rows at a time (`softmax_rows`, sized for a CPU's cache on real
    vocabularies) gives the plain cross-entropy and its gradients, in fp32 and under bf16 autocast."""
    import llmlab.losses as losses

    monkeypatch.setattr(losses, "softmax_rows", lambda vocab, device: rows)
    h, w, y = _inputs(4, vocab=512, hidden=64)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        ref = next_token_loss(torch.nn.functional.linear(h, w), y)
        out = linear_cross_entropy(h, w, y, chunk=32)
        with torch.no_grad():
            no_grad = linear_cross_entropy(h, w, y, chunk=32)
    tol = dict(rtol=2e-3, atol=2e-3) if amp else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(no_grad, out, rtol=1e-6, atol=1e-6)
    gtol = dict(rtol=0.05, atol=2e-4) if amp else dict(rtol=1e-5, atol=1e-7)
    for a, b in zip(_grads(out, h, w), _grads(ref, h, w)):
        torch.testing.assert_close(a, b, **gtol)


def test_softmax_rows_keep_a_cpu_block_within_the_cache():
    assert softmax_rows(49152, torch.device("cpu")) * 49152 * 4 <= 1 << 21
    assert softmax_rows(10**9, torch.device("cpu")) == 1
    assert softmax_rows(49152, torch.device("meta")) >= 1 << 30  # other devices: the whole chunk at once


@pytest.mark.parametrize("rows", [7, 4096])
def test_a_frozen_head_stored_in_bf16_is_widened_for_fp32_hidden_states(rows, monkeypatch):
    """fp32 hidden states with a frozen bf16 head (train.int8_base keeps the head so): the loss and the gradient of
    the hidden states are the fp32 ones of the bf16 weights widened (no bf16 product), whatever the slice size."""
    import llmlab.losses as losses

    monkeypatch.setattr(losses, "UPCAST_ROWS", rows)
    h, w, y = _inputs()
    narrow = w.detach().to(torch.bfloat16)
    ref = next_token_loss(h @ narrow.float().t(), y)
    out = linear_cross_entropy(h, narrow, y, chunk=40)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_grads(out, h)[0], _grads(ref, h)[0], rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, narrow, y), ref, rtol=1e-6, atol=1e-6)


def test_mismatched_labels_are_refused():
    h, w, y = _inputs()
    with pytest.raises(ValueError, match="hidden states for 150 positions but 147 labels"):
        linear_cross_entropy(h, w, y.flatten()[:-3])


def test_default_chunk_bounds_the_logits_per_chunk():
    assert default_chunk(49152) * 49152 <= 1 << 27
    assert default_chunk(10**9) == 64
    cpu = default_chunk(49152, torch.device("cpu"))  # a CPU keeps the loss's peak small: ~170 rows of 49k
    assert cpu * 49152 * 4 <= 32 * 2**20 and cpu >= 128
    assert default_chunk(49152, torch.device("cuda")) == default_chunk(49152)


@pytest.mark.parametrize("preset", ["tiny", "tiny-mha"])
def test_model_loss_with_labels_equals_loss_of_its_logits(preset):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name(preset))
    idx = torch.randint(0, model.config.vocab_size, (2, 24))
    labels = torch.roll(idx, -1, 1)
    labels[:, :5] = IGNORE_INDEX
    params = [p for p in model.parameters()]
    fused = model(idx, labels=labels)
    plain = next_token_loss(model(idx), labels)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(_grads(fused, *params), _grads(plain, *params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    hidden = model(idx, return_hidden=True)
    assert hidden.shape == (2, 24, model.config.hidden_size)
    torch.testing.assert_close(model.lm_head(hidden), model(idx))


def test_method_loss_uses_the_fused_path_and_can_turn_it_off(monkeypatch):
    import llmlab.losses as losses

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny"))
    idx = torch.randint(0, 256, (2, 16))
    batch = {"input_ids": idx, "labels": torch.roll(idx, -1, 1)}
    calls = []
    real = losses.linear_cross_entropy
    monkeypatch.setattr(losses, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = Method().loss(model, batch)
    assert calls == [1]
    model.fused_loss = False
    plain = Method().loss(model, batch)
    assert calls == [1]
    torch.testing.assert_close(fused, plain)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_chunked_loss_on_cuda_under_bf16_autocast_and_compiled_blocks():
    from llmlab.train import compile_blocks

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny"), device="cuda")
    idx = torch.randint(0, 256, (4, 64), device="cuda")
    labels = torch.roll(idx, -1, 1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = next_token_loss(model(idx), labels)
        fused = model(idx, labels=labels)
    torch.testing.assert_close(fused, plain, rtol=2e-3, atol=2e-3)
    grads = _grads(fused, *model.parameters())
    compile_blocks(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        compiled = model(idx, labels=labels)
    torch.testing.assert_close(compiled, fused, rtol=1e-2, atol=1e-2)
    for a, b in zip(_grads(compiled, *model.parameters()), grads):
        torch.testing.assert_close(a, b, rtol=0.1, atol=1e-3)
