import pytest
import torch

from llmlab.checkpoint import hf_to_llmlab
from llmlab.config import ModelConfig
from llmlab.model import LLaMA, build_model

transformers = pytest.importorskip("transformers")

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
CASES = {
    "gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mha-tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "mqa-linear-rope": dict(num_attention_heads=4, num_key_value_heads=1, rope_scaling={"rope_type": "linear",
                                                                                        "factor": 4.0}),
    "gqa-llama3-rope-headdim": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24, rope_scaling=LLAMA3,
                                    tie_word_embeddings=True),
}


def hf_pair(seed: int, **kw):
    """A random HF LlamaForCausalLM and our model with the same weights (copied through the name mapping)."""
    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                                         max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500.0, **kw)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    ours_config = ModelConfig.from_hf_dict(hf_config.to_dict())
    ours = build_model(ours_config, device="meta")
    sd = hf_to_llmlab(hf.state_dict(), ours_config)
    if ours_config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    ours.load_state_dict(sd, assign=True)
    if ours_config.tie_word_embeddings:
        ours.lm_head.weight = ours.model.embed_tokens.weight
    return hf, ours.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(case):
    hf, ours = hf_pair(0, **CASES[case])
    idx = torch.randint(0, 97, (2, 40))  # longer than llama3's original context of 16: scaling matters
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-4, rtol=0)


def test_rope_scaling_changes_logits():
    """Guards the parity test against a scaling that is silently ignored."""
    _, scaled = hf_pair(0, **CASES["mqa-linear-rope"])
    _, plain = hf_pair(0, **{**CASES["mqa-linear-rope"], "rope_scaling": None})
    idx = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        assert (scaled(idx) - plain(idx)).abs().max() > 1e-3


def test_left_padded_batch_matches_hf_with_attention_mask():
    hf, ours = hf_pair(1, **CASES["gqa-untied"])
    idx = torch.randint(3, 97, (2, 12))
    attn = torch.ones(2, 12, dtype=torch.long)
    attn[1, :5] = 0  # row 1 is left-padded by 5
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    keep = attn.bool()[:, None, None, :] & torch.ones(12, 12, dtype=torch.bool).tril()[None, None]
    keep |= torch.eye(12, dtype=torch.bool)[None, None]  # pad queries see themselves: no NaN rows
    with torch.no_grad():
        ref = hf(idx, attention_mask=attn, position_ids=position_ids).logits
        out = ours(idx, position_ids=position_ids, mask=keep)
    torch.testing.assert_close(out[attn.bool()], ref[attn.bool()], atol=1e-4, rtol=0)
    assert torch.isfinite(out).all()


def test_kv_cache_decode_equals_full_forward():
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny")).eval()
    idx = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        full = model(idx)
        model.setup_cache(batch_size=2, max_seq_len=32)
        steps = [model(idx[:, :16], input_pos=torch.arange(16))]
        for t in range(16, 24):  # alternate full-cache attention and attention over the filled slots only
            kv_len = t + 1 if t % 2 else None
            steps.append(model(idx[:, t:t + 1], input_pos=torch.tensor([t]), kv_len=kv_len))
        model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_attend_one_equals_sdpa(n_kv):
    from llmlab.model import attend_one

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, n_kv, 9, 16), torch.randn(2, n_kv, 9, 16)
    mask = torch.rand(2, 1, 1, 9) > 0.3
    mask[..., 0] = True
    kr, vr = k.repeat_interleave(4 // n_kv, dim=1), v.repeat_interleave(4 // n_kv, dim=1)
    want = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
    torch.testing.assert_close(attend_one(q, k, v, mask), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend_one(q, k, v, None),
                               torch.nn.functional.scaled_dot_product_attention(q, kr, vr), atol=1e-5, rtol=1e-5)
    got = attend_one(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_bf16_cache_decode_follows_the_full_forward():
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny")).eval().to(torch.bfloat16)
    idx = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        full = model(idx).float()
        model.setup_cache(batch_size=1, max_seq_len=16)
        steps = [model(idx[:, :8], input_pos=torch.arange(8))]
        for t in range(8, 12):  # one query on the CPU in bf16: the attend_one path
            steps.append(model(idx[:, t:t + 1], input_pos=torch.tensor([t]), kv_len=t + 1))
        model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1).float(), full, atol=0.1, rtol=0.05)


def test_last_only_and_cache_errors():
    model = build_model(ModelConfig.from_name("tiny")).eval()
    idx = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(idx, last_only=True), model(idx)[:, -1:])
    from llmlab.errors import LLMLabError

    with pytest.raises(LLMLabError, match="exceeds the model's context of 128"):
        model.setup_cache(1, 129)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny"))
    idx = torch.randint(0, 256, (2, 16))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(idx).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_bf16_keeps_rope_frequencies_in_fp32():
    model = build_model(ModelConfig.from_name("tiny"), dtype=torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16
    out = model(torch.randint(0, 256, (1, 8)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_tied_embeddings_share_storage():
    model = build_model(ModelConfig.from_name("tiny-mha"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == model.config.num_params()


def test_meta_construction_allocates_nothing():
    with torch.device("meta"):
        model = LLaMA(ModelConfig.from_name("llama-7b"))
    assert all(p.is_meta for p in model.parameters())


# -- the prepared cache (`setup_cache` -> `Cache`) ---------------------------------------------------------
def test_prepared_cache_tables_are_built_once_and_indexed():
    from llmlab.model import Cache, rope_cos_sin

    model = build_model(ModelConfig.from_name("tiny")).eval()
    cache = model.setup_cache(3, 20)
    assert isinstance(cache, Cache) and model.cache is cache and model.max_cache_len == 20
    assert all(layer.self_attn.kv_cache is kv for layer, kv in zip(model.model.layers, cache.layers))
    cos, sin = rope_cos_sin(model.inv_freq, torch.arange(20)[None], model.dtype)
    assert torch.equal(cache.cos, cos[0, 0]) and torch.equal(cache.sin, sin[0, 0])
    assert cache._causal is None  # made on first use only: generation brings its own masks
    slots = torch.tensor([[4, 5], [9, 10]])  # per-row slots: each row's causal mask over its own slots
    at = cache.inputs(slots, kv_len=12, rows=torch.tensor([2, 0]))
    want = torch.arange(12)[None, None, :] <= slots[:, :, None]
    assert at.mask.shape == (2, 1, 2, 12) and torch.equal(at.mask[:, 0], want)
    assert torch.equal(at.cos[:, 0], cache.cos[slots]) and at.kv_len == 12 and at.rows.tolist() == [2, 0]
    shared = cache.inputs(torch.arange(3, 6), position_ids=torch.tensor([[0, 1, 2]]))  # RoPE positions of their own
    assert shared.mask.shape == (1, 1, 3, 20) and torch.equal(shared.cos[0, 0], cache.cos[:3])
    model.clear_cache()
    assert model.cache is None and model.max_cache_len == 0
    assert all(layer.self_attn.kv_cache is None for layer in model.model.layers)


def test_prepared_cache_rows_copy_read_and_write():
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny")).eval()
    idx = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        cache = model.setup_cache(3, 16)
        model(idx, input_pos=torch.arange(6)[None], cache_rows=torch.tensor([2]), kv_len=6)
        kept = cache.read_row(2, 6)
        cache.copy_row(2, 0, 6)
        cache.write_row(1, kept, 4)  # a prefix of 4 slots
        for layer, (k, v) in zip(cache.layers, kept):
            assert torch.equal(layer.k[0, :, :6], k) and torch.equal(layer.v[0, :, :6], v)
            assert torch.equal(layer.k[1, :, :4], k[:, :4]) and not layer.k[1, :, 4:6].any()
        kept[0][0].zero_()  # a copy: the cache is unchanged
        assert cache.layers[0].k[2, :, :6].any()
        # a row continued from the copied prefix equals the full forward
        model.clear_cache()
        full = model(torch.cat([idx, torch.tensor([[7]])], 1))[0, -1]
        cache = model.setup_cache(2, 16)
        model(idx, input_pos=torch.arange(6)[None], cache_rows=torch.tensor([0]), kv_len=6)
        cache.copy_row(0, 1, 6)
        out = model(torch.tensor([[7], [7]]), input_pos=torch.tensor([[6], [6]]), kv_len=7)[:, -1]
    torch.testing.assert_close(out[0], full, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], full, atol=1e-5, rtol=0)


def test_a_model_built_on_meta_skips_the_embedding_init(monkeypatch) -> None:
    """Every load builds on meta and assigns the weights; normal_ on meta costs a one-off import of ~1-2 s."""
    calls = []
    real = torch.nn.init.normal_
    monkeypatch.setattr(torch.nn.init, "normal_", lambda t, *a, **k: calls.append(t.device.type) or real(t, *a, **k))
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        meta = LLaMA(cfg)
    assert calls == [] and meta.model.embed_tokens.weight.is_meta
    cpu = LLaMA(cfg)
    assert calls == ["cpu"] and 0.5 < cpu.model.embed_tokens.weight.std().item() < 1.5  # N(0, 1) as nn.Embedding's
