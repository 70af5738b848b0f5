import itertools
import math

import pytest
import torch
from _tiny import generated_ids as run
from _tiny import tiny_checkpoint, tiny_tokenizer

from llmlab.checkpoint import save_checkpoint
from llmlab.cli import main
from llmlab.config import ModelConfig
from llmlab.errors import LLMLabError
from llmlab.generate import SamplingParams, generate, sampling_logits
from llmlab.model import build_model
from llmlab.speculative import Draft
from llmlab.tokenizer import train_bpe_tokenizer


def tiny_model(vocab_size: int = 256, seed: int = 0, std: float = 0.1, **overrides):
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_name("tiny", vocab_size=vocab_size, **overrides))
    model.init_weights(std=std)  # peaky logits: no near-ties for greedy decoding to flip on
    return model.eval()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12], [200, 201, 202, 203]]


# -- greedy: token for token what decoding without a draft gives ---------------------------------------
@pytest.mark.parametrize("k,adaptive", [(1, False), (4, False), (3, True)])
def test_greedy_with_a_different_draft_equals_plain_decoding(k, adaptive):
    target = tiny_model(seed=0)
    draft = Draft(tiny_model(seed=1, num_hidden_layers=1), k, adaptive)
    assert run(target, PROMPTS, 30, draft=draft) == run(target, PROMPTS, 30)
    assert draft.stats.verifies > 0 and draft.stats.tokens == 90
    assert target.max_cache_len == 0 and draft.model.max_cache_len == 0  # both caches released


def test_the_model_as_its_own_draft_is_always_right():
    target = tiny_model(seed=0)
    draft = Draft(tiny_model(seed=0), 4)  # the same weights, loaded apart: its own KV cache
    assert run(target, PROMPTS, 30, draft=draft) == run(target, PROMPTS, 30)
    assert draft.stats.acceptance_rate == 1.0
    # every check keeps all its drafts and adds one token: 30 tokens = the first + 5 rounds of 4 + 1 + a last round
    assert draft.stats.accepted_per_verify > 3


def test_greedy_with_a_repetition_penalty_equals_plain_decoding():
    target, params = tiny_model(seed=0), SamplingParams(repetition_penalty=1.5)
    for draft in (Draft(tiny_model(seed=0), 4), Draft(tiny_model(seed=2), 3)):
        assert run(target, PROMPTS, 25, sampling=params, draft=draft) == run(target, PROMPTS, 25, sampling=params)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 9])
def test_max_new_tokens_is_exact_whatever_the_rounds(n):
    target = tiny_model(seed=0)
    for draft in (Draft(tiny_model(seed=0), 4), Draft(tiny_model(seed=1), 4)):
        got = run(target, [[3, 4, 5]], n, draft=draft)
        assert got == run(target, [[3, 4, 5]], n) and len(got[0]) == n


def test_eos_inside_an_accepted_run_ends_the_output_there():
    target = tiny_model(seed=0)
    plain = run(target, [[3, 4, 5]], 20)[0]
    eos = plain[7]  # the 8th token (within a round of kept drafts): nothing from it on is yielded
    first = plain.index(eos)
    for draft in (Draft(tiny_model(seed=0), 4), Draft(tiny_model(seed=1), 2)):
        got = run(target, [[3, 4, 5]], 20, eos_ids=[eos], draft=draft)[0]
        assert got == plain[:first]


def test_stop_strings_and_eos_through_generate():
    tok = tiny_tokenizer()
    target, other = tiny_model(300, seed=0), tiny_model(300, seed=3)
    prompts = [tok.encode("Write a short poem"), tok.encode("hello")]
    plain = generate(target, tok, prompts, 24, eos_ids=[])
    stop = plain[0].text[len(plain[0].text) // 2:][:3]
    assert stop.strip()
    for draft in (Draft(tiny_model(300, seed=0), 4), Draft(other, 3)):
        for kw in ({"stop": [stop]}, {"eos_ids": [plain[1].token_ids[5]]}, {}):
            want = generate(target, tok, prompts, 24, **{"eos_ids": [], **kw})
            got = generate(target, tok, prompts, 24, draft=draft, **{"eos_ids": [], **kw})
            assert [(c.text, c.token_ids, c.finish_reason) for c in got] == \
                [(c.text, c.token_ids, c.finish_reason) for c in want]
    assert generate(target, tok, prompts[:1], 24, eos_ids=[], stop=[stop])[0].finish_reason == "stop"


def test_a_logits_processor_decodes_without_the_draft():
    target, draft = tiny_model(seed=0), Draft(tiny_model(seed=1), 4)

    def no_low_ids(ids, logits):
        return logits.masked_fill(torch.arange(logits.numel()) < 128, float("-inf"))

    got = run(target, [[3, 4]], 10, logits_processors=[no_low_ids], draft=draft)
    assert got == run(target, [[3, 4]], 10, logits_processors=[no_low_ids]) and min(got[0]) >= 128
    assert draft.stats.verifies == 0


def test_draft_errors_are_clear():
    target = tiny_model(seed=0)
    with pytest.raises(LLMLabError, match="draft's vocabulary has 128 tokens but the model's has 256"):
        run(target, [[3]], 5, draft=Draft(tiny_model(128, seed=1)))
    with pytest.raises(LLMLabError, match="model object itself"):
        run(target, [[3]], 5, draft=Draft(target))
    with pytest.raises(LLMLabError, match="--draft_tokens must be from 1 to 16, got 0"):
        Draft(target, 0)
    short = Draft(tiny_model(seed=1, max_position_embeddings=16))
    with pytest.raises(LLMLabError, match="draft's context of 16"):
        run(target, [[3, 4, 5]], 20, draft=short)


# -- sampling: the output distribution is the model's --------------------------------------------------
def exact_distribution(model, prompt, params, n):
    """P(first n new tokens) of plain sampling, by enumeration over a tiny vocabulary: {tuple: probability}."""
    V = model.config.vocab_size
    out = {}
    with torch.no_grad():
        for seq in itertools.product(range(V), repeat=n - 1):
            ids = torch.tensor([prompt + list(seq)])
            logits = model(ids)[0].float()[len(prompt) - 1:]  # (n, V): after the prompt and each token
            probs = []
            for i in range(n):
                seen = torch.zeros(1, V, dtype=torch.bool)
                seen[0, prompt + list(seq[:i])] = True
                probs.append(sampling_logits(logits[i:i + 1], params, seen).softmax(-1)[0])
            for last in range(V):
                p = 1.0
                for i, t in enumerate((*seq, last)):
                    p *= float(probs[i][t])
                out[(*seq, last)] = p
    return out


@pytest.mark.parametrize("params", [
    pytest.param(SamplingParams(temperature=1.0, seed=0), marks=pytest.mark.slow),  # the second case covers it too
    SamplingParams(temperature=0.8, top_k=5, top_p=0.95, repetition_penalty=1.4, seed=1)])
def test_sampling_with_a_draft_keeps_the_models_distribution(params):
    # 3 new tokens: the 1st comes from the prefill, the 2nd is a drafted token kept or replaced by a draw from
    # max(0, p - q), the 3rd the bonus token after a kept draft (or a plain step): compare P(2nd, 3rd) with the exact
    V, prompt, n, N = 8, [1, 2, 3], 3, 2000
    target = tiny_model(V, seed=0, std=0.6)
    draft_model = tiny_model(V, seed=5, std=0.6, num_hidden_layers=1)

    def last_two(joint):
        out: dict[tuple, float] = {}
        for key, p in joint.items():
            out[key[1:]] = out.get(key[1:], 0.0) + p
        return out

    want = last_two(exact_distribution(target, prompt, params, n))
    draft_alone = last_two(exact_distribution(draft_model, prompt, params, n))
    draft = Draft(draft_model, 4)
    counts: dict[tuple, int] = {}
    for row in run(target, [prompt] * N, n, sampling=params, draft=draft):
        counts[tuple(row[1:])] = counts.get(tuple(row[1:]), 0) + 1
    assert draft.stats.proposed == N and 0 < draft.stats.acceptance_rate < 1  # the rule really rejected some
    tv = 0.5 * sum(abs(counts.get(key, 0) / N - p) for key, p in want.items())
    tv_draft = 0.5 * sum(abs(draft_alone[key] - p) for key, p in want.items())
    noise = 0.5 * sum(math.sqrt(2 * p * (1 - p) / (math.pi * N)) for p in want.values())  # E|TV| of N exact draws
    assert tv < 2 * noise < tv_draft, (tv, noise, tv_draft)  # deterministic: the seed fixes the draws


# -- the command line --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    target = tiny_checkpoint(root / "target", seed=0, std=0.1)
    draft = tiny_checkpoint(root / "draft", seed=1, preset="tiny", std=0.1)
    other_tok = train_bpe_tokenizer(["completely different text for another vocabulary"] * 20, 300,
                                    eos_token="<|im_end|>")
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny", vocab_size=300))
    other = save_checkpoint(model, root / "other", tokenizer=other_tok)
    return target, draft, other


def test_cli_generate_with_a_draft_prints_what_plain_decoding_prints(ckpts, capsys):
    target, draft, _ = ckpts
    args = ["generate", str(target), "--prompt", "Hello", "--max-new-tokens", "16", "--chat", "false"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--draft", str(draft), "--draft-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == plain and "draft kept" in out.err


def test_cli_chat_with_a_draft(ckpts, capsys, monkeypatch):
    target, draft, _ = ckpts
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Hi\n"))
    assert main(["chat", str(target), "--max-new-tokens", "10"]) == 0
    plain = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Hi\n"))
    assert main(["chat", str(target), "--max-new-tokens", "10", "--draft", str(draft)]) == 0
    assert capsys.readouterr().out == plain


@pytest.mark.parametrize("which,extra,message", [
    ("missing", [], "--draft .*nowhere: no such checkpoint folder or GGUF file"),
    ("other", [], "--draft .*other: its tokenizer differs from the model's"),
    ("draft", ["--draft-tokens", "0"], "--draft_tokens must be from 1 to 16, got 0"),
])
def test_cli_draft_errors(ckpts, capsys, which, extra, message):
    target, draft, other = ckpts
    path = {"missing": target.parent / "nowhere", "other": other, "draft": draft}[which]
    args = ["generate", str(target), "--prompt", "Hi", "--max-new-tokens", "4", "--draft", str(path), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmlab: error: ") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err


# -- the default model -------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_with_its_every_other_layer_student_decodes_the_same_text(default_ckpt):
    from llmlab.distill_method import parse_layers, student_from_teacher
    from llmlab.loading import load_for_inference

    model, tok, _ = load_for_inference(default_ckpt, device="cpu", dtype="float32", quantize="none")
    student = student_from_teacher(model, parse_layers("every-other", model.config.num_hidden_layers)).eval()
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
    plain = generate(model, tok, [prompt], 40, eos_ids=[])[0]  # past the answer's end: longer than one round
    draft = Draft(student, 4)
    spec = generate(model, tok, [prompt], 40, eos_ids=[], draft=draft)[0]
    assert (spec.text, spec.token_ids) == (plain.text, plain.token_ids) and len(plain.token_ids) == 40
    assert draft.stats.verifies > 5  # (untrained, the student is seldom right: this checks the output, not speed)

