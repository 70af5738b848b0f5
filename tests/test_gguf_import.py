"""GGUF import: config, dequantized tensors, q/k un-permutation, tokenizer, errors, and parity with HF."""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
import torch
from _gguf_writer import CHAT_TEMPLATE, gguf_name, gpt2_vocab, llamacpp_permute, tiny_hf_model, write_llama_gguf

from llmlab.checkpoint import dtype_from_name, load_checkpoint, load_safetensors
from llmlab.cli import main
from llmlab.config import ModelConfig
from llmlab.errors import LLMLabError
from llmlab.gguf_import import (
    config_from_gguf,
    gguf_tensor_name,
    hf_tensor_name,
    import_gguf,
    kept_gguf,
    open_gguf,
    permute_qk,
    read_gguf,
    tokenizer_from_gguf,
    unpermute_qk,
)

# One tensor of each kind per layer; k-quants need rows of 256 values, so they sit on ffn_down (in = 256).
MIXED_TYPES = {
    "token_embd.weight": "Q8_0", "output.weight": "Q4_0",
    "blk.0.attn_q.weight": "Q4_0", "blk.0.attn_k.weight": "Q4_1", "blk.0.attn_v.weight": "Q5_0",
    "blk.0.attn_output.weight": "F16", "blk.0.ffn_gate.weight": "BF16", "blk.0.ffn_up.weight": "Q5_1",
    "blk.0.ffn_down.weight": "Q4_K",
    "blk.1.attn_q.weight": "Q8_0", "blk.1.attn_k.weight": "F16", "blk.1.attn_v.weight": "Q4_1",
    "blk.1.attn_output.weight": "Q8_0", "blk.1.ffn_gate.weight": "Q4_0", "blk.1.ffn_up.weight": "Q8_0",
    "blk.1.ffn_down.weight": "Q6_K",
}


def hf_state(model: torch.nn.Module, tie: bool) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}


@pytest.fixture(scope="module")
def tiny():
    return tiny_hf_model(tie=False)


@pytest.fixture
def tiny_gguf(tmp_path, tiny):
    cfg, model = tiny
    return write_llama_gguf(tmp_path / "tiny.gguf", cfg, hf_state(model, False))


# -- tensors ------------------------------------------------------------------------------------------
def test_every_tensor_equals_gguf_dequantization(tmp_path, tiny):
    cfg, model = tiny
    path = write_llama_gguf(tmp_path / "mixed.gguf", cfg, hf_state(model, False), types=MIXED_TYPES)
    config, tensors, _ = read_gguf(path)
    reader = gguf.GGUFReader(path)
    assert {t.tensor_type.name for t in reader.tensors} >= {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0",
                                                            "Q5_1", "Q4_K", "Q6_K"}
    assert len(tensors) == len(reader.tensors) == len(model.state_dict())
    for t in reader.tensors:
        hf = next(k for k in tensors if gguf_name(k) == t.name)
        expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tensors[hf].shape)
        got = tensors[hf].numpy()
        if ".attn_q." in t.name:
            got = llamacpp_permute(got, config.num_attention_heads)
        elif ".attn_k." in t.name:
            got = llamacpp_permute(got, config.num_key_value_heads)
        assert tensors[hf].dtype == torch.float32
        np.testing.assert_array_equal(got, expected, err_msg=t.name)
        assert np.isfinite(got).all()


def test_f32_import_returns_the_hf_weights(tiny_gguf, tiny):
    _, model = tiny
    _, tensors, _ = read_gguf(tiny_gguf)
    for name, ref in model.state_dict().items():
        torch.testing.assert_close(tensors[name], ref, rtol=0, atol=0, msg=name)


def test_dtype_is_applied_per_tensor(tiny_gguf):
    _, tensors, _ = read_gguf(tiny_gguf, dtype=torch.bfloat16)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


@pytest.mark.parametrize("n_head,head_dim,cols", [(4, 16, 64), (2, 8, 24), (3, 64, 1)])
def test_unpermute_inverts_llamacpp_permutation(n_head, head_dim, cols):
    w = torch.randn(n_head * head_dim, cols)
    permuted = torch.from_numpy(llamacpp_permute(w.numpy(), n_head))
    assert not torch.equal(permuted, w)
    torch.testing.assert_close(unpermute_qk(permuted, n_head), w, rtol=0, atol=0)
    bias = torch.randn(n_head * head_dim)
    torch.testing.assert_close(unpermute_qk(torch.from_numpy(llamacpp_permute(bias.numpy(), n_head)), n_head), bias,
                               rtol=0, atol=0)
    # the exporter's direction is the converter's permutation exactly
    assert torch.equal(permute_qk(w, n_head), permuted)
    assert torch.equal(permute_qk(bias, n_head), torch.from_numpy(llamacpp_permute(bias.numpy(), n_head)))


def test_gguf_names_are_the_converters_both_ways(tiny):
    _, model = tiny
    for hf_name in model.state_dict():
        assert gguf_tensor_name(hf_name) == gguf_name(hf_name)  # the test writer's own table
        assert hf_tensor_name(gguf_tensor_name(hf_name)) == hf_name
    assert gguf_tensor_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_hf_after_import(tmp_path, tie):
    cfg, model = tiny_hf_model(tie=tie, seed=1)
    path = write_llama_gguf(tmp_path / "tiny.gguf", cfg, hf_state(model, tie))
    folder = import_gguf(path, tmp_path / "ckpt")
    ours = load_checkpoint(folder)
    assert ours.config.tie_word_embeddings is tie
    idx = torch.randint(0, cfg["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(idx).logits
        got = ours(idx)
    assert (got - expected).abs().max().item() <= 1e-4


def test_import_writes_a_complete_folder(tiny_gguf, tmp_path):
    folder = import_gguf(tiny_gguf, tmp_path / "out", dtype="bfloat16")
    config = json.loads((folder / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is False
    assert {t.dtype for t in load_safetensors(folder).values()} == {torch.bfloat16}
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["bos_token_id"] == 1
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>" and tok_cfg["chat_template"] == CHAT_TEMPLATE
    assert json.loads((folder / "llmlab_import.json").read_text())["source"] == "tiny.gguf"


def test_an_imported_folder_keeps_its_gguf_and_others_hold_none(tiny_gguf, tmp_path):
    folder = import_gguf(tiny_gguf, tmp_path / "out")
    assert kept_gguf(folder) == folder / "model.gguf"
    assert (folder / "model.gguf").read_bytes() == tiny_gguf.read_bytes()
    assert kept_gguf(import_gguf(tiny_gguf, tmp_path / "plain", keep_gguf=False)) is None
    record = folder / "llmlab_import.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "gguf": "../elsewhere.gguf"}))
    assert kept_gguf(folder) is None  # only a file inside the folder counts
    assert kept_gguf(tmp_path) is None


# -- config -------------------------------------------------------------------------------------------
def test_config_from_metadata(tiny_gguf, tiny):
    cfg, _ = tiny
    config = config_from_gguf(open_gguf(tiny_gguf))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "bos_token_id",
                "eos_token_id", "pad_token_id"):
        assert getattr(config, key) == cfg[key], key
    assert config.head_dim == 16 and config.rope_scaling is None and config.tie_word_embeddings is False


def test_linear_rope_scaling(tmp_path, tiny):
    cfg, model = tiny
    path = write_llama_gguf(tmp_path / "lin.gguf", cfg, hf_state(model, False),
                            metadata={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    assert config_from_gguf(open_gguf(path)).rope_scaling == {"rope_type": "linear", "factor": 4.0}


def _llamacpp_rope_factors(head_dim, theta, factor, low, high, old_ctx):
    """llama.cpp's converter: per-frequency divisors for llama3 rope scaling (the `rope_freqs` tensor)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("factor,high,old_ctx", [(32.0, 4.0, 8192), (8.0, 2.0, 16384)])
def test_llama3_rope_scaling_from_rope_freqs(tmp_path, tiny, factor, high, old_ctx):
    cfg, _ = tiny
    cfg = dict(cfg, hidden_size=64, num_attention_heads=1, num_key_value_heads=1, rope_theta=500000.0)
    path = write_llama_gguf(tmp_path / "l3.gguf", cfg, {}, extra_tensors={
        "rope_freqs.weight": _llamacpp_rope_factors(64, 500000.0, factor, 1.0, high, old_ctx)})
    scaling = config_from_gguf(open_gguf(path)).rope_scaling
    assert scaling == {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": high,
                       "original_max_position_embeddings": old_ctx}


def test_rope_freqs_that_are_not_llama3_are_refused(tmp_path, tiny):
    cfg, _ = tiny
    factors = np.linspace(1.0, 3.0, cfg["hidden_size"] // cfg["num_attention_heads"] // 2, dtype=np.float32)[::-1]
    path = write_llama_gguf(tmp_path / "odd.gguf", cfg, {}, extra_tensors={"rope_freqs.weight": factors.copy()})
    with pytest.raises(LLMLabError, match="rope_freqs.weight' does not follow the llama3"):
        config_from_gguf(open_gguf(path))


def test_yarn_scaling_is_refused(tmp_path, tiny):
    cfg, _ = tiny
    path = write_llama_gguf(tmp_path / "yarn.gguf", cfg, {}, metadata={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(LLMLabError, match="rope scaling type 'yarn'"):
        config_from_gguf(open_gguf(path))


# -- tokenizer ----------------------------------------------------------------------------------------
def test_gpt2_tokenizer_from_gguf(tiny_gguf):
    tok = tokenizer_from_gguf(open_gguf(tiny_gguf))
    tokens, _, _ = gpt2_vocab()
    assert tok.vocab_size == len(tokens)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.add_bos) == ("<|im_start|>", "<|im_end|>",
                                                                          "<|im_end|>", False)
    ids = tok.encode("<|im_start|>user\n the and  x<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tokens.index("Ġthe") in ids and tokens.index("Ġand") in ids
    for text in ("héllo wörld\n\tcode()  ", "日本語 🙂", " the  and   "):
        assert tok.decode(tok.encode(text)) == text
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")


def test_pre_tokenizer_regex_follows_tokenizer_pre(tmp_path, tiny):
    cfg, _ = tiny
    default = tokenizer_from_gguf(open_gguf(write_llama_gguf(tmp_path / "a.gguf", cfg, {})))
    llama3 = tokenizer_from_gguf(open_gguf(write_llama_gguf(tmp_path / "b.gguf", cfg, {}, pre="llama-bpe")))
    words = lambda t, s: [w for w, _ in t.backend.pre_tokenizer.pre_tokenize_str(s)]  # noqa: E731
    assert words(default, "12345") == ["12345"]  # GPT-2 pattern: digits stay together
    assert words(llama3, "12345") == ["123", "45"]  # llama3 pattern: at most 3 digits


def _spm_gguf(path, cfg):
    """A sentencepiece-style ('llama') vocabulary: <unk> <s> </s>, byte tokens, and scored pieces."""
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "▁he", "▁hell", "lo", "▁hello", "▁w", "or",
              "▁wor", "ld", "▁world"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    w_cfg = dict(cfg, vocab_size=len(tokens))
    return write_llama_gguf(path, w_cfg, {}, tokenizer="llama", metadata={
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_space_prefix": True})


def test_sentencepiece_tokenizer_matches_transformers(tmp_path, tiny):
    from transformers import AutoTokenizer

    cfg, _ = tiny
    path = _spm_gguf(tmp_path / "spm.gguf", cfg)
    tok = tokenizer_from_gguf(open_gguf(path))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert tok.add_bos and tok.bos_token == "<s>"
    for text in ("hello world", " hello  world", "hello\nworld ü 🙂", "world</s>hello"):
        assert tok.encode(text) == ref(text)["input_ids"], text
        assert tok.decode(tok.encode(text)) == ref.decode(ref(text)["input_ids"], skip_special_tokens=True)


# -- errors -------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(LLMLabError, match="GGUF file not found: .*nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("hello, not a model")
    with pytest.raises(LLMLabError, match="notes.gguf: not a GGUF file"):
        read_gguf(path)


def test_truncated_file(tiny_gguf):
    data = tiny_gguf.read_bytes()
    tiny_gguf.write_bytes(data[: len(data) // 2])
    with pytest.raises(LLMLabError, match=r"tiny.gguf: cannot read GGUF file \(truncated or corrupt\?\)"):
        read_gguf(tiny_gguf)


def test_other_architecture(tmp_path, tiny):
    cfg, _ = tiny
    path = write_llama_gguf(tmp_path / "g.gguf", cfg, {}, arch="gpt2")
    with pytest.raises(LLMLabError, match="g.gguf: GGUF architecture is 'gpt2'; llmlab imports only .*'llama'"):
        read_gguf(path)


def test_unsupported_tensor_type(tmp_path, tiny):
    cfg, model = tiny
    path = write_llama_gguf(tmp_path / "tq.gguf", cfg, hf_state(model, False),
                            types={"blk.1.ffn_down.weight": "TQ1_0"})
    with pytest.raises(LLMLabError, match="tensor 'blk.1.ffn_down.weight' has type TQ1_0, which llmlab does not"):
        read_gguf(path)


def test_unknown_tensor_name(tmp_path, tiny):
    cfg, _ = tiny
    path = write_llama_gguf(tmp_path / "x.gguf", cfg, {}, extra_tensors={"blk.0.ffn_gate_exps.weight":
                                                                          np.zeros((4, 4), np.float32)})
    with pytest.raises(LLMLabError, match="tensor 'blk.0.ffn_gate_exps.weight' is not part of a llama model"):
        read_gguf(path)


def test_unsupported_tokenizer_model(tmp_path, tiny):
    cfg, _ = tiny
    path = write_llama_gguf(tmp_path / "t.gguf", cfg, {}, tokenizer="none", metadata={
        "tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["[CLS]", "a"]})
    with pytest.raises(LLMLabError, match="tokenizer model 'bert' .* is not supported"):
        read_gguf(path)


def test_missing_tensor_is_reported_by_import(tmp_path, tiny):
    cfg, model = tiny
    sd = {k: v for k, v in hf_state(model, False).items() if "layers.1.mlp.up_proj" not in k}
    path = write_llama_gguf(tmp_path / "m.gguf", cfg, sd)
    with pytest.raises(LLMLabError, match=r"m.gguf: .*missing .*'model.layers.1.mlp.up_proj"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_dtype_name(tiny_gguf, tmp_path):
    with pytest.raises(LLMLabError, match="unknown dtype 'fp8'; expected one of float32, bfloat16, float16"):
        dtype_from_name("fp8")
    with pytest.raises(LLMLabError, match="unknown dtype 'int8'"):
        import_gguf(tiny_gguf, tmp_path / "out", dtype="int8")


def test_cli_convert_bad_file_prints_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"\x00" * 64)
    assert main(["convert", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmlab: error: ") and "bad.gguf: not a GGUF file" in err[0]


# -- the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ---------------------------------------------
TRICKY = [
    "Hello world", " leading space", "trailing space ", "multiple   spaces   inside", "   ", "",
    "line one\nline two\n\nline four\r\nwindows", "\ttab\tseparated\t", "naïve café déjà vu — “quotes”",
    "日本語のテキストと中文字符", "한국어 텍스트", "emoji 🙂👍🏽🇫🇷 and 👨‍👩‍👧",
    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # square\n\n\tif x:\n\t\tpass", "numbers 0 12 345 6789 3.14159 -42 1,000,000",
    "<|endoftext|><repo_name>x<file_sep>", "mixed<|im_end|>text", "I'm can't we'll THEY'RE",
]


@pytest.mark.slow
def test_default_model_tensors_equal_gguf_dequantization(default_gguf, default_ckpt):
    reader = gguf.GGUFReader(default_gguf)
    config = ModelConfig.from_file(default_ckpt / "config.json")
    saved = load_safetensors(default_ckpt)
    names = {gguf_name(k): k for k in saved}
    assert len(saved) == len(reader.tensors) == 272
    for t in reader.tensors:
        got = saved[names[t.name]].numpy()
        expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(got.shape)
        if ".attn_q." in t.name:
            got = llamacpp_permute(got, config.num_attention_heads)
        elif ".attn_k." in t.name:
            got = llamacpp_permute(got, config.num_key_value_heads)
        np.testing.assert_array_equal(got, expected, err_msg=t.name)


@pytest.mark.slow
def test_default_tokenizer_matches_transformers(default_gguf):
    from transformers import AutoTokenizer

    tok = tokenizer_from_gguf(open_gguf(default_gguf))
    ref = AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    for text in TRICKY:
        assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"], repr(text)
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text, repr(text)
    assert tok.vocab_size == len(ref) == 49152


@pytest.mark.slow
def test_default_model_logits_match_hf(default_ckpt):
    from transformers import LlamaForCausalLM

    from llmlab.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(default_ckpt)
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])])
    ours = load_checkpoint(default_ckpt)
    ref = LlamaForCausalLM.from_pretrained(str(default_ckpt), dtype=torch.float32).eval()
    with torch.no_grad():
        got, expected = ours(ids), ref(ids).logits
    assert (got - expected).abs().max().item() <= 1e-4
    generation = json.loads((default_ckpt / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.token_id("<|im_end|>") == 2
