"""Tokenizer: HF `tokenizers` (tokenizer.json) plus the special tokens and chat template of tokenizer_config.json.

The chat template is rendered with jinja2 in a sandbox, with the same environment options transformers uses
(`trim_blocks`, `lstrip_blocks`, loop controls), so a template renders here exactly as it does there.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmlab.errors import LLMLabError


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Text <-> token ids, special tokens, and chat-template rendering."""

    def __init__(self, backend: HFTokenizer, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, add_bos: bool = False, chat_template: str | None = None,
                 model_max_length: int | None = None) -> None:
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        for name in ("bos_token", "eos_token", "pad_token"):
            tok = getattr(self, name)
            if tok is not None and backend.token_to_id(tok) is None:
                raise LLMLabError(f"tokenizer: {name} '{tok}' is not in the vocabulary")

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise LLMLabError(f"{folder}: no tokenizer.json")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises its own Exception subclass
            raise LLMLabError(f"{path}: cannot read tokenizer: {e}") from e
        cfg: dict[str, Any] = {}
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text())
            except json.JSONDecodeError as e:
                raise LLMLabError(f"{cfg_path}: not valid JSON: {e}") from e
        template = cfg.get("chat_template")
        jinja = folder / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        return cls(backend, bos_token=_token_str(cfg.get("bos_token")), eos_token=_token_str(cfg.get("eos_token")),
                   pad_token=_token_str(cfg.get("pad_token")), add_bos=bool(cfg.get("add_bos_token", False)),
                   chat_template=template, model_max_length=cfg.get("model_max_length"))

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (read by transformers' AutoTokenizer)."""
        folder = Path(folder)
        self.backend.save(str(folder / "tokenizer.json"))
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "add_bos_token": self.add_bos,
            "clean_up_tokenization_spaces": False,
        }
        if self.model_max_length:
            cfg["model_max_length"] = self.model_max_length
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")

    # -- ids -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        pad = self.token_id(self.pad_token)
        return pad if pad is not None else self.eos_id

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. <|im_start|>) map to their ids."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        add_bos = self.add_bos if add_bos is None else add_bos
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
        return [self.encode(t, add_bos) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat ------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role", "content"}, ...]) with the chat template."""
        if not self.chat_template:
            raise LLMLabError("this tokenizer has no chat template (tokenizer_config.json 'chat_template')")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise LLMLabError(f"chat message {i} must be an object with 'role' and 'content', got {m!r}")
        return _compiled_template(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        # the template writes the BOS itself where the model wants one
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_bos=False)


_TEMPLATES: dict[str, Any] = {}


def _compiled_template(source: str) -> Any:
    if source not in _TEMPLATES:
        def raise_exception(message: str) -> None:
            raise LLMLabError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            _TEMPLATES[source] = env.from_string(source)
        except TemplateError as e:
            raise LLMLabError(f"chat template does not parse: {e}") from e
    return _TEMPLATES[source]


# -- training a new tokenizer ----------------------------------------------------------------------
def train_bpe_tokenizer(source: Iterable[str] | Sequence[Path], vocab_size: int, bos_token: str = "<|bos|>",
                        eos_token: str = "<|eos|>", pad_token: str = "<|pad|>",
                        extra_special_tokens: Sequence[str] = (), show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style: every byte is a symbol, so no text is out of vocabulary).

    `source` is an iterable of texts (streamed: the corpus is never held in memory) or a list of `Path`s of
    plain-text files. The special tokens take the first ids, in the order pad, bos, eos, extras (0, 1, 2 with the
    defaults, the ids LLaMA-style configs use for bos and eos). The result has no chat template and adds no BOS.
    """
    specials = list(dict.fromkeys([pad_token, bos_token, eos_token, *extra_special_tokens]))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise LLMLabError(f"tokenizer vocab size {vocab_size} is too small: a byte-level BPE needs at least "
                          f"{len(alphabet)} byte symbols + {len(specials)} special tokens")
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=show_progress)
    if isinstance(source, (list, tuple)) and source and all(isinstance(p, Path) for p in source):
        backend.train([str(p) for p in source], trainer)
    else:
        backend.train_from_iterator(source, trainer)
    return Tokenizer(backend, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, add_bos=False)
