"""LoRA (Hu et al. 2021): W = W0 + scale * B A with A (r x in), B (out x r), B zero-initialised, W0 frozen.

`LoRALinear` wraps an `nn.Linear` in place and keeps its `weight` (and `bias`), so a base checkpoint still loads
into a LoRA model and the adapter saves on its own. The model fuses q/k/v into `qkv_proj` and gate/up into
`gate_up_proj`; LoRA adapts a slice of such a fused projection with its own A and B (the update is added into
that slice of the output), so each adapted slice is exactly one of PEFT's per-projection adapters
(`q_proj.lora_A` ...) and files map one to one. scale = alpha / r, or alpha / sqrt(r) with rsLoRA.

On disk an adapter is a PEFT folder: adapter_config.json (peft_type LORA) + adapter_model.safetensors with PEFT's
key names (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), written atomically, so PEFT loads
what llmlab saves and the other way round. The weights file's metadata (ignored by PEFT) also records a few
embedding values of the base model, so an adapter put on another base of the same shape is refused.
`merge_lora` folds B A into W0 for inference without extra latency; `unmerge_lora` takes it out again.
"""

from __future__ import annotations

import json
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
from llmlab.methods.base import Method

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# where each target lives: (module path inside a block, fused module attribute, slice index within it)
_MODULE_OF = {"q": ("self_attn", "qkv_proj", 0), "k": ("self_attn", "qkv_proj", 1), "v": ("self_attn", "qkv_proj", 2),
              "o": ("self_attn", "o_proj", 0), "gate": ("mlp", "gate_up_proj", 0), "up": ("mlp", "gate_up_proj", 1),
              "down": ("mlp", "down_proj", 0)}
_PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.lora_([AB])\.weight$")


class LoRALinear(nn.Module):
    """nn.Linear plus low-rank updates on slices of its output; `slices` maps a target name to (start, end) rows."""

    def __init__(self, base: nn.Linear, slices: dict[str, tuple[int, int]], ranks: dict[str, int],
                 alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the base parameter, same name: base checkpoints load unchanged
        self.bias = base.bias
        self.slices = dict(slices)
        self.scale = {n: alpha / (math.sqrt(r) if rslora else r) for n, r in ranks.items()}
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.ParameterDict({n: nn.Parameter(torch.empty(r, self.in_features, device=dev, dtype=dt))
                                        for n, r in ranks.items()})
        self.lora_B = nn.ParameterDict({n: nn.Parameter(torch.zeros(slices[n][1] - slices[n][0], r, device=dev,
                                                                    dtype=dt)) for n, r in ranks.items()})
        for a in self.lora_A.values():
            if a.device.type != "meta":
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as PEFT: B = 0 makes the start exactly W0
        self.dropout = dropout
        self.merged = False
        self._order = sorted(self.slices, key=lambda n: self.slices[n][0])  # targets by first output row

    def delta(self, name: str) -> Tensor:
        """scale * B A of one target: the update of its rows of the weight, in fp32."""
        return self.scale[name] * (self.lora_B[name].float() @ self.lora_A[name].float())

    def base_forward(self, x: Tensor) -> Tensor:
        """W0 x + b (QLoRA overrides it with the 4-bit matmul)."""
        return F.linear(x, self.weight, self.bias)

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
        h = F.linear(xd, a_all)  # (..., sum of ranks)
        b_all = self.joined_B()  # (out, sum of ranks)
        if not torch.is_autocast_enabled(x.device.type):
            h, b_all = h.to(y.dtype), b_all.to(y.dtype)
        out = torch.addmm(y.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]), b_all.t())
        return out.view(y.shape)

    @torch.no_grad()
    def merge(self, sign: float = 1.0) -> None:
        """Fold the updates into the weight (sign -1: take them out again)."""
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
            parent = getattr(block, parent_name)
            base = getattr(parent, fused)
            if isinstance(base, LoRALinear):
                raise LLMLabError("the model already has LoRA modules; merge or remove them before adding more")
            spans = projection_slices(model, fused)
            names = [t for t in LORA_TARGETS if _MODULE_OF[t][1] == fused]
            slices = {t: spans[_MODULE_OF[t][2]] for t in names if t in group}
            setattr(parent, fused, cls(base, slices, group, config.alpha, config.dropout, config.rslora))
    model.lora_config = config
    return model


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The LoRA parameters (lora_A / lora_B of every LoRALinear), with their names: what trains and what saves."""
    return [(n, p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def set_trainable(model: nn.Module) -> None:
    """Freeze everything but the LoRA parameters: the one place the LoRA method chooses what trains."""
    model.requires_grad_(False)
    for _, p in adapter_params(model):
        p.requires_grad_(True)


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
    """Merge every LoRALinear and put plain nn.Linear modules (same weights) back: a normal model to save."""
    for name, m in lora_modules(model):
        if not m.merged:
            m.merge(1.0)
        parent_name, _, attr = name.rpartition(".")
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight, linear.bias = m.weight, m.bias
        setattr(model.get_submodule(parent_name), attr, linear)
    model.__dict__.pop("lora_config", None)
    return model


# -- PEFT files --------------------------------------------------------------------------------------
PROBE_KEY = "llmlab_base_probe"  # safetensors metadata (PEFT ignores it): a few embedding values of the base


def base_probe(state_dict: dict[str, Tensor]) -> str:
    """16 values spread over the base model's embedding matrix, as JSON: recognises the base an adapter was
    trained on (same architecture, other weights) at any load dtype. Embeddings are never adapted or quantized."""
    w = state_dict["model.embed_tokens.weight"].detach()
    rows = torch.linspace(0, w.shape[0] - 1, 4).long()
    cols = torch.linspace(0, w.shape[1] - 1, 4).long()
    return json.dumps([round(float(v), 6) for v in w[rows][:, cols].float().flatten()])


def check_base(model: nn.Module, metadata: dict[str, str] | None, folder: str | Path, base: Any) -> None:
    """Raise when an adapter's recorded base probe does not match `model` (it was trained on another model)."""
    probe = (metadata or {}).get(PROBE_KEY)
    if probe is None:
        return  # adapters from PEFT carry no probe: the shape checks are all there is
    ours = torch.tensor(json.loads(base_probe({"model.embed_tokens.weight": model.model.embed_tokens.weight})))
    theirs = torch.tensor(json.loads(probe))
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-2, atol=1e-6):
        raise LLMLabError(f"{folder}: the adapter was made for another base model ({base!r}): its embeddings "
                          "differ from this checkpoint's; load it on the checkpoint it was trained from")


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


def base_model_reference(base_model: str | Path | None) -> str | None:
    """What an adapter records as `base_model_name_or_path`, so that it finds its base from any folder: the hub
    repo id of a folder `llmlab download ORG/MODEL` fetched, else the folder's absolute, resolved path (a path
    typed relative to where training ran means nothing elsewhere). A name that is no local folder is kept as
    given (a hub id). The default model is an import of a quantized GGUF, not the hub's weights, so it is
    recorded by its path."""
    if base_model is None:
        return None
    folder = Path(base_model).expanduser()
    if not folder.is_dir():
        return str(base_model)
    from llmlab.hub import hub_repo_id

    return hub_repo_id(folder) or str(folder.resolve())


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
    """Write a PEFT adapter folder atomically from llmlab-named LoRA tensors (`probe`: see `base_probe`)."""
    from safetensors.torch import save_file

    from llmlab.checkpoint import atomic_folder, write_json

    peft_sd = {k: v.detach().contiguous().cpu() for k, v in to_peft_names(tensors).items()}
    with atomic_folder(folder) as tmp:
        metadata = {"format": "pt", **({PROBE_KEY: probe} if probe else {})}
        save_file(peft_sd, str(tmp / ADAPTER_WEIGHTS), metadata=metadata)
        write_json(tmp / ADAPTER_CONFIG, adapter_config_dict(config, base_model))
        if tokenizer is not None:
            tokenizer.save(tmp)
        if extra_files is not None:
            extra_files(tmp)
    return Path(folder)


def read_safetensors(path: Path, with_metadata: bool = False) -> Any:
    """The tensors of a safetensors file (and its metadata, with `with_metadata`)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            return (tensors, fh.metadata() or {}) if with_metadata else tensors
    except (SafetensorError, OSError, ValueError) as e:
        raise LLMLabError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from e


def read_adapter(folder: str | Path) -> tuple[LoRAConfig, dict[str, Any], dict[str, Tensor]]:
    """(LoRAConfig, raw adapter_config.json + `_metadata` of the weights file, llmlab-named tensors) of a PEFT LoRA
    folder, checked."""
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise LLMLabError(f"{folder}: no {ADAPTER_CONFIG} (expected a PEFT LoRA adapter folder)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LLMLabError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise LLMLabError(f"{path}: peft_type is {raw.get('peft_type') if isinstance(raw, dict) else raw!r}; "
                          "llmlab loads LORA adapters")
    unsupported = {k: raw[k] for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save",
                                       "fan_in_fan_out", "layers_to_transform") if raw.get(k)}
    if raw.get("bias", "none") != "none":
        unsupported["bias"] = raw["bias"]
    if unsupported:
        raise LLMLabError(f"{path}: LoRA options llmlab does not support: {unsupported}")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise LLMLabError(f"{folder}: no {ADAPTER_WEIGHTS} (llmlab loads safetensors adapters only)")
    peft_sd, raw["_metadata"] = read_safetensors(weights, with_metadata=True)
    tensors = from_peft_names(peft_sd, str(weights))
    targets = sorted({k.rsplit(".", 1)[1] for k in tensors}, key=LORA_TARGETS.index)
    if not targets:
        raise LLMLabError(f"{weights}: holds no LoRA tensors")
    config = LoRAConfig(r=int(raw.get("r", 8)), alpha=float(raw.get("lora_alpha", 8)),
                        dropout=float(raw.get("lora_dropout", 0.0)), targets=targets,
                        rslora=bool(raw.get("use_rslora", False)))
    return config, raw, tensors


def load_adapter(model: nn.Module, folder: str | Path, trainable: bool = False) -> nn.Module:
    """Wrap `model`'s projections with the LoRA adapter of a PEFT folder (unmerged); checks it fits this model."""
    config, raw, tensors = read_adapter(folder)
    check_base(model, raw["_metadata"], folder, raw.get("base_model_name_or_path"))
    ranks = {k.rsplit(".", 1)[1]: t.shape[0] for k, t in tensors.items() if ".lora_A." in k}
    apply_lora(model, config, ranks)
    expected = dict(adapter_params(model))
    base = raw.get("base_model_name_or_path")
    hint = f"(the adapter was made for base model {base!r}; does it belong to this checkpoint?)"
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what} {names[:3]}" for what, names in (("missing", missing), ("unexpected", unexpected),
                           ("wrong shape", sorted(wrong))) if names)
        raise LLMLabError(f"{folder}: the adapter does not fit this model: {detail} {hint}")
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(tensors[k].to(p.dtype))
    if trainable:
        set_trainable(model)
    else:
        for _, p in expected.items():
            p.requires_grad_(False)
    return model


class AddedModulesMethod(Method):
    """Base of the methods that add small modules to a frozen model and save those alone (LoRA, bottleneck
    adapters). A subclass names its config class and gives four module-specific pieces: `apply` (swap the
    modules in), `params` (the added parameters, named: what trains and what saves), `write` and `read` (its
    folder format)."""

    config_class: type
    saves_frozen = False  # only the added modules are saved: the frozen base may live in the compute dtype

    def __init__(self, config: Any = None, base_model: str | None = None) -> None:
        self.config = config or self.config_class()
        self.config.validate()
        self.base_model = base_model

    def apply(self, model: nn.Module) -> None:
        raise NotImplementedError

    def params(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        raise NotImplementedError

    def write(self, folder: Path, tensors: dict[str, Tensor], tokenizer: Any,
              extra_files: Callable[[Path], None] | None, probe: str) -> Path:
        raise NotImplementedError

    def read(self, folder: Path) -> tuple[Any, dict[str, Any], dict[str, Tensor]]:
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> nn.Module:
        self.apply(model)
        model.requires_grad_(False)
        for _, p in self.params(model):
            p.requires_grad_(True)
        return model

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return self.params(model)

    def save(self, model: nn.Module, folder: Path, tokenizer: Any = None, state_dict: dict[str, Tensor] | None = None,
             extra_files: Callable[[Path], None] | None = None) -> Path:
        names = {n for n, _ in self.params(model)}
        source = state_dict if state_dict is not None else model.state_dict()
        tensors = {k: v for k, v in source.items() if k in names}
        return self.write(folder, tensors, tokenizer, extra_files, base_probe(source))

    def load_state(self, model: nn.Module, folder: Path) -> dict[str, Tensor]:
        return self.read(folder)[2]


class LoRA(AddedModulesMethod):
    """Train LoRA adapters on the chosen projections; the base model stays frozen; saves a PEFT adapter folder."""

    name = "lora"
    config_class = LoRAConfig

    def apply(self, model: nn.Module) -> None:
        apply_lora(model, self.config)

    def params(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return adapter_params(model)

    def write(self, folder: Path, tensors: dict[str, Tensor], tokenizer: Any,
              extra_files: Callable[[Path], None] | None, probe: str) -> Path:
        return save_adapter(folder, tensors, self.config, self.base_model, tokenizer, extra_files, probe)

    def read(self, folder: Path) -> tuple[Any, dict[str, Any], dict[str, Tensor]]:
        return read_adapter(folder)
