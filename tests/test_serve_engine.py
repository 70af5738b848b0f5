"""The serving engine without HTTP: continuous batching gives each request what it would get alone, per-row LoRA
equals the training-side LoRA, the logits-processor hook, cancel, the bounded queue, log-probabilities (sampled and
prompt tokens), adapters loaded and unloaded while it runs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from _serve import (
    PROMPTS,
    alone,
    make_adapter,
    make_fixture,
    one_thread,  # noqa: F401  (a fixture, used through pytestmark)
    submit_all,
    wait_for,
)
from _tiny import tiny_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llmlab import quantized as quantized_module
from llmlab.args import LoRAConfig
from llmlab.checkpoint import load_checkpoint
from llmlab.errors import LLMLabError
from llmlab.generate import SamplingParams, generate
from llmlab.gguf_export import export_gguf
from llmlab.gguf_import import import_gguf
from llmlab.loading import load_for_inference
from llmlab.methods import load_adapter
from llmlab.methods.adapters import PROBE_KEY
from llmlab.methods.lora import save_adapter
from llmlab.quantized import FusedQuantLinear, QuantLinear
from llmlab.serve import load_engine, parse_adapters
from llmlab.serve.engine import Engine
from llmlab.serve.lora_multi import MultiLoRA, MultiLoRALinear
from llmlab.serve.request import GenerationRequest, QueueFull

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return make_fixture(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def engine(fixture):
    ckpt, adapters = fixture
    eng, _ = load_engine(ckpt, adapters, max_batch=6, max_seq_len=128, queue_size=8, dtype="float32")
    yield eng
    eng.close()


def test_per_row_cache_slots_equal_full_recompute(fixture):
    ckpt, _ = fixture
    model = load_checkpoint(ckpt).eval()
    a, b = torch.tensor([[5, 9, 13, 2, 7, 30, 40]]), torch.tensor([[3, 8, 11, 60]])
    with torch.no_grad():
        ref_a, ref_b = model(torch.cat([a, torch.tensor([[9]])], 1))[0, -1], model(torch.cat([b, torch.tensor([[5]])],
                                                                                              1))[0, -1]
        model.setup_cache(3, 16)
        model(a, input_pos=torch.arange(7)[None], cache_rows=torch.tensor([1]), kv_len=7)
        model(b, input_pos=torch.arange(4)[None], cache_rows=torch.tensor([0]), kv_len=4)
        out = model(torch.tensor([[5], [9]]), input_pos=torch.tensor([[4], [7]]), kv_len=8)[:, -1]
    torch.testing.assert_close(out[0], ref_b)
    torch.testing.assert_close(out[1], ref_a)


def test_batched_requests_equal_each_alone(fixture, engine):
    ckpt, _ = fixture
    tok = engine.tokenizer
    reqs = [GenerationRequest(tok.encode(p), 12 + 3 * i) for i, p in enumerate(PROMPTS)]
    results = submit_all(engine, reqs)
    for req, got in zip(reqs, results):
        assert got == [alone(ckpt, req.prompt_ids, req.max_tokens)]


def test_mixed_adapter_batch_equals_each_adapter_alone(fixture, engine):
    ckpt, adapters = fixture
    ids = engine.tokenizer.encode(PROMPTS[0])
    names = [None, "alpha", "beta", "alpha", None]
    results = submit_all(engine, [GenerationRequest(ids, 16, adapter=a) for a in names])
    expected = {a: alone(ckpt, ids, 16, adapters.get(a)) for a in set(names)}
    assert len({expected[a] for a in expected}) == 3, "each adapter must change the output for this test to mean much"
    for name, got in zip(names, results):
        assert got == [expected[name]], name


def test_shared_prompt_prefix_is_reused_and_changes_nothing(fixture, engine):
    ckpt, adapters = fixture
    tok = engine.tokenizer
    system = {"role": "system", "content": "What does the cat say? The cat says meow. What does the dog say?"}
    prompts = [tok.encode_chat([system, {"role": "user", "content": q}]) for q in ("The owl", "The cow", "pig")]
    for adapter in (None, "alpha"):
        before = engine.status()["prefix_tokens"]
        for ids in prompts:
            got = engine.generate(GenerationRequest(ids, 10, adapter=adapter), 60)
            assert got == [alone(ckpt, ids, 10, adapters.get(adapter))]
        shared = len(tok.encode_chat([system], add_generation_prompt=False))
        assert engine.status()["prefix_tokens"] - before >= 2 * shared  # the 2nd and 3rd prompts reuse the system part


def test_multi_lora_forward_equals_lora_linear_per_row(fixture):
    ckpt, adapters = fixture
    x = torch.randint(0, 300, (3, 9))
    multi_model = load_checkpoint(ckpt).eval()
    multi = MultiLoRA(multi_model)
    for name, folder in adapters.items():
        multi.add(name, folder)
    with torch.no_grad(), multi.select(["beta", None, "alpha"]):
        got = multi_model(x)
    for row, name in enumerate(["beta", None, "alpha"]):
        ref = load_checkpoint(ckpt).eval()
        if name:
            load_adapter(ref, adapters[name])
        with torch.no_grad():
            torch.testing.assert_close(got[row], ref(x[row:row + 1])[0], rtol=1e-4, atol=1e-5)


def test_n_choices_seed_and_stop(engine):
    ids = engine.tokenizer.encode(PROMPTS[1])
    sampled = SamplingParams(temperature=1.0, seed=7)
    first = engine.generate(GenerationRequest(ids, 10, sampled, n=3), 60)
    again = engine.generate(GenerationRequest(ids, 10, SamplingParams(temperature=1.0, seed=7), n=3), 60)
    assert first == again and len(first) == 3
    assert len({t for t, _ in first}) > 1, "three samples at temperature 1 should not all agree"
    greedy = engine.generate(GenerationRequest(ids, 10), 60)[0][0]
    stop = greedy[3:6]
    text, reason = engine.generate(GenerationRequest(ids, 10, stop=[stop]), 60)[0]
    assert text == greedy[:greedy.index(stop)] and reason == "stop"


def test_logits_processor_hook_constrains_every_token(engine):
    ids = engine.tokenizer.encode(PROMPTS[0])
    allowed = engine.tokenizer.encode(" meow")[-1]
    seen: list[list[int]] = []

    def only_meow(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        seen.append(list(generated))
        out = torch.full_like(logits, float("-inf"))
        out[allowed] = 0.0
        return out

    text, reason = engine.generate(GenerationRequest(ids, 4, SamplingParams(temperature=1.0),
                                                     logits_processor_factory=lambda: only_meow), 60)[0]
    assert text == engine.tokenizer.decode([allowed] * 4) and reason == "length"
    assert seen == [[], [allowed], [allowed] * 2, [allowed] * 3]


def test_each_choice_gets_its_own_logits_processor(engine):
    """A processor may keep per-sequence state (a grammar's parser): with n = 3 each choice has its own, which sees
    that choice's tokens only, one call per token."""
    ids = engine.tokenizer.encode(PROMPTS[0])
    seen: list[list[list[int]]] = []

    def factory():
        calls: list[list[int]] = []
        seen.append(calls)
        return lambda generated, logits: calls.append(list(generated)) or logits

    out = engine.generate(GenerationRequest(ids, 5, SamplingParams(temperature=1.0, seed=4), n=3,
                                            logits_processor_factory=factory), 60)
    assert len(seen) == 3 and len({t for t, _ in out}) == 3
    for calls in seen:  # one sequence each: every call extends the one before by one token
        assert [len(c) for c in calls] == [0, 1, 2, 3, 4]
        assert all(calls[i] == calls[i + 1][:i] for i in range(4))
    assert len({tuple(calls[-1]) for calls in seen}) == 3


def test_failing_logits_processor_fails_only_its_request(engine):
    ids = engine.tokenizer.encode(PROMPTS[0])

    def broken(generated, logits):
        raise ValueError("grammar exploded")

    with pytest.raises(LLMLabError, match="grammar exploded"):
        engine.generate(GenerationRequest(ids, 4, logits_processor_factory=lambda: broken), 60)
    assert engine.generate(GenerationRequest(ids, 4), 60)[0][1] == "length"


def test_cancel_frees_the_rows_and_queue_full(fixture):
    ckpt, _ = fixture
    eng, tok = load_engine(ckpt, max_batch=1, max_seq_len=128, queue_size=1, dtype="float32")
    try:
        ids = tok.encode(PROMPTS[0])
        with eng.lock:  # paused: nothing is admitted
            waiting = eng.submit(GenerationRequest(ids, 100))
            with pytest.raises(QueueFull, match="--queue-size 1"):
                eng.submit(GenerationRequest(ids, 5))
            eng.cancel(waiting)
        assert wait_for(lambda: eng.status()["cancelled"] == 1)
        events = []
        long = GenerationRequest(ids, 120, sink=events.append)
        with eng.lock:
            eng.submit(long)
        assert wait_for(lambda: long.completion_tokens >= 2)
        eng.cancel(long)
        assert wait_for(lambda: eng.status()["running"] == 0 and eng.status()["cancelled"] == 2)
        assert long.completion_tokens < 120 and all(e.kind == "delta" for e in events)
    finally:
        eng.close()


def test_bad_requests_and_options(fixture, engine):
    ids = engine.tokenizer.encode(PROMPTS[0])
    with pytest.raises(LLMLabError, match="n must be between 1 and 6"):
        engine.submit(GenerationRequest(ids, 4, n=7))
    with pytest.raises(LLMLabError, match="context is 128 tokens"):
        engine.submit(GenerationRequest([1] * 128, 4))
    with pytest.raises(LLMLabError, match="unknown adapter 'gamma'"):
        engine.submit(GenerationRequest(ids, 4, adapter="gamma"))
    with pytest.raises(LLMLabError, match="expected NAME=DIR"):
        parse_adapters(["=x"])
    with pytest.raises(LLMLabError, match="given twice"):
        parse_adapters(["a=x", "a=y"])
    assert parse_adapters(["runs/final", "b=y"]) == {"final": Path("runs/final"), "b": Path("y")}
    bottleneck = Path(fixture[1]["alpha"]).parent / "bottleneck"
    bottleneck.mkdir(exist_ok=True)
    (bottleneck / "adapter_config.json").write_text('{"adapter_type": "bottleneck", "dim": 8}')
    with pytest.raises(LLMLabError, match="bottleneck adapters .* cannot be served"):
        MultiLoRA(load_checkpoint(fixture[0])).add("b", bottleneck)
    key = "model.layers.{}.self_attn.qkv_proj.lora_{}.q"
    save_adapter(bottleneck.parent / "narrow", {key.format(0, "A"): torch.zeros(4, 32),
                                                key.format(0, "B"): torch.zeros(64, 4)}, LoRAConfig(r=4, targets="q"))
    with pytest.raises(LLMLabError, match=r"does not fit this model: .* has A \(4, 32\)"):
        MultiLoRA(load_checkpoint(fixture[0])).add("n", bottleneck.parent / "narrow")
    save_adapter(bottleneck.parent / "deep", {key.format(5, "A"): torch.zeros(4, 64),
                                              key.format(5, "B"): torch.zeros(64, 4)}, LoRAConfig(r=4, targets="q"))
    with pytest.raises(LLMLabError, match="names a layer beyond the model's 2"):
        MultiLoRA(load_checkpoint(fixture[0])).add("d", bottleneck.parent / "deep")
    multi = MultiLoRA(load_checkpoint(fixture[0]))
    multi.add("a", fixture[1]["alpha"])
    with pytest.raises(LLMLabError, match="given twice"):
        multi.add("a", fixture[1]["beta"])
    with pytest.raises(LLMLabError, match=r"unknown adapter\(s\) \['zeta'\]"):
        with multi.select(["zeta"]):
            pass
    with pytest.raises(LLMLabError, match="--max-batch and --queue-size"):
        Engine(load_checkpoint(fixture[0]), engine.tokenizer, [], max_batch=0)


# -- log-probabilities -------------------------------------------------------------------------------------
def run_collecting(engine, req) -> list:
    """Submit `req`, wait, and return its events."""
    events, done = [], threading.Event()
    req.sink = lambda ev: (events.append(ev), ev.kind in ("done", "error") and done.set())
    engine.submit(req)
    assert done.wait(60)
    return events


def test_logprobs_are_the_models_own_whatever_the_temperature(fixture, engine):
    """Sampled at temperature 1.5, each token's reported log-probability is the model's (an fp32 log-softmax of its
    logits, the function `llmlab evaluate` scores with), and the alternatives are its most likely tokens."""
    from llmlab.eval.scoring import token_logprobs

    ids = engine.tokenizer.encode(PROMPTS[1])
    events = run_collecting(engine, GenerationRequest(ids, 8, SamplingParams(temperature=1.5, seed=3), logprobs=3))
    scores = [e for ev in events for e in ev.logprobs or []]
    generated = [e.token for e in scores]
    assert len(generated) == 8 and all(len(e.top) == 3 for e in scores)
    model = load_checkpoint(fixture[0]).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids + generated]))[0, len(ids) - 1:-1]
    ref = token_logprobs(logits, torch.tensor(generated), 3)
    torch.testing.assert_close(torch.tensor([e.logprob for e in scores]), ref.logprobs, atol=1e-4, rtol=0)
    assert [[t for t, _ in e.top] for e in scores] == ref.top_ids.tolist()
    assert any(e.logprob < e.top[0][1] for e in scores), "at temperature 1.5 some token should not be the argmax"


def test_prompt_scores_and_max_tokens_zero_equal_llmlab_scoring(fixture, engine):
    """`prompt_logprobs` with max_tokens 0 scores the prompt (every position, no prefix reuse) and generates
    nothing; the sum is what `llmlab evaluate`'s log-likelihood gives, with or without an adapter."""
    from llmlab.eval.scoring import loglikelihoods

    ckpt, adapters = fixture
    ids = engine.tokenizer.encode(PROMPTS[2])
    engine.generate(GenerationRequest(ids, 2), 60)  # now the whole prompt is in the prefix cache
    for adapter in (None, "alpha"):
        req = GenerationRequest(ids, 0, prompt_logprobs=2, adapter=adapter)
        events = run_collecting(engine, req)
        assert [(e.kind, e.text, e.finish_reason) for e in events[:-1]] == [("finish", "", "length")]
        assert req.completion_tokens == 0 and req.prompt_scores[0] is None
        assert [e.token for e in req.prompt_scores[1:]] == ids[1:]
        model = load_checkpoint(ckpt).eval()
        if adapter:
            load_adapter(model, adapters[adapter])
        (want, greedy), = loglikelihoods(model, [(ids[:1], ids[1:])])
        assert sum(e.logprob for e in req.prompt_scores[1:]) == pytest.approx(want, abs=1e-3)
    with pytest.raises(LLMLabError, match="max_tokens must be at least 1"):
        engine.submit(GenerationRequest(ids, 0))


# -- adapters loaded and unloaded while the engine runs ----------------------------------------------------
def test_adapters_load_and_unload_while_running(fixture):
    """An engine started without adapters loads one (the same output as one loaded at start), unloads it while a
    request uses it (that request finishes exactly as it would have; new ones are refused at once; the weights go
    when it is done and the model is the plain base again), and loads another under the same name (no stale
    prefix cache)."""
    ckpt, adapters = fixture
    eng, tok = load_engine(ckpt, max_batch=4, max_seq_len=128, dtype="float32")
    try:
        ids = tok.encode(PROMPTS[0])
        eng.load_adapter("alpha", adapters["alpha"])
        assert eng.adapter_names() == ["alpha"]
        uninterrupted = eng.generate(GenerationRequest(ids, 40, adapter="alpha"), 60)
        assert uninterrupted == [alone(ckpt, ids, 40, adapters["alpha"])]

        def slow(generated, logits):
            time.sleep(0.02)
            return logits

        events = []
        running = GenerationRequest(ids, 40, adapter="alpha", logits_processor_factory=lambda: slow,
                                    sink=events.append)
        eng.submit(running)
        assert wait_for(lambda: running.completion_tokens >= 2)
        eng.unload_adapter("alpha")
        assert eng.adapter_names() == [] and running.completion_tokens < 40
        with pytest.raises(LLMLabError, match="unknown adapter 'alpha'"):
            eng.submit(GenerationRequest(ids, 4, adapter="alpha"))
        with pytest.raises(LLMLabError, match="no adapter named 'alpha'"):
            eng.unload_adapter("alpha")
        assert wait_for(lambda: events and events[-1].kind == "done")
        assert "".join(e.text for e in events) == uninterrupted[0][0]
        assert wait_for(lambda: eng.adapters.names == [])
        assert not any(isinstance(m, MultiLoRALinear) for m in eng.model.modules())
        eng.load_adapter("alpha", adapters["beta"])  # the same name, other weights
        assert eng.generate(GenerationRequest(ids, 12, adapter="alpha"), 60) == [alone(ckpt, ids, 12,
                                                                                       adapters["beta"])]
        with pytest.raises(LLMLabError, match="named 'alpha' is loaded already"):
            eng.load_adapter("alpha", adapters["alpha"])
    finally:
        eng.close()


def test_an_adapter_that_does_not_fit_leaves_the_engine_as_it_was(fixture, tmp_path):
    ckpt, adapters = fixture
    eng, tok = load_engine(ckpt, {"alpha": adapters["alpha"]}, max_batch=2, max_seq_len=128, dtype="float32")
    try:
        key = "model.layers.{}.self_attn.qkv_proj.lora_{}.q"
        save_adapter(tmp_path / "narrow", {key.format(0, "A"): torch.zeros(4, 32), key.format(0, "B"):
                                           torch.zeros(64, 4)}, LoRAConfig(r=4, targets="q"))
        before = {name: type(m) for name, m in eng.model.named_modules()}
        for folder, message in ((tmp_path / "narrow", "does not fit this model"),
                                (tmp_path / "missing", "no adapter_config.json"),
                                (tmp_path / ("x" * 5000), "cannot read the adapter|no adapter_config.json")):
            with pytest.raises(LLMLabError, match=message):
                eng.load_adapter("new", folder)
        assert eng.adapter_names() == ["alpha"]
        assert {name: type(m) for name, m in eng.model.named_modules()} == before
    finally:
        eng.close()


# -- over a quantized base: the fast path serves a folder that keeps its GGUF from the file's own blocks -------------
@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A tiny checkpoint exported to a Q8_0 GGUF and imported back (the folder keeps the file as model.gguf, so
    serving it runs on the blocks), and two LoRA adapters made for it."""
    tmp = tmp_path_factory.mktemp("quantized")
    ckpt = tiny_checkpoint(tmp / "tiny", std=0.1)
    folder = import_gguf(export_gguf(ckpt, tmp / "tiny.gguf", "q8_0"), tmp / "imported")
    adapters = {"alpha": make_adapter(folder, tmp / "alpha", 1), "beta": make_adapter(folder, tmp / "beta", 2, "k,up")}
    for adapter in adapters.values():  # as PEFT writes them: no base probe (read from a float embedding table)
        weights = adapter / "adapter_model.safetensors"
        with safe_open(weights, "pt") as f:
            metadata = {k: v for k, v in (f.metadata() or {}).items() if k != PROBE_KEY}
        save_file(load_file(weights), weights, metadata=metadata)
    return folder, adapters


@pytest.fixture(scope="module")
def quantized_engine(quantized):
    folder, adapters = quantized
    with pytest.MonkeyPatch.context() as mp:  # batches of 2 rows or more take the dense copies, whatever was measured
        mp.setattr(quantized_module, "dense_plan", lambda spec, dev, kernel, act, dtypes: (2, dtypes[0]))
        eng, _ = load_engine(folder, adapters, max_batch=6, max_seq_len=128, queue_size=8, dtype="float32")
    yield eng
    eng.close()


def float_twin(model, folder: Path, adapter: Path | None = None):
    """The float model of `folder` with every quantized projection's weights set to what that layer multiplies by
    (`dequantize()`), plus `adapter` put on the training way: the reference a quantized row must equal."""
    twin = load_checkpoint(folder).eval()
    for name, module in model.named_modules(remove_duplicate=False):  # a tied head is also the embedding's source
        if isinstance(module, QuantLinear | FusedQuantLinear) and ".parts." not in name and ".source" not in name:
            target = twin.get_submodule(name.removesuffix(".base"))
            with torch.no_grad():
                target.weight.copy_(module.dequantize(torch.float32))
    if adapter is not None:
        load_adapter(twin, adapter)
    return twin


def test_quantized_engine_equals_greedy_decoding_one_at_a_time(quantized, quantized_engine):
    folder, _ = quantized
    eng = quantized_engine
    down = eng.model.model.layers[0].mlp.down_proj.base  # alpha targets down: the wrapper keeps the quantized base
    assert isinstance(down, QuantLinear) and down.dense is not None and down.dense_from == 2
    tok = eng.tokenizer
    reqs = [GenerationRequest(tok.encode(p), 12 + 3 * i) for i, p in enumerate(PROMPTS)]
    results = submit_all(eng, reqs)
    model, _, _ = load_for_inference(folder, device="cpu", dtype="float32")  # the same blocks, no dense copies
    assert model.model.layers[0].mlp.down_proj.dense is None
    for req, got in zip(reqs, results):
        out = generate(model, tok, [req.prompt_ids], req.max_tokens)[0]
        assert got == [(out.text, out.finish_reason)]


def test_two_adapters_in_one_batch_over_a_quantized_base(quantized, quantized_engine):
    folder, adapters = quantized
    eng = quantized_engine
    ids = eng.tokenizer.encode(PROMPTS[0])
    names = [None, "alpha", "beta", "alpha", None]
    results = submit_all(eng, [GenerationRequest(ids, 16, adapter=a) for a in names])
    expected = {}
    for a in set(names):
        twin = float_twin(eng.model, folder, adapters.get(a))
        out = generate(twin, eng.tokenizer, [ids], 16)[0]
        expected[a] = (out.text, out.finish_reason)
    assert len(set(expected.values())) == 3, "each adapter must change the output for this test to mean much"
    for name, got in zip(names, results):
        assert got == [expected[name]], name


def test_multi_lora_over_quant_linear_equals_the_adapter_alone(quantized):
    folder, adapters = quantized
    model, _, _ = load_for_inference(folder, device="cpu", dtype="float32")
    x = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(0))
    multi = MultiLoRA(model)
    for name, folder_ in adapters.items():
        multi.add(name, folder_)
    assert isinstance(model.model.layers[1].self_attn.qkv_proj.base, QuantLinear)  # beta targets k
    with torch.no_grad(), multi.select(["beta", None, "alpha"]):
        got = model(x)
    # the int8 kernel rounds its activations to bf16 (logits ~3 here move by ~0.015), which the tolerance allows;
    # each adapter moves them far more than that
    base = float_twin(model, folder)
    for row, name in enumerate(["beta", None, "alpha"]):
        ref = float_twin(model, folder, adapters.get(name))
        with torch.no_grad():
            want = ref(x[row:row + 1])[0]
            torch.testing.assert_close(got[row], want, rtol=0, atol=0.04)
            assert name is None or (want - base(x[row:row + 1])[0]).abs().max() > 0.5
