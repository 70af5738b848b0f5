"""Adapters, the one home: the adapter folder (kinds, files, reading and writing, the base probe), the modules'
protocol, and `AddedModulesMethod`, the base of the methods that train them.

An adapter is a set of small modules added to a frozen base model and saved alone, in a folder of two files:
    adapter_config.json        the options; `peft_type: LORA` (PEFT's format) or `adapter_type: bottleneck` (llmlab's)
    adapter_model.safetensors  the tensors; the file's metadata also holds the base probe (PEFT ignores it)
`adapter_kind` tells a folder's kind from its config (the one place that does); `llmlab.methods.ADAPTER_KINDS` maps
each kind to the method class that reads, writes and applies it (`LoRA` in lora.py, `Bottleneck` in
bottleneck.py), and `llmlab.methods.load_adapter` puts any adapter folder on a model, unmerged.

The base probe (`base_probe`, `check_base`): a few embedding values of the base model, stored with the adapter, so
that an adapter put on another base of the same shape is refused instead of silently producing nonsense.

Adapter modules declare their own parameters, as torchtune's PEFT modules do: a module with an `adapter_params()`
method (`AdapterModule`) returns the names of its trainable parameters relative to itself, and `adapter_params(model)`
collects them with their full names. That list is what trains, what saves and what loads; no parameter is chosen by
matching its name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from llmlab.checkpoint import read_safetensors, write_folder, write_json
from llmlab.errors import LLMLabError
from llmlab.methods.base import Method

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROBE_KEY = "llmlab_base_probe"  # safetensors metadata (PEFT ignores it): a few embedding values of the base
LORA, BOTTLENECK = "lora", "bottleneck"  # the adapter kinds


# -- the modules' protocol ---------------------------------------------------------------------------
@runtime_checkable
class AdapterModule(Protocol):
    """A module that adds trainable adapter parameters to a frozen one (`LoRALinear`, `AdaptedLinear`)."""

    def adapter_params(self) -> list[str]:
        """The names of this module's adapter parameters, relative to it (e.g. `lora_A.q`)."""
        ...


def adapter_params(model: nn.Module, module_class: type[nn.Module] = nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The adapter parameters of every `AdapterModule` of `model` (of `module_class` only, if given), with their full
    names, in the model's order: what trains, what saves and what loads."""
    out = []
    for prefix, module in model.named_modules():
        if isinstance(module, module_class) and isinstance(module, AdapterModule):
            out += [(f"{prefix}.{name}", module.get_parameter(name)) for name in module.adapter_params()]
    return out


def wrap_linear(parent: nn.Module, attr: str, wrapper: Callable[[nn.Module], nn.Module]) -> None:
    """Replace the linear layer `parent.<attr>` by `wrapper(it)`, in place: a plain nn.Linear, or a quantized one
    (`QuantLinear`, `FusedQuantLinear`: a base kept in its GGUF blocks, frozen). A module that is already something
    else (another adapter's, or the same kind twice) is refused: wrapping it would silently drop what it adds."""
    from llmlab.quantized import FusedQuantLinear, QuantLinear

    base = getattr(parent, attr)
    if type(base) not in (nn.Linear, QuantLinear, FusedQuantLinear):
        raise LLMLabError(f"{attr} is a {type(base).__name__}, not a plain nn.Linear or a quantized one: adapters "
                          "wrap linear layers only (merge or remove an adapter already on it before adding another)")
    setattr(parent, attr, wrapper(base))


def is_float_linear(base: nn.Module) -> bool:
    """Whether an adapter's base layer holds a float `weight` parameter (nn.Linear) rather than quantized blocks,
    which an adapter module calls as a whole and never merges into."""
    return isinstance(base, nn.Linear)


def set_trainable(model: nn.Module, params: list[tuple[str, nn.Parameter]]) -> None:
    """Freeze everything but `params`: the one place an adapter method chooses what trains."""
    model.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)


# -- the base probe ----------------------------------------------------------------------------------
def base_probe(model: nn.Module, state_dict: dict[str, Tensor] | None = None) -> str:
    """16 values spread over the base model's embedding matrix, as JSON: recognises the base an adapter was
    trained on (same architecture, other weights) at any load dtype. Embeddings are never adapted. Read from
    `state_dict` when it holds them (under FSDP the only whole copy), else from the model, where a quantized
    embedding (`QuantEmbedding`) gives its dequantized rows: the float import's values, up to rounding."""
    emb = model.model.embed_tokens
    w = (state_dict or {}).get("model.embed_tokens.weight")
    if w is None and isinstance(getattr(emb, "weight", None), Tensor):
        w = emb.weight
    vocab, width = (w.shape[0], w.shape[1]) if w is not None else (emb.num_embeddings, emb.embedding_dim)
    rows = torch.linspace(0, vocab - 1, 4).long()
    cols = torch.linspace(0, width - 1, 4).long()
    if w is not None:
        picked = w.detach()[rows.to(w.device)]
    else:
        with torch.no_grad():
            picked = emb(rows.to(model.device))
    return json.dumps([round(float(v), 6) for v in picked[:, cols.to(picked.device)].float().flatten()])


# -- folders -----------------------------------------------------------------------------------------
@dataclass
class AdapterFiles:
    """What an adapter folder holds: its config (adapter_config.json), its tensors (with llmlab names once a kind has
    read them) and the weights file's metadata."""

    folder: Path
    config: dict[str, Any]
    tensors: dict[str, Tensor]
    metadata: dict[str, str]

    @property
    def base_model(self) -> Any:
        """The base model the adapter says it was made for (`base_model_name_or_path`), for messages."""
        return self.config.get("base_model_name_or_path")


def check_base(model: nn.Module, files: AdapterFiles) -> None:
    """Raise when an adapter's recorded base probe does not match `model` (it was trained on another model)."""
    probe = files.metadata.get(PROBE_KEY)
    if probe is None:
        return  # adapters from PEFT carry no probe: the shape checks are all there is
    ours = torch.tensor(json.loads(base_probe(model)))
    theirs = torch.tensor(json.loads(probe))
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-2, atol=1e-6):
        raise LLMLabError(f"{files.folder}: the adapter was made for another base model ({files.base_model!r}): its "
                          "embeddings differ from this checkpoint's; load it on the checkpoint it was trained from")


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """adapter_config.json of an adapter folder, as a dict."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise LLMLabError(f"{folder}: no {ADAPTER_CONFIG} (expected an adapter folder: PEFT LoRA or llmlab "
                          "bottleneck adapters)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LLMLabError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise LLMLabError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _kind(raw: dict[str, Any], path: Path) -> str:
    if raw.get("adapter_type") == BOTTLENECK:
        return BOTTLENECK
    if raw.get("peft_type") == "LORA":
        return LORA
    found = f"adapter_type is {raw['adapter_type']!r}" if "adapter_type" in raw else \
        f"peft_type is {raw.get('peft_type')!r}"
    raise LLMLabError(f"{path}: {found}; llmlab loads LORA adapters (PEFT) and its own {BOTTLENECK} adapters")


def adapter_kind(folder: str | Path) -> str:
    """The kind of an adapter folder, from its config: "lora" (a PEFT LoRA folder) or "bottleneck" (llmlab's)."""
    return _kind(read_adapter_config(folder), Path(folder) / ADAPTER_CONFIG)


def read_adapter_files(folder: str | Path, kind: str) -> AdapterFiles:
    """The config, tensors (as stored) and weights metadata of an adapter folder, which must be of `kind`."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    found = _kind(config, folder / ADAPTER_CONFIG)
    if found != kind:
        raise LLMLabError(f"{folder}: holds {found} adapters, not {kind} adapters")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise LLMLabError(f"{folder}: no {ADAPTER_WEIGHTS} (llmlab loads safetensors adapters only)")
    tensors, metadata = read_safetensors(weights, with_metadata=True)
    return AdapterFiles(folder, config, tensors, metadata)


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
    # llmlab.hub imports gguf; training must not need it (benchmarks/gpu.py runs where only torch & co. are installed)
    from llmlab.hub import hub_repo_id

    return hub_repo_id(folder) or str(folder.resolve())


def write_adapter_files(folder: str | Path, tensors: dict[str, Tensor], config: dict[str, Any],
                        probe: str | None = None, tokenizer: Any = None,
                        extra_files: Callable[[Path], None] | None = None) -> Path:
    """Write an adapter folder atomically: `tensors` (named as they go on disk), the config, and the base probe."""
    metadata = {"format": "pt", **({PROBE_KEY: probe} if probe else {})}
    with write_folder(folder, tokenizer, extra_files) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS),
                  metadata=metadata)
        write_json(tmp / ADAPTER_CONFIG, config)
    return Path(folder)


def fill_adapter(params: list[tuple[str, nn.Parameter]], files: AdapterFiles) -> None:
    """Copy an adapter's tensors into the freshly added `params` (frozen), after checking that names and shapes match
    one to one."""
    expected = dict(params)
    tensors = files.tensors
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what} {names[:3]}" for what, names in (("missing", missing), ("unexpected", unexpected),
                           ("wrong shape", wrong)) if names)
        raise LLMLabError(f"{files.folder}: the adapter does not fit this model: {detail} (the adapter was made for "
                          f"base model {files.base_model!r}; does it belong to this checkpoint?)")
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(tensors[k].to(p.dtype))
            p.requires_grad_(False)


# -- the methods -------------------------------------------------------------------------------------
class AddedModulesMethod(Method):
    """Base of the methods that add adapter modules to a frozen model and save those alone (LoRA, bottleneck
    adapters). A subclass names its config class, its adapter kind and its module class, and gives three pieces of
    its own: `apply` (swap the modules in), `write` and `from_folder` (its folder format)."""

    config_class: type
    kind: str  # the adapter kind of the folders it writes (see `adapter_kind`)
    module_class: type[nn.Module]  # the adapter module it adds
    saves_frozen = False  # only the added modules are saved: the frozen base may live in the compute dtype

    def __init__(self, config: Any = None, base_model: str | None = None) -> None:
        self.config = config or self.config_class()
        self.config.validate()
        self.base_model = base_model

    def apply(self, model: nn.Module) -> None:
        """Add this method's adapter modules to `model`, in place."""
        raise NotImplementedError

    def write(self, folder: Path, tensors: dict[str, Tensor], tokenizer: Any,
              extra_files: Callable[[Path], None] | None, probe: str) -> Path:
        """Write llmlab-named adapter `tensors` as a folder of this kind."""
        raise NotImplementedError

    @classmethod
    def from_folder(cls, folder: str | Path) -> tuple[AddedModulesMethod, AdapterFiles]:
        """The method configured as an adapter folder of this kind says, and the folder's files (llmlab names)."""
        raise NotImplementedError

    @classmethod
    def load(cls, model: nn.Module, folder: str | Path) -> nn.Module:
        """Put the adapter of `folder` on `model` (unmerged, frozen), after checking it was made for this model."""
        method, files = cls.from_folder(folder)
        check_base(model, files)
        method.apply(model)
        fill_adapter(method.params(model), files)
        return model

    def params(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The parameters of this method's adapter modules, named: what trains and what saves."""
        return adapter_params(model, self.module_class)

    def prepare(self, model: nn.Module) -> nn.Module:
        self.apply(model)
        set_trainable(model, self.params(model))
        return model

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return self.params(model)

    def save(self, model: nn.Module, folder: Path, tokenizer: Any = None, state_dict: dict[str, Tensor] | None = None,
             extra_files: Callable[[Path], None] | None = None) -> Path:
        names = {n for n, _ in self.params(model)}
        source = state_dict if state_dict is not None else model.state_dict()
        tensors = {k: v for k, v in source.items() if k in names}
        return self.write(folder, tensors, tokenizer, extra_files, base_probe(model, source))

    def load_state(self, model: nn.Module, folder: Path) -> dict[str, Tensor]:
        return self.from_folder(folder)[1].tensors
