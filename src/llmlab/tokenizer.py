"""Tokenizer: HF `tokenizers` (tokenizer.json) plus the special tokens and chat template of tokenizer_config.json.

The chat template is rendered with jinja2 in a sandbox, with the same environment options transformers uses
(`trim_blocks`, `lstrip_blocks`, loop controls), so a template renders here exactly as it does there.

Message text is text: `encode_chat` keeps the control tokens the template writes (`<|im_start|>`, ...) and encodes
special-token text that appears inside a message's content as ordinary text tokens, so a user who types
`<|im_end|>\n<|im_start|>system` cannot open a system turn. Every chat path (the server, `llmlab chat`, `generate`
with the chat template) renders through it.
"""

from __future__ import annotations

import json
import re
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
        self._plain: HFTokenizer | None = None  # a copy that never matches special tokens in text (lazy)
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

    @property
    def special_tokens(self) -> dict[str, int]:
        """{text: id} of the vocabulary's special (control) tokens."""
        return {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str, add_bos: bool | None = None, special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With `special_tokens`, special tokens written in the text (e.g. <|im_start|>) map to
        their ids; without, that text is encoded like any other (the way message content is, see `encode_chat`)."""
        ids = _encode(self.backend if special_tokens else self._text_backend(), text).ids
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
        """Token ids of `messages` rendered with the chat template. The template's own special tokens are control
        tokens; special-token text inside a message's content is ordinary text (see the module docstring)."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        # the template writes the BOS itself where the model wants one
        specials = self.special_tokens
        if not any(isinstance(m["content"], str) and any(t in m["content"] for t in specials) for m in messages):
            return self.encode(text, add_bos=False)  # nothing to tell apart: the same ids either way
        spans = self._content_spans(messages, add_generation_prompt, text)
        enc = _encode(self.backend, text)
        control, ids, start = set(specials.values()), [], 0
        for tok, (a, b) in zip(enc.ids, enc.offsets):
            if tok not in control or any(s <= a < e for s, e in spans):
                continue  # text, or special-token text typed inside a message
            ids += self.encode(text[start:a], add_bos=False, special_tokens=False) + [tok]
            start = b
        return ids + self.encode(text[start:], add_bos=False, special_tokens=False)

    def _text_backend(self) -> HFTokenizer:
        if self._plain is None:
            plain = HFTokenizer.from_str(self.backend.to_str())
            plain.encode_special_tokens = True  # special-token text splits into ordinary tokens
            self._plain = plain
        return self._plain

    def _content_spans(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool,
                       text: str) -> list[tuple[int, int]]:
        """Where each message's content sits in `text` (the rendering of `messages`): the template is rendered again
        with a placeholder for each content and the two renderings are aligned. A template may write a content
        verbatim or stripped; one that changes it otherwise cannot be aligned, and then special-token text in a
        message is refused rather than let through as control tokens."""
        marked = [{**m, "content": f"\ue000{i}\ue001"} if isinstance(m["content"], str) else m
                  for i, m in enumerate(messages)]
        parts = re.split("\ue000(\\d+)\ue001", self.apply_chat_template(marked, add_generation_prompt))
        spans, pos = [], 0
        for k, part in enumerate(parts):
            if k % 2 == 0:  # the template's own text
                if not text.startswith(part, pos):
                    break
                pos += len(part)
                continue
            content = messages[int(part)]["content"]
            form = next((f for f in (content, content.strip()) if text.startswith(f, pos)
                         and text.startswith(parts[k + 1], pos + len(f))), None)
            if form is None:
                break
            spans.append((pos, pos + len(form)))
            pos += len(form)
        else:
            if pos == len(text):
                return spans
        raise LLMLabError("chat messages contain special-token text (e.g. <|im_end|>) and this chat template changes "
                          "message text in a way that cannot be traced, so it cannot be kept as plain text; remove "
                          "the special tokens from the messages")


_LONG_TEXT = 10_000  # characters


def _encode(backend: HFTokenizer, text: str) -> Any:
    """`backend.encode(text)`; a long text goes through `encode_batch`, which releases the GIL while it works (about
    0.5 s for 1 MB), so a server tokenizing a long prompt in a worker thread keeps answering others meanwhile."""
    if len(text) < _LONG_TEXT:
        return backend.encode(text, add_special_tokens=False)
    return backend.encode_batch([text], add_special_tokens=False)[0]


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
