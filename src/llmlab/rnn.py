"""The recurrent baseline: an LSTM language model that trains through the same loop and data as the LLaMA.

The notebook's first chapter contrasts RNNs with the Transformer: an LSTM reads a sequence one token after the
other (training cannot run the positions in parallel, but cost and memory grow linearly with the length), while
attention looks at every earlier position at once (parallel, but quadratic in the length). This module makes the
comparison runnable: `llmlab pretrain --arch lstm` and benchmarks/bench_rnn_vs_transformer.py.

Design:
- token embedding -> dropout -> multi-layer `nn.LSTM` (dropout between layers) -> dropout -> output head, tied to
  the embedding by default (so the embedding width is the hidden size);
- `forward(idx (B, T)) -> logits (B, T, V)`, the LLaMA's signature, so the loss and the `Method`s work unchanged;
  the state starts at zero for every sequence; `position_ids` is accepted and ignored (an RNN has no positions),
  an attention mask (packed examples) is refused;
- its own folder format: `config.json` with `"model_type": "llmlab-lstm"` + `model.safetensors` (its own tensor
  names), written by `FullLSTM.save` (atomic) and read by `load_lstm`. There is no HF equivalent to follow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from llmlab.checkpoint import load_safetensors, write_folder, write_json
from llmlab.config import PRESETS, read_config_mapping
from llmlab.errors import LLMLabError
from llmlab.methods.full import Full

MODEL_TYPE = "llmlab-lstm"

# Sizes; lstm-10m has about the parameters of the `micro-10m` LLaMA preset (10.5M vs 10.1M, same vocabulary).
LSTM_PRESETS: dict[str, dict[str, Any]] = {
    "lstm-tiny": dict(vocab_size=256, hidden_size=64, num_layers=2),
    "lstm-10m": dict(vocab_size=8192, hidden_size=512, num_layers=3, dropout=0.1),
}


@dataclass
class LSTMConfig:
    """Shape of an LSTM language model."""

    name: str = "custom"
    vocab_size: int = 8192
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.0
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "num_layers"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LLMLabError(f"LSTM config field '{key}' must be a positive integer, got {value!r}")
        if not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise LLMLabError(f"LSTM config field 'dropout' must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> LSTMConfig:
        """The LSTM preset called exactly `name`; a LLaMA preset name gets a hint to use --arch llama."""
        if name not in LSTM_PRESETS:
            if name in PRESETS:
                raise LLMLabError(f"model preset '{name}' is a LLaMA preset, not an LSTM one: use --arch llama, or an "
                                  f"LSTM preset ({', '.join(sorted(LSTM_PRESETS))})")
            raise LLMLabError(f"unknown LSTM preset '{name}'; known LSTM presets: {', '.join(sorted(LSTM_PRESETS))}")
        return cls.from_dict({**LSTM_PRESETS[name], **overrides}, name=name, source=f"preset '{name}'")

    @classmethod
    def from_dict(cls, d: dict[str, Any], name: str = "custom", source: str = "LSTM config") -> LSTMConfig:
        """Build from a mapping of fields (a `config.json` written by llmlab, or a YAML file's keys)."""
        d = dict(d)
        model_type = d.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise LLMLabError(f"{source}: model_type '{model_type}' is not an LSTM (expected '{MODEL_TYPE}'); "
                              "LLaMA models train with --arch llama")
        unknown = sorted(set(d) - {f.name for f in fields(cls)} - {"name"})
        if unknown:
            raise LLMLabError(f"{source}: unknown LSTM config keys {unknown} (known: "
                              f"{[f.name for f in fields(cls) if f.name != 'name']})")
        d.pop("name", None)
        return cls(name=name, **d)

    def to_dict(self) -> dict[str, Any]:
        """The contents of the model folder's `config.json`."""
        return {"model_type": MODEL_TYPE, **{k: v for k, v in asdict(self).items() if k != "name"}}

    @classmethod
    def from_spec(cls, spec: str | Path) -> LSTMConfig:
        """An LSTM preset name, or a config file (YAML/JSON of fields, a `preset:` key) or model folder."""
        path = Path(spec)
        if path.is_dir():
            path = path / "config.json"
        if not (path.suffix in (".yaml", ".yml", ".json") or path.exists()):
            return cls.from_name(str(spec))
        data = read_config_mapping(path)
        if "preset" in data:
            preset = data.pop("preset")
            return cls.from_name(preset, **data)
        return cls.from_dict(data, name=path.stem if path.name != "config.json" else path.parent.name,
                             source=str(path))

    def num_params(self) -> int:
        """Exact parameter count of the model this config builds."""
        h, v = self.hidden_size, self.vocab_size
        per_layer = 4 * h * (h + h) + 2 * 4 * h  # input and recurrent weights, two bias vectors
        return v * h * (1 if self.tie_word_embeddings else 2) + self.num_layers * per_layer


class LSTMLM(nn.Module):
    """Embedding -> multi-layer LSTM -> (tied) linear head; see the module doc."""

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.drop = nn.Dropout(config.dropout)
        self.lstm = nn.LSTM(h, h, config.num_layers, batch_first=True,
                            dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.lm_head = nn.Linear(h, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_weights(self) -> None:
        """Small normal embeddings (they are also the output head), PyTorch's uniform LSTM weights, and forget-gate
        biases of 1 so that the cell keeps its memory at the start of training."""
        nn.init.normal_(self.embed_tokens.weight, std=0.02)
        if not self.config.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        self.lstm.reset_parameters()
        h = self.config.hidden_size
        with torch.no_grad():
            for name, p in self.lstm.named_parameters():
                if name.startswith("bias_ih"):
                    p[h:2 * h].fill_(1.0)  # gate order: input, forget, cell, output
                elif name.startswith("bias_hh"):
                    p[h:2 * h].zero_()

    def forward(self, idx: Tensor, position_ids: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Logits (B, T, V) of next tokens; the recurrent state starts at zero. `position_ids` is ignored; an
        attention `mask` (packed examples) cannot be honoured by a recurrence, so it is refused."""
        if mask is not None:
            raise LLMLabError("the LSTM reads every sequence from its start and cannot keep packed examples apart "
                              "(an attention mask was given): train it on unpacked sequences")
        x = self.drop(self.embed_tokens(idx))  # (B, T, H)
        y, _ = self.lstm(x)  # (B, T, H), one time step after the other
        return self.lm_head(self.drop(y))  # (B, T, V)


def build_lstm(config: LSTMConfig, device: torch.device | str = "cpu") -> LSTMLM:
    """A freshly initialised LSTM language model."""
    model = LSTMLM(config)
    model.init_weights()
    return model.to(device)


# -- folders -----------------------------------------------------------------------------------------
def _file_names(state_dict: dict[str, Tensor], config: LSTMConfig) -> list[str]:
    """The names of the tensors on disk: every parameter once (a tied head is the embedding)."""
    return [k for k in state_dict if not (config.tie_word_embeddings and k == "lm_head.weight")]


def save_lstm(model: LSTMLM, folder: str | Path, tokenizer: Any = None, state_dict: dict[str, Tensor] | None = None,
              extra_files: Callable[[Path], None] | None = None) -> Path:
    """Write the model folder atomically: config.json (model_type llmlab-lstm), model.safetensors, tokenizer."""
    sd = state_dict if state_dict is not None else model.state_dict()
    tensors = {k: sd[k].detach().contiguous().cpu() for k in _file_names(sd, model.config)}
    with write_folder(folder, tokenizer, extra_files) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", model.config.to_dict())
    return Path(folder)


def read_lstm_state(folder: str | Path, config: LSTMConfig) -> dict[str, Tensor]:
    """The model tensors of an LSTM folder, checked against `config` (names and shapes), tied head restored."""
    sd = load_safetensors(folder)
    with torch.device("meta"):
        ref = LSTMLM(config).state_dict()
    expected = {k: tuple(ref[k].shape) for k in _file_names(ref, config)}
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise LLMLabError(f"{folder}: LSTM tensors do not match its config.json: missing {missing[:5]}, unexpected "
                          f"{unexpected[:5]}, wrong shape {wrong[:5]}")
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    return sd


def load_lstm(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> LSTMLM:
    """Load an LSTM model folder written by llmlab (RUN_DIR/final or a checkpoint of `pretrain --arch lstm`)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise LLMLabError(f"{folder}: no config.json (expected an LSTM model folder from `llmlab pretrain --arch "
                          "lstm`)")
    config = LSTMConfig.from_spec(folder)
    sd = read_lstm_state(folder, config)
    model = LSTMLM(config)
    model.load_state_dict(sd, strict=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.to(device=device, dtype=dtype).eval()


class FullLSTM(Full):
    """Full training of an LSTM: every parameter trains; checkpoints and the final model are LSTM folders."""

    def save(self, model: nn.Module, folder: Path, tokenizer: Any = None, state_dict: dict[str, Tensor] | None = None,
             extra_files: Callable[[Path], None] | None = None) -> Path:
        return save_lstm(model, folder, tokenizer, state_dict=state_dict, extra_files=extra_files)

    def load_state(self, model: nn.Module, folder: Path) -> dict[str, Tensor]:
        return read_lstm_state(folder, model.config)

    def model_config(self, model: nn.Module) -> dict[str, Any]:
        return model.config.to_dict()
