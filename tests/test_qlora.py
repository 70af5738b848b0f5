"""QLoRA: NF4 base weights match NF4 as the paper defines it (on every CPU, whatever bitsandbytes' kernels do), each
projection holds exactly what transformers' 4-bit loading holds, the 4-bit model computes what its dequantized
weights give (also through HF + PEFT), a training step changes only the adapters, and the run lowers held-out loss."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from _tiny import changed_after_steps, task_records, tiny_checkpoint, write_jsonl

from llmlab.args import LoRAConfig
from llmlab.checkpoint import llmlab_to_hf, load_checkpoint, save_checkpoint
from llmlab.cli import main
from llmlab.config import ModelConfig
from llmlab.errors import LLMLabError
from llmlab.methods import load_adapter
from llmlab.metrics import read_metrics
from llmlab.model import build_model

bnb = pytest.importorskip("bitsandbytes")
from llmlab.methods.qlora import Linear4bit, LoRALinear4bit, QLoRA  # noqa: E402

# NF4, written here from the QLoRA paper (appendix E) and independently of llmlab: the 16 quantiles of N(0, 1)
# normalised to [-1, 1] with an exact zero; every block of 64 consecutive values of the flattened weight is scaled by
# its absolute maximum and each value rounded to the nearest code.
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])
BLOCK = 64
PROJ = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
        "o_proj": ("o_proj",), "down_proj": ("down_proj",)}


def check_nf4(deq: torch.Tensor, w: torch.Tensor) -> None:
    """Assert `deq` is NF4 of `w` by the definition: in every block of 64 consecutive values of the flattened
    weight, each value is a code times one scale (the block's stored absmax: within 1% of the true one after double
    quantization), and each code is a nearest code of the value divided by the block's absmax (ties either way)."""
    n = w.numel()
    pad = (-n) % BLOCK
    blocks = torch.cat([w.detach().float().reshape(-1), w.new_zeros(pad)]).view(-1, BLOCK)
    got = torch.cat([deq.detach().float().reshape(-1), deq.new_zeros(pad)]).view(-1, BLOCK)
    absmax, scale = blocks.abs().amax(dim=1), got.abs().amax(dim=1)
    torch.testing.assert_close(scale, absmax, rtol=0.01, atol=0)
    codes = (got / scale[:, None]).unsqueeze(-1).sub(NF4).abs()
    assert codes.amin(-1).max() < 1e-6  # one scale per block, code book values only
    dist = (blocks / absmax[:, None]).unsqueeze(-1).sub(NF4).abs()
    chosen = dist.gather(-1, codes.argmin(-1, keepdim=True)).squeeze(-1)
    assert (chosen - dist.amin(-1)).max() < 1e-5  # the nearest code


def unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Code indices of bitsandbytes' packed storage: two per byte, high nibble first."""
    b = packed.reshape(-1)
    return torch.stack((b >> 4, b & 15), dim=1).reshape(-1)[:numel].long()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("qlora")
    return tiny_checkpoint(folder / "base", std=0.2), write_jsonl(folder / "task.jsonl", task_records(80))


@pytest.fixture
def fresh_check():
    """The bitsandbytes check runs once per process; clear its cache around a test that fakes bitsandbytes."""
    from llmlab.methods.qlora import nf4_backend

    nf4_backend.cache_clear()
    yield nf4_backend
    nf4_backend.cache_clear()


def quantized_projections(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each HF-named projection of a QLoRA model, dequantized, cut out of its (possibly fused) module."""
    cfg = model.config
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    rows = {"qkv_proj": [q, kv, kv], "gate_up_proj": [cfg.intermediate_size] * 2}
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (Linear4bit, LoRALinear4bit)):
            prefix, _, fused = name.rpartition(".")
            weight = module.dequantized()
            for proj, piece in zip(PROJ[fused], weight.split(rows.get(fused, [weight.shape[0]]))):
                out[f"{prefix}.{proj}"] = piece
    return out


def test_nf4_weights_follow_the_definition_and_the_model_computes_with_them(setup: tuple[Path, Path]) -> None:
    ckpt, _ = setup
    base = load_checkpoint(ckpt)
    model = QLoRA(LoRAConfig(r=4, targets="q,v,down")).prepare(load_checkpoint(ckpt)).eval()
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, (Linear4bit, LoRALinear4bit))}
    assert len(quantized) == 4 * 2 and all(m.weight.dtype == torch.uint8 for m in quantized.values())
    hf_names = llmlab_to_hf(base.state_dict(), base.config)
    projections = quantized_projections(model)
    assert len(projections) == 7 * 2  # down_proj is 64 x 160: rows that are not a multiple of the block
    for name, deq in projections.items():
        w = hf_names[f"{name}.weight"]
        check_nf4(deq, w)
        assert 0 < (deq - w).abs().max() < 0.25 * w.abs().max()  # 4-bit: close, not equal
    dequantized = load_checkpoint(ckpt)
    with torch.no_grad():
        for name, module in quantized.items():
            dequantized.get_submodule(name).weight.copy_(module.dequantized())
        ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(model(ids), dequantized(ids), atol=1e-4, rtol=1e-4)
    assert model.model.embed_tokens.weight.dtype == torch.float32  # embeddings and head stay full precision


def test_each_projection_holds_what_transformers_4bit_loading_holds(setup: tuple[Path, Path]) -> None:
    transformers = pytest.importorskip("transformers")
    ckpt, _ = setup
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt, quantization_config=config, device_map="cpu",
                                                       dtype=torch.float32)
    model = QLoRA(LoRAConfig(r=4, targets="all")).prepare(load_checkpoint(ckpt))
    ours = quantized_projections(model)
    for name, deq in ours.items():
        weight = hf.get_submodule(name).weight
        state = weight.quant_state
        assert tuple(state.shape) == tuple(deq.shape) and state.nested
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        numel = deq.numel()
        theirs = NF4[unpack(weight.data, numel)] * absmax.repeat_interleave(BLOCK)[:numel]
        assert torch.equal(deq.reshape(-1), theirs), name  # same NF4 codes, same (double-quantized) scales


def test_an_adapter_trained_on_the_4bit_base_meets_the_same_weights_in_hf_and_peft(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = ModelConfig.from_name("tiny", vocab_size=300, intermediate_size=128)  # shapes every bitsandbytes handles
    torch.manual_seed(0)
    net = build_model(cfg)
    net.init_weights(0.2)
    ckpt = save_checkpoint(net, tmp_path / "base")
    method = QLoRA(LoRAConfig(r=4, alpha=8, targets="all"))
    model = method.prepare(load_checkpoint(ckpt)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.2)  # an adapter that changes the output
    method.save(model, tmp_path / "adapter")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt, quantization_config=config, device_map="cpu",
                                                       dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter")
    hf.train()  # bitsandbytes' CPU inference path repacks the weights and computes in bf16; training mode does not
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(input_ids=ids).logits
        assert (ours - load_checkpoint(ckpt)(ids)).abs().max() > 0.1  # the adapter and the 4-bit base both count
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)
        for backend in ("bitsandbytes", "bitsandbytes-rows", "reference"):  # these shapes: alike by every path
            monkeypatch.setattr("llmlab.methods.qlora.nf4_backend", lambda device_type, b=backend: b)
            torch.testing.assert_close(model(ids), ours, atol=1e-6, rtol=1e-6)


def test_bitsandbytes_is_checked_against_the_definition_once(fresh_check, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    from llmlab.methods.qlora import PROBE_SHAPE

    bf = bnb.functional

    def right(packed: torch.Tensor, state) -> torch.Tensor:  # dequantize as the definition says
        absmax = bf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        n = torch.Size(state.shape).numel()
        return (NF4[unpack(packed, n)] * absmax.repeat_interleave(BLOCK)[:n]).view(tuple(state.shape))

    def row_blocked(packed: torch.Tensor, state) -> torch.Tensor:  # the AVX-512 bug: blocks restart at each row
        absmax = bf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        rows, cols = state.shape
        i = torch.arange(rows * cols)
        block = i % cols // BLOCK + i // cols * ((cols + BLOCK - 1) // BLOCK)
        return (NF4[unpack(packed, rows * cols)] * absmax[block.clamp_max(absmax.numel() - 1)]).view(rows, cols)

    def shifted(packed: torch.Tensor, state) -> torch.Tensor:  # wrong whatever the shape: the next block's scale
        absmax = bf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        n = torch.Size(state.shape).numel()
        return (NF4[unpack(packed, n)] * absmax.roll(1).repeat_interleave(BLOCK)[:n]).view(tuple(state.shape))

    probe = torch.randn(PROBE_SHAPE, generator=torch.Generator().manual_seed(0))
    packed, state = bf.quantize_4bit(probe, blocksize=BLOCK, quant_type="nf4", compress_statistics=True)
    rows = copy.copy(state)
    rows.shape = torch.Size((probe.numel() // BLOCK, BLOCK))
    direct = torch.allclose(bf.dequantize_4bit(packed, state), right(packed, state), rtol=0, atol=1e-6)
    as_rows = torch.allclose(bf.dequantize_4bit(packed, rows).view(PROBE_SHAPE), right(packed, state), rtol=0,
                             atol=1e-6)
    want = "bitsandbytes" if direct else "bitsandbytes-rows" if as_rows else "reference"
    assert fresh_check("cpu") == want  # this machine's bitsandbytes
    capsys.readouterr()
    fresh_check("cpu")
    assert capsys.readouterr().err == ""  # checked and logged once per process

    for fake, backend, said in ((right, "bitsandbytes", "agrees with the NF4 definition"),
                                (row_blocked, "bitsandbytes-rows", "dequantizing with it as rows of one block each"),
                                (shifted, "reference", "dequantizing with llmlab's reference NF4 instead")):
        fresh_check.cache_clear()
        monkeypatch.setattr(bf, "dequantize_4bit", fake)
        assert fresh_check("cpu") == backend
        assert said in capsys.readouterr().err
    quantize = bf.quantize_4bit
    monkeypatch.setattr(bf, "quantize_4bit", lambda w, **kw: (quantize(w, **kw)[0] // 2, quantize(w, **kw)[1]))
    fresh_check.cache_clear()
    with pytest.raises(LLMLabError, match=r"bitsandbytes .* quantizes NF4 wrongly on this cpu"):
        fresh_check("cpu")


def test_the_fallback_paths_follow_the_definition_for_any_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmlab.methods import qlora

    gen = torch.Generator().manual_seed(2)
    for backend in ("bitsandbytes-rows", "reference"):  # "bitsandbytes" itself is what the start-up check decides
        monkeypatch.setattr(qlora, "nf4_backend", lambda device_type, b=backend: b)
        for shape in [(64, 160), (4, 96), (5, 100), (1, 3)]:  # whole blocks or not, even or odd
            w = torch.randn(shape, generator=gen)
            deq = qlora.dequantize_nf4(*qlora.quantize_nf4(w))
            assert deq.shape == w.shape and deq.dtype == w.dtype
            check_nf4(deq, w)


def test_qlora_step_changes_only_the_adapters(setup: tuple[Path, Path]) -> None:
    ckpt, data = setup
    changed, trained = changed_after_steps(ckpt, data, QLoRA(LoRAConfig(r=4, targets="all")))
    assert changed == trained and len(trained) == 2 * 7 * 2 and all(".lora_" in n for n in changed)


def test_qlora_finetune_lowers_held_out_loss_and_saves_a_peft_adapter(setup: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    ckpt, data = setup
    run = tmp_path / "run"
    assert main(["finetune", str(ckpt), "--data", str(data), "--out", str(run), "--method", "qlora",
                 "--lora.r", "8", "--lora.targets", "all", "--train.lr", "1e-2", "--train.max_steps", "30",
                 "--train.warmup_steps", "2", "--train.batch_size", "8", "--train.seq_len", "64",
                 "--train.eval_every", "0", "--train.eval_batches", "2", "--train.save_every", "0"]) == 0
    vals = [r["val_loss"] for r in read_metrics(run) if r.get("val_loss") is not None]
    assert vals[-1] < vals[0] - 0.5, vals
    model = load_adapter(load_checkpoint(ckpt), run / "final")  # a normal PEFT adapter on the fp32 base
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)
