"""The LLaMA transformer in plain PyTorch.

Design choices (Touvron et al. 2023 and its descendants):
- pre-norm: RMSNorm before attention and before the MLP, residual stream kept in the model dtype;
- SwiGLU MLP: down(silu(gate(x)) * up(x)), with gate and up fused into one `gate_up_proj` matmul;
- rotary position embeddings (RoPE) in HF's rotate-half layout, with optional `linear` or `llama3` scaling;
- grouped-query attention (n_kv_heads <= n_heads) through `scaled_dot_product_attention`,
  with q, k and v fused into one `qkv_proj` matmul; a single query position attending to a cache on the CPU in
  bf16/fp16 (a decode step) takes `attend_one`, a plain fp32 softmax(q k^T) v, instead: torch's CPU flash kernel
  costs ~0.25 ms per call in bf16 at 256 cached positions, 30 calls a token;
- training on a CPU in bf16, attention over fewer than 512 positions runs in fp32: the CPU flash kernel's bf16
  backward pass costs 1.7-2.4x its fp32 one there (from 512 positions on, bf16 is the faster);
- optional tied input/output embeddings;
- a preallocated (static) KV cache for decoding, so decode steps have fixed shapes, prepared as in gpt-fast's
  `setup_caches`: `LLaMA.setup_cache` returns a `Cache` holding every layer's keys/values, the RoPE table and the
  causal mask, and a forward only indexes them into one `AttnInputs` that every layer reads.

Module names follow HF's `LlamaForCausalLM` except for the two fused projections;
`llmlab.checkpoint` maps names at load/save time so files on disk keep HF names.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from llmlab import losses
from llmlab.config import ModelConfig
from llmlab.errors import LLMLabError
from llmlab.lean import swiglu_saved_bf16
from llmlab.quantized import QuantLinear, compute_dtype

_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa came in 2.5


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back (as HF does)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # torch's one-op rms_norm on the fp32 copy: the same numbers as the written-out formula, a quarter of the
        # ops (an eager decode step runs 61 norms; each op costs a few microseconds of dispatch)
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


def rope_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> Tensor:
    """Per-pair rotation frequencies, with the config's rope scaling applied."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: Tensor, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and signed sin tables for the given positions: (B, T) -> two (B, 1, T, head_dim) tensors.

    The sin table's first half is negated (-sin, sin), which is what `apply_rope` multiplies the halves-swapped x
    by: HF's rotate_half(x) * sin, the negation moved from x to the table (exact), one op fewer per call."""
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2)
    sin = freqs.sin()
    cos, signed_sin = torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-sin, sin), dim=-1)  # (B, T, head_dim)
    return cos.to(dtype)[:, None], signed_sin.to(dtype)[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) of x: (B, heads, T, head_dim) by the angles in cos/sin (`rope_cos_sin`'s
    tables): x cos + (x_{d/2..}, x_{..d/2}) (-sin, sin), HF's x cos + rotate_half(x) sin rounded alike."""
    return x * cos + x.roll(x.size(-1) // 2, -1) * sin


class AttnInputs(NamedTuple):
    """What every layer of one forward reads besides its input, made once per forward by indexing prepared tables.

    cos, sin: the queries' RoPE rotations, (B or 1, 1, T, head_dim). mask: (B or 1, 1, T, S) bool, True = attend, or
    None for causal attention among the T positions (no cache). slots: the cache slots the T positions are written
    to, (T,) alike in every row or (B, T) per row (continuous batching); None without a cache. rows: with per-row
    slots, the cache rows of the batch (None: rows 0..B-1). kv_len: the queries read cache slots [0, kv_len) only
    (None: all of them).
    """

    cos: Tensor
    sin: Tensor
    mask: Tensor | None
    slots: Tensor | None = None
    rows: Tensor | None = None
    kv_len: int | None = None


class KVCache(nn.Module):
    """Preallocated keys and values of one layer for `max_seq_len` positions: (B, n_kv_heads, max_seq_len, head_dim)."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, k: Tensor, v: Tensor, at: AttnInputs) -> tuple[Tensor, Tensor]:
        """Write k, v (B, n_kv, T, head_dim) at `at.slots` and return the keys/values the queries attend to.

        Slots (T,) are written in every row of a cache of batch B. Slots (B, T) are each row's own, in cache rows
        `at.rows` (default the first B); the batch then reads those rows (a view for the default rows, a gathered
        copy otherwise). Either way only the first `at.kv_len` slots come back when it is set.
        """
        end = at.kv_len or self.k.size(2)
        if at.slots.dim() == 1:
            self.k.index_copy_(2, at.slots, k)
            self.v.index_copy_(2, at.slots, v)
            return (self.k, self.v) if at.kv_len is None else (self.k[:, :, :end], self.v[:, :, :end])
        B = k.size(0)
        rows = torch.arange(B, device=k.device) if at.rows is None else at.rows
        self.k[rows[:, None], :, at.slots] = k.transpose(1, 2)  # indexed view: (B, T, n_kv, head_dim)
        self.v[rows[:, None], :, at.slots] = v.transpose(1, 2)
        if at.rows is None:
            return self.k[:B, :, :end], self.v[:B, :, :end]
        return self.k[at.rows, :, :end], self.v[at.rows, :, :end]


class Cache:
    """The model's prepared decoding state, made by `LLaMA.setup_cache` (gpt-fast's `setup_caches`): every layer's
    `KVCache`, the RoPE cos/sin of every cache position and the causal mask over the slots, built once; a forward only
    indexes them (`inputs`). The serving engine's row operations (a finished row's place taken by another, a prompt
    prefix kept and copied into a new row) live here too, so no caller reaches into the layers.
    """

    def __init__(self, model: LLaMA, batch_size: int, max_seq_len: int, dtype: torch.dtype) -> None:
        device = model.device
        self.layers = []
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.kv_cache = KVCache(batch_size, max_seq_len, attn.n_kv, attn.head_dim, dtype, device)
            self.layers.append(attn.kv_cache)
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        positions = torch.arange(max_seq_len, device=device)
        cos, sin = rope_cos_sin(model.inv_freq.to(device), positions[None], model.dtype)
        self.cos, self.sin = cos[0, 0], sin[0, 0]  # (S, head_dim)
        self._slots = positions
        self._causal: Tensor | None = None

    @property
    def causal(self) -> Tensor:
        """(S, S) bool: slot s is seen from position p when s <= p. Made on first use (generation passes masks of its
        own, and S x S bytes is large for long caches)."""
        if self._causal is None:
            self._causal = self._slots[None, :] <= self._slots[:, None]
        return self._causal

    def inputs(self, slots: Tensor, position_ids: Tensor | None = None, mask: Tensor | None = None,
               kv_len: int | None = None, rows: Tensor | None = None) -> AttnInputs:
        """The layers' inputs for queries written at `slots` ((T,) or (B, T)): RoPE at `position_ids` (default: the
        slots), `mask` (default: causal over the slots, per row for (B, T) slots) cut to `kv_len` slots."""
        pos = slots if position_ids is None else position_ids
        cos, sin = self.cos[pos], self.sin[pos]  # (T, head_dim) or (B, T, head_dim)
        cos, sin = (cos[None, None], sin[None, None]) if pos.dim() == 1 else (cos[:, None], sin[:, None])
        if mask is None:
            causal = self.causal if kv_len is None else self.causal[:, :kv_len]
            mask = causal[slots][None, None] if slots.dim() == 1 else causal[slots][:, None]
        elif kv_len is not None:
            mask = mask[..., :kv_len]
        return AttnInputs(cos, sin, mask, slots, rows, kv_len)

    # -- rows, for serving -----------------------------------------------------------------------------
    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` slots of cache row `src` into row `dst`, in every layer."""
        for c in self.layers:
            c.k[dst, :, :length] = c.k[src, :, :length]
            c.v[dst, :, :length] = c.v[src, :, :length]

    def read_row(self, row: int, length: int) -> list[tuple[Tensor, Tensor]]:
        """A copy of the first `length` slots of `row`: each layer's (keys, values), (n_kv, length, head_dim)."""
        return [(c.k[row, :, :length].clone(), c.v[row, :, :length].clone()) for c in self.layers]

    def write_row(self, row: int, kv: list[tuple[Tensor, Tensor]], length: int) -> None:
        """Put the first `length` slots of `kv` (from `read_row`) into slots [0, length) of `row`."""
        for c, (k, v) in zip(self.layers, kv):
            c.k[row, :, :length] = k[:, :length]
            c.v[row, :, :length] = v[:, :length]


def attend_one(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Attention of one query position (q: (B, n_head, 1, head_dim)) over k, v: (B, n_kv, S, head_dim), in fp32.

    `mask` (B or 1, 1, 1, S; True = attend) or None. Query head h reads kv head h // (n_head / n_kv), as SDPA's
    enable_gqa does; scores and the softmax are fp32 whatever the cache dtype.
    """
    B, n_head, _, head_dim = q.shape
    n_kv = k.size(1)
    q = q.reshape(B, n_kv, n_head // n_kv, head_dim).float()  # (B, n_kv, group, head_dim)
    scores = (q @ k.float().transpose(-1, -2)) * head_dim ** -0.5  # (B, n_kv, group, S)
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(mask.size(0), 1, 1, -1), float("-inf"))
    y = scores.softmax(dim=-1) @ v.float()  # (B, n_kv, group, head_dim)
    return y.to(v.dtype).reshape(B, n_head, 1, head_dim)


CPU_FP32_ATTENTION_BELOW = 512  # CPU bf16 training: attention over fewer positions runs in fp32 (module docstring)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, cached: bool) -> Tensor:
    """softmax(q k^T / sqrt(d)) v with GQA, q: (B, n_head, T, head_dim), k, v: (B, n_kv, S, head_dim); `mask` None
    is causal. One query over a cache on the CPU in bf16/fp16 takes `attend_one` (see the module docstring)."""
    n_head, n_kv = q.size(1), k.size(1)
    if (cached and q.size(2) == 1 and q.device.type == "cpu" and q.dtype != torch.float32
            and (mask is None or mask.dtype == torch.bool)):
        return attend_one(q, k, v, mask)
    if n_kv != n_head and not _SDPA_HAS_GQA:
        k = k.repeat_interleave(n_head // n_kv, dim=1)
        v = v.repeat_interleave(n_head // n_kv, dim=1)
    gqa = {"enable_gqa": True} if n_kv != n_head and _SDPA_HAS_GQA else {}
    dtype = q.dtype
    if (dtype == torch.bfloat16 and q.device.type == "cpu" and q.size(2) < CPU_FP32_ATTENTION_BELOW
            and torch.is_grad_enabled()):
        q, k, v = q.float(), k.float(), v.float()  # CPU training on short rows (see the module docstring)
        mask = mask.float() if mask is not None and mask.is_floating_point() else mask
        with torch.autocast("cpu", enabled=False):  # autocast would cast them back to bf16
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, **gqa)
        return y.to(dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, **gqa)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.attention_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, at: AttnInputs) -> Tensor:
        B, T, _ = x.shape
        heads = self.qkv_proj(x).view(B, T, self.n_head + 2 * self.n_kv, self.head_dim).transpose(1, 2)
        qk = apply_rope(heads[:, :self.n_head + self.n_kv], at.cos, at.sin)  # queries and keys rotated at once
        q, k = qk.split((self.n_head, self.n_kv), dim=1)  # (B, n_head, T, head_dim), (B, n_kv, T, head_dim)
        v = heads[:, self.n_head + self.n_kv:]
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(k, v, at)  # (B, n_kv, kv_len or max_seq_len, head_dim)
        y = attention(q, k, v, at.mask, self.kv_cache is not None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). `lean_activations`: the backward keeps gate_up in bf16 only (set by
    `llmlab.precision` for fp32 training on int8 copies of a quantized base, a mode that approximates anyway)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.lean_activations = False

    def forward(self, x: Tensor) -> Tensor:
        gate_up = self.gate_up_proj(x)
        if self.lean_activations and torch.is_grad_enabled() and gate_up.dtype == torch.float32:
            return self.down_proj(swiglu_saved_bf16(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, at: AttnInputs) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), at)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embeddings, the stack of blocks and the final norm (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # Built on the meta device (every load: weights assigned after), the table skips its random init: normal_ on
        # meta imports torch's reference decompositions, ~1-2 s of a 3 s start-up. Elsewhere it inits as usual.
        meta = torch.empty(0).device.type == "meta"
        table = torch.empty(config.vocab_size, config.hidden_size) if meta else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=table)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LLaMA(nn.Module):
    """Decoder-only LLaMA language model: token ids (B, T) -> next-token logits (B, T, vocab)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # A plain tensor, not a buffer: `model.to(bfloat16)` must not round the RoPE frequencies.
        self.inv_freq = rope_inv_freq(config, device="cpu")
        self.gradient_checkpointing = False
        self.fused_loss = True  # forward(labels=...) uses the chunked head + loss (llmlab.losses)
        self.cache: Cache | None = None  # the prepared decoding state, while `setup_cache` holds one
        self.max_cache_len = 0

    # -- weights ---------------------------------------------------------------------------------
    def init_weights(self, std: float | None = None) -> None:
        """Random init for pretraining: N(0, 0.02) for matrices, residual outputs scaled by 1/sqrt(2 * layers)."""
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif p.dim() == 1:  # biases
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.num_hidden_layers))
            else:
                nn.init.normal_(p, std=std)

    @property
    def device(self) -> torch.device:
        """Where the model computes (its final norm is never quantized or offloaded)."""
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations are computed in."""
        return self.model.norm.weight.dtype

    # -- KV cache --------------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None) -> Cache:
        """Prepare decoding with a cache of `max_seq_len` positions for `batch_size` rows (keys/values in `dtype`,
        default the model's): every layer's static KV cache, RoPE tables and causal mask (`Cache`)."""
        if max_seq_len > self.config.max_position_embeddings:
            raise LLMLabError(f"a cache of {max_seq_len} positions exceeds the model's context of "
                              f"{self.config.max_position_embeddings} (max_position_embeddings)")
        self.cache = Cache(self, batch_size, max_seq_len, dtype or self.dtype)
        self.max_cache_len = max_seq_len
        return self.cache

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None
        self.cache = None
        self.max_cache_len = 0

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, idx: Tensor, input_pos: Tensor | None = None, position_ids: Tensor | None = None,
                mask: Tensor | None = None, last_only: bool = False, kv_len: int | None = None,
                cache_rows: Tensor | None = None, labels: Tensor | None = None,
                return_hidden: bool = False) -> Tensor:
        """Logits for token ids `idx` (B, T); with `labels` (B, T) the mean next-token loss instead.

        Where the tokens sit (`attention_inputs`): without a cache, positions 0..T-1 (or `position_ids`) attending
        causally (or as `mask` (B, 1, T, T) says). With a cache (`setup_cache`), `input_pos` are the cache slots
        written, (T,) or per row (B, T) in cache rows `cache_rows`; queries see every earlier slot of their row, or
        what `mask` (B, 1, T, max_seq_len; True = attend) says, within the first `kv_len` slots.
        What comes out: `last_only` keeps the last position, (B, 1, vocab); `return_hidden` gives the final-norm hidden
        states (B, T, hidden) instead of logits; `labels` (aligned with idx, IGNORE_INDEX = no loss) gives the loss,
        through `llmlab.losses`' chunked head + cross-entropy (no full logits tensor) while `fused_loss` is True (a
        quantized head, frozen, is dequantized for the batch in the compute dtype).
        """
        x = self.model.embed_tokens(idx)  # (B, T, hidden)
        at = self.attention_inputs(x, input_pos, position_ids, mask, kv_len, cache_rows)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, at, use_reentrant=False)
            else:
                x = layer(x, at)
        x = self.model.norm(x[:, -1:] if last_only else x)  # (B, T, hidden)
        if return_hidden:
            return x
        if labels is None:
            return self.lm_head(x)  # (B, T, vocab)
        head = self.lm_head
        if self.fused_loss and type(head) is nn.Linear and head.bias is None:
            return losses.linear_cross_entropy(x, head.weight, labels)
        if self.fused_loss and isinstance(head, QuantLinear) and head.bias is None:  # frozen: dense copy or dequantized
            return losses.linear_cross_entropy(x, head.dense_weight(compute_dtype(x), narrower=True), labels)
        return losses.next_token_loss(head(x), labels)

    def attention_inputs(self, x: Tensor, input_pos: Tensor | None = None, position_ids: Tensor | None = None,
                         mask: Tensor | None = None, kv_len: int | None = None,
                         cache_rows: Tensor | None = None) -> AttnInputs:
        """What the layers read in a forward of the embedded tokens `x` (B, T, hidden) (the arguments are
        `forward`'s): the prepared cache's tables indexed, or without a cache the RoPE of the positions and `mask`."""
        if self.cache is not None:
            if input_pos is None:
                raise ValueError("a KV cache is set up: pass input_pos, the cache slots of idx")
            return self.cache.inputs(input_pos, position_ids, mask, kv_len, cache_rows)
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        if position_ids is None:
            position_ids = input_pos if input_pos is not None else torch.arange(x.size(1), device=x.device)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids if position_ids.dim() == 2 else position_ids[None],
                                x.dtype)
        return AttnInputs(cos, sin, mask)


def build_model(config: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                init: bool = True) -> LLaMA:
    """A model with random weights (`init=True`) or with uninitialised storage to be overwritten by a load."""
    with torch.device(device):
        model = LLaMA(config)
    if init and device != "meta":
        model.init_weights()
    return model.to(dtype)
