"""The serving engine with its decode step compiled (`serve --compile`): the same greedy tokens as the eager engine
and as `generate` for concurrent requests of different lengths, over float and quantized weights; LoRA adapters
loaded while it runs still apply per row (those steps run eagerly) and the compiled step takes over again once they
are gone; `--compile` auto / on / off and a bad value."""

from __future__ import annotations

import pytest
from _serve import (
    PROMPTS,
    alone,
    make_fixture,
    one_thread,  # noqa: F401  (a fixture, used through pytestmark)
    submit_all,
)

from llmlab import hardware
from llmlab import quantized as quantized_module
from llmlab.checkpoint import load_checkpoint
from llmlab.errors import LLMLabError
from llmlab.generate import generate
from llmlab.gguf_export import export_gguf
from llmlab.gguf_import import import_gguf
from llmlab.loading import load_for_inference
from llmlab.serve import _compiles, compile_possible, load_engine
from llmlab.serve.request import GenerationRequest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # compiling takes a while


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return make_fixture(tmp_path_factory.mktemp("serve_compile"))


def requests(tok, lengths=(14, 5, 9, 12)) -> list[GenerationRequest]:
    """Prompts of different lengths, each with its own max_tokens: rows finish and leave at different steps, so the
    batch shrinks from 4 rows to 1 (every warmed-up size runs)."""
    return [GenerationRequest(tok.encode(p), n) for p, n in zip(PROMPTS, lengths)]


def test_compiled_engine_equals_eager_engine_and_generate(fixture):
    ckpt, adapters = fixture
    compiled, tok = load_engine(ckpt, max_batch=4, max_seq_len=96, dtype="float32", compile="on")
    eager, _ = load_engine(ckpt, max_batch=4, max_seq_len=96, dtype="float32", compile="off")
    try:
        assert compiled.decode_step.startswith("compiled for batches of [1, 2, 4] rows")
        assert eager.decode_step == "eager" and eager._compiled is None
        warm = compiled._compiled.steps
        got = submit_all(compiled, requests(tok))
        assert compiled._compiled.steps > warm + 10  # the requests' steps went through the compiled step
        assert got == submit_all(eager, requests(tok))
        for req, out in zip(requests(tok), got):
            assert out == [alone(ckpt, req.prompt_ids, req.max_tokens)]

        # an adapter loaded while it runs: its rows get it (eager steps), the others stay the base model's
        compiled.load_adapter("alpha", adapters["alpha"])
        ids = tok.encode(PROMPTS[0])
        before = compiled._compiled.steps
        mixed = submit_all(compiled, [GenerationRequest(ids, 12, adapter=a) for a in (None, "alpha", None)])
        assert compiled._compiled.steps == before
        want = {a: alone(ckpt, ids, 12, adapters.get(a)) for a in (None, "alpha")}
        assert want[None] != want["alpha"], "the adapter must change the output for this test to mean much"
        assert mixed == [[want[None]], [want["alpha"]], [want[None]]]
        compiled.unload_adapter("alpha")  # the wrappers go: the compiled step again
        assert submit_all(compiled, requests(tok)) == got
        assert compiled._compiled.steps > before
    finally:
        compiled.close()
        eager.close()


def test_compiled_engine_over_a_quantized_base_equals_generate(tmp_path):
    ckpt = make_fixture(tmp_path)[0]
    folder = import_gguf(export_gguf(ckpt, tmp_path / "tiny.gguf", "q8_0"), tmp_path / "imported")
    with pytest.MonkeyPatch.context() as mp:  # batches of 3 rows or more take the dense copies: one more graph
        mp.setattr(quantized_module, "dense_plan", lambda spec, dev, kernel, act, dtypes: (3, dtypes[0]))
        eng, tok = load_engine(folder, max_batch=4, max_seq_len=96, dtype="float32", compile="on")
    try:
        assert eng.decode_step.startswith("compiled for batches of [1, 2, 3, 4] rows")
        reqs = requests(tok)
        got = submit_all(eng, reqs)
        model, _, _ = load_for_inference(folder, device="cpu", dtype="float32")  # the same blocks, no dense copies
        for req, out in zip(reqs, got):
            ref = generate(model, tok, [req.prompt_ids], req.max_tokens)[0]
            assert out == [(ref.text, ref.finish_reason)]
    finally:
        eng.close()


def test_adapters_at_start_run_eagerly(fixture, tmp_path):
    ckpt, adapters = fixture
    eng, tok = load_engine(ckpt, {"alpha": adapters["alpha"]}, max_batch=2, max_seq_len=64, dtype="float32",
                           compile="on")
    try:
        assert eng.decode_step == "eager (LoRA adapters are served)"
        ids = tok.encode(PROMPTS[1])
        assert eng.generate(GenerationRequest(ids, 8, adapter="alpha"), 60) == [alone(ckpt, ids, 8,
                                                                                      adapters["alpha"])]
    finally:
        eng.close()


def test_compile_option(fixture, tmp_path, monkeypatch):
    ckpt, _ = fixture
    with pytest.raises(LLMLabError, match="--compile: expected one of auto, on, off, got 'yes'"):
        load_engine(ckpt, compile="yes")
    model = load_checkpoint(ckpt)
    assert not _compiles("auto", model) and _compiles("on", model) and not _compiles("off", model)
    quantized_module.quantize_model(model, "int8")
    monkeypatch.setattr(hardware, "cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(hardware, "cpp_compiler", lambda: "g++")
    assert _compiles("auto", model)
    assert compile_possible("auto")
    monkeypatch.setattr(hardware, "cpu_capability", lambda: "AVX2")  # not verified there: eager unless asked
    assert not _compiles("auto", model) and _compiles("on", model)
    assert not compile_possible("auto") and compile_possible("on") and not compile_possible("off")  # the CLI's note
    monkeypatch.setattr(hardware, "cpu_capability", lambda: "AMX")
    monkeypatch.setattr(hardware, "cpp_compiler", lambda: None)  # inductor could not build the step
    assert not _compiles("auto", model)
