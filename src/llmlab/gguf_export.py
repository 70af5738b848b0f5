"""Export checkpoints and LoRA adapters as GGUF files that llama.cpp (and Ollama, LM Studio, ...) run.

llama.cpp's own converter recognises a tokenizer only by hashing how a few test strings tokenize, so it rejects
every vocabulary it has not seen, including each one `llmlab prepare --train-tokenizer` trains. This exporter
writes the file itself with the `gguf` package and names the pre-tokenizer by what it does instead: the
tokenizer.json's pre-tokenizer is reduced to the list of split patterns it applies, and `tokenizer.ggml.pre`
is the llama.cpp name whose patterns are exactly those (`PRE_TOKENIZER_NAMES`). A tokenizer that matches no name
is refused, never written with a wrong name.

Tensors go under llama.cpp's names with the query/key rows in llama.cpp's order (the name tables and the
permutation are `llmlab.gguf_import`'s, used in reverse), so `llmlab convert OUT.gguf` reads back exactly what
was written. Types: f32, f16, bf16, or q8_0 / q4_0 by the `gguf` package's quantizer; 1-D tensors (norms) stay
f32, and with q4_0 the embedding and output matrices take q8_0 (as llama.cpp keeps its output layer at higher
precision). A LoRA adapter becomes a llama.cpp LoRA GGUF: `blk.N.attn_q.weight.lora_a` (r x in) and `.lora_b`
(out x r, q/k rows permuted like the weight they update) with `adapter.lora.alpha` such that llama.cpp's
alpha / r is llmlab's scale.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType, RopeScalingType
from gguf.quants import quantize
from torch import Tensor

from llmlab.checkpoint import load_checkpoint, load_config, load_safetensors
from llmlab.config import ModelConfig
from llmlab.errors import LLMLabError
from llmlab.gguf_import import PRE_TOKENIZER_SPLITS, gguf_tensor_name, permute_qk
from llmlab.methods.lora import LoRA, lora_modules
from llmlab.model import rope_inv_freq
from llmlab.tokenizer import Tokenizer

EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
ADAPTER_TYPES = ("f32", "f16", "bf16")  # LoRA matrices are small, and B's rows (r values) are too short to quantize

# The pattern of `ByteLevel(use_regex=True)` (GPT-2's), and of `Digits(individual_digits=True)`.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
DIGIT_SPLIT = r"\p{N}"
# `tokenizer.ggml.pre` names written, with the split patterns llama.cpp applies for each (in order, HF regex
# syntax: llama.cpp's own spellings of these patterns are equivalent rewrites) and whether it looks a whole word
# up in the vocabulary before merging (HF BPE's `ignore_merges`), as in llama.cpp's llama-vocab.cpp.
PRE_TOKENIZER_NAMES: dict[str, tuple[tuple[str, ...], bool]] = {
    "gpt-2": ((GPT2_SPLIT,), False),
    "smollm": ((DIGIT_SPLIT, GPT2_SPLIT), False),
    "llama-bpe": ((PRE_TOKENIZER_SPLITS["llama-bpe"],), True),
    "qwen2": ((PRE_TOKENIZER_SPLITS["qwen2"],), False),
    "qwen35": ((PRE_TOKENIZER_SPLITS["qwen35"],), False),
    "tekken": ((PRE_TOKENIZER_SPLITS["tekken"],), True),
    "gpt-4o": ((PRE_TOKENIZER_SPLITS["gpt-4o"],), False),
}
# tokenizer.ggml.token_type values
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


# -- tokenizer -----------------------------------------------------------------------------------------
def pre_tokenizer_splits(pre: dict[str, Any] | None, source: str) -> tuple[tuple[str, ...], bool]:
    """(split patterns in order, whether a byte-level step is there) of a tokenizer.json `pre_tokenizer`."""
    if pre is None:
        raise LLMLabError(f"{source}: the tokenizer has no pre-tokenizer; llama.cpp needs a byte-level one")
    kind = pre.get("type")
    if kind == "Sequence":
        splits: tuple[str, ...] = ()
        byte_level = False
        for step in pre.get("pretokenizers", []):
            more, is_byte_level = pre_tokenizer_splits(step, source)
            if byte_level and more:
                raise LLMLabError(f"{source}: the pre-tokenizer splits after its ByteLevel step (on byte symbols), "
                                  "which llama.cpp never does")
            splits, byte_level = splits + more, byte_level or is_byte_level
        return splits, byte_level
    if kind == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise LLMLabError(f"{source}: the ByteLevel pre-tokenizer adds a prefix space, which llama.cpp's "
                              "byte-level BPE does not do")
        return ((GPT2_SPLIT,) if pre.get("use_regex", True) else ()), True
    if kind == "Digits":
        return ((DIGIT_SPLIT,) if pre.get("individual_digits") else (r"\p{N}+",)), False
    if kind == "Split":
        pattern = pre.get("pattern", {})
        regex = pattern.get("Regex")
        if regex is None:
            regex = re.escape(pattern.get("String", ""))
        if str(pre.get("behavior", "")).lower() != "isolated" or pre.get("invert"):
            raise LLMLabError(f"{source}: a Split pre-tokenizer with behavior {pre.get('behavior')!r} and "
                              f"invert={pre.get('invert')} has no llama.cpp equivalent (llama.cpp isolates matches)")
        return (regex,), False
    raise LLMLabError(f"{source}: pre-tokenizer type '{kind}' has no llama.cpp equivalent")


def pre_tokenizer_name(spec: dict[str, Any], source: str) -> str:
    """The `tokenizer.ggml.pre` name under which llama.cpp splits text exactly as this tokenizer.json does."""
    splits, byte_level = pre_tokenizer_splits(spec.get("pre_tokenizer"), source)
    if not byte_level:
        raise LLMLabError(f"{source}: the pre-tokenizer has no ByteLevel step; llmlab exports byte-level BPE "
                          "tokenizers only")
    ignore_merges = bool(spec.get("model", {}).get("ignore_merges", False))
    for name, (patterns, ignores) in PRE_TOKENIZER_NAMES.items():
        if patterns == splits and ignores == ignore_merges:
            return name
    near = [n for n, (p, _) in PRE_TOKENIZER_NAMES.items() if p == splits]
    detail = (f"llama.cpp's '{near[0]}' splits the same way but has ignore_merges={not ignore_merges}" if near
              else f"its split patterns {list(splits)} match none of {', '.join(PRE_TOKENIZER_NAMES)}")
    raise LLMLabError(f"{source}: no pre-tokenizer llama.cpp knows behaves like this tokenizer's ({detail}); "
                      "writing another name would make llama.cpp tokenize differently, so nothing was written")


def tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int, source: str) -> dict[str, Any]:
    """The `tokenizer.*` metadata of a byte-level BPE tokenizer, padded with unused tokens to `vocab_size`."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        raise LLMLabError(f"{source}: tokenizer model {model.get('type')} with these options is not a byte-level "
                          "BPE; llmlab exports byte-level BPE tokenizers (GPT-2 style) only")
    if spec.get("normalizer") is not None:
        raise LLMLabError(f"{source}: the tokenizer has a normalizer ({spec['normalizer'].get('type')}), which "
                          "llama.cpp's byte-level BPE does not apply")
    pre = pre_tokenizer_name(spec, source)
    n = tokenizer.vocab_size
    if n > vocab_size:
        raise LLMLabError(f"{source}: the tokenizer has {n} tokens but the model's embedding only {vocab_size} rows")
    tokens = [tokenizer.backend.id_to_token(i) for i in range(n)]
    if None in tokens:
        raise LLMLabError(f"{source}: the tokenizer has no token with id {tokens.index(None)} (ids must be 0..{n - 1})")
    added = tokenizer.backend.get_added_tokens_decoder()
    types = [(_CONTROL if added[i].special else _USER_DEFINED) if i in added else _NORMAL for i in range(n)]
    tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]
    types += [_UNUSED] * (vocab_size - n)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, Any] = {"model": "gpt2", "pre": pre, "tokens": tokens, "token_type": types, "merges": merges,
                            "add_bos_token": tokenizer.add_bos, "add_eos_token": False}
    for key, token in (("bos_token_id", tokenizer.bos_token), ("eos_token_id", tokenizer.eos_token),
                       ("padding_token_id", tokenizer.pad_token)):
        if token is not None:
            meta[key] = tokenizer.token_id(token)
    if tokenizer.chat_template:
        meta["chat_template"] = tokenizer.chat_template
    return meta


# -- writing -------------------------------------------------------------------------------------------
def _ggml_type(kind: str) -> Any:

    return GGMLQuantizationType[kind.upper()]


def tensor_kind(name: str, shape: tuple[int, ...], export_type: str) -> str:
    """The GGML type a tensor is written in: 1-D stays F32; q4_0 keeps the embedding/output at Q8_0; a matrix whose
    rows are not whole 32-value blocks falls back to F16."""
    if len(shape) == 1 or export_type == "f32":
        return "F32"
    if export_type in ("f16", "bf16"):
        return export_type.upper()
    kind = "Q8_0" if export_type == "q8_0" or name in ("token_embd.weight", "output.weight") else "Q4_0"
    return kind if shape[-1] % 32 == 0 else "F16"


def _encode(t: Tensor, kind: str) -> np.ndarray:
    """A tensor's bytes as GGUF stores them in `kind` (numpy, row-major: GGUF lists the dims the other way)."""

    if kind == "F32":
        return t.float().contiguous().numpy()
    if kind == "F16":
        return t.to(torch.float16).contiguous().numpy()
    if kind == "BF16":  # torch rounds to nearest even, as ggml does
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    return quantize(t.float().contiguous().numpy(), _ggml_type(kind))


def check_output_file(out: Path, overwrite: bool = False) -> None:
    """Raise unless `out` may be written: nothing there, or a GGUF file (an earlier export); anything else only with
    `overwrite` (an export never silently replaces a file of another kind, and never a folder)."""
    if out.is_dir():
        raise LLMLabError(f"--gguf {out} is a folder; give the path of the .gguf file to write")
    if not out.exists() or overwrite:
        return
    with open(out, "rb") as f:
        if f.read(4) == b"GGUF":
            return
    raise LLMLabError(f"--gguf {out} exists and is not a GGUF file; choose another path, or pass --overwrite true "
                      "to replace it")


class _Writer:
    """A GGUFWriter to a temporary sibling of `out` that replaces `out` only once the file is complete."""

    def __init__(self, out: Path, overwrite: bool = False, arch: str = "llama") -> None:

        check_output_file(Path(out), overwrite)
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self.writer = GGUFWriter(str(self.tmp), arch)

    def add(self, name: str, t: Tensor, kind: str) -> None:
        data = _encode(t.detach(), kind)
        self.writer.add_tensor(name, data, raw_dtype=None if kind in ("F32", "F16") else _ggml_type(kind))

    def finish(self) -> Path:
        w = self.writer
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp makes it private; the GGUF is an ordinary file
            os.replace(self.tmp, self.out)
        finally:
            self.tmp.unlink(missing_ok=True)
        return self.out

    def abandon(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)


def _add_metadata(writer: Any, key: str, value: Any) -> None:
    """One `tokenizer.ggml.*`-style value with the GGUF type llama.cpp reads it as."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif key.endswith("token_type"):
        writer.add_array(key, [int(v) for v in value])  # int32, as llama.cpp requires
    else:
        writer.add_array(key, list(value))


def _rope_metadata(writer: Any, config: ModelConfig) -> Tensor | None:
    """Write the rope scaling metadata; returns the `rope_freqs` tensor llama3 scaling needs (or None)."""
    import dataclasses



    scaling = config.rope_scaling
    if scaling is None:
        return None
    if scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        return None
    # llama3: llama.cpp divides each frequency by the factor stored in `rope_freqs` (1 = unchanged)
    base = rope_inv_freq(dataclasses.replace(config, rope_scaling=None)).double()
    return (base / rope_inv_freq(config).double()).float()


def _model_metadata(writer: Any, config: ModelConfig, name: str, file_type: int, quantized: bool) -> None:
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(file_type)
    if quantized:

        writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_vocab_size(config.vocab_size)


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q4_0": "MOSTLY_Q4_0"}


def _check_type(export_type: str, allowed: tuple[str, ...], what: str) -> None:
    if export_type not in allowed:
        raise LLMLabError(f"--type {export_type!r}: {what} are exported as one of {', '.join(allowed)}")


def export_gguf(checkpoint: str | Path, out: str | Path, export_type: str = "f16", overwrite: bool = False) -> Path:
    """Write an HF-format checkpoint folder as a llama GGUF file `out` (weights in `export_type`, tokenizer, chat
    template and generation ids in the metadata), atomically; see `check_output_file` for what `out` may be."""


    _check_type(export_type, EXPORT_TYPES, "models")
    check_output_file(Path(out), overwrite)  # before the slow part; checked again when writing
    checkpoint = Path(checkpoint)
    config = load_config(checkpoint)
    tokenizer = Tokenizer.from_folder(checkpoint)
    tok_meta = tokenizer_metadata(tokenizer, config.vocab_size, str(checkpoint / "tokenizer.json"))
    tensors = load_safetensors(checkpoint)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    named: list[tuple[str, Tensor]] = []
    for hf_name, t in tensors.items():
        name = gguf_tensor_name(hf_name)
        if name is None:
            raise LLMLabError(f"{checkpoint}: tensor '{hf_name}' has no llama.cpp name (not a llama model tensor)")
        if ".attn_q." in name:
            t = permute_qk(t, config.num_attention_heads)
        elif ".attn_k." in name:
            t = permute_qk(t, config.num_key_value_heads)
        named.append((name, t))
    writer = _Writer(Path(out), overwrite)
    try:
        w = writer.writer
        _model_metadata(w, config, checkpoint.resolve().name, int(LlamaFileType[_FILE_TYPES[export_type]]),
                        export_type.startswith("q"))
        for key, value in tok_meta.items():
            _add_metadata(w, f"tokenizer.ggml.{key}" if key != "chat_template" else "tokenizer.chat_template", value)
        rope_freqs = _rope_metadata(w, config)
        if rope_freqs is not None:
            writer.add("rope_freqs.weight", rope_freqs, "F32")
        for name, t in named:
            writer.add(name, t, tensor_kind(name, tuple(t.shape), export_type))
    except BaseException:
        writer.abandon()
        raise
    return writer.finish()


def lora_tensors(model: torch.nn.Module) -> tuple[dict[str, Tensor], float]:
    """llama.cpp LoRA tensors (`blk.N.attn_q.weight.lora_a` / `.lora_b`, q/k rows of B permuted) of a model that
    carries llmlab LoRA modules, and the one `adapter.lora.alpha` for which llama.cpp's alpha / r is every
    module's scale."""

    config = model.config
    out: dict[str, Tensor] = {}
    alphas: set[float] = set()
    for module_name, m in lora_modules(model):
        prefix = module_name.rsplit(".", 1)[0]
        for target in m.slices:
            a, b = m.lora_A[target].detach().float(), m.lora_B[target].detach().float()
            name = gguf_tensor_name(f"{prefix}.{target}_proj.weight")
            if target == "q":
                b = permute_qk(b, config.num_attention_heads)
            elif target == "k":
                b = permute_qk(b, config.num_key_value_heads)
            out[f"{name}.lora_a"], out[f"{name}.lora_b"] = a, b
            alphas.add(round(m.scale[target] * a.shape[0], 6))
    if len(alphas) != 1:
        raise LLMLabError(f"the adapter's modules have different alpha * r / scale ({sorted(alphas)}); a llama.cpp "
                          "LoRA file holds one alpha")
    return out, alphas.pop()


def export_lora_gguf(checkpoint: str | Path, adapter: str | Path, out: str | Path, export_type: str = "f32",
                     overwrite: bool = False) -> Path:
    """Write the PEFT LoRA adapter folder `adapter` (trained on `checkpoint`) as a llama.cpp LoRA GGUF `out`."""
    _check_type(export_type, ADAPTER_TYPES, "LoRA adapters")
    check_output_file(Path(out), overwrite)
    model = LoRA.load(load_checkpoint(checkpoint), adapter)  # checks the adapter fits this base
    tensors, alpha = lora_tensors(model)
    writer = _Writer(Path(out), overwrite)
    try:
        w = writer.writer
        w.add_type("adapter")
        w.add_name(Path(adapter).resolve().name)
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", alpha)
        for name, t in tensors.items():
            writer.add(name, t, export_type.upper())
    except BaseException:
        writer.abandon()
        raise
    return writer.finish()

