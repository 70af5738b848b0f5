"""Model configuration: a typed dataclass, named presets, and HF `config.json` round-trips.

The field names follow HF's `LlamaConfig`, so `config.json` maps onto them one to one and a user who
knows transformers knows these. `from_name` matches a preset name exactly; there is no fuzzy matching.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from llmlab.errors import LLMLabError


@dataclass
class ModelConfig:
    """Shape and numerics of a LLaMA-family decoder. Derived fields are filled in `__post_init__`."""

    name: str = "custom"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int | None = None  # None: LLaMA's rule, 2/3 * 4 * hidden rounded up to a multiple of 256
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: multi-head attention (= num_attention_heads)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown config.json keys, kept on save

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            hidden = int(2 * 4 * self.hidden_size / 3)
            self.intermediate_size = 256 * math.ceil(hidden / 256)
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        self.validate()

    def validate(self) -> None:
        """Raise a clear error for shapes that cannot form a model."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LLMLabError(f"config field '{name}' must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise LLMLabError(
                f"config field 'num_attention_heads' ({self.num_attention_heads}) must be a multiple of "
                f"'num_key_value_heads' ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise LLMLabError(f"config field 'head_dim' must be even for RoPE, got {self.head_dim}")

    # -- presets ---------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """The preset called exactly `name`, with optional field overrides."""
        if name not in PRESETS:
            raise LLMLabError(f"unknown model preset '{name}'; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], "name": name, **overrides})

    # -- HF config.json --------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str = "custom") -> ModelConfig:
        """Build from the keys of an HF `LlamaConfig` (transformers 4.x or 5.x style)."""
        d = dict(d)
        model_type = d.get("model_type", "llama")
        if model_type not in ("llama", "mistral"):
            raise LLMLabError(f"config.json: model_type '{model_type}' is not a LLaMA-family model (expected 'llama')")
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters
        rope_params = d.pop("rope_parameters", None)
        if rope_params:
            rope_params = dict(rope_params)
            d.setdefault("rope_theta", rope_params.pop("rope_theta", 10000.0))
            if rope_params.get("rope_type", rope_params.get("type", "default")) != "default":
                d.setdefault("rope_scaling", rope_params)
        known = {f.name for f in fields(cls)} - {"name", "extra"}
        kwargs = {k: d.pop(k) for k in list(d) if k in known}
        if "hidden_size" not in kwargs or "num_hidden_layers" not in kwargs:
            raise LLMLabError("config.json: missing required keys 'hidden_size' and/or 'num_hidden_layers'")
        if kwargs.get("rope_scaling") is not None and _rope_type(kwargs["rope_scaling"]) == "default":
            kwargs["rope_scaling"] = None
        return cls(name=name, extra=d, **kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` contents HF transformers reads as a `LlamaConfig`."""
        d = {k: v for k, v in asdict(self).items() if k not in ("name", "extra")}
        d.update({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "use_cache": True,
        })
        extra = {k: v for k, v in self.extra.items() if k not in d and k not in ("torch_dtype", "dtype")}
        return {**extra, **d}

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read an HF `config.json` or a YAML/JSON file of ModelConfig fields (a `preset:` key starts from a preset)."""
        path = Path(path)
        data = read_config_mapping(path)
        if "preset" in data:
            preset = data.pop("preset")
            return cls.from_name(preset, **data)
        if "model_type" in data or "architectures" in data:
            return cls.from_hf_dict(data, name=path.parent.name or "custom")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise LLMLabError(f"{path}: unknown config keys {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_spec(cls, spec: str | Path) -> ModelConfig:
        """A preset name, or a config file: YAML/JSON of fields, an HF config.json, or a checkpoint folder with one."""
        path = Path(spec)
        if path.is_dir():
            path = path / "config.json"
        if path.suffix in (".yaml", ".yml", ".json") or path.exists():
            return cls.from_file(path)
        return cls.from_name(str(spec))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    # -- derived quantities ----------------------------------------------------------------------
    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact parameter count of the model this config builds."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv + h if self.attention_bias else 0)
        mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * h
        total = self.num_hidden_layers * per_layer + h  # + final norm
        if include_embeddings:
            total += v * h * (1 if self.tie_word_embeddings else 2)
        return total


def read_config_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping of a YAML (.yaml/.yml) or JSON config file, with a clear error for a missing or malformed one."""
    path = Path(path)
    if not path.is_file():
        raise LLMLabError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # parse errors of either format
        raise LLMLabError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {e}") from e
    if not isinstance(data, dict):
        raise LLMLabError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def _rope_type(scaling: dict[str, Any]) -> str:
    return scaling.get("rope_type", scaling.get("type", "default"))


def _normalise_rope_scaling(scaling: dict[str, Any]) -> dict[str, Any]:
    scaling = dict(scaling)
    kind = _rope_type(scaling)
    scaling.pop("type", None)
    scaling["rope_type"] = kind
    required = {"linear": ["factor"], "llama3": ["factor", "low_freq_factor", "high_freq_factor",
                                                  "original_max_position_embeddings"]}
    if kind not in required and kind != "default":
        raise LLMLabError(f"config field 'rope_scaling': rope_type '{kind}' is not supported "
                          "(supported: 'linear', 'llama3')")
    missing = [k for k in required.get(kind, []) if k not in scaling]
    if missing:
        raise LLMLabError(f"config field 'rope_scaling' of type '{kind}' is missing {missing}")
    return scaling


_LLAMA1 = dict(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
_SMOLLM2 = dict(vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)

PRESETS: dict[str, dict[str, Any]] = {
    # The LLaMA paper's four sizes (Touvron et al. 2023, table 2).
    "llama-7b": dict(_LLAMA1, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama-13b": dict(_LLAMA1, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40),
    "llama-33b": dict(_LLAMA1, hidden_size=6656, intermediate_size=17920, num_hidden_layers=60,
                      num_attention_heads=52),
    "llama-65b": dict(_LLAMA1, hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                      num_attention_heads=64),
    "llama-2-7b": dict(_LLAMA1, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000,
                         eos_token_id=128001,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "smollm2-135m": dict(_SMOLLM2, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3),
    "smollm2-360m": dict(_SMOLLM2, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5),
    "smollm2-1.7b": dict(_SMOLLM2, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, rope_theta=130000.0),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                           rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
    # Small sizes for tests and CPU experiments.
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1,
                 eos_token_id=2),
    "tiny-mha": dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=True,
                     bos_token_id=1, eos_token_id=2),
    "micro-10m": dict(vocab_size=8192, hidden_size=320, intermediate_size=864, num_hidden_layers=6,
                      num_attention_heads=5, num_key_value_heads=5, max_position_embeddings=512, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
}
