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
- a preallocated (static) KV cache for decoding, so decode steps have fixed shapes.

Module names follow HF's `LlamaForCausalLM` except for the two fused projections;
`llmlab.checkpoint` maps names at load/save time so files on disk keep HF names.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from llmlab.config import ModelConfig

_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa came in 2.5


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back (as HF does)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


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
    """cos and sin tables for the given positions: (B, T) -> two (B, 1, T, head_dim) tensors."""
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) of x: (B, n_head, T, head_dim) by the angles in cos/sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache(nn.Module):
    """Preallocated keys and values for `max_seq_len` positions: (B, n_kv_heads, max_seq_len, head_dim)."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, rows: Tensor | None = None,
               kv_len: int | None = None) -> tuple[Tensor, Tensor]:
        """Write k, v (B, n_kv, T, head_dim) at slots `input_pos` and return the cache the queries attend to.

        `input_pos` (T,) writes the same slots in every row of a cache of batch B (the whole cache comes back).
        `input_pos` (B, T) writes each row at its own slots (continuous batching: rows at different lengths);
        the batch then uses cache rows `rows` (B,) (default the first B) and gets back those rows' first `kv_len`
        slots (a view for the default rows, a gathered copy otherwise).
        """
        if input_pos.dim() == 1:
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
            return self.k, self.v
        B = k.size(0)
        idx = torch.arange(B, device=k.device) if rows is None else rows
        self.k[idx[:, None], :, input_pos] = k.transpose(1, 2)  # indexed view: (B, T, n_kv, head_dim)
        self.v[idx[:, None], :, input_pos] = v.transpose(1, 2)
        end = kv_len or self.k.size(2)
        if rows is None:
            return self.k[:B, :, :end], self.v[:B, :, :end]
        return self.k[rows, :, :end], self.v[rows, :, :end]


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


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv * self.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.attention_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None,
                kv_len: int | None = None, cache_rows: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, n_kv, T, head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None and input_pos.dim() == 2:  # per-row slots
            k, v = self.kv_cache.update(input_pos, k, v, cache_rows, kv_len)  # (B, n_kv, kv_len, head_dim)
        elif self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, n_kv, max_seq_len, head_dim)
            if kv_len is not None:  # only the filled slots: less work on CPU, at the price of changing shapes
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
        if self.n_kv != self.n_head and not _SDPA_HAS_GQA:
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        if (T == 1 and self.kv_cache is not None and x.device.type == "cpu" and x.dtype != torch.float32
                and (mask is None or mask.dtype == torch.bool)):
            y = attend_one(q, k, v, mask)
        else:
            gqa = {"enable_gqa": True} if self.n_kv != self.n_head and _SDPA_HAS_GQA else {}
            dtype, fp32 = q.dtype, False
            if dtype == torch.bfloat16 and x.device.type == "cpu" and T < 512 and torch.is_grad_enabled():
                q, k, v = q.float(), k.float(), v.float()  # see the module docstring: CPU training on short rows
                mask = mask.float() if mask is not None and mask.is_floating_point() else mask
                fp32 = True
            with torch.autocast(x.device.type, enabled=False) if fp32 else nullcontext():  # autocast would cast back
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, **gqa)
            y = y.to(dtype)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, n_head * head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None,
                kv_len: int | None = None, cache_rows: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, kv_len, cache_rows)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embeddings, the stack of blocks and the final norm (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
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
    def setup_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate a static KV cache for `max_seq_len` positions in every attention layer."""
        if max_seq_len > self.config.max_position_embeddings:
            from llmlab.errors import LLMLabError

            raise LLMLabError(f"a cache of {max_seq_len} positions exceeds the model's context of "
                              f"{self.config.max_position_embeddings} (max_position_embeddings)")
        dtype = dtype or self.dtype
        for layer in self.model.layers:
            attn = layer.self_attn
            attn.kv_cache = KVCache(batch_size, max_seq_len, attn.n_kv, attn.head_dim, dtype, self.device)
        self.max_cache_len = max_seq_len

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None
        self.max_cache_len = 0

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, idx: Tensor, input_pos: Tensor | None = None, position_ids: Tensor | None = None,
                mask: Tensor | None = None, last_only: bool = False, kv_len: int | None = None,
                cache_rows: Tensor | None = None, labels: Tensor | None = None,
                return_hidden: bool = False) -> Tensor:
        """Logits for token ids `idx` (B, T); with `labels` (B, T) the mean next-token loss instead.

        Without a cache: causal attention over `idx` (positions 0..T-1 unless `position_ids` is given).
        With a cache (`setup_cache`): `input_pos` (T,) are the cache slots written; queries attend to every
        earlier slot unless `mask` (B, 1, T, max_seq_len; True = attend) says otherwise.
        `mask` may also be given without a cache: (B, 1, T, T).
        `last_only` returns only the last position's logits, (B, 1, vocab), for generation.
        `kv_len` (with a cache): attend only to slots [0, kv_len), which must cover every slot a query may see;
        eager CPU decoding is faster with it, compiled decoding wants the fixed shapes of leaving it None.
        Per-row slots (continuous batching, `llmlab.serve`): `input_pos` (B, T) gives each row its own slots, in
        cache rows `cache_rows` (B,) (default the first B); the default mask is causal per row.
        `labels` (aligned with idx, IGNORE_INDEX = no loss): the loss goes through `llmlab.losses`' chunked head +
        cross-entropy (no full logits tensor) while `fused_loss` is True; a quantized head (frozen) is dequantized
        for the batch in the compute dtype. `return_hidden`: the final-norm hidden
        states (B, T, hidden) instead of logits.
        """
        B, T = idx.shape
        x = self.model.embed_tokens(idx)  # (B, T, hidden)
        if self.inv_freq.device != idx.device:
            self.inv_freq = self.inv_freq.to(idx.device)
        if position_ids is None:
            pos = input_pos if input_pos is not None else torch.arange(T, device=idx.device)
            position_ids = pos if pos.dim() == 2 else pos[None].expand(B, T)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, x.dtype)
        if self.max_cache_len:
            if input_pos is None:
                raise ValueError("a KV cache is set up: pass input_pos, the cache slots of idx")
            if mask is None and input_pos.dim() == 2:
                slots = torch.arange(kv_len or self.max_cache_len, device=idx.device)
                mask = (slots[None, None, :] <= input_pos[:, :, None])[:, None]  # (B, 1, T, kv_len)
            elif mask is None:
                slots = torch.arange(self.max_cache_len, device=idx.device)
                mask = (slots[None, :] <= input_pos[:, None])[None, None]  # (1, 1, T, max_seq_len)
            if kv_len is not None:
                mask = mask[..., :kv_len]
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, input_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, input_pos, kv_len, cache_rows)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)  # (B, T, hidden)
        if return_hidden:
            return x
        if labels is None:
            return self.lm_head(x)  # (B, T, vocab)
        from llmlab.losses import linear_cross_entropy, next_token_loss
        from llmlab.quantized import QuantLinear

        head = self.lm_head
        if self.fused_loss and type(head) is nn.Linear and head.bias is None:
            return linear_cross_entropy(x, head.weight, labels)
        if self.fused_loss and isinstance(head, QuantLinear) and head.bias is None:  # frozen: dequantized per batch
            dev = x.device.type
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
            return linear_cross_entropy(x, head.dequantize(dtype), labels)
        return next_token_loss(head(x), labels)


def build_model(config: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                init: bool = True) -> LLaMA:
    """A model with random weights (`init=True`) or with uninitialised storage to be overwritten by a load."""
    with torch.device(device):
        model = LLaMA(config)
    if init and device != "meta":
        model.init_weights()
    return model.to(dtype)
