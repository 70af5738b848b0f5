"""QLoRA (Dettmers et al. 2023): the frozen base linear weights of every block stored 4-bit NormalFloat (NF4) with
double quantization (the per-block absmax scales are themselves quantized to 8 bits), LoRA trained on top.

Quantization and the 4-bit matmul are bitsandbytes' (`quantize_4bit`, `matmul_4bit`), so the weights are exactly
what bitsandbytes' `Linear4bit` holds. Each layer dequantizes its weight to the compute dtype for the matmul:
bf16 on CUDA, fp32 on CPU. Embeddings, norms and the output head stay in full precision. The adapter saves as a
normal PEFT LoRA folder, to use on the full-precision base (`--adapter`, `llmlab merge`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmlab.args import LoRAConfig
from llmlab.errors import LLMLabError
from llmlab.methods.lora import LoRA, LoRALinear, apply_lora, set_trainable

BLOCKSIZE = 64  # weights per absmax scale (bitsandbytes' and QLoRA's default)


def _bnb():
    try:
        import bitsandbytes
    except ImportError as e:
        raise LLMLabError("--method qlora needs bitsandbytes (pip install 'llmlab[qlora]' or bitsandbytes)") from e
    return bitsandbytes


def quantize_nf4(weight: Tensor, blocksize: int = BLOCKSIZE) -> tuple[Tensor, object]:
    """(packed uint8 weight, bitsandbytes QuantState) of `weight` in NF4 with double quantization."""
    import bitsandbytes.functional as bf

    _bnb()
    return bf.quantize_4bit(weight.detach(), blocksize=blocksize, compress_statistics=True, quant_type="nf4")


def dequantize_nf4(packed: Tensor, state: object) -> Tensor:
    """The weight a packed NF4 tensor stands for, in the dtype it was quantized from."""
    import bitsandbytes.functional as bf

    return bf.dequantize_4bit(packed, state)


class _NF4Base:
    """Mixin: the base weight is packed NF4 (frozen) + its QuantState; W0 x runs through bitsandbytes."""

    def _quantize(self) -> None:
        w = self.weight
        self.compute_dtype = torch.bfloat16 if w.device.type == "cuda" else torch.float32
        packed, self.quant_state = quantize_nf4(w.to(self.compute_dtype))
        self.weight = nn.Parameter(packed, requires_grad=False)  # same name: `weight`

    def dequantized(self) -> Tensor:
        return dequantize_nf4(self.weight, self.quant_state)

    def base_forward(self, x: Tensor) -> Tensor:
        import bitsandbytes as bnb

        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = bnb.matmul_4bit(x.to(self.compute_dtype), self.weight.t(), bias=bias, quant_state=self.quant_state)
        return y.to(x.dtype)


class Linear4bit(_NF4Base, nn.Module):
    """A frozen nn.Linear stored in NF4 (the block projections QLoRA does not adapt)."""

    def __init__(self, base: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self._quantize()

    def forward(self, x: Tensor) -> Tensor:
        return self.base_forward(x)


class LoRALinear4bit(_NF4Base, LoRALinear):
    """LoRALinear whose frozen base weight is NF4; cannot merge (merge into the full-precision base instead)."""

    def __init__(self, base: nn.Linear, *args, **kwargs) -> None:
        LoRALinear.__init__(self, base, *args, **kwargs)
        self._quantize()

    def merge(self, sign: float = 1.0) -> None:
        raise LLMLabError("a QLoRA model's 4-bit base cannot take a merged adapter; merge the saved adapter into the "
                          "full-precision checkpoint with `llmlab merge`")


def quantize_blocks(model: nn.Module) -> nn.Module:
    """Replace every plain nn.Linear inside the blocks by its NF4 version, in place."""
    for block in model.model.layers:
        for name, module in list(block.named_modules()):
            if type(module) is nn.Linear:
                parent, _, attr = name.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, attr, Linear4bit(module))
    return model


class QLoRA(LoRA):
    """LoRA on a base model whose block weights are NF4 (double-quantized); saves a normal PEFT adapter."""

    name = "qlora"

    def __init__(self, config: LoRAConfig | None = None, base_model: str | None = None) -> None:
        super().__init__(config, base_model)
        _bnb()

    def prepare(self, model: nn.Module) -> nn.Module:
        apply_lora(model, self.config, cls=LoRALinear4bit)
        quantize_blocks(model)
        set_trainable(model)
        return model
