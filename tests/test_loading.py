"""load_for_inference: the one way a checkpoint is loaded to run it (device, dtype, adapters, tokenizer, config)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _tiny import tiny_checkpoint

from llmlab.args import BottleneckConfig, LoRAConfig
from llmlab.checkpoint import load_checkpoint
from llmlab.errors import LLMLabError
from llmlab.loading import load_for_inference
from llmlab.methods import Bottleneck, LoRA
from llmlab.methods.adapters import adapter_params


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
    assert load_for_inference(ckpt, device="cpu")[0].lm_head.weight.dtype == torch.float32  # auto on a CPU
