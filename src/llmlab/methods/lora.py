"""LoRA (Hu et al. 2021): W = W0 + scale * B A with A (r x in), B (out x r), B zero-initialised, W0 frozen.

`LoRALinear` wraps an `nn.Linear` in place and keeps its `weight` (and `bias`), so a base checkpoint still loads
into a LoRA model and the adapter saves on its own. The model fuses q/k/v into `qkv_proj` and gate/up into
`gate_up_proj`; LoRA adapts a slice of such a fused projection with its own A and B (the update is added into
that slice of the output), so each adapted slice is exactly one of PEFT's per-projection adapters
(`q_proj.lora_A` ...) and files map one to one. scale = alpha / r, or alpha / sqrt(r) with rsLoRA.

On disk an adapter is a PEFT folder: adapter_config.json (peft_type LORA) + adapter_model.safetensors with PEFT's
key names (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), written atomically, so PEFT loads
what llmlab saves and the other way round; the folder plumbing (files, the base probe that refuses an adapter put on
another base of the same shape, loading) is `llmlab.methods.adapters`', and this module gives the LoRA pieces: the
names on disk, the config, the module. `merge_lora` folds B A into W0 for inference without extra latency;
`unmerge_lora` takes it out again.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.args import LORA_TARGETS, LoRAConfig
from llmlab.errors import LLMLabError
from llmlab.lean import linear_saved_bf16
from llmlab.methods.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LORA,
    AdapterFiles,
    AddedModulesMethod,
    base_model_reference,
    is_float_linear,
    read_adapter_files,
    wrap_linear,
    write_adapter_files,
)

PEFT_PREFIX = "base_model.model."
# where each target lives: (module path inside a block, fused module attribute, slice index within it)
_MODULE_OF = {"q": ("self_attn", "qkv_proj", 0), "k": ("self_attn", "qkv_proj", 1), "v": ("self_attn", "qkv_proj", 2),
              "o": ("self_attn", "o_proj", 0), "gate": ("mlp", "gate_up_proj", 0), "up": ("mlp", "gate_up_proj", 1),
              "down": ("mlp", "down_proj", 0)}
_PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.lora_([AB])\.weight$")


def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """The factor of B A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (math.sqrt(r) if rslora else r)


class LoRALinear(nn.Module):
    """A linear layer plus low-rank updates on slices of its output; `slices` maps a target name to (start, end)
    rows. The base is an nn.Linear, whose `weight` and `bias` the module takes over under the same names, or a
    quantized layer (`QuantLinear`, `FusedQuantLinear`: GGUF blocks), kept whole as `base` and called as is; the
    update then stays unmerged (`merge_and_unload` still folds it into the dequantized weights)."""

    def __init__(self, base: nn.Module, slices: dict[str, tuple[int, int]], ranks: dict[str, int],
                 alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        if is_float_linear(base):
            self.weight = base.weight  # the base parameter, same name: base checkpoints load unchanged
            self.bias = base.bias
            dev, dt = base.weight.device, base.weight.dtype
        else:
            self.base = base
            dev, dt = base.device, torch.float32  # trainable parameters in fp32 (autocast casts them per matmul)
        self.slices = dict(slices)
        self.scale = {n: lora_scale(alpha, r, rslora) for n, r in ranks.items()}
        self.lora_A = nn.ParameterDict({n: nn.Parameter(torch.empty(r, self.in_features, device=dev, dtype=dt))
                                        for n, r in ranks.items()})
        self.lora_B = nn.ParameterDict({n: nn.Parameter(torch.zeros(slices[n][1] - slices[n][0], r, device=dev,
                                                                    dtype=dt)) for n, r in ranks.items()})
        for a in self.lora_A.values():
            if a.device.type != "meta":
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as PEFT: B = 0 makes the start exactly W0
        self.dropout = dropout
        self.merged = False
        self.lean_activations = False  # the A product keeps its input in bf16 for backward (llmlab.lean)
        self._order = sorted(self.slices, key=lambda n: self.slices[n][0])  # targets by first output row

    def adapter_params(self) -> list[str]:
        """The A and B of every target (the base weight and bias stay frozen)."""
        return [f"lora_A.{n}" for n in self.lora_A] + [f"lora_B.{n}" for n in self.lora_B]

    def delta(self, name: str) -> Tensor:
        """scale * B A of one target: the update of its rows of the weight, in fp32."""
        return self.scale[name] * (self.lora_B[name].float() @ self.lora_A[name].float())

    @property
    def quantized(self) -> bool:
        """Whether the base is a quantized layer (called whole, never merged into)."""
        return "base" in self._modules

    def base_forward(self, x: Tensor) -> Tensor:
        """W0 x + b (QLoRA overrides it with the 4-bit matmul)."""
        return self.base(x) if self.quantized else F.linear(x, self.weight, self.bias)

    def joined_B(self) -> Tensor:
        """All targets' scale * B as one (out_features, sum of ranks) matrix: block-diagonal, with zero rows where
        no target adapts the output, so that one matmul h @ joined_B.T gives every target's update in place."""
        blocks, row = [], 0
        for name in self._order:
            lo, hi = self.slices[name]
            b = self.lora_B[name] * self.scale[name]
            if lo > row:
                blocks.append(b.new_zeros(lo - row, 0))
            blocks.append(b)
            row = hi
        if row < self.out_features:
            blocks.append(blocks[-1].new_zeros(self.out_features - row, 0))
        return torch.block_diag(*blocks) if len(blocks) > 1 else blocks[0]

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_forward(x)
        if self.merged or not self.slices:
            return y
        xd = F.dropout(x, self.dropout, self.training) if self.dropout else x
        # All A's in one matmul, all B's in one addmm onto the base output: h @ joined_B.T, block-diagonal over the
        # targets. Nothing output-sized is built besides the result (per-target updates joined by cat cost an
        # output-sized temporary and extra passes; in-place adds into slices of y copy the gradient per slice).
        names = self._order
        a_all = torch.cat([self.lora_A[n] for n in names]) if len(names) > 1 else self.lora_A[names[0]]
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmul casts; no fp32 copy of x
            xd = xd.to(a_all.dtype)
        if self.lean_activations and xd.dtype == torch.float32 and torch.is_grad_enabled():
            h = linear_saved_bf16(xd, a_all)
        else:
            h = F.linear(xd, a_all)  # (..., sum of ranks)
        b_all = self.joined_B()  # (out, sum of ranks)
        if not torch.is_autocast_enabled(x.device.type):
            h, b_all = h.to(y.dtype), b_all.to(y.dtype)
        out = torch.addmm(y.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]), b_all.t())
        return out.view(y.shape)

    @torch.no_grad()
    def merge(self, sign: float = 1.0) -> None:
        """Fold the updates into the weight (sign -1: take them out again)."""
        if self.quantized:
            raise LLMLabError("LoRA on a quantized base stays unmerged (its blocks cannot take the update); merge "
                              "the adapter into the float checkpoint with `llmlab merge`")
        for name, (lo, hi) in self.slices.items():
            w = self.weight[lo:hi]
            w.copy_((w.float() + sign * self.delta(name)).to(w.dtype))
        self.merged = sign > 0

    def extra_repr(self) -> str:
        ranks = {n: a.shape[0] for n, a in self.lora_A.items()}
        return f"in={self.in_features}, out={self.out_features}, ranks={ranks}, merged={self.merged}"


def projection_slices(model: nn.Module, fused: str) -> list[tuple[int, int]]:
    """The output rows (start, end) of each projection inside the module `fused` of a block (q, k, v of qkv_proj;
    gate, up of gate_up_proj; one span for the others)."""
    cfg = model.config
    if fused == "qkv_proj":
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        return [(0, q), (q, q + kv), (q + kv, q + 2 * kv)]
    if fused == "gate_up_proj":
        n = cfg.intermediate_size
        return [(0, n), (n, 2 * n)]
    out = cfg.hidden_size
    return [(0, out)]


def target_rows(model: nn.Module, target: str) -> tuple[int, int]:
    """The output rows (start, end) of the projection `target` (q, k, ..., down) inside its module of a block."""
    _, fused, index = _MODULE_OF[target]
    return projection_slices(model, fused)[index]


def apply_lora(model: nn.Module, config: LoRAConfig, ranks: dict[str, int] | None = None,
               cls: type[LoRALinear] = LoRALinear) -> nn.Module:
    """Wrap the targeted projections of every block in `cls` (LoRALinear), in place; returns the model.

    `ranks` (target -> r) overrides config.r per target (adapters read from files give their own shapes).
    """
    config.validate()
    targets = config.target_list()
    groups: dict[tuple[str, str], dict[str, int]] = {}
    for t in targets:
        parent, fused, _ = _MODULE_OF[t]
        groups.setdefault((parent, fused), {})[t] = (ranks or {}).get(t, config.r)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        raise LLMLabError(f"LoRA targets {targets} match no module: the model has no model.layers blocks")
    for block in layers:
        for (parent_name, fused), group in groups.items():
            slices = {t: target_rows(model, t) for t in LORA_TARGETS if t in group}
            wrap_linear(getattr(block, parent_name), fused,
                        lambda base: cls(base, slices, group, config.alpha, config.dropout, config.rslora))
    model.lora_config = config
    return model


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> nn.Module:
    for _, m in lora_modules(model):
        if not m.merged:
            m.merge(1.0)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for _, m in lora_modules(model):
        if m.merged:
            m.merge(-1.0)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every LoRALinear and put plain nn.Linear modules (same weights) back: a normal model to save. A quantized
    base becomes an fp32 nn.Linear holding its dequantized weights plus the update."""
    for name, m in lora_modules(model):
        if m.quantized:
            with torch.no_grad():
                weight = m.base.dequantize(torch.float32)
                for target, (lo, hi) in m.slices.items():
                    weight[lo:hi] += m.delta(target)
            bias = getattr(m.base, "bias", None)
            linear = nn.Linear(m.in_features, m.out_features, bias=bias is not None, device="meta")
            linear.weight = nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                linear.bias = nn.Parameter(bias.detach().float(), requires_grad=False)
        else:
            if not m.merged:
                m.merge(1.0)
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            linear.weight, linear.bias = m.weight, m.bias
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, linear)
    model.__dict__.pop("lora_config", None)
    return model


# -- PEFT files --------------------------------------------------------------------------------------
def to_peft_names(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """llmlab LoRA tensors (`...qkv_proj.lora_A.q`) -> PEFT keys (`base_model.model...q_proj.lora_A.weight`)."""
    out = {}
    for name, t in sd.items():
        prefix, kind, target = name.rsplit(".", 2)
        block = prefix.rsplit(".", 1)[0]  # drop the fused module name
        out[f"{PEFT_PREFIX}{block}.{target}_proj.{kind}.weight"] = t
    return out


def from_peft_names(sd: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """PEFT LoRA keys -> llmlab names; a key of another kind (DoRA magnitudes, embeddings, ...) is an error."""
    out = {}
    for key, t in sd.items():
        m = _PEFT_KEY.match(key.replace(".default.weight", ".weight"))
        if m is None or m.group(3) not in _MODULE_OF:
            raise LLMLabError(f"{source}: tensor '{key}' is not a LoRA weight of a LLaMA projection (llmlab loads "
                              "LoRA on q/k/v/o/gate/up/down_proj of model.layers)")
        layer, parent, target, kind = m.groups()
        out[f"model.layers.{layer}.{parent}.{_MODULE_OF[target][1]}.lora_{kind}.{target}"] = t
    return out


def adapter_config_dict(config: LoRAConfig, base_model: str | None) -> dict[str, Any]:
    """adapter_config.json for PEFT's LoraConfig (the keys PEFT writes; the defaults it would fill in)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_reference(base_model),
            "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
            "target_modules": sorted(f"{t}_proj" for t in config.target_list()), "use_rslora": config.rslora,
            "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {}, "use_dora": False, "revision": None}


def save_adapter(folder: str | Path, tensors: dict[str, Tensor], config: LoRAConfig, base_model: str | None = None,
                 tokenizer: Any = None, extra_files: Callable[[Path], None] | None = None,
                 probe: str | None = None) -> Path:
    """Write a PEFT adapter folder atomically from llmlab-named LoRA tensors (`probe`: see `adapters.base_probe`)."""
    return write_adapter_files(folder, to_peft_names(tensors), adapter_config_dict(config, base_model), probe,
                               tokenizer, extra_files)


def read_adapter(folder: str | Path) -> tuple[LoRAConfig, AdapterFiles]:
    """The LoRAConfig and the files (tensors with llmlab names) of a PEFT LoRA folder, checked."""
    files = read_adapter_files(folder, LORA)
    raw, path = files.config, files.folder / ADAPTER_CONFIG
    unsupported = {k: raw[k] for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save",
                                       "fan_in_fan_out", "layers_to_transform") if raw.get(k)}
    if raw.get("bias", "none") != "none":
        unsupported["bias"] = raw["bias"]
    if unsupported:
        raise LLMLabError(f"{path}: LoRA options llmlab does not support: {unsupported}")
    weights = files.folder / ADAPTER_WEIGHTS
    files.tensors = from_peft_names(files.tensors, str(weights))
    targets = sorted({k.rsplit(".", 1)[1] for k in files.tensors}, key=LORA_TARGETS.index)
    if not targets:
        raise LLMLabError(f"{weights}: holds no LoRA tensors")
    config = LoRAConfig(r=int(raw.get("r", 8)), alpha=float(raw.get("lora_alpha", 8)),
                        dropout=float(raw.get("lora_dropout", 0.0)), targets=targets,
                        rslora=bool(raw.get("use_rslora", False)))
    return config, files


class LoRA(AddedModulesMethod):
    """Train LoRA adapters on the chosen projections; the base model stays frozen; saves a PEFT adapter folder."""

    name = "lora"
    option_group = "lora"
    config_class = LoRAConfig
    kind = LORA
    module_class = LoRALinear
    ranks: dict[str, int] | None = None  # target -> r, where an adapter read from a folder has its own shapes

    def apply(self, model: nn.Module) -> None:
        apply_lora(model, self.config, self.ranks)

    def write(self, folder: Path, tensors: dict[str, Tensor], tokenizer: Any,
              extra_files: Callable[[Path], None] | None, probe: str) -> Path:
        return save_adapter(folder, tensors, self.config, self.base_model, tokenizer, extra_files, probe)

    @classmethod
    def from_folder(cls, folder: str | Path) -> tuple[LoRA, AdapterFiles]:
        config, files = read_adapter(folder)
        method = cls(config, base_model=files.base_model)
        method.ranks = {k.rsplit(".", 1)[1]: t.shape[0] for k, t in files.tensors.items() if ".lora_A." in k}
        return method, files
