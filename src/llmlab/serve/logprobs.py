"""Log-probabilities in OpenAI's two wire formats, from the engine's `TokenLogprob`s.

Chat completions give each token as `{"token", "bytes", "logprob", "top_logprobs": [{"token", "bytes",
"logprob"}, ...]}` under `choice.logprobs.content`; completions give four parallel lists, `tokens`,
`token_logprobs`, `top_logprobs` (a {token: logprob} dict per position, the chosen token included, so up to
`logprobs` + 1 entries, as OpenAI documents) and `text_offset` (where each token starts in the choice's text).

A token's text is its bytes decoded as UTF-8; a token that holds part of a character (byte-level BPE splits emoji and
most CJK characters) is written `bytes:\\xe2\\x80` as OpenAI writes one, so two such tokens never share a name,
and chat's `bytes` carries the exact bytes (joining the bytes of consecutive tokens gives the text back). The bytes
come from the vocabulary itself: the GPT-2 byte alphabet for byte-level tokenizers (SmolLM2's), `<0xNN>` byte
tokens and the `▁` space marker for SentencePiece-style ones (LLaMA-2's).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

from llmlab.serve.request import TokenLogprob
from llmlab.tokenizer import Tokenizer


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenText:
    """The bytes and text of token ids for one tokenizer (cached per id)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        decoder = json.loads(tokenizer.backend.to_str()).get("decoder") or {}
        self.byte_level = "ByteLevel" in json.dumps(decoder)
        self.special = set(tokenizer.special_tokens.values())
        self._bytes = lru_cache(maxsize=65536)(self._token_bytes)

    def _token_bytes(self, token: int) -> bytes:
        piece = self.tokenizer.backend.id_to_token(token)
        if piece is None:
            return b""
        if token in self.special:
            return piece.encode()
        table = _byte_decoder()
        if self.byte_level and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace("\u2581", " ").encode()

    def bytes(self, token: int) -> bytes:
        return self._bytes(token)

    def text(self, token: int) -> str:
        data = self._bytes(token)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:  # part of a character
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def chat_logprobs(text: TokenText, entries: Iterable[TokenLogprob], top: int) -> list[dict[str, Any]]:
    """`choice.logprobs.content` of a chat completion (or chunk) for `entries`, with `top` alternatives each."""
    def one(token: int, logprob: float) -> dict[str, Any]:
        return {"token": text.text(token), "bytes": list(text.bytes(token)), "logprob": logprob}

    return [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top[:top]]} for e in entries]


class CompletionLogprobs:
    """The `logprobs` object of one completions choice, built token by token (`add`), with the character offsets
    of a text that starts with `start` characters (the echoed prompt)."""

    def __init__(self, text: TokenText) -> None:
        self.text = text
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self._chars = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, entries: Sequence[TokenLogprob | None], tokens: Sequence[int], shown: Sequence[bool]) -> None:
        """Append `tokens` with their scores (None: not scored, the prompt's first token); `shown[i]` says whether
        token i's text is part of the choice's text (a special token the text leaves out, like EOS, is not)."""
        for entry, token, visible in zip(entries, tokens, shown):
            self.text_offset.append(self._chars)
            self.tokens.append(self.text.text(token))
            if visible:
                self._chars += len(self._utf8.decode(self.text.bytes(token)))
            if entry is None:
                self.token_logprobs.append(None)
                self.top_logprobs.append(None)
                continue
            self.token_logprobs.append(entry.logprob)
            self.top_logprobs.append({**{self.text.text(t): lp for t, lp in entry.top},
                                      self.text.text(entry.token): entry.logprob})

    def body(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}

    def take(self) -> dict[str, Any]:
        """The entries added since the last `take` (a streamed chunk's share)."""
        out = self.body()
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return out
