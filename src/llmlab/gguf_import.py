"""Import GGUF files (llama.cpp's format) of architecture `llama` into llmlab's HF-format checkpoints.

A GGUF holds the model config and the tokenizer as metadata and the weights as (often quantized) tensors under
llama.cpp's names. Importing means: read the config from the metadata, dequantize every tensor with the `gguf`
package's own dequantizer, rename it to HF's name, undo the row permutation llama.cpp's converter applies to the
query/key projections, and rebuild an HF `tokenizers` tokenizer from the vocabulary. The result is an ordinary
float checkpoint folder: quantization is not kept, only its values.

`load_gguf_quantized` is the other way in: it builds the model straight from the file for inference, keeping every
quantized tensor in its own block format (`llmlab.quantized.QuantLinear`), so no float copy of those weights is
made; the q/k un-permutation then reorders rows of blocks, which a row permutation leaves intact.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE
from torch import Tensor, nn

from llmlab.checkpoint import dtype_from_name, generation_config, load_into, save_checkpoint, write_json
from llmlab.config import ModelConfig
from llmlab.errors import LLMLabError
from llmlab.ggml_blocks import QUANTIZED_TYPES, decode
from llmlab.model import LLaMA, rope_inv_freq
from llmlab.quant_kernels import Groups
from llmlab.quantized import FusedQuantLinear, QuantEmbedding, QuantLinear
from llmlab.tokenizer import Tokenizer

IMPORTER_VERSION = 2  # bump when the import changes what it writes, so cached imports get rebuilt

# Tensor types imported. All are dequantized by `gguf.quants.dequantize`; others (IQ*, TQ*, ...) are refused.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")

# llama.cpp block tensor name -> HF module path inside `model.layers.N.`
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# Pre-tokenizer split patterns by `tokenizer.ggml.pre`, for the names transformers' GGUF loader knows; any other
# name keeps GPT-2's byte-level pattern, as transformers does.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN_SPLIT = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O_SPLIT = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}"
                rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}

# tokenizer.ggml.token_type values
_CONTROL, _USER_DEFINED = 3, 4


# -- reading the file ----------------------------------------------------------------------------------
def open_gguf(path: str | Path) -> Any:
    """A `gguf.GGUFReader` over `path`, with a clear error for a missing, non-GGUF or truncated file."""
    path = Path(path)
    if not path.is_file():
        raise LLMLabError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise LLMLabError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, OSError) as e:
        raise LLMLabError(f"{path}: cannot read GGUF file (truncated or corrupt?): {e}") from e


def _meta(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except (UnicodeDecodeError, ValueError, IndexError) as e:
        raise LLMLabError(f"{reader.data.filename}: cannot read GGUF metadata '{key}': {e}") from e


def _source(reader: Any) -> str:
    return str(reader.data.filename)


def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def config_from_gguf(reader: Any) -> ModelConfig:
    """The ModelConfig described by the `llama.*` and `tokenizer.ggml.*` metadata (and the tensor shapes)."""
    src = _source(reader)
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise LLMLabError(f"{src}: GGUF architecture is '{arch}'; llmlab imports only architecture 'llama'")
    if _meta(reader, "llama.expert_count"):
        raise LLMLabError(f"{src}: mixture-of-experts llama models (llama.expert_count) are not supported")

    def need(key: str) -> Any:
        value = _meta(reader, f"llama.{key}")
        if value is None:
            raise LLMLabError(f"{src}: GGUF metadata 'llama.{key}' is missing")
        return value

    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    hidden, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_meta(reader, "llama.attention.key_length", 0) or _meta(reader, "llama.rope.dimension_count", 0)
                   or hidden // n_heads)
    rope_dims = _meta(reader, "llama.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise LLMLabError(f"{src}: partial rotary embeddings (llama.rope.dimension_count={rope_dims} < head dim "
                          f"{head_dim}) are not supported")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab_size = len(tokens.data) if tokens is not None else int(_meta(reader, "llama.vocab_size", 0))
    if "token_embd.weight" in shapes:  # the weights decide if the token list and the embedding disagree
        vocab_size = shapes["token_embd.weight"][1]
    eps = need("attention.layer_norm_rms_epsilon")
    has_bias = "blk.0.attn_q.bias" in shapes
    config = ModelConfig(
        name=Path(src).stem,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(_meta(reader, "llama.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        max_position_embeddings=int(_meta(reader, "llama.context_length", 2048)),
        rms_norm_eps=_f32(eps),
        rope_theta=_f32(_meta(reader, "llama.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in shapes,
        attention_bias=has_bias,
        mlp_bias="blk.0.ffn_up.bias" in shapes,
        bos_token_id=_meta(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_meta(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_meta(reader, "tokenizer.ggml.padding_token_id"),
    )
    scaling = _rope_scaling(reader, config)
    return dataclasses.replace(config, rope_scaling=scaling) if scaling else config


def _rope_scaling(reader: Any, config: ModelConfig) -> dict[str, Any] | None:
    """HF `rope_scaling` from `llama.rope.scaling.*` (linear) or a llama3-style `rope_freqs` tensor."""
    src = _source(reader)
    kind = _meta(reader, "llama.rope.scaling.type")
    factor = _meta(reader, "llama.rope.scaling.factor") or _meta(reader, "llama.rope.scale_linear")
    if kind == "linear" or (kind is None and factor and float(factor) != 1.0):
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind not in (None, "none"):
        raise LLMLabError(f"{src}: rope scaling type '{kind}' (llama.rope.scaling.type) is not supported "
                          "(supported: linear, and llama3 via a rope_freqs tensor)")
    rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if rope_freqs is None:
        return None
    return llama3_scaling_from_factors(_dequantize(rope_freqs, src).double().numpy(), config, src)


def llama3_scaling_from_factors(factors: np.ndarray, config: ModelConfig, source: str) -> dict[str, Any] | None:
    """Recover HF's llama3 `rope_scaling` from llama.cpp's per-frequency divisors (`rope_freqs`).

    llama.cpp stores the result of the llama3 rule (1 for high frequencies, `factor` for low ones, a smooth
    blend between). The blend is linear in 1/wavelength, so two blended entries give its slope and intercept;
    with `low_freq_factor` = 1 (every llama3 release) that fixes `high_freq_factor` and the original context.
    The answer is checked by recomputing the frequencies with the model's own rule.
    """
    base = rope_inv_freq(dataclasses.replace(config, rope_scaling=None)).double().numpy()
    if factors.shape != base.shape:
        raise LLMLabError(f"{source}: tensor 'rope_freqs.weight' has {factors.size} entries, expected {base.size} "
                          "(head_dim / 2)")
    factor = float(factors.max())
    if abs(factor - 1.0) < 1e-6:
        return None
    candidates = [(1.0, 4.0, 8192)]
    blended = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    if blended.sum() >= 2:
        inv_wavelen = base[blended] / (2 * math.pi)
        smooth = (1 / factors[blended] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(inv_wavelen, smooth, 1)
        if intercept < 0:
            high = round(1 - 1 / intercept, 4)
            candidates.insert(0, (1.0, high, int(round(-slope / intercept))))
    for low, high, old_ctx in candidates:
        scaling = {"rope_type": "llama3", "factor": round(factor, 6), "low_freq_factor": low,
                   "high_freq_factor": high, "original_max_position_embeddings": old_ctx}
        got = rope_inv_freq(dataclasses.replace(config, rope_scaling=scaling)).double().numpy()
        if np.allclose(got, base / factors, rtol=1e-4, atol=0):
            return scaling
    raise LLMLabError(f"{source}: tensor 'rope_freqs.weight' does not follow the llama3 rope scaling rule; "
                      "this kind of rope scaling is not supported")


# -- tensors -------------------------------------------------------------------------------------------
def hf_tensor_name(gguf_name: str) -> str | None:
    """HF name of a llama.cpp tensor name (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`)."""
    stem, _, leaf = gguf_name.rpartition(".")
    if leaf not in ("weight", "bias"):
        return None
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{leaf}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{leaf}"
    return None


def gguf_tensor_name(hf_name: str) -> str | None:
    """llama.cpp name of an HF tensor name (`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`);
    the inverse of `hf_tensor_name`, from the same tables."""
    stem, _, leaf = hf_name.rpartition(".")
    top = {hf: gg for gg, hf in _TOP_NAMES.items()}
    if stem in top:
        return f"{top[stem]}.{leaf}"
    parts = stem.split(".", 3)
    block = {hf: gg for gg, hf in _BLOCK_NAMES.items()}
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in block:
        return f"blk.{parts[2]}.{block[parts[3]]}.{leaf}"
    return None


def permute_qk(w: Tensor, n_heads: int) -> Tensor:
    """llama.cpp's q/k row order from HF's: within each head, rows (half t, pair index j) go to (j, t), so the
    two members of a rotary pair sit next to each other. The inverse of `unpermute_qk`."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's q/k row order: it interleaves each head's two rotary halves; HF keeps them apart.

    Rows of a head come from the converter as (pair index j, half t) and go back to (half t, pair index j),
    so the result is the HF weight (or bias) the GGUF was made from.
    """
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _dequantize(tensor: Any, source: str) -> Tensor:
    """A GGUF tensor as float32 in numpy/HF order (GGUF lists dimensions innermost first)."""
    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise LLMLabError(f"{source}: tensor '{tensor.name}' has type {kind}, which llmlab does not import "
                          f"(supported: {', '.join(SUPPORTED_TYPES)})")
    values = dequantize(tensor.data, tensor.tensor_type)
    values = values.reshape([int(d) for d in reversed(tensor.shape)])
    return torch.from_numpy(np.require(values, np.float32, ["C", "W", "O"]))


def _named_tensors(reader: Any, config: ModelConfig) -> Any:
    """(HF name, GGUF tensor, q/k head count to un-permute its rows by or None) for every weight of the file."""
    src = _source(reader)
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            continue  # folded into config.rope_scaling
        name = hf_tensor_name(tensor.name)
        if name is None:
            raise LLMLabError(f"{src}: tensor '{tensor.name}' is not part of a llama model llmlab can import")
        heads = (config.num_attention_heads if ".q_proj." in name else
                 config.num_key_value_heads if ".k_proj." in name else None)
        yield name, tensor, heads


def tensors_from_gguf(reader: Any, config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Every weight of the file, dequantized, under its HF name and in HF's layout (q/k rows un-permuted)."""
    out: dict[str, Tensor] = {}
    for name, tensor, heads in _named_tensors(reader, config):
        w = _dequantize(tensor, _source(reader))
        out[name] = (w if heads is None else unpermute_qk(w, heads)).to(dtype)
    return out


# -- tokenizer -----------------------------------------------------------------------------------------
def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest map to chr(256 + n) in order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: a piece's splits, ranked by the piece's score."""
    ids = {t: i for i, t in enumerate(tokens)}
    found: list[tuple[float, str, str]] = []
    for token, score in zip(tokens, scores):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                found.append((score, left, right))
    found.sort(key=lambda m: -m[0])  # stable: equal scores keep vocabulary order
    return [(left, right) for _, left, right in found]


def tokenizer_from_gguf(reader: Any) -> Tokenizer:
    """Rebuild the file's tokenizer as an HF `tokenizers` tokenizer (byte-level BPE or sentencepiece BPE)."""
    src = _source(reader)
    model = _meta(reader, "tokenizer.ggml.model")
    tokens = _meta(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise LLMLabError(f"{src}: GGUF has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    token_types = _meta(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = _meta(reader, "tokenizer.ggml.merges")
    merge_pairs = [tuple(m.split(" ", 1)) for m in merges] if merges else None
    ids = {name: _meta(reader, f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "unknown", "padding")}
    if model == "gpt2":
        alphabet = _byte_to_char()
        letters = set(alphabet.values())
        spelled = [t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens]
        backend = HFTokenizer(BPE(vocab={t: i for i, t in enumerate(spelled)}, merges=merge_pairs or [],
                                  dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
        split = PRE_TOKENIZER_SPLITS.get(_meta(reader, "tokenizer.ggml.pre"))
        if split is None:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        usable = [t == s for t, s in zip(tokens, spelled)]  # a respelled token cannot stay whole as an added token
        add_bos_default = False
    elif model == "llama":
        scores = _meta(reader, "tokenizer.ggml.scores")
        if merge_pairs is None and scores is None:
            raise LLMLabError(f"{src}: sentencepiece tokenizer has neither merges nor scores")
        unk = tokens[ids["unknown"]] if ids["unknown"] is not None else None
        backend = HFTokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)},
                                  merges=merge_pairs or _merges_from_scores(tokens, scores),
                                  unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None))
        prefix = bool(_meta(reader, "tokenizer.ggml.add_space_prefix", True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                         prepend_scheme="first" if prefix else "never", split=False)
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        usable = [True] * len(tokens)
        add_bos_default = True  # llama.cpp adds BOS to sentencepiece vocabularies that do not say otherwise
    else:
        raise LLMLabError(f"{src}: tokenizer model '{model}' (tokenizer.ggml.model) is not supported "
                          "(supported: gpt2 byte-level BPE, llama sentencepiece BPE)")
    named = {i for i in ids.values() if i is not None and 0 <= i < len(tokens)}
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, kind in enumerate(token_types)
               if (kind == _CONTROL or i in named) and usable[i]]
    backend.add_special_tokens(special)
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, kind in enumerate(token_types)
            if kind == _USER_DEFINED and usable[i] and i not in named]
    if user:
        backend.add_tokens(user)

    def token_of(key: str) -> str | None:
        i = ids[key]
        return backend.id_to_token(i) if i is not None and 0 <= i < len(tokens) else None

    context = _meta(reader, f"{_meta(reader, 'general.architecture')}.context_length")
    return Tokenizer(backend, bos_token=token_of("bos"), eos_token=token_of("eos"), pad_token=token_of("padding"),
                     add_bos=bool(_meta(reader, "tokenizer.ggml.add_bos_token", add_bos_default)),
                     chat_template=_meta(reader, "tokenizer.chat_template"),
                     model_max_length=int(context) if context else None)


# -- public entry points -------------------------------------------------------------------------------
def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict[str, Tensor], Tokenizer]:
    """Config, HF-named dequantized tensors and tokenizer of a llama GGUF file."""
    reader = open_gguf(path)
    config = config_from_gguf(reader)
    tokenizer = tokenizer_from_gguf(reader)
    return config, tensors_from_gguf(reader, config, dtype), tokenizer


def stop_token_ids(config: ModelConfig, tokenizer: Tokenizer) -> int | list[int] | None:
    """Ids that end a reply: the eos id, plus the chat template's turn-end token (e.g. <|im_end|>, <|eot_id|>)."""
    stops = [config.eos_token_id] if isinstance(config.eos_token_id, int) else list(config.eos_token_id or [])
    template = tokenizer.chat_template or ""
    for token in ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>"):
        tid = tokenizer.token_id(token)
        if token in template and tid is not None and tid not in stops:
            stops.append(tid)
    return stops[0] if len(stops) == 1 else (stops or None)


KEPT_GGUF = "model.gguf"  # an imported folder keeps the GGUF it came from, for the quantized fast path
IMPORT_RECORD = "llmlab_import.json"


def import_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32", keep_gguf: bool = True) -> Path:
    """Write the GGUF model as an HF-format checkpoint folder (weights in `dtype`, tokenizer, generation config).

    With `keep_gguf` the folder also holds the GGUF itself as `model.gguf` (a hard link when the file system allows,
    else a copy), so that running the folder can use the file's own quantized blocks (`kept_gguf`), while
    transformers, PEFT and the rest read the float weights as usual.
    """
    torch_dtype = dtype_from_name(dtype)
    config, tensors, tokenizer = read_gguf(gguf_path, torch_dtype)
    with torch.device("meta"):
        model = LLaMA(config)
    try:
        load_into(model, tensors, str(gguf_path), torch_dtype)
    except LLMLabError as e:  # name the GGUF in every mismatch message
        raise LLMLabError(str(e) if str(gguf_path) in str(e) else f"{gguf_path}: {e}") from e
    generation = generation_config(config, eos_token_id=stop_token_ids(config, tokenizer))
    source = {"source": Path(gguf_path).name, "format": "gguf", "importer": IMPORTER_VERSION,
              "gguf": KEPT_GGUF if keep_gguf else None}

    def extra_files(folder: Path) -> None:
        write_json(folder / IMPORT_RECORD, source)
        if keep_gguf:
            try:
                os.link(gguf_path, folder / KEPT_GGUF)
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(gguf_path, folder / KEPT_GGUF)

    return save_checkpoint(model, out_dir, tokenizer=tokenizer, dtype=torch_dtype, generation=generation,
                           extra_files=extra_files)


def kept_gguf(folder: str | Path) -> Path | None:
    """The GGUF an imported checkpoint folder keeps beside its float weights (`import_gguf`), or None: folders
    written any other way (training, merge, convert from a folder) hold none, so their own weights are used."""
    folder = Path(folder)
    record = folder / IMPORT_RECORD
    try:
        name = json.loads(record.read_text()).get("gguf") if record.is_file() else None
    except (json.JSONDecodeError, AttributeError):
        return None
    path = folder / name if isinstance(name, str) and "/" not in name else None
    return path if path is not None and path.is_file() else None


def load_gguf_quantized(gguf_path: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.bfloat16, kernel: str = "auto") -> tuple[Any, Tokenizer, dict]:
    """Model (eval mode), tokenizer and generation config of a llama GGUF, its quantized tensors kept quantized.

    Quantized weights (`llmlab.ggml_blocks.QUANTIZED_TYPES`) become `QuantLinear`s read from the file's memory map
    block by block; q/k rows are un-permuted as rows of blocks; a fused projection joins its parts' groups (or keeps
    a layer per part when their formats differ); a tied embedding reads its rows out of the head's tensor. Float
    tensors (norms, biases, F16/F32 weights) are loaded in `dtype`, the dtype activations are computed in.
    `kernel` is passed to every `QuantLinear` ("auto": measured per shape).
    """
    reader = open_gguf(gguf_path)
    src = _source(reader)
    config = config_from_gguf(reader)
    tokenizer = tokenizer_from_gguf(reader)
    device = torch.device(device)
    # read lazily, one projection at a time, so the decoded codes of the whole model never coexist
    weights = {name: (tensor, heads) for name, tensor, heads in _named_tensors(reader, config)}

    def read(name: str) -> Any:
        """A tensor as `Groups` (quantized) or as a float tensor in `dtype`; None if the file lacks it."""
        if name not in weights:
            return None
        tensor, heads = weights.pop(name)
        kind = tensor.tensor_type.name
        if kind in QUANTIZED_TYPES and len(tensor.shape) == 2:
            with warnings.catch_warnings():  # the memory map is read-only and only ever read
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                raw = torch.from_numpy(np.asarray(tensor.data))
            groups = decode(raw.reshape(int(tensor.shape[1]), -1), kind, int(tensor.shape[0]))
            return groups if heads is None else groups.take_rows(unpermute_qk(torch.arange(groups.shape[0]), heads))
        w = _dequantize(tensor, src)
        return (w if heads is None else unpermute_qk(w, heads)).to(device, dtype)

    def need(name: str) -> Any:
        value = read(name)
        if value is None:
            raise LLMLabError(f"{src}: tensor for '{name}' is missing")
        return value

    def as_module(w: Any, bias: Tensor | None, table_only: bool = False, head: bool = False) -> nn.Module:
        if isinstance(w, Tensor):
            layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
            layer.weight = nn.Parameter(w, requires_grad=False)
            if bias is not None:
                layer.bias = nn.Parameter(bias, requires_grad=False)
            return layer
        return QuantLinear(w, bias, "dequant" if table_only else kernel, device, torch.float32 if head else None)

    def linear(prefix: str, parts: tuple[str, ...]) -> nn.Module:
        ws = [need(f"{prefix}{p}.weight") for p in parts]
        biases = [read(f"{prefix}{p}.bias") for p in parts]
        bias = torch.cat(biases) if all(b is not None for b in biases) else None
        if all(isinstance(w, Tensor) for w in ws):
            return as_module(torch.cat(ws), bias)
        if not any(isinstance(w, Tensor) for w in ws):
            try:
                return QuantLinear(Groups.cat(ws), bias, kernel, device)
            except LLMLabError:
                pass  # parts in different formats (Q4_K_M mixes Q4_K and Q6_K): one layer each
        return FusedQuantLinear([as_module(w, b) for w, b in zip(ws, biases)])

    with torch.device("meta"):
        model = LLaMA(config)
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        layer.self_attn.qkv_proj = linear(f"{p}self_attn.", ("q_proj", "k_proj", "v_proj"))
        layer.self_attn.o_proj = linear(f"{p}self_attn.", ("o_proj",))
        layer.mlp.gate_up_proj = linear(f"{p}mlp.", ("gate_proj", "up_proj"))
        layer.mlp.down_proj = linear(f"{p}mlp.", ("down_proj",))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            getattr(layer, norm).weight = nn.Parameter(need(f"{p}{norm}.weight"), requires_grad=False)
    model.model.norm.weight = nn.Parameter(need("model.norm.weight"), requires_grad=False)
    embed = need("model.embed_tokens.weight")
    head = embed if config.tie_word_embeddings else need("lm_head.weight")
    model.lm_head = as_module(head, None, head=True)  # fp32 logits
    if isinstance(embed, Tensor):
        model.model.embed_tokens = nn.Embedding(*embed.shape, _weight=embed)  # a given table skips the random init
        model.model.embed_tokens.weight = nn.Parameter(embed, requires_grad=False)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
    else:  # a tied embedding reads its rows out of the head's own quantized tensor
        table = model.lm_head if config.tie_word_embeddings else as_module(embed, None, table_only=True)
        model.model.embed_tokens = QuantEmbedding(table, dtype)
    if weights:
        raise LLMLabError(f"{src}: tensors the config does not use: {sorted(weights)[:5]}")
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise LLMLabError(f"{src}: no tensors for {left[:5]}")
    generation = generation_config(config, eos_token_id=stop_token_ids(config, tokenizer))
    del reader  # with the tensors read, this closes the memory map: its pages stop counting as resident
    _return_freed_memory()
    return model.eval(), tokenizer, generation


def _return_freed_memory() -> None:
    """Hand the heap the load freed (decode temporaries, the reader's metadata) back to the OS, where glibc keeps
    it otherwise: ~100 MB of resident memory for the default model. A no-op elsewhere."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
