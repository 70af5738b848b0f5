"""Training precision and the copies of a frozen quantized base (`llmlab.precision`): precision auto, compile auto,
dense bf16 copies of GGUF blocks (`train.dense_base`) and int8 copies (`train.int8_base`), each trained against the
path that dequantizes the blocks."""

from __future__ import annotations

import pytest
import torch

import llmlab.quantized as quantized_module
from llmlab.config import ModelConfig
from llmlab.errors import LLMLabError
from llmlab.hardware import int8_matmul_limit
from llmlab.methods import Full
from llmlab.model import build_model
from llmlab.quantized import QuantLinear, quantize_int4, quantize_model


def test_setup_precision_keeps_frozen_weights_in_bf16_only_for_methods_that_do_not_save_them() -> None:
    from llmlab.args import LoRAConfig
    from llmlab.methods import LoRA
    from llmlab.precision import setup_precision

    for method, frozen in ((LoRA(LoRAConfig(targets="all")), torch.bfloat16), (Full(), torch.float32)):
        model = method.prepare(build_model(ModelConfig.from_name("tiny")))
        assert setup_precision(model, method, "bf16", torch.device("cpu")) == torch.bfloat16
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
        assert {p.dtype for p in model.parameters() if not p.requires_grad} <= {frozen}
    model = build_model(ModelConfig.from_name("tiny"))
    assert setup_precision(model, Full(), "bf16-true", torch.device("cpu")) is None
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_autocast_only_where_the_cpu_computes_bf16(native: bool, monkeypatch) -> None:
    import llmlab.checkpoint as checkpoint
    from llmlab.precision import autocast_dtype

    monkeypatch.setattr(checkpoint, "native_bf16", lambda device="cpu": native)
    assert autocast_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else None)
    assert autocast_dtype("fp32", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16  # forced: runs on any CPU


def test_compile_auto_compiles_long_cpu_adapter_runs_under_bf16_only(monkeypatch) -> None:
    import shutil

    from llmlab.args import LoRAConfig
    from llmlab.methods import make_method
    from llmlab.precision import COMPILE_AUTO_MIN_STEPS, compile_auto

    lora, cpu, bf16 = make_method("lora", lora=LoRAConfig()), torch.device("cpu"), torch.bfloat16
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    assert compile_auto(None, lora, bf16, cpu, COMPILE_AUTO_MIN_STEPS)
    assert not compile_auto(None, lora, bf16, cpu, COMPILE_AUTO_MIN_STEPS - 1)  # too short to repay the compile
    assert not compile_auto(None, lora, None, cpu, 1000)  # fp32: not measured to pay
    assert not compile_auto(None, Full(), bf16, cpu, 1000)  # full fine-tuning: not measured to pay
    assert not compile_auto(None, lora, bf16, torch.device("cuda"), 1000)
    assert compile_auto(True, Full(), None, cpu, 1) and not compile_auto(False, lora, bf16, cpu, 1000)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no C++ compiler for inductor
    assert not compile_auto(None, lora, bf16, cpu, 1000)


# -- training through torch.compile (train.compile) ------------------------------------------------------------------
def test_int4_bf16_dequantize_is_the_fp32_weights_rounded():
    """The bf16 training path computes in bf16 passes; the weights are still the fp32 ones rounded once."""
    layer = QuantLinear(quantize_int4(torch.randn(192, 128, generator=torch.Generator().manual_seed(3))),
                        kernel="auto")
    assert torch.equal(layer.dequantize(torch.bfloat16), layer.dequantize(torch.float32).to(torch.bfloat16))
    assert torch.equal(layer.dequantize(torch.bfloat16, 64, 192),
                       layer.dequantize(torch.float32, 64, 192).to(torch.bfloat16))


def _tiny_lora_on_quantized_blocks(dense_base: bool | None = False, precision: str = "bf16",
                                   int8_base: bool | None = False):
    from llmlab.args import LoRAConfig
    from llmlab.methods import make_method
    from llmlab.precision import setup_precision

    torch.manual_seed(0)
    model = quantize_model(build_model(ModelConfig.from_name("tiny", vocab_size=300)), "int4")
    method = make_method("lora", lora=LoRAConfig(r=4, alpha=8, targets="all"))
    model = method.prepare(model)
    amp = setup_precision(model, method, precision, torch.device("cpu"), dense_base, int8_base)
    return model, method, amp


@pytest.mark.slow
@pytest.mark.parametrize("copies", ["none", "dense", "int8"])
def test_compiled_blocks_train_lora_on_quantized_blocks_as_eager_does(copies):
    """LoRA over QuantLinear bases, blocks compiled (train.compile): the dequantize + GEMM custom op under bf16
    autocast (or the dense copies, `train.dense_base`, or in fp32 the int8 copies, `train.int8_base`) keeps each block
    one graph (no graph break) and the losses follow eager's within rounding (2%: the compiled blocks fuse the
    norms and casts, which rounds differently)."""
    if copies == "int8" and int8_matmul_limit() is None:
        pytest.skip("no exact int8 GEMM on this CPU")
    from torch._dynamo.utils import counters

    from llmlab.args import TrainConfig
    from llmlab.train import Env, build_optimizer, compile_blocks, train_step

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 300, (4, 33), generator=g)
    batches = [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}] * 4  # one batch, learnt step by step
    curves = []
    torch._dynamo.reset()
    counters.clear()
    for compiled in (False, True):
        model, method, amp = _tiny_lora_on_quantized_blocks(copies == "dense", "fp32" if copies == "int8" else "bf16",
                                                            copies == "int8")
        assert quantized_module.trains_in_int8(model) is (copies == "int8")
        assert isinstance(model.model.layers[0].mlp.gate_up_proj.base, QuantLinear)
        if compiled:
            assert compile_blocks(model) == 2
        named = method.trainable_parameters(model)
        optimizer = build_optimizer(named, TrainConfig(lr=3e-2, weight_decay=0.0), Env())
        params = [p for _, p in named]
        curves.append([float(train_step(model, method, optimizer, params, [b], 1.0, amp)[0]) for b in batches])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert curves[0][-1] < curves[0][0]  # it learns
    torch.testing.assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=2e-2, atol=0)


def test_training_keeps_a_dense_copy_of_a_quantized_head_under_autocast_only():
    from llmlab.model import LLaMA

    model, _, amp = _tiny_lora_on_quantized_blocks()
    head = model.lm_head
    assert isinstance(head, QuantLinear) and amp == torch.bfloat16
    assert head.dense is not None and head.dense.dtype == torch.bfloat16
    assert torch.equal(head.dense_weight(torch.bfloat16), head.dequantize(torch.bfloat16))
    assert head.dense_weight(torch.float32).dtype == torch.float32  # another dtype: dequantized, not the copy
    assert isinstance(model, LLaMA)
    ids = torch.randint(0, 300, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids)
    assert torch.isfinite(loss)


def _lora_curve(model, method, amp, steps: int = 4) -> tuple[list[float], list[torch.Tensor]]:
    """Training losses of `steps` LoRA steps on one batch, and the trained parameters."""
    from llmlab.args import TrainConfig
    from llmlab.train import Env, build_optimizer, train_step

    tokens = torch.randint(0, 300, (4, 33), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    named = method.trainable_parameters(model)
    optimizer = build_optimizer(named, TrainConfig(lr=3e-2, weight_decay=0.0), Env())
    params = [p for _, p in named]
    losses = [float(train_step(model, method, optimizer, params, [batch], 1.0, amp)[0]) for _ in range(steps)]
    return losses, [p.detach().clone() for p in params]


def test_training_copies_of_the_blocks_train_as_the_dequantizing_path_does():
    """train.dense_base: every quantized projection keeps a bf16 copy equal to its dequantized weights (the
    embedding table read by rows keeps none beyond the tied head's) and LoRA trains to the losses and weights of
    the path that dequantizes a chunk at a time (the same bf16 weights, GEMMs blocked differently)."""
    runs = {}
    for dense in (False, True):
        model, method, amp = _tiny_lora_on_quantized_blocks(dense)
        table = model.model.embed_tokens.source
        assert table is not model.lm_head  # untied: the table is read by rows only
        projections = [m for m in model.modules() if isinstance(m, QuantLinear) and m is not table]
        assert table.dense is None
        if dense:
            assert all(m.dense is not None and m.dense.dtype == torch.bfloat16 for m in projections)
            for m in projections:
                assert torch.equal(m.dense, m.dequantize(torch.bfloat16))
            assert quantized_module.training_copy_bytes(model, torch.bfloat16) == 0  # nothing left to copy
        else:
            assert all(m.dense is None for m in projections if m is not model.lm_head)
        runs[dense] = _lora_curve(model, method, amp)
    (loss0, params0), (loss1, params1) = runs[False], runs[True]
    assert loss0[-1] < loss0[0]
    torch.testing.assert_close(torch.tensor(loss1), torch.tensor(loss0), rtol=2e-3, atol=0)
    for a, b in zip(params1, params0):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_dense_base_auto_keeps_copies_only_where_they_fit_and_under_autocast(monkeypatch):
    import llmlab.hardware as hardware
    import llmlab.precision as train_module
    from llmlab.args import LoRAConfig
    from llmlab.config import ModelConfig
    from llmlab.methods import make_method
    from llmlab.model import build_model

    def prepared():
        torch.manual_seed(0)
        model = quantize_model(build_model(ModelConfig.from_name("tiny", vocab_size=300)), "int4")
        method = make_method("lora", lora=LoRAConfig(r=4, alpha=8, targets="all"))
        return method.prepare(model), method

    cpu = torch.device("cpu")
    model, method = prepared()
    need = quantized_module.training_copy_bytes(model, torch.bfloat16)
    q_proj = model.model.layers[0].self_attn.qkv_proj.base
    assert need > 0
    monkeypatch.setattr(hardware, "available_memory", lambda device: 4 * need - 1)  # the copies would take > 1/4
    assert not train_module.dense_base_auto(None, model, torch.bfloat16, cpu)
    train_module.setup_precision(model, method, "bf16", cpu)
    assert q_proj.dense is None
    assert train_module.dense_base_auto(True, model, torch.bfloat16, cpu)  # asked for: kept whatever the memory
    monkeypatch.setattr(hardware, "available_memory", lambda device: 4 * need)
    assert train_module.dense_base_auto(None, model, torch.bfloat16, cpu)
    assert not train_module.dense_base_auto(False, model, torch.bfloat16, cpu)
    monkeypatch.setattr(hardware, "available_memory", lambda device: None)  # unknown: blocks only
    assert not train_module.dense_base_auto(None, model, torch.bfloat16, cpu)
    assert not train_module.dense_base_auto(None, model, None, cpu)  # fp32: never under auto
    with pytest.raises(LLMLabError, match="dense_base true needs bf16 autocast"):
        train_module.setup_precision(model, method, "fp32", cpu, dense_base=True)
    model, method = prepared()
    monkeypatch.setattr(hardware, "available_memory", lambda device: 2**40)
    train_module.setup_precision(model, method, "bf16", cpu)
    assert model.model.layers[0].self_attn.qkv_proj.base.dense.dtype == torch.bfloat16


# -- int8 copies of a quantized base (train.int8_base) ----------------------------------------------------------------
def _limits() -> list[int]:
    """The weight ranges this CPU's int8 GEMM multiplies exactly (none: the int8 path is not taken here)."""
    limit = int8_matmul_limit()
    return [b for b in (127, 63) if limit is not None and b <= limit]


@pytest.mark.parametrize("limit", [127, 63])
def test_int8_product_and_input_gradient_are_per_row_int8_arithmetic(limit):
    """A layer's int8 copy multiplies as the textbook per-row scheme computed in float64 here (weights rounded per
    output row to +-limit, inputs and gradients per row to +-127, integer sums, scales back) and stays within a
    few percent of the exact product of the weights it holds."""
    if limit not in _limits():
        pytest.skip(f"this CPU's int8 GEMM is not exact for weights within +-{limit}")
    g = torch.Generator().manual_seed(7)
    layer = QuantLinear(quantize_int4(torch.randn(96, 128, generator=g)), kernel="auto")
    layer.keep_int8(limit)
    w = layer.dequantize(torch.float32).double()
    s = w.abs().amax(1) / limit
    codes = torch.round(w / s[:, None])
    assert torch.equal(layer.int8_weight.double(), codes) and layer.int8_scale.dtype == torch.float32
    assert codes.abs().max() == limit

    def rows(t):
        scale = t.abs().amax(1, keepdim=True) / 127
        return torch.round(t / scale), scale

    x = torch.randn(24, 128, generator=g, requires_grad=True)
    y = layer(x)
    xq, sx = rows(x.detach().double())
    torch.testing.assert_close(y.double(), (xq @ codes.T) * sx * s, rtol=1e-5, atol=1e-6)
    exact = x.detach().double() @ w.T
    assert (y.double() - exact).norm() / exact.norm() < 0.02
    grad = torch.randn(24, 96, generator=g)
    y.backward(grad)
    gq, sg = rows(grad.double() * s)
    torch.testing.assert_close(x.grad.double(), (gq @ codes) * sg, rtol=1e-5, atol=1e-6)
    exact_grad = grad.double() @ w
    assert (x.grad.double() - exact_grad).norm() / exact_grad.norm() < 0.02


def test_int8_copies_serve_training_batches_only_and_survive_dtype_moves():
    layer = QuantLinear(quantize_int4(torch.randn(64, 128, generator=torch.Generator().manual_seed(1))),
                        kernel="auto")
    x = torch.randn(20, 128)
    with torch.no_grad():
        before = layer(x)
    layer.keep_int8(63)
    with torch.no_grad():
        assert torch.equal(layer(x), before)  # evaluation and decoding keep the kernel
    layer.to(torch.bfloat16)
    assert layer.int8_weight.dtype == torch.int8 and layer.int8_scale.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(layer(x), before)


def test_keep_int8_copies_leaves_the_down_projection_and_the_head_on_the_float_path():
    model, _, _ = _tiny_lora_on_quantized_blocks(precision="fp32")
    need = quantized_module.int8_copy_bytes(model)
    assert need > 0 and not quantized_module.trains_in_int8(model)
    assert quantized_module.keep_int8_copies(model, 63) == need
    assert quantized_module.int8_copy_bytes(model) == 0 and quantized_module.trains_in_int8(model)
    block = model.model.layers[0]
    assert block.mlp.down_proj.base.int8_weight is None and model.lm_head.int8_weight is None
    assert block.mlp.gate_up_proj.base.int8_weight is not None and block.self_attn.qkv_proj.base.int8_weight is not None
    tied = quantize_model(build_model(ModelConfig.from_name("tiny", vocab_size=300, tie_word_embeddings=True)), "int4")
    assert tied.model.embed_tokens.source is tied.lm_head  # the head, reached first as the embedding's table
    quantized_module.keep_int8_copies(tied, 63)
    assert tied.lm_head.int8_weight is None and tied.model.layers[0].self_attn.qkv_proj.int8_weight is not None


def test_lora_on_int8_copies_trains_as_the_fp32_path_does():
    """4 LoRA steps in fp32 on the same batch: with int8 copies (train.int8_base true) the losses follow the exact
    fp32 products' within 2% and the run learns as much."""
    if not _limits():
        pytest.skip("no exact int8 GEMM on this CPU")
    runs = {}
    for int8 in (False, True):
        model, method, amp = _tiny_lora_on_quantized_blocks(precision="fp32", int8_base=int8)
        assert amp is None and quantized_module.trains_in_int8(model) is int8
        start = torch.cat([p.detach().flatten() for _, p in method.trainable_parameters(model)])
        losses, params = _lora_curve(model, method, amp)
        runs[int8] = losses, torch.cat([p.flatten() for p in params]) - start
    (exact, moved0), (int8, moved1) = runs[False], runs[True]
    assert exact[-1] < exact[0] and int8[-1] < int8[0]
    torch.testing.assert_close(torch.tensor(int8), torch.tensor(exact), rtol=2e-2, atol=0)  # measured: 0.3%
    # the updates point the same way (AdamW's per-element normalisation magnifies tiny gradient differences, so
    # the weights themselves are compared by direction, not element by element)
    assert torch.nn.functional.cosine_similarity(moved1, moved0, dim=0) > 0.9


@pytest.fixture()
def cpu_without_bf16(monkeypatch):
    """A CPU whose precision auto is fp32, with an exact int8 GEMM 2x its fp32 one and plenty of memory."""
    import llmlab.checkpoint as checkpoint
    import llmlab.hardware as hardware

    monkeypatch.setattr(checkpoint, "native_bf16", lambda device="cpu": False)
    monkeypatch.setattr(hardware, "int8_matmul_limit", lambda: 63)
    monkeypatch.setattr(hardware, "int8_matmul_speedup", lambda: 2.0)
    monkeypatch.setattr(hardware, "available_memory", lambda device: 2**40)
    return hardware


def test_int8_base_auto_takes_int8_only_where_precision_auto_chose_fp32(cpu_without_bf16, monkeypatch):
    from llmlab.precision import int8_base_auto

    hardware, cpu = cpu_without_bf16, torch.device("cpu")
    model, _, _ = _tiny_lora_on_quantized_blocks(precision="fp32")
    assert int8_base_auto(None, model, "auto", cpu) == 63
    assert int8_base_auto(None, model, "fp32", cpu) is None  # fp32 asked for: fp32 products
    assert int8_base_auto(False, model, "auto", cpu) is None
    assert int8_base_auto(True, model, "fp32", cpu) == 63  # asked for
    monkeypatch.setattr(hardware, "available_memory", lambda device: 4 * quantized_module.int8_copy_bytes(model) - 1)
    assert int8_base_auto(None, model, "auto", cpu) is None  # the copies would take more than 1/4 of the memory
    monkeypatch.setattr(hardware, "available_memory", lambda device: 2**40)
    monkeypatch.setattr(hardware, "int8_matmul_speedup", lambda: 1.1)
    assert int8_base_auto(None, model, "auto", cpu) is None  # not fast enough to be worth the approximation
    assert int8_base_auto(True, model, "auto", cpu) == 63
    monkeypatch.setattr(hardware, "int8_matmul_limit", lambda: None)
    with pytest.raises(LLMLabError, match="int8_base true: this CPU has no exact int8 GEMM"):
        int8_base_auto(True, model, "auto", cpu)
    with pytest.raises(LLMLabError, match="int8_base true: int8 training products run on the CPU, not on cuda"):
        int8_base_auto(True, model, "auto", torch.device("cuda"))
    assert int8_base_auto(None, model, "auto", torch.device("cuda")) is None


def test_setup_precision_keeps_int8_copies_under_auto_and_refuses_what_cannot_be(cpu_without_bf16):
    model, _, amp = _tiny_lora_on_quantized_blocks(dense_base=None, precision="auto", int8_base=None)
    assert amp is None and quantized_module.trains_in_int8(model)
    assert model.model.layers[0].self_attn.qkv_proj.base.dense is None  # no dense copies besides
    head = model.lm_head  # a bf16 copy for the fused loss only: the head's own products keep the kernel
    assert head.dense is not None and head.dense.dtype == torch.bfloat16 and head.dense_from > 2**40
    assert torch.equal(head.dense, head.dequantize(torch.bfloat16))
    assert head.dense_weight(torch.float32, narrower=True) is head.dense
    x = torch.randn(2, 12, head.in_features)
    with torch.no_grad():
        got = head(x)
        copy, head.dense = head.dense, None
        assert torch.equal(got, head(x))  # the copy is not what the head's own products use
        head.dense = copy
    plain, _, _ = _tiny_lora_on_quantized_blocks(precision="fp32")  # fp32 products asked for: an fp32 copy
    assert plain.lm_head.dense.dtype == torch.float32 and plain.lm_head.dense_from == 16
    model, _, _ = _tiny_lora_on_quantized_blocks(dense_base=None, precision="fp32", int8_base=None)
    assert not quantized_module.trains_in_int8(model)
    with pytest.raises(LLMLabError, match="dense_base true and --train.int8_base true"):
        _tiny_lora_on_quantized_blocks(dense_base=True, precision="bf16", int8_base=True)
    from llmlab.precision import setup_precision

    with pytest.raises(LLMLabError, match="int8_base true: the model has no quantized projections"):
        from llmlab.args import LoRAConfig
        from llmlab.methods import make_method

        method = make_method("lora", lora=LoRAConfig(r=4, alpha=8))
        setup_precision(method.prepare(build_model(ModelConfig.from_name("tiny"))), method, "fp32",
                        torch.device("cpu"), int8_base=True)
    with pytest.raises(LLMLabError, match="int8_base true: only LoRA and adapter training"):
        setup_precision(build_model(ModelConfig.from_name("tiny")), Full(), "fp32", torch.device("cpu"),
                        int8_base=True)


def test_compile_auto_compiles_fp32_runs_on_int8_copies(cpu_without_bf16, monkeypatch):
    import shutil

    from llmlab.precision import COMPILE_AUTO_MIN_STEPS, compile_auto

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    int8_model, method, amp = _tiny_lora_on_quantized_blocks(precision="auto", int8_base=None)
    plain, _, _ = _tiny_lora_on_quantized_blocks(precision="fp32")
    cpu = torch.device("cpu")
    assert amp is None and compile_auto(None, method, amp, cpu, COMPILE_AUTO_MIN_STEPS, int8_model)
    assert not compile_auto(None, method, amp, cpu, COMPILE_AUTO_MIN_STEPS, plain)
    assert not compile_auto(None, method, amp, cpu, COMPILE_AUTO_MIN_STEPS - 1, int8_model)


def test_int8_training_sets_lean_activations_and_nothing_else_does(cpu_without_bf16):
    from llmlab.methods.lora import LoRALinear
    from llmlab.model import MLP

    for precision, lean in (("auto", True), ("fp32", False)):
        model, _, _ = _tiny_lora_on_quantized_blocks(dense_base=None, precision=precision, int8_base=None)
        flags = {m.lean_activations for m in model.modules() if isinstance(m, MLP | LoRALinear)}
        assert flags == {lean}
