"""Text generation over the model's static KV cache: prefill, one-token decode steps, sampling, stop conditions.

Shaped after gpt-fast: `prefill` and `decode_one_token` are small functions whose shapes stay fixed during a
call (the cache is preallocated and every per-step tensor is updated in place, never rebuilt), so
`torch.compile` can wrap the decode step. Prompts of different lengths are batched with left padding: each
row's RoPE positions start at its first real token and a key mask hides the pads, so every row generates
what it would generate alone.

The host reads each step's new tokens once (one device sync per step), which is what the EOS and stop-string
checks need; on an accelerator the next step is queued before that read, so the device does not wait for
the host. Layers, from the bottom: `generate_tokens` (token ids, per step) -> `TextStream` (printable text,
stop strings) -> `generate` / `stream` / `ChatSession`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from llmlab.errors import LLMLabError
from llmlab.model import LLaMA
from llmlab.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llmlab.speculative import Draft

# -- sampling ----------------------------------------------------------------------------------------
GREEDY_BELOW = 1e-5  # temperatures this small decode greedily


@dataclass
class SamplingParams:
    """How the next token is picked from the logits.

    temperature 0 is greedy decoding (argmax), and so is any temperature below GREEDY_BELOW (sampling there is the
    argmax anyway, and dividing the logits by, say, 1e-320 overflows them); otherwise the logits are divided by the
    temperature, filtered by top-k and top-p (in that order, as HF does) and sampled. repetition_penalty 1.0 is
    off. `seed` fixes the sample through a private torch.Generator (None: a fresh random seed), so no global RNG
    state is touched.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise LLMLabError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise LLMLabError(f"--top-k must be a positive integer (0 or unset = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LLMLabError(f"--top-p must be in (0, 1] (1 = off), got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise LLMLabError(f"--repetition-penalty must be > 0 (1 = off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @classmethod
    def from_generation_config(cls, gen_config: dict[str, Any], **overrides: Any) -> SamplingParams:
        """Defaults from a checkpoint's generation_config.json (HF semantics), then `overrides` that are not None.

        Without `do_sample: true` the checkpoint asks for greedy decoding; with it, HF's defaults apply to the
        keys it leaves out (temperature 1.0, top_k 50, top_p 1.0).
        """
        base: dict[str, Any] = {}
        if gen_config.get("do_sample"):
            base = {"temperature": gen_config.get("temperature", 1.0), "top_k": gen_config.get("top_k", 50),
                    "top_p": gen_config.get("top_p", 1.0)}
        if "repetition_penalty" in gen_config:
            base["repetition_penalty"] = gen_config["repetition_penalty"]
        base = {k: v for k, v in base.items() if v is not None}
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty with HF semantics: for tokens in `seen` (B, V bool), logits > 0 are divided, < 0 multiplied."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept), set the rest to -inf."""
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the most likely tokens until their probability reaches p (at least one), -inf the rest."""
    if p >= 1:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    remove_sorted = mass_before >= p
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sampling_logits(logits: Tensor, params: SamplingParams, seen: Tensor | None = None) -> Tensor:
    """The logits (B, V) as `params` shape them before the pick: repetition penalty, then (unless greedy)
    temperature, top-k and top-p. Their softmax is the distribution `sample` draws from (greedy: their argmax)."""
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if params.top_k:
        logits = top_k_filter(logits, params.top_k)
    return top_p_filter(logits, params.top_p)


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One sample from each row of probabilities (B, V) -> (B, 1), without a host sync.

    Inverse-CDF sampling: one uniform per row against the cumulative probabilities (in float64, so even the smallest
    probabilities keep their share); ~15x cheaper on a CPU than drawing an exponential per token for a race (0.06 vs
    0.9 ms a row of 49k), which a serving batch pays for every row of every step. u stays strictly below the total,
    so the pick is never a filtered token of the flat tail; the clamp keeps rows whose logits overflowed to NaN (a
    tiny temperature in bf16) on a valid id, as argmax did."""
    cdf = probs.double().cumsum_(dim=-1)
    total = cdf[..., -1:]
    u = torch.rand(total.shape, generator=generator, device=cdf.device, dtype=cdf.dtype) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(-1) - 1)


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           seen: Tensor | None = None) -> Tensor:
    """Pick the next token of each row from fp32 logits (B, V) -> (B, 1), without a host sync."""
    logits = sampling_logits(logits, params, seen)
    if params.greedy:
        return logits.argmax(dim=-1, keepdim=True)
    return draw(logits.softmax(dim=-1), generator)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator:
    """The private RNG of one generation call: seeded by `params.seed`, or freshly at random."""
    rng = torch.Generator(device=device)
    if params.seed is None:
        rng.seed()
    else:
        rng.manual_seed(params.seed)
    return rng


def cache_length(model: LLaMA, prompt_len: int, max_new_tokens: int, compile: bool) -> int:
    """Cache slots for a call: the prompt and the new tokens, rounded up to 256 when compiled (so that calls of
    similar length share one compiled graph), at most the model's context."""
    S = prompt_len + max_new_tokens
    if compile:
        S = min(model.config.max_position_embeddings, -(-S // 256) * 256)
    return S


# A per-row hook between the model and the sampler: (ids generated so far in this row, logits (V,)) -> logits.
# Constrained decoding (llmlab.constrained) masks the tokens its grammar forbids through it.
LogitsProcessor = Callable[[list[int], Tensor], Tensor]


# -- the model steps ---------------------------------------------------------------------------------
def prefill(model: LLaMA, tokens: Tensor, input_pos: Tensor, position_ids: Tensor, mask: Tensor) -> Tensor:
    """Run the (padded) prompts (B, T) through the model, filling cache slots `input_pos`; last logits (B, V) fp32."""
    return model(tokens, input_pos=input_pos, position_ids=position_ids, mask=mask, last_only=True,
                 kv_len=tokens.size(1))[:, -1].float()


def decode_one_token(model: LLaMA, token: Tensor, input_pos: Tensor, position_ids: Tensor, mask: Tensor,
                     kv_len: int | None = None) -> Tensor:
    """One decode step: token (B, 1) at cache slot `input_pos` (1,) -> next-token logits (B, V) fp32.

    Queries attend to cache slots [0, kv_len), kv_len defaulting to the mask's width (B, 1, 1, kv_len). This is the
    function to `torch.compile`: on CUDA every argument keeps its shape and storage across steps (the full-width
    mask; CUDA graphs want fixed shapes); on the CPU the mask is a view of the filled slots whose width is marked
    dynamic, so one compiled graph reads only the filled part of the cache at every length.
    """
    kv_len = mask.size(-1) if kv_len is None else kv_len
    return model(token, input_pos=input_pos, position_ids=position_ids, mask=mask, kv_len=kv_len)[:, -1].float()


_COMPILED: dict[str, Callable[..., Tensor]] = {}


def _decode_fn(compile: bool, device: torch.device) -> Callable[..., Tensor]:
    if not compile:
        return decode_one_token
    if device.type not in _COMPILED:
        # CUDA graphs remove the per-kernel launch cost that dominates batch-1 decoding
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        _COMPILED[device.type] = torch.compile(decode_one_token, mode=mode, fullgraph=True)
    return _COMPILED[device.type]


@contextlib.contextmanager
def _without_onednn() -> Iterator[None]:
    """Run bf16 matmuls through torch's own kernels instead of oneDNN's.

    For one activation row (batch-1 decoding) oneDNN's AVX-512 BF16 path is about 2x slower than torch's native
    bf16 matrix-vector code on the CPUs measured (SmolLM2-135M decode step: 38 -> 18 ms compiled, 53 -> 32 ms
    eager, one thread), while for 8 rows and more oneDNN is 2-6x faster; so only batch-1 decode steps use this.
    """
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def _trusting_guards() -> Any:
    """A context in which compiled code runs without re-checking its guards (torch >= 2.7; else a no-op).

    A decode step's guards check every parameter and buffer of the model (about 1 ms a token on a CPU); within
    one generation nothing they check can change, so only its first step evaluates them all. Should a later step
    need a recompilation after all, torch raises instead of guessing, and the step is run again with guards.
    """
    try:
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
    except (AttributeError, TypeError):
        return contextlib.nullcontext()


class DecodeStep:
    """Calls one model's decode step (`decode_one_token`, compiled or eager) the way batch-1 speed needs it: the
    filled part of the mask only (CPU) or its full width (CUDA graphs), without oneDNN for batch-1 bf16, and after
    the first step without re-evaluating the compiled code's guards. `_Batch` feeds the model through it, and so
    do speculative decoding's draft (`llmlab.speculative`) and the serving engine (`llmlab.serve.engine`), whose
    batch changes size between steps (`batch_size` None: the batch dimension is dynamic, and oneDNN is left out on
    the steps of one row)."""

    def __init__(self, model: LLaMA, batch_size: int | None, compile: bool) -> None:
        device = model.device
        self.model, self.compiled, self.steps, self.trust_guards = model, compile, 0, True
        self.decode = _decode_fn(compile, device)
        self.full_width = compile and device.type != "cpu"  # fixed shapes for CUDA graphs
        self.dynamic_batch = batch_size is None
        self.native_gemv = device.type == "cpu" and batch_size in (1, None) and model.dtype == torch.bfloat16

    def __call__(self, token: Tensor, pos: Tensor, position_ids: Tensor | None, step_mask: Tensor,
                 slot: int) -> Tensor:
        """Feed `token` (B, 1) at cache slot `pos` ((1,), or (B, 1) one per row) (`slot` on the host: the largest)
        with RoPE `position_ids` (B, 1) (None: the slots), keys valid as `step_mask` (B, 1, 1, S) says; the
        next-token logits (B, V) fp32."""
        native_gemv = self.native_gemv and token.size(0) == 1
        with _without_onednn() if native_gemv else contextlib.nullcontext():
            if not self.compiled:  # eager: attend to the filled slots only
                logits = self.decode(self.model, token, pos, position_ids, step_mask, slot + 1)
            else:
                mask = step_mask if self.full_width else step_mask[..., :slot + 1]
                if not self.full_width:
                    torch._dynamo.mark_dynamic(mask, 3)
                if self.dynamic_batch:  # one graph for every batch of 2 rows or more (1 is specialised)
                    for t in (token, pos, mask):
                        torch._dynamo.maybe_mark_dynamic(t, 0)
                logits = None
                if self.steps and self.trust_guards:
                    try:
                        with _trusting_guards():
                            logits = self.decode(self.model, token, pos, position_ids, mask)
                    except RuntimeError as e:  # torch refuses to recompile without guards: evaluate them again
                        if "skip_guard_eval_unsafe" not in str(e):
                            raise
                        self.trust_guards = False
                if logits is None:
                    logits = self.decode(self.model, token, pos, position_ids, mask)
        self.steps += 1
        return logits


class _Batch:
    """The device state of one generation call: cache, key mask, positions, repetition mask, RNG."""

    @torch.inference_mode()
    def __init__(self, model: LLaMA, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams,
                 pad_id: int, compile: bool, process: Callable[[Tensor], Tensor] | None = None) -> None:
        self.model, self.params, self.process = model, params, process
        device = model.device
        B, T = len(prompts), max(len(p) for p in prompts)
        S = cache_length(model, T, max_new_tokens, compile)
        model.setup_cache(B, S)
        n_pad = torch.tensor([T - len(p) for p in prompts], device=device)
        self.tokens = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts], device=device)  # (B, T)
        slots, steps = torch.arange(S, device=device), torch.arange(T, device=device)
        # key_valid[b, s]: slot s holds a real token of row b; decode steps switch on one slot at a time
        self.key_valid = (slots[None, :] >= n_pad[:, None]) & (slots[None, :] < T)  # (B, S)
        mask = (slots[None, :] <= steps[:, None])[None] & self.key_valid[:, None, :]  # (B, T, S) causal, no pads
        mask[:, steps, steps] = True  # every query sees itself, so a pad row is never all -inf (NaN)
        self.prefill_mask = mask[:, None]  # (B, 1, T, S)
        self.prefill_pos = steps
        self.prefill_position_ids = (steps[None, :] - n_pad[:, None]).clamp(min=0)  # (B, T)
        self.step_mask = self.key_valid.view(B, 1, 1, S)  # a view: in-place updates of key_valid show through
        self.pos = torch.tensor([T], device=device)  # cache slot of the token fed next
        self.slot = T  # the same, on the host (for kv_len)
        self.step = DecodeStep(model, B, compile)
        self.position_ids = (T - n_pad)[:, None].clone()  # (B, 1) its RoPE position in each row
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
            for b, p in enumerate(prompts):
                self.seen[b, p] = True
        self.rng = make_generator(params, device)

    @torch.inference_mode()
    def first(self) -> Tensor:
        logits = prefill(self.model, self.tokens, self.prefill_pos, self.prefill_position_ids, self.prefill_mask)
        if self.process is not None:
            logits = self.process(logits)
        return sample(logits, self.params, self.rng, self.seen)

    @torch.inference_mode()
    def next(self, token: Tensor) -> Tensor:
        """Feed `token` (B, 1), return the one after it; all bookkeeping stays on the device."""
        if self.seen is not None:
            self.seen.scatter_(1, token, True)
        self.key_valid.index_fill_(1, self.pos, True)
        logits = self.step(token, self.pos, self.position_ids, self.step_mask, self.slot)
        self.pos += 1
        self.slot += 1
        self.position_ids += 1
        if self.process is not None:
            logits = self.process(logits)
        return sample(logits, self.params, self.rng, self.seen)


def check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, context: int, vocab_size: int) -> None:
    """Raise a clear LLMLabError for prompts that cannot be generated from (empty, too long, unknown ids)."""
    if not prompts:
        raise LLMLabError("no prompts given")
    if max_new_tokens < 1:
        raise LLMLabError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise LLMLabError(f"prompt {i} is empty (0 tokens): give some text to continue")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise LLMLabError(f"prompt {i} has token ids {bad[:5]} outside the model's vocabulary of {vocab_size}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > context:
        raise LLMLabError(f"prompt of {longest} tokens + --max-new-tokens {max_new_tokens} = "
                          f"{longest + max_new_tokens} exceeds the model's context of {context} tokens "
                          f"(max_position_embeddings); lower --max-new-tokens or shorten the prompt")


def generate_tokens(model: LLaMA, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    sampling: SamplingParams | None = None, eos_ids: Iterable[int] = (), pad_id: int = 0,
                    should_stop: Callable[[int, int], bool] | None = None, compile: bool = False,
                    logits_processors: Sequence[LogitsProcessor | None] | None = None,
                    draft: Draft | None = None) -> Iterator[list[int | None]]:
    """Yield, step by step, the new token id of each prompt (None for prompts that have finished).

    A prompt finishes when it samples an id in `eos_ids` (not yielded), when `should_stop(row, token)` is True
    (that token is yielded first), or after `max_new_tokens`. Prompts are token-id lists of any lengths.
    The model's KV cache is set up for this call and cleared when the generator ends or is closed.
    `logits_processors` (one per prompt, None for none) see each row's generated ids and fp32 logits before sampling.
    With a `draft` (`llmlab.speculative`) the prompts are decoded one after another by speculative decoding, which
    yields the same tokens greedily and the same distribution when sampling; logits processors (constrained
    decoding) need every step's logits, so with them the draft sits out.
    """
    params = sampling or SamplingParams()
    prompts = [list(p) for p in prompts]
    config = model.config
    check_prompts(prompts, max_new_tokens, config.max_position_embeddings, config.vocab_size)
    eos = set(eos_ids)
    constrained = logits_processors is not None and any(p is not None for p in logits_processors)
    if draft is not None and not constrained:
        yield from draft.generate_tokens(model, prompts, max_new_tokens, params, eos, should_stop, compile)
        return
    generated: list[list[int]] = [[] for _ in prompts]
    process = None
    if constrained:
        if len(logits_processors) != len(prompts):
            raise LLMLabError(f"{len(logits_processors)} logits processors for {len(prompts)} prompts")

        def process(logits: Tensor) -> Tensor:
            rows = [proc(generated[row], logits[row]) if proc is not None else logits[row]
                    for row, proc in enumerate(logits_processors)]
            return torch.stack(rows)
    try:
        batch = _Batch(model, prompts, max_new_tokens, params, pad_id, compile, process)
        # on an accelerator, queue step t+1 before reading step t back, so the device never idles on the host
        # (not with logits processors: they need step t's token to shape step t+1's logits)
        lookahead = batch.pos.device.type != "cpu" and process is None
        finished = [False] * len(prompts)
        token = batch.first()
        for step in range(max_new_tokens):
            more = step + 1 < max_new_tokens
            following = batch.next(token) if more and lookahead else None
            out: list[int | None] = []
            for row, t in enumerate(token.view(-1).tolist()):  # the one host sync of the step
                if finished[row] or t in eos:
                    finished[row] = True
                    out.append(None)
                    continue
                out.append(t)
                generated[row].append(t)
                if should_stop is not None and should_stop(row, t):
                    finished[row] = True
            if any(t is not None for t in out):
                yield out
            if all(finished):
                break
            if more:
                token = following if following is not None else batch.next(token)
    finally:
        model.clear_cache()


# -- text ----------------------------------------------------------------------------------------------
class IncrementalDetokenizer:
    """Turns token ids into text as they arrive; the pieces concatenate to `decode(all ids)`.

    Each new piece is the decoded text of a short window (the last emitted token(s) plus the new ones) minus the
    text of that window before them, which keeps spacing rules of decoders (SentencePiece's leading space)
    right. While the text ends with U+FFFD a multi-byte character is incomplete, so nothing is emitted yet.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids before this are emitted

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], self.skip)
        text = self.tokenizer.decode(self.ids[self.prefix:], self.skip)
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        """Whatever is held back (an incomplete character decodes to U+FFFD, as `decode` does)."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], self.skip)
        text = self.tokenizer.decode(self.ids[self.prefix:], self.skip)
        self.prefix = self.read = len(self.ids)
        return text[len(before):]


class TextStream:
    """The printable text of one generated sequence as tokens arrive, cut before the first stop string.

    Text that could be the start of a stop string is held back until it is clear it is not one, so a
    printed stream never shows (part of) a stop string. `text` is everything accepted so far.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        if any(s == "" for s in stop):
            raise LLMLabError("--stop: stop strings must not be empty")
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop = list(stop)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token: int) -> str:
        """Add a token; return the text that became printable (may be empty)."""
        if self.stopped:
            return ""
        self.text += self.detok.add(token)
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            return self._emit(len(self.text))
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._emit(max(self.emitted, len(self.text) - hold))

    def finish(self) -> str:
        """Generation ended: return the rest (held-back text that turned out not to be a stop string)."""
        if not self.stopped:
            self.text += self.detok.flush()
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        out, self.emitted = self.text[self.emitted:end], end
        return out


@dataclass
class Completion:
    """One generated continuation. finish_reason: "stop" (EOS or a stop string) or "length" (max_new_tokens)."""

    text: str
    token_ids: list[int]
    finish_reason: str


def generate(model: LLaMA, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int = 256,
             sampling: SamplingParams | None = None, eos_ids: Iterable[int] | None = None, stop: Sequence[str] = (),
             compile: bool = False, draft: Draft | None = None) -> list[Completion]:
    """Generate a continuation of each prompt (token ids) in one batch; the text excludes EOS and stop strings.

    `eos_ids` defaults to the tokenizer's EOS token. Token ids include the token that completed a stop string.
    With a `draft`, speculative decoding (`llmlab.speculative`).
    """
    streams = [TextStream(tokenizer, stop) for _ in prompts]
    ids: list[list[int]] = [[] for _ in prompts]

    def on_token(row: int, token: int) -> bool:
        ids[row].append(token)
        streams[row].add(token)
        return streams[row].stopped

    eos = _default_eos(tokenizer) if eos_ids is None else eos_ids
    for _ in generate_tokens(model, prompts, max_new_tokens, sampling, eos, _pad_id(tokenizer), on_token, compile,
                             draft=draft):
        pass
    out = []
    for s, row_ids in zip(streams, ids):
        s.finish()
        reason = "stop" if s.stopped or len(row_ids) < max_new_tokens else "length"
        out.append(Completion(s.text, row_ids, reason))
    return out


def stream(model: LLaMA, tokenizer: Tokenizer, prompt: Sequence[int], max_new_tokens: int = 256,
           sampling: SamplingParams | None = None, eos_ids: Iterable[int] | None = None, stop: Sequence[str] = (),
           compile: bool = False, logits_processor: LogitsProcessor | None = None,
           draft: Draft | None = None) -> Iterator[str]:
    """Generate a continuation of one prompt, yielding printable text pieces as the tokens arrive (with a `draft`,
    by speculative decoding)."""
    text = TextStream(tokenizer, stop)
    pending: list[str] = []

    def on_token(row: int, token: int) -> bool:
        pending.append(text.add(token))
        return text.stopped

    eos = _default_eos(tokenizer) if eos_ids is None else eos_ids
    for _ in generate_tokens(model, [prompt], max_new_tokens, sampling, eos, _pad_id(tokenizer), on_token, compile,
                             [logits_processor], draft):
        piece = "".join(pending)
        pending.clear()
        if piece:
            yield piece
    rest = "".join(pending) + text.finish()
    if rest:
        yield rest


def _default_eos(tokenizer: Tokenizer) -> set[int]:
    return {tokenizer.eos_id} if tokenizer.eos_id is not None else set()


def _pad_id(tokenizer: Tokenizer) -> int:
    return tokenizer.pad_id if tokenizer.pad_id is not None else 0


# -- chat ----------------------------------------------------------------------------------------------
class ChatSession:
    """A multi-turn conversation rendered with the tokenizer's chat template; keeps the history.

    When the history no longer fits the context (prompt + max_new_tokens), the oldest turns are dropped;
    the system message stays.
    """

    def __init__(self, model: LLaMA, tokenizer: Tokenizer, system: str | None = None, max_new_tokens: int = 256,
                 sampling: SamplingParams | None = None, eos_ids: Iterable[int] | None = None,
                 stop: Sequence[str] = (), compile: bool = False, draft: Draft | None = None) -> None:
        if not tokenizer.chat_template:
            raise LLMLabError("this checkpoint's tokenizer has no chat template (tokenizer_config.json "
                              "'chat_template'); use `llmlab generate --chat false` for plain completion")
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.max_new_tokens, self.sampling, self.stop, self.compile = max_new_tokens, sampling, stop, compile
        self.draft = draft  # speculative decoding (llmlab.speculative), or None
        self.eos_ids = _default_eos(tokenizer) if eos_ids is None else set(eos_ids)
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (keeps the system message)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str, role: str = "user", logits_processor: LogitsProcessor | None = None) -> Iterator[str]:
        """Add a user message (or another role's, e.g. a tool result) and stream the assistant's reply; the reply
        joins the history when it is complete. `logits_processor` constrains this reply (see llmlab.constrained)."""
        self.messages.append({"role": role, "content": text})
        done = False
        try:
            ids = self._fit()
            reply = []
            for piece in stream(self.model, self.tokenizer, ids, self.max_new_tokens, self.sampling, self.eos_ids,
                                self.stop, self.compile, logits_processor, self.draft):
                reply.append(piece)
                yield piece
            self.messages.append({"role": "assistant", "content": "".join(reply)})
            done = True
        finally:
            if not done:  # error or interrupted: the unanswered message leaves the history
                self.messages.pop()

    def _fit(self) -> list[int]:
        config = self.model.config
        first = 1 if self.system else 0
        alone = self.tokenizer.encode_chat(self.messages[:first] + self.messages[-1:])
        check_prompts([alone], self.max_new_tokens, config.max_position_embeddings, config.vocab_size)
        ids = self.tokenizer.encode_chat(self.messages)
        while len(ids) + self.max_new_tokens > config.max_position_embeddings and len(self.messages) - first > 1:
            del self.messages[first:first + 2]  # the oldest user/assistant pair
            ids = self.tokenizer.encode_chat(self.messages)
        return ids


# -- stopping ------------------------------------------------------------------------------------------
def eos_token_ids(tokenizer: Tokenizer, gen_config: dict[str, Any]) -> set[int]:
    """The ids that end a generation: the tokenizer's EOS token plus generation_config.json's eos_token_id(s)."""
    ids = _default_eos(tokenizer)
    value = gen_config.get("eos_token_id")
    ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return ids
