"""Test helper: write small llama GGUF files the way llama.cpp's converter does (GGUF names, permuted q/k).

This is deliberately independent of `llmlab.gguf_import`: it carries its own name table and llama.cpp's forward
q/k permutation, so a test that imports what it writes checks the importer against the converter's conventions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")

_HF_TO_GGUF = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}

# Byte offsets of the float16 scale fields inside one block of each k-quant (gguf's block layouts), so random
# blocks can be made finite.
_KQUANT_F16_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k permutation: each head's rows (half, j) -> (j, half)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    stem, leaf = hf_name.rsplit(".", 1)
    if stem in _HF_TO_GGUF:
        return f"{_HF_TO_GGUF[stem]}.{leaf}"
    _, _, n, rest = stem.split(".", 3)  # model.layers.N.<module>
    return f"blk.{n}.{_HF_TO_GGUF[rest]}.{leaf}"


def gpt2_vocab() -> tuple[list[str], list[str], list[int]]:
    """A small byte-level BPE vocabulary: 3 control tokens, the 256 byte symbols, and a few merges."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    alphabet, extra = [], 0
    for b in range(256):
        if b in printable:
            alphabet.append(chr(b))
        else:
            alphabet.append(chr(256 + extra))
            extra += 1
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġ Ġ", "e r", "Ġa n", "Ġan d", "o n"]
    merged = ["".join(m.split(" ")) for m in merges]
    tokens = SPECIALS + alphabet + merged
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, merges, types


def random_blocks(shape: tuple[int, int], qtype: gguf.GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """Random bytes of a quantized (rows, cols) tensor, with finite float16 scales (for types gguf can't quantize)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(shape[0], shape[1] // block, size), dtype=np.uint8)
    for offset in _KQUANT_F16_OFFSETS[qtype.name]:
        scale = rng.uniform(0.001, 0.01, size=data.shape[:2]).astype(np.float16)
        data[..., offset:offset + 2] = scale.view(np.uint8).reshape(*data.shape[:2], 2)
    return data.reshape(shape[0], -1)


def write_llama_gguf(path: Path, hf_cfg: dict[str, Any], hf_sd: dict[str, torch.Tensor],
                     types: dict[str, str] | None = None, arch: str = "llama", tokenizer: str = "gpt2",
                     metadata: dict[str, Any] | None = None, extra_tensors: dict[str, np.ndarray] | None = None,
                     pre: str = "smollm", seed: int = 0) -> Path:
    """Write `hf_sd` (HF names) as a llama GGUF; `types` maps GGUF tensor names to GGML type names (default F32).

    Types gguf can quantize are quantized from the weights; k-quants get random blocks of the right shape.
    """
    rng = np.random.default_rng(seed)
    types = types or {}
    w = gguf.GGUFWriter(str(path), arch)
    n_head, n_kv = hf_cfg["num_attention_heads"], hf_cfg["num_key_value_heads"]
    head_dim = hf_cfg["hidden_size"] // n_head
    w.add_block_count(hf_cfg["num_hidden_layers"])
    w.add_context_length(hf_cfg["max_position_embeddings"])
    w.add_embedding_length(hf_cfg["hidden_size"])
    w.add_feed_forward_length(hf_cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(hf_cfg.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(hf_cfg["rms_norm_eps"])
    w.add_rope_dimension_count(head_dim)
    if tokenizer == "gpt2":
        tokens, merges, token_types = gpt2_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(token_types)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(2)
        w.add_add_bos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)
    for key, value in (metadata or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    for hf_name, t in hf_sd.items():
        name = gguf_name(hf_name)
        data = t.detach().float().numpy()
        if ".attn_q." in name:
            data = llamacpp_permute(data, n_head)
        elif ".attn_k." in name:
            data = llamacpp_permute(data, n_kv)
        kind = types.get(name, "F32")
        qtype = gguf.GGMLQuantizationType[kind]
        if kind in _KQUANT_F16_OFFSETS:
            w.add_tensor(name, random_blocks(data.shape, qtype, rng), raw_dtype=qtype)
        elif kind == "F32":
            w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    for name, data in (extra_tensors or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_hf_model(tie: bool = False, seed: int = 0, intermediate: int = 256) -> tuple[dict[str, Any], Any]:
    """A tiny random HF LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 kv heads) and its config dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, _, _ = gpt2_vocab()
    cfg = dict(vocab_size=len(tokens), hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
               rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # norms away from 1 so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return cfg, model


# Q8_0, Q4_0, Q4_1 and two k-quants (on ffn_down, the projection with 256 inputs); blk.1's qkv mixes formats (a
# FusedQuantLinear when loaded); the tied table (embeddings and head) is Q8_0.
MIXED_TYPES = {"token_embd.weight": "Q8_0",
               "blk.0.attn_q.weight": "Q4_1", "blk.0.attn_k.weight": "Q4_1", "blk.0.attn_v.weight": "Q4_1",
               "blk.0.attn_output.weight": "Q4_0", "blk.0.ffn_gate.weight": "Q8_0", "blk.0.ffn_up.weight": "Q8_0",
               "blk.0.ffn_down.weight": "Q4_K",
               "blk.1.attn_q.weight": "Q4_0", "blk.1.attn_k.weight": "Q8_0", "blk.1.attn_v.weight": "Q4_1",
               "blk.1.attn_output.weight": "Q8_0", "blk.1.ffn_gate.weight": "Q4_1", "blk.1.ffn_up.weight": "Q4_1",
               "blk.1.ffn_down.weight": "Q6_K"}


def tiny_mixed_gguf(path: Path, types: dict[str, str] = MIXED_TYPES, seed: int = 0) -> Path:
    """A tiny tied llama GGUF whose tensors use the block formats of `types` (default `MIXED_TYPES`, which training
    on blocks supports; a tensor left out is F32)."""
    cfg, model = tiny_hf_model(tie=True, seed=seed)
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return write_llama_gguf(path, cfg, sd, types=types)
