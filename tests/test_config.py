import json

import pytest
import torch

from llmlab.config import PRESETS, ModelConfig
from llmlab.errors import LLMLabError
from llmlab.model import LLaMA


@pytest.mark.parametrize("name, billions", [("llama-7b", 6.7), ("llama-13b", 13.0), ("llama-33b", 32.5),
                                            ("llama-65b", 65.2)])
def test_llama_paper_sizes_on_meta_device(name, billions):
    config = ModelConfig.from_name(name)
    with torch.device("meta"):
        model = LLaMA(config)
    n = sum(p.numel() for p in model.parameters())
    assert n == config.num_params()
    assert n // 10**8 == round(billions * 10)  # the paper's table truncates to one decimal: 65.29B reads "65.2B"


@pytest.mark.parametrize("name, millions", [("smollm2-135m", 134.5), ("tinyllama-1.1b", 1100.0),
                                            ("llama-3.2-1b", 1235.8), ("smollm2-360m", 361.8)])
def test_published_sizes(name, millions):
    assert ModelConfig.from_name(name).num_params() / 1e6 == pytest.approx(millions, rel=0.01)


def test_every_preset_builds_on_meta():
    for name in PRESETS:
        config = ModelConfig.from_name(name)
        with torch.device("meta"):
            model = LLaMA(config)
        assert sum(p.numel() for p in model.parameters()) == config.num_params(), name


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(LLMLabError, match="unknown model preset 'llama-8b'.*llama-7b"):
        ModelConfig.from_name("llama-8b")


def test_from_name_matches_exactly():
    with pytest.raises(LLMLabError):
        ModelConfig.from_name("LLaMA-7B")


def test_derived_fields():
    c = ModelConfig(hidden_size=4096, num_attention_heads=32)
    assert c.head_dim == 128 and c.num_key_value_heads == 32 and c.intermediate_size == 11008


def test_bad_shapes():
    with pytest.raises(LLMLabError, match="'num_attention_heads' \\(6\\) must be a multiple of 'num_key_value_heads'"):
        ModelConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(LLMLabError, match="'hidden_size' must be a positive integer"):
        ModelConfig(hidden_size=0)
    with pytest.raises(LLMLabError, match="rope_type 'yarn' is not supported"):
        ModelConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(LLMLabError, match="missing \\['low_freq_factor'"):
        ModelConfig(rope_scaling={"rope_type": "llama3", "factor": 2.0})


def test_hf_dict_round_trip_and_transformers_reads_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = ModelConfig.from_name("llama-3.2-1b")
    config.save(tmp_path / "config.json")
    hf = transformers.LlamaConfig.from_pretrained(tmp_path)
    assert hf.num_key_value_heads == 8 and hf.tie_word_embeddings and hf.head_dim == 64
    rope = getattr(hf, "rope_parameters", None) or hf.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0
    # and back again, through what transformers writes (v5 folds rope keys into rope_parameters)
    hf.save_pretrained(tmp_path / "hf")
    again = ModelConfig.from_file(tmp_path / "hf" / "config.json")
    for field in ("hidden_size", "num_key_value_heads", "rope_theta", "tie_word_embeddings", "head_dim"):
        assert getattr(again, field) == getattr(config, field), field
    assert again.rope_scaling["factor"] == 32.0


def test_from_file_yaml_preset_with_overrides(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("preset: tiny\nnum_hidden_layers: 3\n")
    c = ModelConfig.from_file(p)
    assert c.num_hidden_layers == 3 and c.hidden_size == 64


def test_from_file_errors(tmp_path):
    with pytest.raises(LLMLabError, match="config file not found"):
        ModelConfig.from_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LLMLabError, match="bad.json: not valid JSON"):
        ModelConfig.from_file(bad)
    unknown = tmp_path / "u.yaml"
    unknown.write_text("hidden_sise: 64\n")
    with pytest.raises(LLMLabError, match="unknown config keys \\['hidden_sise'\\]"):
        ModelConfig.from_file(unknown)
    other = tmp_path / "config.json"
    other.write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(LLMLabError, match="model_type 'gpt2' is not a LLaMA-family model"):
        ModelConfig.from_file(other)


def test_from_spec_takes_a_preset_a_file_or_a_checkpoint_folder(tmp_path):
    assert ModelConfig.from_spec("tiny").hidden_size == 64
    ModelConfig.from_name("tiny-mha").save(tmp_path / "config.json")
    assert ModelConfig.from_spec(tmp_path).tie_word_embeddings is True
    assert ModelConfig.from_spec(tmp_path / "config.json").num_key_value_heads == 4
    with pytest.raises(LLMLabError, match="unknown model preset 'no-such-model'"):
        ModelConfig.from_spec("no-such-model")
