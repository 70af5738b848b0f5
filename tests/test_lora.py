"""LoRA: parity with transformers + PEFT (logits, files both ways), merge/unmerge, training selection, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny import task_records, tiny_checkpoint, write_jsonl

from llmlab.args import LoRAConfig
from llmlab.checkpoint import load_checkpoint
from llmlab.errors import LLMLabError
from llmlab.methods import load_adapter
from llmlab.methods.adapters import adapter_params
from llmlab.methods.lora import (
    LoRA,
    LoRALinear,
    apply_lora,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)

ALL = ["q", "k", "v", "o", "gate", "up", "down"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("lora") / "base")


def ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))


def randomize(params) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def lora_model(ckpt: Path, **kw) -> torch.nn.Module:
    model = apply_lora(load_checkpoint(ckpt), LoRAConfig(**{"r": 4, "alpha": 8.0, "targets": ALL, **kw}))
    randomize([p for n, p in adapter_params(model)])
    return model.eval()


def hf_model(ckpt: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_llmlab_adapter_loads_in_peft_with_the_same_logits(ckpt: Path, tmp_path: Path, rslora: bool) -> None:
    from peft import PeftModel

    model = lora_model(ckpt, rslora=rslora)
    LoRA(model.lora_config, base_model=str(ckpt)).save(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["use_rslora"] is rslora
    peft = PeftModel.from_pretrained(hf_model(ckpt), tmp_path / "adapter").eval()
    with torch.no_grad():
        ours, theirs = model(ids()), peft(ids()).logits
        base = hf_model(ckpt)(ids()).logits
    assert (ours - base).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_peft_adapter_loads_in_llmlab_with_the_same_logits(ckpt: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                        task_type="CAUSAL_LM")
    peft = get_peft_model(hf_model(ckpt), config)
    randomize([p for n, p in peft.named_parameters() if "lora_" in n])
    peft.save_pretrained(tmp_path / "peft")
    model = load_adapter(load_checkpoint(ckpt), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(model(ids()), peft.eval()(ids()).logits, atol=1e-5, rtol=0)
    assert all(not p.requires_grad for _, p in adapter_params(model)) and len(adapter_params(model)) == 4 * 2 * 2


def test_merged_equals_unmerged_and_unmerge_restores(ckpt: Path) -> None:
    model = lora_model(ckpt, targets=["q", "k", "gate", "o"])
    w0 = model.model.layers[0].self_attn.qkv_proj.weight.detach().clone()
    with torch.no_grad():
        unmerged = model(ids())
        merge_lora(model)
        merged = model(ids())
        unmerge_lora(model)
        again = model(ids())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, unmerged, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.model.layers[0].self_attn.qkv_proj.weight, w0, atol=1e-7, rtol=0)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(ids()), unmerged, atol=1e-5, rtol=0)


def test_lora_starts_at_the_base_model_and_trains_only_adapters(ckpt: Path) -> None:
    base = load_checkpoint(ckpt)
    method = LoRA(LoRAConfig(r=2, targets="q,v,down", dropout=0.1))
    model = method.prepare(load_checkpoint(ckpt))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids()), base(ids()))  # B = 0: exactly the base model
    names = [n for n, _ in method.trainable_parameters(model)]
    assert names == [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 2 * 3 * 2 and all(".lora_" in n for n in names)
    assert "model.layers.0.self_attn.qkv_proj.weight" in model.state_dict()  # base names kept
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert set(qkv.lora_A) == {"q", "v"} and qkv.lora_B["v"].shape == (2 * 16, 2)


def test_bad_targets_and_foreign_adapters(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(LLMLabError, match=r"LoRA target\(s\) \['lm_head'\] match no module"):
        LoRA(LoRAConfig(targets="q,lm_head"))
    with pytest.raises(LLMLabError, match="match no module"):
        LoRA(LoRAConfig(targets=""))
    # an adapter made for a model of another shape
    other = tiny_checkpoint(tmp_path / "other", preset="tiny-mha")
    model = lora_model(other)
    LoRA(model.lora_config, base_model="someone/tiny-mha").save(model, tmp_path / "adapter")
    with pytest.raises(LLMLabError, match=r"made for another base model \('someone/tiny-mha'\)"):
        load_adapter(load_checkpoint(ckpt), tmp_path / "adapter")
    # without llmlab's base probe (as PEFT writes them) the shapes tell
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt"})
    with pytest.raises(LLMLabError, match=r"does not fit this model: wrong shape .*made for base model "
                                          r"'someone/tiny-mha'"):
        load_adapter(load_checkpoint(ckpt), tmp_path / "adapter")
    # an adapter made for a model of the same shape but other weights
    twin = tiny_checkpoint(tmp_path / "twin", seed=1)
    model = lora_model(twin)
    LoRA(model.lora_config, base_model="someone/twin").save(model, tmp_path / "twin-adapter")
    with pytest.raises(LLMLabError, match=r"made for another base model \('someone/twin'\): its embeddings differ"):
        load_adapter(load_checkpoint(ckpt), tmp_path / "twin-adapter")
    load_adapter(load_checkpoint(twin, dtype=torch.bfloat16), tmp_path / "twin-adapter")  # its own base, any dtype
    with pytest.raises(LLMLabError, match="no adapter_config.json"):
        load_adapter(load_checkpoint(ckpt), tmp_path)
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "use_dora": True}))
    with pytest.raises(LLMLabError, match="does not support: {'use_dora': True}"):
        load_adapter(load_checkpoint(ckpt), tmp_path / "adapter")
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "use_dora": False,
                                    "layers_to_transform": [0]}))
    with pytest.raises(LLMLabError, match=r"does not support: {'layers_to_transform': \[0\]}"):
        load_adapter(load_checkpoint(ckpt), tmp_path / "adapter")


@pytest.mark.slow
def test_peft_parity_on_the_default_model(default_ckpt: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    model = apply_lora(load_checkpoint(default_ckpt), LoRAConfig(r=8, alpha=16.0, targets="all"))
    randomize([p for _, p in adapter_params(model)])
    LoRA(model.lora_config, base_model=str(default_ckpt)).save(model.eval(), tmp_path / "adapter")
    peft = PeftModel.from_pretrained(hf_model(default_ckpt), tmp_path / "adapter").eval()
    x = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), peft(x).logits, atol=1e-4, rtol=1e-5)


@pytest.mark.slow
def test_lora_run_resumes_exactly(ckpt: Path, tmp_path: Path) -> None:
    from llmlab.args import TrainConfig
    from llmlab.finetune import finetune
    from llmlab.metrics import read_metrics
    data = write_jsonl(tmp_path / "t.jsonl", task_records(40))
    cfg = dict(lr=1e-2, max_steps=6, warmup_steps=1, batch_size=4, seq_len=64, eval_every=0, eval_batches=1,
               save_every=3, log_every=1)
    lora = LoRAConfig(r=4, targets="q,v,gate", dropout=0.1)
    finetune(ckpt, data=data, out=tmp_path / "a", train=TrainConfig(**cfg), lora=lora)
    finetune(ckpt, data=data, out=tmp_path / "b", train=TrainConfig(**cfg, stop_at=3), lora=lora)
    assert (tmp_path / "b" / "checkpoints" / "step-000003" / "adapter_config.json").is_file()
    finetune(ckpt, data=data, out=tmp_path / "b", train=TrainConfig(**cfg), lora=lora)
    losses = [{r["step"]: r["loss"] for r in read_metrics(tmp_path / d) if r.get("loss") is not None} for d in "ab"]
    assert losses[1][6] == pytest.approx(losses[0][6], rel=1e-5)


def test_adapter_finds_its_base_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import AutoPeftModelForCausalLM

    from llmlab.hub import record_hub_source
    from llmlab.methods import make_method

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    tiny_checkpoint(work / "base")
    monkeypatch.chdir(work)  # training runs here and is given the base as the relative path `base`
    model = lora_model(Path("base"))
    make_method("lora", "base", lora=model.lora_config).save(model, Path("run") / "final")
    recorded = json.loads((work / "run" / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((work / "base").resolve())
    monkeypatch.chdir(tmp_path)  # anywhere else: PEFT still finds the base
    peft = AutoPeftModelForCausalLM.from_pretrained(work / "run" / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(ids()).logits, model(ids()), atol=1e-5, rtol=0)
    # a base downloaded from the hub is recorded by its repo id; the bottleneck adapters record the path too
    record_hub_source(work / "base", "someone/tiny-llama")
    make_method("lora", str(work / "base"), lora=model.lora_config).save(model, tmp_path / "hub")
    assert json.loads((tmp_path / "hub" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "someone/tiny-llama"
    (work / "base" / "llmlab_hub.json").unlink()
    monkeypatch.chdir(work)
    method = make_method("adapter", "base")
    method.save(method.prepare(load_checkpoint("base")), tmp_path / "bottleneck")
    assert json.loads((tmp_path / "bottleneck" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str((work / "base").resolve())
