import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny import generated_ids as run
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmlab.checkpoint import save_checkpoint
from llmlab.cli import main
from llmlab.config import ModelConfig
from llmlab.errors import LLMLabError
from llmlab.generate import (
    ChatSession,
    IncrementalDetokenizer,
    SamplingParams,
    TextStream,
    apply_repetition_penalty,
    eos_token_ids,
    generate,
    sample,
    stream,
    top_k_filter,
    top_p_filter,
)
from llmlab.model import build_model
from llmlab.tokenizer import Tokenizer

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["The capital of France is Paris.", "Hello world, hello tokens.", "User: hi\nAssistant: hello there"] * 20


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 / SmolLM2 style) with ChatML special tokens, trained on a few lines."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    return Tokenizer(backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML)


def tiny_model(vocab_size: int = 256, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_name("tiny", vocab_size=vocab_size, **overrides))
    model.init_weights(std=0.1)  # peakier logits than the default init: no near-ties for greedy to flip on
    return model.eval()


def greedy_without_cache(model, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


# -- decoding --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "tiny-mha"])
def test_greedy_with_cache_equals_recomputing_without_cache(preset):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name(preset)).eval()
    model.init_weights(std=0.1)
    prompt = [5, 17, 42, 9, 100]
    assert run(model, [prompt], 20) == [greedy_without_cache(model, prompt, 20)]
    assert model.max_cache_len == 0  # the cache is released after the call


def test_batched_prompts_of_different_lengths_equal_each_alone():
    model = tiny_model()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15, 16], [200, 201, 202, 203, 204, 205, 206, 207, 208]]
    for params in (SamplingParams(), SamplingParams(repetition_penalty=1.3)):
        alone = [run(model, [p], 15, sampling=params)[0] for p in prompts]
        assert run(model, prompts, 15, sampling=params) == alone
    assert alone[1] != alone[2]  # the rows really differ


def test_temperature_zero_is_deterministic_and_a_seed_reproduces_a_sample():
    model = tiny_model()
    prompt = [[3, 4, 5]]
    assert run(model, prompt, 16) == run(model, prompt, 16)
    hot = dict(temperature=1.5, top_k=100, top_p=0.95)
    state = torch.random.get_rng_state()
    a = run(model, prompt, 16, sampling=SamplingParams(**hot, seed=1))
    b = run(model, prompt, 16, sampling=SamplingParams(**hot, seed=1))
    c = run(model, prompt, 16, sampling=SamplingParams(**hot, seed=2))
    assert a == b and a != c
    assert a != run(model, prompt, 16)  # sampling is not greedy
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched


def test_a_vanishing_temperature_decodes_greedily():
    # dividing the logits by 1e-320 overflows them to inf/nan; such a temperature means the argmax anyway
    model = tiny_model()
    assert SamplingParams(temperature=1e-320).greedy and not SamplingParams(temperature=0.01).greedy
    assert run(model, [[3, 4]], 10, sampling=SamplingParams(temperature=1e-320, seed=0)) == run(model, [[3, 4]], 10)


def test_top_k_one_samples_the_argmax():
    model = tiny_model()
    assert run(model, [[3, 4]], 10, sampling=SamplingParams(temperature=2.0, top_k=1, seed=0)) == run(model, [[3, 4]],
                                                                                                        10)


@pytest.mark.slow  # torch.compile takes ~30 s on a 2-core CPU
def test_compiled_decode_step_gives_the_same_tokens():
    model = tiny_model()
    prompts = [[5, 6, 7, 8], [9]]
    assert run(model, prompts, 12, compile=True) == run(model, prompts, 12)


def test_batch1_bf16_decode_steps_bypass_onednn_and_restore_it():
    model = tiny_model().to(torch.bfloat16)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append((args[0].shape, torch.backends.mkldnn.enabled)))
    run(model, [[5, 6, 7, 8]], 4)  # batch 1: oneDNN's bf16 gemv is the slow one
    assert seen[0] == ((1, 4), True) and all(flag is False for shape, flag in seen[1:]) and len(seen) == 4
    seen.clear()
    run(model, [[5, 6, 7, 8], [9]], 3)  # a batch keeps oneDNN
    assert all(flag for _, flag in seen)
    assert torch.backends.mkldnn.enabled


def test_eos_ends_a_row_and_is_not_returned():
    model = tiny_model()
    tokens = run(model, [[3, 4, 5]], 12)[0]
    cut = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
    assert run(model, [[3, 4, 5]], 12, eos_ids={tokens[cut]}) == [tokens[:cut]]
    # in a batch, the other row goes on
    other = run(model, [[9, 9]], 12)[0]
    if tokens[cut] not in other:
        assert run(model, [[3, 4, 5], [9, 9]], 12, eos_ids={tokens[cut]}) == [tokens[:cut], other]


# -- sampling filters -------------------------------------------------------------------------------------
LOGITS = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.0, 1.0],
                       [-0.3, 0.2, 0.1, -4.0, 2.5, 2.4, -1.0]])


def test_repetition_penalty_matches_reference_and_hf():
    seen_ids = torch.tensor([[0, 1, 5], [3, 4, 4]])
    seen = torch.zeros_like(LOGITS, dtype=torch.bool).scatter(1, seen_ids, True)
    got = apply_repetition_penalty(LOGITS, seen, 2.0)
    expected = LOGITS.clone()
    for b in range(2):
        for t in set(seen_ids[b].tolist()):
            v = LOGITS[b, t]
            expected[b, t] = v / 2.0 if v > 0 else v * 2.0
    torch.testing.assert_close(got, expected)
    lp = pytest.importorskip("transformers.generation.logits_process")
    torch.testing.assert_close(got, lp.RepetitionPenaltyLogitsProcessor(2.0)(seen_ids, LOGITS.clone()))


def test_top_k_matches_reference_and_hf():
    got = top_k_filter(LOGITS, 3)
    for b in range(2):
        keep = set(LOGITS[b].argsort(descending=True)[:3].tolist())
        for t in range(LOGITS.size(1)):
            assert (got[b, t] == LOGITS[b, t]) if t in keep else got[b, t] == float("-inf")
    lp = pytest.importorskip("transformers.generation.logits_process")
    torch.testing.assert_close(got, lp.TopKLogitsWarper(3)(None, LOGITS.clone()))
    assert torch.equal(top_k_filter(LOGITS, 50), LOGITS)


@pytest.mark.parametrize("p", [0.3, 0.6, 0.9, 0.99])
def test_top_p_matches_reference_and_hf(p):
    got = top_p_filter(LOGITS, p)
    probs = LOGITS.softmax(-1)
    for b in range(2):
        order, total, keep = probs[b].argsort(descending=True).tolist(), 0.0, set()
        for t in order:  # smallest set of most likely tokens with probability >= p
            keep.add(t)
            total += probs[b, t].item()
            if total >= p:
                break
        assert {t for t in range(LOGITS.size(1)) if got[b, t] > float("-inf")} == keep
    lp = pytest.importorskip("transformers.generation.logits_process")
    torch.testing.assert_close(got, lp.TopPLogitsWarper(p)(None, LOGITS.clone()))


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]]).expand(4000, 4)
    draws = sample(logits, SamplingParams(temperature=1.0, top_k=3), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws.view(-1), minlength=4).float() / 4000
    expected = top_k_filter(logits[:1], 3).softmax(-1)[0]
    assert freq[2] == 0  # filtered out
    torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)


def test_sampling_params_from_generation_config():
    assert SamplingParams.from_generation_config({"eos_token_id": 2}).greedy
    hot = SamplingParams.from_generation_config({"do_sample": True, "temperature": 0.6, "top_p": 0.9})
    assert (hot.temperature, hot.top_k, hot.top_p) == (0.6, 50, 0.9)  # HF's top_k default applies
    mixed = SamplingParams.from_generation_config({"do_sample": True, "temperature": 0.6}, temperature=0.0, seed=3)
    assert mixed.greedy and mixed.seed == 3


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-1), "--temperature must be >= 0"),
    (dict(top_p=0), "--top-p must be in (0, 1]"),
    (dict(top_k=-5), "--top-k must be a positive integer"),
    (dict(repetition_penalty=0), "--repetition-penalty must be > 0"),
])
def test_bad_sampling_params(kw, message):
    with pytest.raises(LLMLabError, match=message.replace("(", r"\(").replace("]", r"\]")):
        SamplingParams(**kw)


# -- errors ----------------------------------------------------------------------------------------------
def test_context_length_error_names_both_numbers_and_the_option():
    model = tiny_model()  # max_position_embeddings 128
    with pytest.raises(LLMLabError) as e:
        run(model, [list(range(3, 103))], 29)
    assert str(e.value) == ("prompt of 100 tokens + --max-new-tokens 29 = 129 exceeds the model's context of 128 "
                            "tokens (max_position_embeddings); lower --max-new-tokens or shorten the prompt")
    assert run(model, [list(range(3, 103))], 28)  # exactly the context is fine


def test_empty_and_out_of_vocab_prompts():
    model = tiny_model()
    with pytest.raises(LLMLabError, match=r"prompt 1 is empty \(0 tokens\)"):
        run(model, [[1, 2], []], 4)
    with pytest.raises(LLMLabError, match=r"prompt 0 has token ids \[256\] outside the model's vocabulary of 256"):
        run(model, [[1, 256]], 4)
    with pytest.raises(LLMLabError, match="--max-new-tokens must be at least 1"):
        run(model, [[1, 2]], 0)


# -- text --------------------------------------------------------------------------------------------------
def test_streaming_detokenizer_reassembles_multibyte_characters(tokenizer):
    text = "Hello 🙂 wörld — 日本語 ok 👍🏽!"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)  # never a partial character
    assert "" in pieces  # some tokens were held back until their character was complete


def test_text_stream_cuts_at_stop_string_and_never_prints_part_of_it(tokenizer):
    ids = tokenizer.encode("Assistant: hello there\nUser: hi")
    s = TextStream(tokenizer, stop=["\nUser:"])
    pieces = []
    for t in ids:
        pieces.append(s.add(t))
        if s.stopped:
            break
    pieces.append(s.finish())
    assert s.stopped and s.text == "Assistant: hello there" == "".join(pieces)
    # a partial match that never completes is printed once generation ends
    s = TextStream(tokenizer, stop=["\nUser:"])
    printed = "".join(s.add(t) for t in tokenizer.encode("hi\nUs"))
    assert printed == "hi" and s.finish() == "\nUs" and not s.stopped
    with pytest.raises(LLMLabError, match="--stop: stop strings must not be empty"):
        TextStream(tokenizer, stop=[""])


def test_stop_strings_and_eos_end_generation_and_are_excluded(tokenizer):
    model = tiny_model(tokenizer.vocab_size)
    prompt = tokenizer.encode("Hello world")
    full = generate(model, tokenizer, [prompt], 30, eos_ids=())[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 30
    assert full.text == tokenizer.decode(full.token_ids)
    stop = full.text[len(full.text) // 2:][:2]
    cut = generate(model, tokenizer, [prompt], 30, eos_ids=(), stop=[stop])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    assert "".join(stream(model, tokenizer, prompt, 30, eos_ids=(), stop=[stop])) == cut.text
    other = tokenizer.encode("The capital")
    batch = generate(model, tokenizer, [prompt, other], 30, eos_ids=(), stop=[stop])
    assert batch == [cut, generate(model, tokenizer, [other], 30, eos_ids=(), stop=[stop])[0]]
    eos = full.token_ids[5]
    ended = generate(model, tokenizer, [prompt], 30, eos_ids={eos})[0]
    first = full.token_ids.index(eos)
    assert ended.finish_reason == "stop" and ended.token_ids == full.token_ids[:first]
    assert ended.text == tokenizer.decode(full.token_ids[:first])


def test_chat_session_keeps_history_resets_and_drops_old_turns(tokenizer):
    model = tiny_model(tokenizer.vocab_size)
    session = ChatSession(model, tokenizer, system="Be brief.", max_new_tokens=8, eos_ids=())
    first = "".join(session.send("hi"))
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    assert session.messages[-1]["content"] == first
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]
    assert "".join(session.send("hi")) == first  # greedy: same history, same answer
    for _ in range(6):  # long turns overflow the 128-token context: the oldest turns go, the system stays
        "".join(session.send("hello world " * 4))
    assert session.messages[0]["role"] == "system" and len(session.messages) < 13
    assert len(tokenizer.encode_chat(session.messages)) <= 128
    before = len(session.messages)
    with pytest.raises(LLMLabError, match="exceeds the model's context"):
        "".join(session.send("hello " * 200))
    assert len(session.messages) == before  # the unanswerable message left the history, which is kept


def test_eos_token_ids_from_tokenizer_and_generation_config(tokenizer):
    assert eos_token_ids(tokenizer, {}) == {tokenizer.eos_id}
    assert eos_token_ids(tokenizer, {"eos_token_id": [0, 7]}) == {tokenizer.eos_id, 0, 7}
    assert eos_token_ids(tokenizer, {"eos_token_id": 9}) == {tokenizer.eos_id, 9}


# -- parity with HF transformers ---------------------------------------------------------------------------
def test_greedy_matches_hf_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model()
    save_checkpoint(model, tmp_path / "ckpt")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    prompt = [1, 40, 41, 42, 43]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    eos = model.config.eos_token_id
    ours = run(model, [prompt], 20, eos_ids={eos})[0]
    assert ours == (ref[:ref.index(eos)] if eos in ref else ref) and len(ours) > 5


# -- command line ------------------------------------------------------------------------------------------
@pytest.fixture
def ckpt(tmp_path, tokenizer) -> Path:
    """A tiny random checkpoint with the test tokenizer; no EOS, so every reply has max_new_tokens tokens."""
    model = tiny_model(tokenizer.vocab_size, eos_token_id=None, bos_token_id=None)
    no_eos = Tokenizer(tokenizer.backend, pad_token="<|endoftext|>", chat_template=CHATML)
    return save_checkpoint(model, tmp_path / "ckpt", tokenizer=no_eos)


def cli_model(ckpt: Path):
    """The model and tokenizer the commands run: loaded with the same defaults (dtype auto: bf16 on a CPU that
    computes it natively), so their output can be compared token for token."""
    from llmlab.loading import load_for_inference

    model, tok, _ = load_for_inference(ckpt)
    return model, tok


def test_cli_generate_streams_text(ckpt, capsys):
    assert main(["generate", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "12", "--chat", "false"]) == 0
    model, tok = cli_model(ckpt)
    expected = generate(model, tok, [tok.encode("Hello")], 12)[0].text
    out = capsys.readouterr().out
    assert out == expected + "\n" and expected.strip()
    # the chat template is the default when the tokenizer has one
    assert main(["generate", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "12", "--system", "Be kind."]) == 0
    ids = tok.encode_chat([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"}])
    assert capsys.readouterr().out == generate(model, tok, [ids], 12)[0].text + "\n"


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "hi", "--chat", "false", "--system", "x"], "--system needs the chat template"),
    (["--prompt", "hi", "--max-new-tokens", "500"], "exceeds the model's context of 128 tokens"),
    (["--prompt", "hi", "--top-p", "1.5"], "--top-p must be in"),
    (["--prompt", "hi", "--dtype", "int8"], "--dtype: expected auto, float32, bfloat16, float16; got 'int8'"),
])
def test_cli_generate_errors(ckpt, capsys, args, message):
    assert main(["generate", str(ckpt), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmlab: error: ") and message in err


def test_cli_chat_reset_and_exit(ckpt, capsys, monkeypatch):
    model, tok = cli_model(ckpt)
    session = ChatSession(model, tok, max_new_tokens=10)
    first = "".join(session.send("hi"))
    second = "".join(session.send("hi"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nhi\n/reset\n\nhi\n/exit\nnever answered\n"))
    assert main(["chat", str(ckpt), "--max-new-tokens", "10"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{first}\n{second}\n{first}\n"
    assert "> " not in captured.out  # no prompt when stdin is not a terminal
    assert "history cleared" in captured.err


@pytest.mark.slow  # a fresh interpreter imports torch: ~10 s on a busy 2-core machine
def test_cli_chat_with_piped_stdin_in_a_subprocess(ckpt):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, "-m", "llmlab.cli", "chat", str(ckpt), "--max-new-tokens", "6"],
                          input="What is the capital of France?\n", capture_output=True, text=True, env=env,
                          encoding="utf-8", timeout=120)
    assert proc.returncode == 0, proc.stderr
    model, tok = cli_model(ckpt)
    expected = "".join(ChatSession(model, tok, max_new_tokens=6).send("What is the capital of France?"))
    assert proc.stdout == expected + "\n"


def test_cli_chat_needs_a_chat_template(ckpt, capsys):
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    assert main(["chat", str(ckpt)]) == 2
    assert "has no chat template" in capsys.readouterr().err


# -- the default model (SmolLM2-135M-Instruct) ---------------------------------------------------------------
@pytest.mark.slow
def test_chat_on_the_default_model_knows_the_capital_of_france(default_ckpt):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, "-m", "llmlab.cli", "chat", str(default_ckpt), "--temperature", "0",
                           "--max-new-tokens", "40"], input="What is the capital of France?\n",
                          capture_output=True, text=True, env=env, encoding="utf-8", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


@pytest.mark.slow
def test_greedy_matches_hf_generate_on_the_default_model(default_ckpt):
    transformers = pytest.importorskip("transformers")
    from llmlab.checkpoint import load_checkpoint

    tok = Tokenizer.from_folder(default_ckpt)
    prompt = tok.encode_chat([{"role": "user", "content": "Write a haiku about the sea."}])
    hf = transformers.LlamaForCausalLM.from_pretrained(default_ckpt, dtype=torch.float32).eval()
    ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    ours = run(load_checkpoint(default_ckpt), [prompt], 20, eos_ids={tok.eos_id})[0]
    assert len(ours) == 20 and ours == ref


def test_sampling_never_picks_a_filtered_token_at_the_top_of_the_draw(monkeypatch):
    logits = torch.tensor([[2.0, 1.0, -5.0, -6.0]])
    real = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **kw: torch.full_like(real(*a, **kw), 1 - 2 ** -53))
    assert sample(logits, SamplingParams(temperature=1.0, top_k=2)).item() == 1  # the last kept token, not 3
    monkeypatch.setattr(torch, "rand", lambda *a, **kw: torch.zeros_like(real(*a, **kw)))
    assert sample(logits, SamplingParams(temperature=1.0, top_k=2)).item() == 0


def test_sampling_overflowed_logits_still_give_a_token_id():
    logits = torch.tensor([[float("nan")] * 4, [1.0, 2.0, 0.0, 0.0]])
    picked = sample(logits, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    assert picked.shape == (2, 1) and 0 <= int(picked.min()) and int(picked.max()) < 4
