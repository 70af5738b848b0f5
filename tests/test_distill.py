"""Distillation through the loop on tiny models: student initialisation, the teacher cache, on-policy batches,
distillation vs labels alone, the CLI, and the error messages for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _corpus import make_text
from _tiny import task_records, tiny_checkpoint, write_jsonl

from llmlab.args import DistillConfig, TrainConfig
from llmlab.checkpoint import load_checkpoint, load_safetensors, save_checkpoint
from llmlab.cli import main
from llmlab.config import ModelConfig
from llmlab.data import prepare
from llmlab.distill import distill
from llmlab.distill_losses import ForwardKL
from llmlab.distill_method import (
    DistillMethod,
    check_same_tokenizer,
    load_data,
    make_student,
    parse_layers,
    student_from_teacher,
)
from llmlab.errors import LLMLabError
from llmlab.instruct import InstructDataset
from llmlab.methods import Full
from llmlab.model import build_model
from llmlab.tokenizer import Tokenizer, train_bpe_tokenizer
from llmlab.train import train


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 4-block teacher (vocab 300) whose large init makes its distributions peaked."""
    folder = tmp_path_factory.mktemp("teacher")
    tok = Tokenizer.from_folder(tiny_checkpoint(folder / "two-blocks"))
    cfg = ModelConfig.from_name("tiny", vocab_size=300, num_hidden_layers=4)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_id, tok.eos_id, tok.pad_id
    torch.manual_seed(3)
    model = build_model(cfg)
    model.init_weights(0.3)
    return save_checkpoint(model, folder / "ckpt", tokenizer=tok)


@pytest.fixture(scope="module")
def instruct_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "animals.jsonl", task_records(40))


def small_config(**overrides: object) -> TrainConfig:
    base = dict(lr=3e-3, warmup_steps=1, max_steps=4, batch_size=4, seq_len=48, eval_every=0, eval_batches=1,
                save_every=0, keep_last=0, log_every=1, seed=0)
    return TrainConfig(**{**base, **overrides})


# -- student initialisation --------------------------------------------------------------------------
def test_parse_layers() -> None:
    assert parse_layers("every-other", 6) == [0, 2, 4]
    assert parse_layers("every-other", 30) == list(range(0, 30, 2))
    assert parse_layers("every-3", 7) == [0, 3, 6]
    assert parse_layers("1, 3", 4) == [1, 3]
    assert parse_layers([0, 2], 4) == [0, 2]


@pytest.mark.parametrize("spec, message", [
    ("", "expected block ids like 0,2,4"),
    ("a,b", "expected block ids like 0,2,4"),
    ("0,0", "block ids must be increasing and unique"),
    ("2,1", "block ids must be increasing and unique"),
    ("1,4", r"block ids \[4\] are outside the teacher's 0..3"),
    ("-1", r"block ids \[-1\] are outside"),
    ("every-0", "expected every-N with N a positive integer"),
])
def test_parse_layers_errors(spec: str, message: str) -> None:
    with pytest.raises(LLMLabError, match=f"--student-layers '{spec}': {message}"):
        parse_layers(spec, 4)


def test_student_from_teacher_keeps_the_chosen_blocks(teacher_ckpt: Path) -> None:
    teacher = load_checkpoint(teacher_ckpt)
    student = student_from_teacher(teacher, [1, 3])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    t_sd = teacher.state_dict()
    for name, value in student.state_dict().items():
        if name.startswith("model.layers."):
            new, rest = name[len("model.layers."):].split(".", 1)
            name = f"model.layers.{[1, 3][int(new)]}.{rest}"
        torch.testing.assert_close(value, t_sd[name], rtol=0, atol=0)
    with torch.no_grad():  # copies, not views: training the student leaves the teacher alone
        student.model.embed_tokens.weight.add_(1.0)
        student.model.layers[0].mlp.down_proj.weight.add_(1.0)
    assert not torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert not torch.equal(student.model.layers[0].mlp.down_proj.weight, teacher.model.layers[1].mlp.down_proj.weight)
    everything = student_from_teacher(teacher, [0, 1, 2, 3])
    ids = torch.randint(0, 300, (2, 10))
    torch.testing.assert_close(everything(ids), teacher(ids))


def test_make_student_from_preset_checkpoint_or_layers(teacher_ckpt: Path, tmp_path: Path) -> None:
    teacher, tok = load_checkpoint(teacher_ckpt), Tokenizer.from_folder(teacher_ckpt)
    random = make_student("tiny", None, teacher, "T", tok)  # preset vocab 256 -> the teacher's 300
    assert random.config.vocab_size == 300 and random.config.num_hidden_layers == 2
    assert random.config.eos_token_id == teacher.config.eos_token_id
    saved = save_checkpoint(random, tmp_path / "student", tokenizer=tok)
    again = make_student(saved, None, teacher, "T", tok)
    torch.testing.assert_close(again.lm_head.weight, random.lm_head.weight)
    assert make_student(None, "every-other", teacher, "T", tok).config.num_hidden_layers == 2
    with pytest.raises(LLMLabError, match="give either --student .* or --student-layers"):
        make_student("tiny", "every-other", teacher, "T", tok)
    with pytest.raises(LLMLabError, match="no student: give --student"):
        make_student(None, None, teacher, "T", tok)


def test_different_tokenizers_are_refused(teacher_ckpt: Path, tmp_path: Path) -> None:
    teacher, tok = load_checkpoint(teacher_ckpt), Tokenizer.from_folder(teacher_ckpt)
    other_tok = train_bpe_tokenizer([make_text(400, seed=5)] * 3, 300, eos_token="<|im_end|>")
    other = save_checkpoint(build_model(ModelConfig.from_name("tiny", vocab_size=300)), tmp_path / "other",
                            tokenizer=other_tok)
    with pytest.raises(LLMLabError, match="the teacher T and student .*other have different tokenizers .*"
                                          "must use the teacher's tokenizer"):
        make_student(other, None, teacher, "T", tok)
    (tmp_path / "corpus.txt").write_text(make_text(600))
    data = prepare([tmp_path / "corpus.txt"], tmp_path / "data", train_tokenizer=300, val_fraction=0.2,
                   progress=False)
    with pytest.raises(LLMLabError, match="the teacher T and the data .*data have different tokenizers"):
        load_data(data, tok, small_config(seq_len=16), "T")
    check_same_tokenizer(tok, Tokenizer.from_folder(teacher_ckpt), "T", "same")  # no error


def test_student_with_another_vocabulary_is_refused(teacher_ckpt: Path) -> None:
    teacher = load_checkpoint(teacher_ckpt)
    method = DistillMethod(teacher)
    with pytest.raises(LLMLabError, match="student vocab_size 256 != teacher vocab_size 300"):
        method.prepare(build_model(ModelConfig.from_name("tiny")))


def test_bad_distillation_options() -> None:
    cases = [(dict(cache=True), "set top_k too"), (dict(loss="kl"), "'loss' must be one of"),
             (dict(on_policy_fraction=1.5), "'on_policy_fraction' must be in"),
             (dict(teacher_dtype="int8"), "'teacher_dtype' must be one of"), (dict(top_k=0), "'top_k' must be"),
             (dict(loss="jsd", beta=0.0), "'beta' must be strictly between")]
    for options, message in cases:
        with pytest.raises(LLMLabError, match=message):
            DistillConfig(**options).validate()


# -- the method --------------------------------------------------------------------------------------
def test_teacher_is_frozen_and_cache_reuse_gives_the_same_loss(teacher_ckpt: Path, instruct_file: Path,
                                                               tmp_path: Path) -> None:
    tok = Tokenizer.from_folder(teacher_ckpt)
    ds = InstructDataset(instruct_file, tok, 48, seed=0)
    kd = DistillConfig(loss="jsd", top_k=5, cache=True, alpha=0.7)
    path = tmp_path / "cache.safetensors"

    def fresh(cache: bool) -> tuple[DistillMethod, torch.nn.Module]:
        torch.manual_seed(0)
        student = build_model(ModelConfig.from_name("tiny", vocab_size=300))
        options = DistillConfig(**{**kd.__dict__, "cache": cache})
        method = DistillMethod(load_checkpoint(teacher_ckpt), options, data=ds, cache_path=path, cache_batch_size=4)
        return method, method.prepare(student)

    live, student = fresh(cache=False)
    assert not any(p.requires_grad for p in live.teacher.parameters()) and not live.teacher.training
    batches = [ds.train_batch(s, 4) for s in (0, 4, 40)]  # 40: the second epoch
    expected = [live.loss(student, b).item() for b in batches]
    built, student = fresh(cache=True)
    assert path.is_file() and built.cache is not None
    assert [built.loss(student, b).item() for b in batches] == pytest.approx(expected, rel=1e-5)
    assert built.cache.hits == 12 and built.cache.misses == 0
    stamp = path.stat().st_mtime_ns
    reused, student = fresh(cache=True)
    assert path.stat().st_mtime_ns == stamp  # read, not rebuilt
    assert [reused.loss(student, b).item() for b in batches] == pytest.approx(expected, rel=1e-5)
    kd.top_k = 6
    with pytest.raises(LLMLabError, match="cache.safetensors is a teacher cache of another setup: top_k '5' "
                                          "\\(this run: '6'\\)"):
        fresh(cache=True)
    path.write_bytes(b"not safetensors")
    with pytest.raises(LLMLabError, match="cannot read the teacher cache"):
        fresh(cache=True)


def test_on_policy_batches_are_student_samples_scored_by_the_teacher(teacher_ckpt: Path,
                                                                      instruct_file: Path) -> None:
    tok = Tokenizer.from_folder(teacher_ckpt)
    ds = InstructDataset(instruct_file, tok, 48, seed=0)
    method = DistillMethod(load_checkpoint(teacher_ckpt), DistillConfig(on_policy_fraction=1.0, on_policy_tokens=6),
                           pad_id=tok.pad_id, eos_id=tok.eos_id)
    torch.manual_seed(0)
    student = method.prepare(build_model(ModelConfig.from_name("tiny", vocab_size=300)))
    batch = ds.train_batch(0, 3)
    torch.manual_seed(1)
    made = method.on_policy_batch(batch)
    torch.manual_seed(1)
    assert torch.equal(method.on_policy_batch(batch)["input_ids"], made["input_ids"])  # seeded by torch's RNG
    for row in range(3):
        first = int((batch["labels"][row] != -100).nonzero()[0])  # the prompt is kept, the response resampled
        assert torch.equal(made["input_ids"][row, : first + 1], batch["input_ids"][row, : first + 1])
        assert (made["labels"][row, :first] == -100).all()
        scored = made["labels"][row] != -100
        assert 1 <= int(scored.sum()) <= 7  # up to 6 samples (+ EOS when sampled)
        torch.testing.assert_close(made["labels"][row, first: first + 5][scored[first: first + 5]],
                                   made["input_ids"][row, first + 1: first + 6][scored[first: first + 5]])
    assert all(layer.self_attn.kv_cache is None for layer in student.model.layers) and student.training
    loss = method.loss(student, batch)
    loss.backward()
    assert torch.isfinite(loss) and student.lm_head.weight.grad.abs().sum() > 0
    student.eval()  # evaluation never samples: the batch's own labels are scored
    torch.testing.assert_close(method.loss(student, batch), method.criterion(
        student(batch["input_ids"]), method.teacher(batch["input_ids"]), batch["labels"]))


# -- through the loop --------------------------------------------------------------------------------
class TeacherSamples:
    """Token rows sampled from a teacher, as the loop's data: the labels are draws from the teacher's distribution,
    the classic setting in which its full distribution (distillation) carries more than one sample (labels)."""

    def __init__(self, teacher: torch.nn.Module, rows: int, length: int, n_val: int) -> None:
        from llmlab.generate import SamplingParams, generate_tokens

        prompts = torch.randint(3, teacher.config.vocab_size, (rows, 1), generator=torch.Generator().manual_seed(0))
        out = prompts.tolist()
        for step in generate_tokens(teacher, out, length, SamplingParams(temperature=1.0, seed=0)):
            for r, t in enumerate(step):
                out[r].append(t)
        data = torch.tensor(out)
        self.val, self.train = data[:n_val], data[n_val:]

    @staticmethod
    def _batch(rows: torch.Tensor, start: int, size: int) -> dict[str, torch.Tensor]:
        picked = rows[torch.arange(start, start + size) % len(rows)]
        return {"input_ids": picked[:, :-1], "labels": picked[:, 1:]}

    def train_batch(self, start: int, size: int) -> dict[str, torch.Tensor]:
        return self._batch(self.train, start, size)

    def val_batch(self, start: int, size: int) -> dict[str, torch.Tensor]:
        return self._batch(self.val, start, size)


@pytest.mark.slow
def test_distillation_gets_closer_to_the_teacher_than_labels_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = build_model(ModelConfig.from_name("tiny", vocab_size=64))
    teacher.init_weights(0.3)  # peaked, context-dependent distributions
    teacher.eval()
    data = TeacherSamples(teacher, rows=320, length=32, n_val=64)

    def student() -> torch.nn.Module:
        torch.manual_seed(1)
        return build_model(ModelConfig.from_name("tiny", vocab_size=64, num_hidden_layers=1, hidden_size=32,
                                                 intermediate_size=64))

    @torch.no_grad()
    def held_out_kl(model: torch.nn.Module) -> float:
        batch = data.val_batch(0, 64)
        return ForwardKL()(model(batch["input_ids"]), teacher(batch["input_ids"])).item()

    cfg = small_config(max_steps=30, seq_len=32, batch_size=8, lr=1e-2)  # the same budget for both
    untrained = held_out_kl(student())
    labels_only = held_out_kl(load_checkpoint(train(student(), Full(), data, cfg, tmp_path / "ce").final))
    method = DistillMethod(teacher, DistillConfig(loss="forward_kl", alpha=1.0))
    distilled = held_out_kl(load_checkpoint(train(student(), method, data, cfg, tmp_path / "kd").final))
    assert distilled < labels_only - 0.02 and labels_only < untrained


@pytest.mark.slow
def test_distill_resumes_exactly(teacher_ckpt: Path, instruct_file: Path, tmp_path: Path) -> None:
    def run(out: Path, **overrides: object) -> Path:
        distill(teacher=teacher_ckpt, data=instruct_file, out=out, student_layers="0,3",
                train=small_config(**overrides), kd=DistillConfig(loss="reverse_kl", top_k=8))
        return out / "final"

    whole = run(tmp_path / "whole")
    run(tmp_path / "split", stop_at=2, save_every=2)
    assert not (tmp_path / "split" / "final").exists()
    split = run(tmp_path / "split")
    a, b = load_safetensors(whole), load_safetensors(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_distill(teacher_ckpt: Path, instruct_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(teacher_ckpt), "--data", str(instruct_file), "--out", str(out),
            "--student-layers", "every-other", "--kd.loss", "jsd", "--kd.top-k", "4", "--kd.cache", "true",
            "--train.max-steps", "2", "--train.batch-size", "4", "--train.seq-len", "48", "--train.eval-batches", "1",
            "--train.save-every", "0"]
    assert main(args) == 0
    student = load_checkpoint(out / "final")
    assert student.config.num_hidden_layers == 2 and (out / "teacher_topk.safetensors").is_file()
    assert Tokenizer.from_folder(out / "final").vocab_size == 300
    assert main(["distill", "--teacher", str(teacher_ckpt), "--data", str(instruct_file), "--out", str(tmp_path / "x"),
                 "--student-layers", "0,9"]) == 2
    assert "llmlab: error: --student-layers '0,9': block ids [9] are outside the teacher's 0..3" in \
        capsys.readouterr().err
    assert main(["distill", "--teacher", str(teacher_ckpt), "--data", str(instruct_file), "--out", str(tmp_path / "y"),
                 "--student", "tiny", "--train.seq-len", "4096"]) == 2
    assert "seq_len 4096 exceeds the teacher's context of 128" in capsys.readouterr().err


@pytest.mark.parametrize("native", [True, False])
def test_distill_auto_precision_follows_the_cpu(native: bool, teacher_ckpt: Path, instruct_file: Path,
                                                tmp_path: Path, monkeypatch) -> None:
    from _tiny import record_autocast

    chosen = record_autocast(monkeypatch, native)
    distill(teacher=teacher_ckpt, data=instruct_file, out=tmp_path / "run", student_layers="0,3",
            train=small_config(max_steps=1))
    assert chosen == [torch.bfloat16 if native else None]
