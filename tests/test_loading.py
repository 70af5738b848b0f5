"""load_for_inference: the one way a checkpoint is loaded to run it (device, dtype, quantized or float weights,
adapters, tokenizer, config)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _gguf_writer import gguf_name, tiny_hf_model, write_llama_gguf
from _tiny import tiny_checkpoint

from llmlab import checkpoint
from llmlab.args import BottleneckConfig, LoRAConfig
from llmlab.checkpoint import load_checkpoint, load_generation_config
from llmlab.errors import LLMLabError
from llmlab.gguf_import import import_gguf, kept_gguf
from llmlab.loading import load_for_generation, load_for_inference, weights_source
from llmlab.methods import Bottleneck, LoRA
from llmlab.methods.adapters import adapter_params
from llmlab.quantized import QuantLinear


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("loading") / "base", std=0.2)


def _saved(method, ckpt: Path, folder: Path) -> Path:
    model = method.prepare(load_checkpoint(ckpt))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in method.params(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return method.save(model, folder)


def test_adapters_are_put_on_in_order(ckpt: Path, tmp_path: Path) -> None:
    lora = _saved(LoRA(LoRAConfig(r=2, targets="q,v")), ckpt, tmp_path / "lora")
    bottleneck = _saved(Bottleneck(BottleneckConfig(dim=4)), ckpt, tmp_path / "bn")
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(0))
    base, tok, gen = load_for_inference(ckpt, device="cpu", dtype="float32")
    model, _, _ = load_for_inference(ckpt, [lora, bottleneck], device="cpu", dtype="float32")
    assert not model.training and tok.eos_id is not None and gen["eos_token_id"] == tok.eos_id
    assert len(adapter_params(model)) == 2 * (2 * 2) + 2 * 2 * 4  # LoRA A, B on q, v; 4 bottleneck tensors, 2 places
    alone, _, _ = load_for_inference(ckpt, [lora], device="cpu", dtype="float32")
    with torch.no_grad():
        assert not torch.allclose(alone(ids), base(ids)) and not torch.allclose(model(ids), alone(ids))
    half, _, _ = load_for_inference(ckpt, [lora], device="cpu", dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}  # the adapter follows the model's dtype


def test_bad_options(ckpt: Path) -> None:
    with pytest.raises(LLMLabError, match="--dtype: expected auto, float32, bfloat16, float16; got 'int8'"):
        load_for_inference(ckpt, dtype="int8")
    with pytest.raises(LLMLabError, match="--device: 'gpu0' is not a device"):
        load_for_inference(ckpt, device="gpu0")
    with pytest.raises(TypeError):
        load_for_inference(ckpt, (), "cpu")  # options are keyword-only
    with pytest.raises(LLMLabError, match="--quantize: expected one of auto, none, int8, int4, got 'nf4'"):
        load_for_inference(ckpt, quantize="nf4")


# -- what `auto` picks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("native", [True, False])
def test_dtype_auto_is_bf16_only_where_the_cpu_computes_it(ckpt: Path, monkeypatch, native: bool) -> None:
    monkeypatch.setattr(checkpoint, "native_bf16", lambda device="cpu": native)
    model, _, _ = load_for_inference(ckpt, device="cpu")
    assert model.dtype == (torch.bfloat16 if native else torch.float32)
    assert load_for_inference(ckpt, device="cpu", dtype="float32")[0].dtype == torch.float32  # asked: kept


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Q8_0 GGUF and the folder `llmlab convert` makes of it (which keeps the file as model.gguf)."""
    cfg, hf = tiny_hf_model(tie=True)
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    types = {gguf_name(k): "Q8_0" for k in sd if k.endswith("proj.weight") or "embed" in k}
    root = tmp_path_factory.mktemp("kept")
    gguf_file = write_llama_gguf(root / "tiny.gguf", cfg, sd, types=types)
    return gguf_file, import_gguf(gguf_file, root / "folder")


def _quantized(model: torch.nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def test_quantize_auto_runs_the_kept_gguf(imported: tuple[Path, Path], ckpt: Path) -> None:
    gguf_file, folder = imported
    assert kept_gguf(folder) is not None
    cpu = torch.device("cpu")
    assert weights_source(folder, "auto", cpu)[0] == "gguf"
    assert weights_source(folder, "none", cpu) == ("float", None)
    assert weights_source(folder, "auto", torch.device("cuda")) == ("float", None)  # the kernels are CPU kernels
    assert weights_source(ckpt, "auto", cpu) == ("float", None)  # a folder keeping no GGUF: its own weights
    fast, tok, gen = load_for_inference(folder, device="cpu", dtype="float32")
    slow, _, _ = load_for_inference(folder, device="cpu", dtype="float32", quantize="none")
    assert _quantized(fast) and not _quantized(slow) and type(slow.lm_head) is torch.nn.Linear
    assert gen == load_generation_config(folder) and tok.eos_id == 2  # the folder's own tokenizer and config
    ids = torch.tensor([[5, 40, 200, 7, 99, 3]])
    with torch.no_grad():  # the same numbers either way, up to how the kernel stores block scales
        assert torch.equal(fast(ids).argmax(-1), slow(ids).argmax(-1))
    assert not _quantized(load_for_inference(ckpt, device="cpu")[0])


def test_a_gguf_file_refuses_quantize_int8(imported: tuple[Path, Path]) -> None:
    gguf_file, _ = imported
    with pytest.raises(LLMLabError, match=r"--quantize int8: .*tiny.gguf is a GGUF file"):
        load_for_inference(gguf_file, quantize="int8")
    with pytest.raises(LLMLabError, match=r"--quantize none: .*tiny.gguf is a GGUF file.*llmlab convert"):
        load_for_inference(gguf_file, quantize="none")
    assert _quantized(load_for_inference(gguf_file, device="cpu")[0])


def test_load_for_generation_gathers_what_a_command_needs(ckpt: Path, tmp_path: Path) -> None:
    model, tokenizer, sampling, eos, stops, drafter = load_for_generation(
        ckpt, "float32", "none", "cpu", temperature=0.5, top_k=3, top_p=None, repetition_penalty=None, seed=7,
        stop="END")
    assert isinstance(model, torch.nn.Module) and tokenizer.vocab_size > 0 and drafter is None
    assert (sampling.temperature, sampling.top_k, sampling.seed) == (0.5, 3, 7)
    assert stops == ["END"] and eos
    # a bad --draft_tokens is refused before the (missing) checkpoint is looked at
    with pytest.raises(LLMLabError, match="--draft_tokens must be from 1 to 16, got 17"):
        load_for_generation(tmp_path / "missing", "auto", "auto", "cpu", None, None, None, None, None, None,
                            draft=tmp_path / "draft", draft_tokens=17)
    with pytest.raises(LLMLabError, match="--draft .*no such checkpoint"):
        load_for_generation(ckpt, "float32", "none", "cpu", None, None, None, None, None, None,
                            draft=tmp_path / "draft")
