"""Adapter folders and the method registry (llmlab.methods.adapters, llmlab.methods): kinds told from the config,
one error per unreadable folder, modules that name their own parameters, loading any kind through one function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _tiny import tiny_checkpoint

from llmlab.args import METHOD_NAMES, BottleneckConfig, LoRAConfig
from llmlab.checkpoint import load_checkpoint
from llmlab.errors import LLMLabError
from llmlab.methods import ADAPTER_KINDS, METHODS, Bottleneck, LoRA, QLoRA, load_adapter, make_method
from llmlab.methods.adapters import adapter_kind, adapter_params, read_adapter_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("adapters") / "base")


def test_the_registry_holds_the_names_the_command_line_offers() -> None:
    assert tuple(METHODS) == METHOD_NAMES  # args.py lists them without importing torch, for `--help`
    assert set(ADAPTER_KINDS) == {"lora", "bottleneck"}
    assert type(make_method("adapter", bottleneck=BottleneckConfig(dim=3))) is Bottleneck
    assert make_method("adapter", bottleneck=BottleneckConfig(dim=3)).config.dim == 3
    assert make_method("lora", "base/dir", lora=LoRAConfig(r=2)).base_model == "base/dir"
    assert make_method("freeze").name == "freeze" and make_method("full").name == "full"


def test_each_method_trains_only_the_parameters_its_modules_declare(ckpt: Path) -> None:
    model = LoRA(LoRAConfig(r=2, targets="q,gate")).prepare(load_checkpoint(ckpt))
    Bottleneck(BottleneckConfig(dim=4)).apply(model)  # a second kind of adapter on the same model
    with pytest.raises(LLMLabError, match="o_proj is a AdaptedLinear, not a plain nn.Linear"):
        LoRA(LoRAConfig(r=2, targets="o")).apply(model)  # on top of another adapter: refused, not dropped
    with pytest.raises(LLMLabError, match="down_proj is a LoRALinear, not a plain nn.Linear"):
        Bottleneck().apply(LoRA(LoRAConfig(r=2, targets="down")).prepare(load_checkpoint(ckpt)))
    lora = {n for n, _ in LoRA(LoRAConfig(r=2)).params(model)}
    bottleneck = {n for n, _ in Bottleneck().params(model)}
    assert lora == {f"model.layers.{i}.{m}.lora_{ab}.{t}" for i in range(2) for ab in "AB"
                    for m, t in (("self_attn.qkv_proj", "q"), ("mlp.gate_up_proj", "gate"))}
    assert len(bottleneck) == 2 * 2 * 4 and all(".adapter_" in n for n in bottleneck)  # 2 blocks x 2 places x 4
    assert {n for n, _ in adapter_params(model)} == lora | bottleneck
    names = {n for n, _ in model.named_parameters()}
    assert lora <= names and bottleneck <= names  # full names, as named_parameters gives them


def test_kinds_are_told_from_the_config(ckpt: Path, tmp_path: Path) -> None:
    model = LoRA(LoRAConfig(r=2)).prepare(load_checkpoint(ckpt))
    LoRA(LoRAConfig(r=2)).save(model, tmp_path / "lora")
    model = Bottleneck(BottleneckConfig(dim=4)).prepare(load_checkpoint(ckpt))
    Bottleneck(BottleneckConfig(dim=4)).save(model, tmp_path / "bn")
    assert adapter_kind(tmp_path / "lora") == "lora" and adapter_kind(tmp_path / "bn") == "bottleneck"
    loaded = load_adapter(load_checkpoint(ckpt), tmp_path / "bn")
    assert len(Bottleneck().params(loaded)) == 16 and not any(p.requires_grad for _, p in adapter_params(loaded))
    with pytest.raises(LLMLabError, match="holds bottleneck adapters, not lora adapters"):
        LoRA.load(load_checkpoint(ckpt), tmp_path / "bn")
    with pytest.raises(LLMLabError, match="holds lora adapters, not bottleneck adapters"):
        Bottleneck.load(load_checkpoint(ckpt), tmp_path / "lora")


def test_unreadable_adapter_folders(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(LLMLabError, match="no adapter_config.json"):
        adapter_kind(tmp_path)
    config = tmp_path / "adapter_config.json"
    config.write_text("{not json")
    with pytest.raises(LLMLabError, match="adapter_config.json: not valid JSON"):
        read_adapter_config(tmp_path)
    config.write_text("[1]")
    with pytest.raises(LLMLabError, match="adapter_config.json: expected a JSON object, got list"):
        adapter_kind(tmp_path)
    config.write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(LLMLabError, match="peft_type is 'IA3'; llmlab loads LORA adapters"):
        load_adapter(load_checkpoint(ckpt), tmp_path)
    config.write_text(json.dumps({"adapter_type": "prefix"}))
    with pytest.raises(LLMLabError, match="adapter_type is 'prefix'"):
        adapter_kind(tmp_path)
    config.write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(LLMLabError, match="no adapter_model.safetensors"):
        load_adapter(load_checkpoint(ckpt), tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(LLMLabError, match="adapter_model.safetensors: cannot read safetensors file"):
        load_adapter(load_checkpoint(ckpt), tmp_path)


def test_qlora_saves_lora_folders() -> None:
    assert QLoRA.kind == "lora" and ADAPTER_KINDS[QLoRA.kind] is LoRA  # its folders load on the full-precision base


# -- adapters on a quantized base (GGUF blocks) ---------------------------------------------------------
@pytest.fixture(scope="module")
def quant_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from _gguf_writer import tiny_mixed_gguf

    return tiny_mixed_gguf(tmp_path_factory.mktemp("quant") / "tiny.gguf")


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_adapters_train_on_quantized_blocks_without_a_float_copy_of_the_base(quant_gguf: Path, kind: str,
                                                                            amp: bool) -> None:
    """LoRA and bottleneck adapters wrap the GGUF's quantized layers and train through them (the loss on a fixed
    batch falls, in fp32 and under bf16 autocast); the blocks stay as they were, and no float weight of the base's
    shapes exists: the only float parameters are the norms and what the adapter adds."""
    import torch
    from torch import nn

    from llmlab.gguf_import import load_gguf_quantized
    from llmlab.quantized import FusedQuantLinear, QuantLinear

    model, _, _ = load_gguf_quantized(quant_gguf, dtype=torch.float32)
    quantized = [m for m in model.modules() if isinstance(m, (QuantLinear, FusedQuantLinear))]
    assert any(isinstance(m, FusedQuantLinear) for m in quantized)
    base_shapes = {(m.out_features, m.in_features) for m in quantized}
    blocks = {f"{i}.{n}": b.clone() for i, m in enumerate(quantized) if isinstance(m, QuantLinear)
              for n, b in m.kernel_buffers().items()}
    norms = sum(p.numel() for p in model.parameters())
    assert norms == sum(p.numel() for n, p in model.named_parameters() if n.endswith("norm.weight"))

    method = (LoRA(LoRAConfig(r=4, alpha=8, targets="all")) if kind == "lora" else
              Bottleneck(BottleneckConfig(dim=8)))
    model = method.prepare(model)
    trainable = method.trainable_parameters(model)
    assert trainable and {n for n, _ in trainable} == {n for n, _ in method.params(model)}
    assert sum(p.numel() for p in model.parameters()) == norms + sum(p.numel() for _, p in trainable)
    assert not [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                and tuple(m.weight.shape) in base_shapes]

    ids = torch.randint(3, 250, (4, 33), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for _, p in trainable], lr=2e-2)
    losses = []
    for _ in range(25):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.25, losses  # learns the batch (lora: -1.0 in 25 steps, adapter: -0.4)
    after = {f"{i}.{n}": b for i, m in enumerate(quantized) if isinstance(m, QuantLinear)
             for n, b in m.kernel_buffers().items()}
    assert all(torch.equal(blocks[k], after[k]) for k in blocks)
