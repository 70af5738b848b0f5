import json
import os

import pytest
import torch
from safetensors.torch import load_file

from llmlab.checkpoint import (
    dtype_from_name,
    hf_to_llmlab,
    llmlab_to_hf,
    load_checkpoint,
    load_generation_config,
    save_checkpoint,
)
from llmlab.config import ModelConfig
from llmlab.errors import LLMLabError
from llmlab.model import build_model


@pytest.fixture
def tiny(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny")).eval()
    save_checkpoint(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_name_mapping_round_trip():
    config = ModelConfig.from_name("tiny")
    sd = build_model(config).state_dict()
    hf = llmlab_to_hf(sd, config)
    assert "model.layers.0.self_attn.k_proj.weight" in hf and "model.layers.1.mlp.up_proj.weight" in hf
    assert not any("qkv" in k or "gate_up" in k for k in hf)
    assert hf["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)  # 2 kv heads x 16
    back = hf_to_llmlab(hf, config)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k])


def test_save_load_round_trip(tiny):
    model, folder = tiny
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "generation_config.json"}
    loaded = load_checkpoint(folder)
    idx = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_tied_checkpoint_has_no_lm_head_and_stays_tied(tmp_path):
    model = build_model(ModelConfig.from_name("tiny-mha"))
    save_checkpoint(model, tmp_path / "c")
    assert "lm_head.weight" not in load_file(tmp_path / "c" / "model.safetensors")
    loaded = load_checkpoint(tmp_path / "c")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_transformers_reads_what_we_write(tiny):
    transformers = pytest.importorskip("transformers")
    model, folder = tiny
    hf = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    idx = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-5, rtol=0)


def test_sharded_hf_checkpoint_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_checkpoint(tmp_path)
    idx = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=0)


def test_dtype_on_save_and_load(tiny, tmp_path):
    model, folder = tiny
    save_checkpoint(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_checkpoint(tmp_path / "bf16").lm_head.weight.dtype == torch.bfloat16
    assert load_checkpoint(folder, dtype=torch.float16).lm_head.weight.dtype == torch.float16


def test_failed_save_keeps_the_old_checkpoint(tiny):
    model, folder = tiny
    before = (folder / "model.safetensors").read_bytes()

    class Broken:
        def save(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(build_model(ModelConfig.from_name("tiny")), folder, tokenizer=Broken())
    assert (folder / "model.safetensors").read_bytes() == before
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def test_errors(tiny, tmp_path):
    model, folder = tiny
    with pytest.raises(LLMLabError, match="checkpoint folder not found"):
        load_checkpoint(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LLMLabError, match="no config.json"):
        load_checkpoint(empty)
    (empty / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(LLMLabError, match="no model.safetensors"):
        load_checkpoint(empty)
    (empty / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(LLMLabError, match="only pickle weights.*safetensors only"):
        load_checkpoint(empty)


def test_truncated_weights(tiny, tmp_path):
    _, folder = tiny
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LLMLabError, match="model.safetensors: cannot read safetensors file"):
        load_checkpoint(folder)


def test_config_that_does_not_match_the_weights(tiny):
    _, folder = tiny
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LLMLabError, match="has shape \\(320, 64\\) but the config implies \\(192, 64\\)"):
        load_checkpoint(folder)
    cfg["intermediate_size"], cfg["num_hidden_layers"] = 160, 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LLMLabError, match="missing \\['model.layers.2"):
        load_checkpoint(folder)


def test_missing_shard(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(ModelConfig.from_name("tiny").to_hf_dict()))
    index = {"weight_map": {"a": "model-1-of-2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LLMLabError, match="lists shard files that are missing"):
        load_checkpoint(tmp_path)


def test_saved_checkpoint_is_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint(build_model(ModelConfig.from_name("tiny")), tmp_path / "c")
    finally:
        os.umask(old)
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "c" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_dtype_names():
    assert dtype_from_name("bfloat16") is torch.bfloat16
    with pytest.raises(LLMLabError, match="unknown dtype 'fp8'; expected one of float32, bfloat16, float16"):
        dtype_from_name("fp8")


def test_generation_config_reading(tiny):
    _, folder = tiny
    assert load_generation_config(folder)["eos_token_id"] == 2
    (folder / "generation_config.json").unlink()
    assert load_generation_config(folder) == {}
    (folder / "generation_config.json").write_text("{broken")
    with pytest.raises(LLMLabError, match="generation_config.json: not valid JSON"):
        load_generation_config(folder)
    (folder / "generation_config.json").write_text("[2]")
    with pytest.raises(LLMLabError, match="generation_config.json: expected a JSON object"):
        load_generation_config(folder)


def test_auto_dtype_needs_the_device_it_runs_on() -> None:
    assert dtype_from_name("auto", torch.device("cuda")) is torch.bfloat16  # no GPU needed to name one
    assert dtype_from_name("auto", torch.device("cpu")) is torch.float32
    assert dtype_from_name("float16", torch.device("cpu")) is torch.float16
    with pytest.raises(LLMLabError, match="unknown dtype 'auto'"):
        dtype_from_name("auto")  # a stored dtype is never auto
