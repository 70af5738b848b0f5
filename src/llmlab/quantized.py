"""Quantized linear layers: weights kept as group-wise integers (GGUF blocks, llmlab's int8/int4), used alike by
generation, serving and fine-tuning.

On a CPU, decoding one token reads every weight once, so its speed is the bytes it moves: a 4-bit weight moves an
eighth of an fp32 one. `QuantLinear` holds a weight as `Groups` (integer codes + per-group scales and zeros, see
`llmlab.quant_kernels`) packed for the kernel measured fastest here, and never materialises a float copy of it:
- `forward(x)`: the kernel's product (bf16 activations inside torch's CPU kernels, output in x's dtype);
- `dequantize()`: the exact weights the layer multiplies by (fp32), for merging, export and tests;
- `rows(index)`: a few rows' groups, which is how `QuantEmbedding` looks tokens up: a tied head and embedding
  share one quantized tensor;
- training (gradients recorded, a batch of `DENSE_MIN_ROWS` rows or more): the weight is dequantized to the
  compute dtype (autocast's, as nn.Linear) a chunk of rows at a time and multiplied by the dense GEMM, forward and
  backward (grad_x = grad_y @ W), never kept: LoRA and bottleneck adapters train on a quantized base through it;
  the quantized weights themselves are frozen. Where memory allows, training keeps a dense copy in the compute
  dtype instead (`keep_training_copies`, `train.dense_base`): the same weights, one GEMM and no dequantization a
  step. Training in fp32 on a CPU whose int8 GEMM is much faster than its fp32 one (AVX2 and VNNI CPUs without
  native bf16) may keep int8 copies instead (`keep_int8_copies`, `train.int8_base`): the weight requantized per
  row, inputs and gradients quantized per row, one int8 GEMM each way;
- inference batches (`keep_dense_copies`): the kernels are built for decoding's one row and their cost grows with
  the rows, so where a serving batch, a prefill or a scoring batch is multiplied faster by the dense GEMM
  (measured per shape, `quant_kernels.dense_plan`) a layer may also keep a dense copy in the activations' dtype
  and use it from that many rows on; decoding one sequence keeps the kernel and the memory saving.
A fused projection (`qkv_proj`, `gate_up_proj`) whose parts share a format is one `QuantLinear` over the
concatenated rows (a group never spans two rows, so each part keeps its own blocks); parts of different formats
(Q4_K_M files mix Q4_K and Q6_K) become a `FusedQuantLinear` of one layer per part.

Quantized layers are rebuilt from their source (a GGUF file, or a float checkpoint and `quantize_model`), never
saved in a kernel's layout, which depends on the CPU: their buffers are not part of the state dict. The one
exception is machine-local: `llmlab.packed_cache` keeps a GGUF's packed layers to skip rebuilding them
(`QuantLinear.from_buffers`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.errors import LLMLabError
from llmlab.quant_kernels import KERNELS, Groups, Kernel, QuantSpec, choose_kernel, dense_plan

_CHUNK = 1 << 22  # weights dequantized at a time by the dense (training) path: 8 MB in bf16
DENSE_MIN_ROWS = 16  # products of at least this many rows take the dense path when gradients are recorded


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a linear layer computes x in: autocast's when it is on for x's device (as nn.Linear), else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _row_chunks(layer: QuantLinear, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Ranges of rows [start, end) of at most _CHUNK weights each (whole 64-row blocks from `start`, so every kernel
    slices its layout)."""
    return _chunks(layer.in_features, start, layer.out_features if end is None else end)


def _chunks(in_features: int, start: int, end: int) -> list[tuple[int, int]]:
    step = max(64, _CHUNK // in_features // 64 * 64)
    return [(a, min(end, a + step)) for a in range(start, end, step)]


# The training path as torch.library custom ops: the layer travels as its buffers (tensors) plus its kernel's name and
# spec (constants alike in every block of a model), so a compiled block (`train.compile`) keeps one graph across the
# dequantize + GEMM instead of breaking at an autograd.Function that carries the module, and one compiled graph
# serves every block (the buffers are graph inputs, as parameters are).
def _unpack_layer(buffers: list[Tensor], names: str, kernel: str, spec: list[int]):
    return KERNELS[kernel], dict(zip(names.split(","), buffers)), QuantSpec.from_ints(spec)


@torch.library.custom_op("llmlab::dense_quant_linear", mutates_args=())
def dense_quant_linear(x: Tensor, buffers: list[Tensor], names: str, kernel: str, spec: list[int]) -> Tensor:
    """y = x @ W.T for a batch of many rows x (M, K), with W quantized and frozen: W is dequantized to x's dtype a
    chunk of rows at a time and multiplied by the dense GEMM, in the forward pass and again in the backward pass
    (grad_x = grad_y @ W, `dense_quant_grad_input`), so no float copy of W outlives the call and the gradient flows to
    x only. `buffers`/`names` are the layer's kernel buffers, `spec` its QuantSpec as ints.

    Why dense: dequantizing costs O(N K) against the product's O(M N K); at a training batch's hundreds of rows the
    GEMM decides, and the dense bf16/fp32 GEMM is 2-4x faster than the weight-only kernels, which are built for
    decoding's few rows (docs/finetune.md has the measurements)."""
    kern, bufs, qs = _unpack_layer(buffers, names, kernel, spec)
    with torch.autocast(x.device.type, enabled=False):
        parts = [F.linear(x, kern.dequantize(bufs, qs, x.dtype, a, b))
                 for a, b in _chunks(qs.in_features, 0, qs.out_features)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


@dense_quant_linear.register_fake
def _(x: Tensor, buffers: list[Tensor], names: str, kernel: str, spec: list[int]) -> Tensor:
    return x.new_empty(x.shape[0], spec[0])


@torch.library.custom_op("llmlab::dense_quant_grad_input", mutates_args=())
def dense_quant_grad_input(grad: Tensor, buffers: list[Tensor], names: str, kernel: str,
                           spec: list[int]) -> Tensor:
    """grad_y @ W in grad's dtype (grad (M, N)), W dequantized a chunk of rows at a time."""
    kern, bufs, qs = _unpack_layer(buffers, names, kernel, spec)
    grad_x = None
    with torch.autocast(grad.device.type, enabled=False):
        for a, b in _chunks(qs.in_features, 0, qs.out_features):
            w = kern.dequantize(bufs, qs, grad.dtype, a, b)
            grad_x = grad[:, a:b] @ w if grad_x is None else grad_x.addmm_(grad[:, a:b], w)
    return grad_x


@dense_quant_grad_input.register_fake
def _(grad: Tensor, buffers: list[Tensor], names: str, kernel: str, spec: list[int]) -> Tensor:
    return grad.new_empty(grad.shape[0], spec[1])


def _dense_setup(ctx, inputs: tuple, output: Tensor) -> None:
    _, buffers, names, kernel, spec = inputs
    ctx.save_for_backward(*buffers)
    ctx.meta = (names, kernel, spec)


def _dense_backward(ctx, grad: Tensor) -> tuple[Tensor, list[None], None, None, None]:
    buffers = list(ctx.saved_tensors)
    return dense_quant_grad_input(grad.contiguous(), buffers, *ctx.meta), [None] * len(buffers), None, None, None


dense_quant_linear.register_autograd(_dense_backward, setup_context=_dense_setup)


def _grad_input(layer: QuantLinear, grad: Tensor) -> Tensor:
    """grad_y @ W in grad's dtype, W dequantized a chunk of rows at a time."""
    return dense_quant_grad_input(grad, *layer.op_args())


class _QuantMatmul(torch.autograd.Function):
    """y = x @ W.T through the layer's kernel, with W quantized and frozen: the gradient flows to x only."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantLinear, out_dtype: torch.dtype) -> Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        # cast inside: the gradient then arrives in out_dtype, not rounded to the kernel's bf16
        return layer.kernel.matmul(x, layer.kernel_buffers(), layer.spec).to(out_dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return _grad_input(ctx.layer, grad.to(ctx.x_dtype)), None, None


def _quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (M, K) as int8 codes and a scale per row (fp32 absmax / 127, so each row uses the whole int8 range)."""
    x = x.float()
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-30) / 127.0
    return torch.round(x / scale).to(torch.int8), scale


class _Int8Matmul(torch.autograd.Function):
    """y = x @ W.T with W frozen as int8 codes (N, K) and a scale per output row, x quantized per row on the fly:
    one int8 GEMM (`torch._int_mm`, int32 sums) scaled back. The input gradient is the same kind of product:
    grad_x = (grad_y * scale) @ codes, the gradient quantized per row. Tensors only (no module), so a compiled block
    traces through it and fuses the quantization with its neighbours."""

    @staticmethod
    def forward(ctx, x: Tensor, codes: Tensor, scale: Tensor) -> Tensor:
        q, row_scale = _quantize_rows(x)
        ctx.save_for_backward(codes, scale)
        ctx.x_dtype = x.dtype
        return torch._int_mm(q, codes.t()).float() * row_scale * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        codes, scale = ctx.saved_tensors
        q, row_scale = _quantize_rows(grad.float() * scale)
        return (torch._int_mm(q, codes).float() * row_scale).to(ctx.x_dtype), None, None


class QuantLinear(nn.Module):
    """y = x W^T + b with W held as group-wise integer codes (see the module docstring).

    `kernel` names the storage/matmul kernel (`int4pack`, `int8split`, `dequant`) or "auto": the fastest one that
    computes correctly on `device`, measured once per weight shape and cached (`llmlab.quant_kernels`).
    `out_dtype` None returns x's dtype; an LM head asks for float32, keeping the kernel's fp32 sums (bf16 logits
    tie often among 49k tokens, and greedy decoding then depends on rounding). Build the layer on its target
    device: the kernel's layout does not move between devices.
    """

    def __init__(self, groups: Groups, bias: Tensor | None = None, kernel: str = "auto",
                 device: torch.device | str | None = None, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dev = torch.device(device) if device is not None else groups.q.device
        spec = QuantSpec.of(groups)
        chosen = choose_kernel(spec, dev, kernel)
        if groups.q.device != dev:
            groups = Groups(groups.q.to(dev), groups.scale.to(dev), None if groups.zero is None else
                            groups.zero.to(dev), groups.group, groups.bits, groups.qmin)
        self._hold(chosen, spec, chosen.pack(groups), None if bias is None else bias.to(dev), out_dtype)

    def _hold(self, kernel: Kernel, spec: QuantSpec, buffers: dict[str, Tensor], bias: Tensor | None,
              out_dtype: torch.dtype | None) -> None:
        self.out_features, self.in_features = spec.out_features, spec.in_features
        self.spec, self.kernel = spec, kernel
        self._names = tuple(buffers)
        self._dtypes = {name: t.dtype for name, t in buffers.items()}
        for name, t in buffers.items():
            self.register_buffer(name, t, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_dtype = out_dtype
        self.register_buffer("dense", None, persistent=False)  # see keep_dense
        self.dense_from = 0
        self.register_buffer("int8_weight", None, persistent=False)  # see keep_int8
        self.register_buffer("int8_scale", None, persistent=False)

    @classmethod
    def from_buffers(cls, kernel: str, spec: QuantSpec, buffers: dict[str, Tensor], bias: Tensor | None = None,
                     out_dtype: torch.dtype | None = None) -> QuantLinear:
        """A layer from buffers another layer's kernel `kernel` packed on this machine (`llmlab.packed_cache` keeps
        them), without decoding or packing anything."""
        if kernel not in KERNELS:
            raise LLMLabError(f"unknown quantized kernel '{kernel}' (known: {', '.join(KERNELS)})")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._hold(KERNELS[kernel], spec, buffers, bias, out_dtype)
        return self

    def kernel_buffers(self) -> dict[str, Tensor]:
        """The kernel's buffers by name."""
        return {name: getattr(self, name) for name in self._names}

    def op_args(self) -> tuple[list[Tensor], str, str, list[int]]:
        """The layer as the training ops (`dense_quant_linear`) take it: buffers, their names (comma-joined), kernel,
        spec."""
        return [getattr(self, name) for name in self._names], ",".join(self._names), self.kernel.name, self.spec.ints()

    @property
    def device(self) -> torch.device:
        return getattr(self, self._names[0]).device

    def _apply(self, fn, recurse=True):
        # model.to(dtype) must not cast the kernel's scales: its kernel expects the dtypes it packed
        super()._apply(fn, recurse)
        for name, dtype in self._dtypes.items():
            t = getattr(self, name)
            if t.dtype != dtype:
                setattr(self, name, t.to(dtype))
        if self.int8_scale is not None and self.int8_scale.dtype != torch.float32:
            self.int8_scale = self.int8_scale.float()
        return self

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        compute = compute_dtype(x)
        out_dtype = self.out_dtype or compute
        if self.int8_weight is not None and torch.is_grad_enabled() and x2.shape[0] >= DENSE_MIN_ROWS:
            y = _Int8Matmul.apply(x2, self.int8_weight, self.int8_scale).to(out_dtype)  # training, int8 (keep_int8)
        elif (self.dense is not None and x2.shape[0] >= self.dense_from
                and (self.dense.dtype == compute or not x.requires_grad)):  # a batch and its dense copy
            y = F.linear(x2.to(self.dense.dtype), self.dense).to(out_dtype)
        elif torch.is_grad_enabled() and x2.shape[0] >= DENSE_MIN_ROWS:  # training: dequantize + dense GEMM
            y = dense_quant_linear(x2.to(compute), *self.op_args()).to(out_dtype)
        elif torch.is_grad_enabled() and x.requires_grad:
            y = _QuantMatmul.apply(x2, self, out_dtype)
        else:
            y = self.kernel.matmul(x2, self.kernel_buffers(), self.spec)
            if y.dtype != out_dtype:
                y = y.to(out_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def keep_dense(self, from_rows: int, dtype: torch.dtype) -> None:
        """Multiply inputs of `from_rows` rows or more by a dense copy of the weight in `dtype` from now on (kept
        beside the quantized one: 2 bytes a weight in bf16); fewer rows still take the kernel. The product is computed
        in `dtype` and returned in the layer's output dtype."""
        self.dense = self.dequantize(dtype)
        self.dense_from = from_rows

    def keep_int8(self, limit: int) -> None:
        """Multiply training batches (gradients recorded, `DENSE_MIN_ROWS` rows or more) in int8 from now on: the
        weight requantized per output row to codes within +-`limit` (127; 63 where the CPU's int8 GEMM saturates,
        `hardware.int8_matmul_limit`), 1 byte a weight beside the blocks, inputs and gradients quantized per row on the
        fly (`_Int8Matmul`). An approximation of the weight the layer holds (the loss moves by ~0.2-0.4% on SmolLM2,
        docs/finetune.md), for CPUs whose int8 GEMM is 2-4x their fp32 one; decoding and evaluation keep the kernel."""
        g = quantize_int8(self.dequantize(torch.float32), None, limit)  # one group a row
        self.int8_weight, self.int8_scale = g.q, g.scale.squeeze(1)

    def dense_weight(self, dtype: torch.dtype, narrower: bool = False) -> Tensor:
        """The whole weight in `dtype`: the dense copy when the layer keeps one in that dtype (`keep_dense`), else
        dequantized now (a frozen head under the fused loss, every training step). `narrower`: a copy in a narrower
        float dtype is returned as it is (the fused loss widens it a slice of rows at a time)."""
        if self.dense is not None and (self.dense.dtype == dtype
                                       or narrower and self.dense.element_size() < dtype.itemsize):
            return self.dense
        return self.dequantize(dtype)

    def rows(self, index: Tensor) -> Groups:
        """The groups of output rows `index` (1-D), as this layer computes with them."""
        return self.kernel.rows(self.kernel_buffers(), self.spec, index)

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, end: int | None = None) -> Tensor:
        """The weight (out_features, in_features) the layer multiplies by, in `dtype` (computed in fp32, rounded
        once); `start`, `end`: only those output rows."""
        end = self.out_features if end is None else end
        chunks = _row_chunks(self, start, end)
        if len(chunks) == 1:
            return self.kernel.dequantize(self.kernel_buffers(), self.spec, dtype, start, end)
        out = torch.empty(end - start, self.in_features, dtype=dtype, device=self.device)
        for a, b in chunks:  # a chunk at a time: the fp32 temporaries stay small (a head is 28M weights)
            out[a - start:b - start] = self.kernel.dequantize(self.kernel_buffers(), self.spec, dtype, a, b)
        return out

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in_features={s.in_features}, out_features={s.out_features}, bits={s.bits}, group={s.group}, "
                f"kernel={self.kernel.name}, bias={self.bias is not None}")


class FusedQuantLinear(nn.Module):
    """Several layers side by side (their outputs concatenated): a fused projection whose parts are stored in
    different formats (or some not quantized at all), each kept in its own."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    @property
    def device(self) -> torch.device:
        first = self.parts[0]
        return first.device if isinstance(first, QuantLinear) else first.weight.device

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def rows(self, index: Tensor) -> Groups:
        raise LLMLabError("rows of a projection fused from differently quantized parts: dequantize() it instead")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.cat([p.dequantize(dtype) if isinstance(p, QuantLinear) else p.weight.detach().to(dtype)
                          for p in self.parts])


class QuantEmbedding(nn.Module):
    """Token embeddings read out of a quantized (vocab, hidden) weight, dequantizing only the looked-up rows.

    `source` is the `QuantLinear` holding the table: with tied embeddings it is the LM head itself, so the model
    keeps one quantized tensor for both.
    """

    def __init__(self, source: QuantLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.source = source
        self.num_embeddings, self.embedding_dim = source.out_features, source.in_features
        # carries the output dtype through model.to(dtype)
        self.register_buffer("dtype_ref", torch.empty(0, dtype=dtype, device=source.device), persistent=False)

    def forward(self, idx: Tensor) -> Tensor:
        dense = self.source.dense
        if dense is not None and dense.dtype == self.dtype_ref.dtype:  # the same rows, already dequantized
            return F.embedding(idx, dense)
        flat = idx.reshape(-1)
        return self.source.rows(flat).dequantize(self.dtype_ref.dtype).view(*idx.shape, self.embedding_dim)


# -- quantizing float weights ---------------------------------------------------------------------------
def quantize_int4(w: Tensor, group: int = 32) -> Groups:
    """Asymmetric 4-bit groups (as GGUF's Q4_1): per group, scale = (max - min) / 15 and zero = min."""
    n, k = w.shape
    if k % group:
        raise LLMLabError(f"int4 quantization: {k} inputs are not a multiple of the group size {group}")
    wg = w.detach().float().view(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = (hi - lo) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((wg - lo[..., None]) / safe[..., None]).round().clamp(0, 15).to(torch.int8).view(n, k)
    return Groups(q, scale, lo, group, 4, 0)


def quantize_int8(w: Tensor, group: int | None = None, limit: int = 127) -> Groups:
    """Symmetric 8-bit groups: scale = max |w| / `limit` per group of `group` inputs (None: one per row), codes within
    +-`limit` (63 for a CPU whose int8 GEMM saturates beyond, `QuantLinear.keep_int8`)."""
    n, k = w.shape
    group = group or k
    if k % group:
        raise LLMLabError(f"int8 quantization: {k} inputs are not a multiple of the group size {group}")
    wg = w.detach().float().view(n, k // group, group)
    scale = wg.abs().amax(-1) / limit
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (wg / safe[..., None]).round().clamp(-limit, limit).to(torch.int8).view(n, k)
    return Groups(q, scale, None, group, 8, -128)


QUANTIZE_MODES = ("int8", "int4")


def quantize_model(model: nn.Module, mode: str, group: int = 32, kernel: str = "auto") -> nn.Module:
    """Replace the model's float projections by `QuantLinear`s, in place (for HF-format float checkpoints).

    `int4`: every block projection becomes asymmetric 4-bit with groups of `group` inputs; `int8`: symmetric
    per-channel int8. In both modes the LM head is per-channel int8 (the head's errors land directly on the
    logits) and the token embedding reads its rows out of the same tensor when tied (or out of its own int8 copy).
    Layers are quantized one at a time, so the float model is the peak memory.
    """
    if mode not in QUANTIZE_MODES:
        raise LLMLabError(f"--quantize: expected one of {', '.join(QUANTIZE_MODES)}, got '{mode}'")
    decoder = model.model
    dtype = decoder.norm.weight.dtype
    device = decoder.norm.weight.device

    def convert(linear: nn.Module, how: str, out_dtype: torch.dtype | None = None) -> QuantLinear:
        w = linear.weight
        n, k = w.shape
        g = quantize_int4(w, group) if how == "int4" and k % group == 0 and n % 16 == 0 else quantize_int8(w)
        return QuantLinear(g, linear.bias.detach() if linear.bias is not None else None, kernel, device, out_dtype)

    with torch.no_grad():
        for layer in decoder.layers:
            for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                                 (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
                setattr(parent, name, convert(getattr(parent, name), mode))
        tied = model.lm_head.weight is decoder.embed_tokens.weight
        head = convert(model.lm_head, "int8", torch.float32)
        model.lm_head = head
        table = head if tied else QuantLinear(quantize_int8(decoder.embed_tokens.weight), kernel="dequant",
                                              device=device)
        decoder.embed_tokens = QuantEmbedding(table, dtype)
    return model


def _projections(model: nn.Module) -> list[QuantLinear]:
    """The quantized layers of `model` that multiply (every QuantLinear but a table only read by rows)."""
    tables = {id(m.source) for m in model.modules() if isinstance(m, QuantEmbedding)}
    tables.discard(id(getattr(model, "lm_head", None)))
    return [m for m in model.modules() if isinstance(m, QuantLinear) and id(m) not in tables]


def keep_dense_copies(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Give every quantized projection of `model` whose kernel a dense copy beats on batches (measured per shape,
    `quant_kernels.dense_plan`) a dense copy, used from that many rows on (`QuantLinear.keep_dense`): in `dtype` (the
    activations', by default) or float32, whichever measured faster; a layer with its own output dtype (the fp32
    head) in that. Returns the bytes added. For serving and evaluation, whose batches are many rows; decoding one
    sequence (generate, chat) does without, keeping the memory saving. A model without quantized layers is left as
    it is."""
    layers = [m for m in _projections(model) if m.dense is None]  # a table is only read by rows
    if not layers:
        return 0
    dtype = dtype or model.model.norm.weight.dtype
    added = 0
    for m in layers:
        # a head answering fp32 logits keeps them fp32 (no bf16 ties in scoring); others: whichever is faster
        candidates = (m.out_dtype,) if m.out_dtype else tuple(dict.fromkeys((dtype, torch.float32)))
        plan = dense_plan(m.spec, m.device, m.kernel, dtype, candidates)
        if plan is not None:
            m.keep_dense(*plan)
            added += m.dense.numel() * m.dense.element_size()
    return added


def _without_copy(model: nn.Module, dtype: torch.dtype) -> list[QuantLinear]:
    """The projections of `model` that keep no dense copy in `dtype` yet."""
    return [m for m in _projections(model) if m.dense is None or m.dense.dtype != dtype]


def training_copy_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes `keep_training_copies(model, dtype)` would add."""
    size = torch.empty(0, dtype=dtype).element_size()
    return sum(m.out_features * m.in_features * size for m in _without_copy(model, dtype))


def keep_training_copies(model: nn.Module, dtype: torch.dtype) -> int:
    """Give every quantized projection of `model` a dense copy in `dtype` (the training compute dtype, autocast's)
    used for products of `DENSE_MIN_ROWS` rows or more, gradients included: a training batch then multiplies by it
    with one GEMM, forward and backward, instead of dequantizing the weight a chunk at a time twice a step. The
    copy holds the same values the dequantizing path computes with (`dequantize(dtype)`), so the numbers are
    unchanged; it costs 2 bytes a weight in bf16 (212 MB for SmolLM2-135M's blocks, against ~30% of a CPU LoRA
    step, docs/finetune.md). Returns the bytes added."""
    added = 0
    for m in _without_copy(model, dtype):
        m.keep_dense(DENSE_MIN_ROWS, dtype)
        added += m.dense.numel() * m.dense.element_size()
    return added


INT8_SKIP = ("down_proj",)  # keep_int8_copies leaves these to the float path (see there)


def _int8_candidates(model: nn.Module) -> list[QuantLinear]:
    """The projections `keep_int8_copies` requantizes: every one but the LM head (also reached as a tied
    embedding's table) and those under a name in INT8_SKIP."""
    head = id(getattr(model, "lm_head", None))
    projections = {id(m) for m in _projections(model)} - {head}
    # in_features 1: torch 2.13's _int_mm sums wrong against a transposed (N, 1) weight
    return [m for name, m in model.named_modules() if id(m) in projections and m.int8_weight is None
            and m.in_features > 1 and not set(name.split(".")) & set(INT8_SKIP)]


def int8_copy_bytes(model: nn.Module) -> int:
    """Bytes `keep_int8_copies(model, ...)` would add (a byte a weight and 4 a row)."""
    return sum(m.out_features * (m.in_features + 4) for m in _int8_candidates(model))


def keep_int8_copies(model: nn.Module, limit: int) -> int:
    """Give the quantized projections of `model` int8 copies for training (`QuantLinear.keep_int8`, codes within
    +-`limit`); returns the bytes added. Left out (INT8_SKIP): the MLP's down projection, whose input (the SwiGLU
    product) a per-row int8 scale serves badly (measured on SmolLM2: int8 there alone raised the loss by 0.9%, every
    other projection together by 0.2%; SmoothQuant-style per-channel smoothing did not help), and the LM head, which
    the fused loss multiplies by its dense weight (int8 logits: +0.6%)."""
    added = 0
    for m in _int8_candidates(model):
        m.keep_int8(limit)
        added += m.int8_weight.numel() + m.int8_scale.numel() * 4
    return added


def trains_in_int8(model: nn.Module) -> bool:
    """Whether any quantized layer of `model` multiplies training batches in int8 (`keep_int8_copies`)."""
    return any(isinstance(m, QuantLinear) and m.int8_weight is not None for m in model.modules())


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each tensor counted once (tied ones too)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen and t.device.type != "meta":
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total

