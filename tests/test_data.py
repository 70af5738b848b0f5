"""Pretraining data: corpus -> token files (prepare) and deterministic batches (TokenDataset)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _corpus import make_text

from llmlab.data import BLOCK_CHARS, TokenDataset, prepare, token_dtype
from llmlab.errors import LLMLabError
from llmlab.tokenizer import Tokenizer, train_bpe_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "a.txt").write_text(make_text(2000, seed=1))  # several blocks of BLOCK_CHARS
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": make_text(5, seed=i), "id": i}) + "\n"
                                               for i in range(40)))
    return folder


@pytest.fixture(scope="module")
def data_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare([corpus], tmp_path_factory.mktemp("d") / "data", train_tokenizer=300, val_fraction=0.1,
                   progress=False)


def read_tokens(data_dir: Path, split: str) -> np.ndarray:
    meta = json.loads((data_dir / "meta.json").read_text())
    return np.fromfile(data_dir / f"{split}.bin", dtype=meta["dtype"])


def test_prepare_writes_tokens_meta_and_tokenizer(corpus: Path, data_dir: Path) -> None:
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and 256 < meta["vocab_size"] <= 300  # a small corpus may give fewer merges
    assert meta["documents"] == 41  # the text file + 40 JSONL records
    train, val = read_tokens(data_dir, "train"), read_tokens(data_dir, "val")
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert 0.03 < len(val) / (len(train) + len(val)) < 0.25  # val_fraction 0.1 in blocks of ~2k tokens
    tok = Tokenizer.from_folder(data_dir)
    eos = meta["eos_id"]
    assert eos == tok.eos_id and int((train == eos).sum() + (val == eos).sum()) == 41  # one EOS per document
    # byte-level BPE is lossless: the tokens decode back to the corpus, block by block
    corpus_text = (corpus / "a.txt").read_text()
    assert tok.decode(train[:200].tolist()) in corpus_text or tok.decode(val[:200].tolist()) in corpus_text
    assert (data_dir / "tokenizer_config.json").is_file()


def test_prepare_single_document_round_trips(tmp_path: Path) -> None:
    text = make_text(50)
    (tmp_path / "c.txt").write_text(text)
    out = prepare([tmp_path / "c.txt"], tmp_path / "d", train_tokenizer=280, val_fraction=0.0, progress=False)
    tok = Tokenizer.from_folder(out)
    ids = read_tokens(out, "train").tolist()
    assert ids == tok.encode(text) + [tok.eos_id]
    assert tok.decode(ids) == text


def test_prepare_reuses_a_tokenizer_folder(corpus: Path, data_dir: Path, tmp_path: Path) -> None:
    out = prepare([corpus / "docs.jsonl"], tmp_path / "d2", tokenizer=data_dir, val_fraction=0.0, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == str(data_dir) and meta["documents"] == 40
    tok = Tokenizer.from_folder(data_dir)
    first = json.loads((corpus / "docs.jsonl").read_text().splitlines()[0])["text"]
    assert read_tokens(out, "train")[: len(tok.encode(first)) + 1].tolist() == tok.encode(first) + [tok.eos_id]


def test_jsonl_text_field_option(tmp_path: Path) -> None:
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": make_text(30)}) + "\n\n")  # blank lines are skipped
    out = prepare([tmp_path / "c.jsonl"], tmp_path / "d", train_tokenizer=280, text_field="content",
                  val_fraction=0.0, progress=False)
    assert json.loads((out / "meta.json").read_text())["documents"] == 1


def test_folder_skips_other_and_hidden_files(tmp_path: Path) -> None:
    (tmp_path / "keep.md").write_text(make_text(20))
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00\x01")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("secret " * 100)
    out = prepare([tmp_path], tmp_path.parent / "out", train_tokenizer=280, val_fraction=0.0, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["documents"] == 1
    assert "secret" not in Tokenizer.from_folder(out).decode(read_tokens(out, "train").tolist())


def test_token_dtype_by_vocabulary_size() -> None:
    assert token_dtype(32000) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(128256) == np.uint32


def test_train_bpe_tokenizer_specials_and_errors() -> None:
    tok = train_bpe_tokenizer(iter([make_text(100)]), 300)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2) and 256 < tok.vocab_size <= 300
    assert tok.decode(tok.encode("héllo wörld ✓")) == "héllo wörld ✓"  # bytes never go out of vocabulary
    with pytest.raises(LLMLabError, match="vocab size 100 is too small"):
        train_bpe_tokenizer(iter(["x"]), 100)


# -- errors ------------------------------------------------------------------------------------------
def test_empty_corpus_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LLMLabError, match="corpus is empty"):
        prepare([tmp_path / "empty.txt"], tmp_path / "d", train_tokenizer=300, progress=False)
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(LLMLabError, match="corpus is empty"):
        prepare([tmp_path / "empty.jsonl"], tmp_path / "d", train_tokenizer=300, progress=False)
    assert not (tmp_path / "d").exists()


def test_whitespace_only_corpus_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_text("  \n\n \t \n")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": " \n "}) + "\n" + json.dumps({"text": "\t"}) + "\n")
    for corpus in ([tmp_path / "blank.txt"], [tmp_path / "blank.txt", tmp_path / "blank.jsonl"]):
        for option in ({"train_tokenizer": 300}, {"tokenizer": tmp_path / "tok"}):
            with pytest.raises(LLMLabError, match=r"corpus is empty: .*blank\.txt.* hold only whitespace"):
                prepare(corpus, tmp_path / "d", progress=False, **option)
    assert not (tmp_path / "d").exists()
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": " one word "}) + "\n")  # some text among blanks: fine
    out = prepare([tmp_path / "blank.txt", tmp_path / "blank.jsonl"], tmp_path / "d", train_tokenizer=260,
                  val_fraction=0.0, progress=False)
    assert json.loads((out / "meta.json").read_text())["documents"] == 2


def test_missing_path_and_folder_without_text(tmp_path: Path) -> None:
    with pytest.raises(LLMLabError, match="corpus path not found: .*nope.txt"):
        prepare([tmp_path / "nope.txt"], tmp_path / "d", train_tokenizer=300)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.dat").write_bytes(b"\x00")
    with pytest.raises(LLMLabError, match="has no .txt"):
        prepare([tmp_path / "bin"], tmp_path / "d", train_tokenizer=300)


def test_jsonl_without_text_field_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(LLMLabError, match=r"c\.jsonl:2: no 'text' field \(found \['body'\]\).*--text-field"):
        prepare([path], tmp_path / "d", train_tokenizer=300, progress=False)
    path.write_text("{not json\n")
    with pytest.raises(LLMLabError, match=r"c\.jsonl:1: not valid JSON"):
        prepare([path], tmp_path / "d", train_tokenizer=300, progress=False)


def test_a_failed_prepare_leaves_the_old_folder_intact(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text(make_text(50))
    out = prepare([tmp_path / "ok.txt"], tmp_path / "d", train_tokenizer=280, progress=False)
    before = (out / "train.bin").read_bytes()
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(LLMLabError):
        prepare([tmp_path / "ok.txt", tmp_path / "bad.jsonl"], out, tokenizer=out, progress=False)
    assert (out / "train.bin").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left behind


def test_tokenizer_options_are_exclusive(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("text")
    with pytest.raises(LLMLabError, match="exactly one of --tokenizer"):
        prepare([tmp_path / "c.txt"], tmp_path / "d")
    with pytest.raises(LLMLabError, match="exactly one of --tokenizer"):
        prepare([tmp_path / "c.txt"], tmp_path / "d", tokenizer=tmp_path, train_tokenizer=300)


# -- batches -----------------------------------------------------------------------------------------
def test_batches_are_deterministic_shifted_windows(data_dir: Path) -> None:
    ds = TokenDataset(data_dir, seq_len=16, seed=3)
    a, b = ds.train_batch(5, 4), TokenDataset(data_dir, seq_len=16, seed=3).train_batch(5, 4)
    assert a["input_ids"].shape == (4, 16) and a["input_ids"].dtype == torch.int64
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(a["input_ids"][:, 1:], a["labels"][:, :-1])  # targets are the next tokens
    assert not torch.equal(a["input_ids"], TokenDataset(data_dir, seq_len=16, seed=4).train_batch(5, 4)["input_ids"])
    # a batch is addressed by sample number: two halves equal the whole
    torch.testing.assert_close(torch.cat([ds.train_batch(5, 2)["input_ids"], ds.train_batch(7, 2)["input_ids"]]),
                               a["input_ids"])


def test_an_epoch_visits_every_window_once(data_dir: Path) -> None:
    ds = TokenDataset(data_dir, seq_len=16)
    n = ds.train.num_windows
    tokens = read_tokens(data_dir, "train")
    starts = {tuple(row[:4].tolist()) for row in ds.train_batch(0, n)["input_ids"]}
    expected = {tuple(tokens[i * 16: i * 16 + 4].tolist()) for i in range(n)}
    assert starts == expected
    assert not torch.equal(ds.train_batch(0, 8)["input_ids"], ds.train_batch(n, 8)["input_ids"])  # reshuffled


def test_validation_batches_are_fixed_and_wrap(data_dir: Path) -> None:
    ds = TokenDataset(data_dir, seq_len=16)
    n = ds.val.num_windows
    torch.testing.assert_close(ds.val_batch(0, 3), ds.val_batch(n, 3))
    val = read_tokens(data_dir, "val")
    assert ds.val_batch(1, 1)["input_ids"][0].tolist() == val[16:32].tolist()


def test_split_shorter_than_one_sequence(data_dir: Path) -> None:
    n_val = json.loads((data_dir / "meta.json").read_text())["val_tokens"]
    with pytest.raises(LLMLabError, match=rf"the 'val' split has {n_val} tokens, shorter than one sequence of "
                                          rf"seq_len {n_val} \+ 1"):
        TokenDataset(data_dir, seq_len=n_val)


def test_data_folder_without_meta(tmp_path: Path) -> None:
    with pytest.raises(LLMLabError, match="no meta.json.*llmlab prepare"):
        TokenDataset(tmp_path, seq_len=8)


def test_block_size_splits_long_files(tmp_path: Path) -> None:
    text = make_text(4 * BLOCK_CHARS // 20)
    (tmp_path / "long.txt").write_text(text)
    out = prepare([tmp_path / "long.txt"], tmp_path / "d", train_tokenizer=280, val_fraction=0.3, seed=1,
                  progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["val_tokens"] > 0 and meta["train_tokens"] > 0  # one document split across both


@pytest.mark.slow
def test_prepare_with_the_default_models_tokenizer(default_ckpt: Path, tmp_path: Path) -> None:
    text = make_text(200)
    (tmp_path / "c.txt").write_text(text)
    out = prepare([tmp_path / "c.txt"], tmp_path / "d", tokenizer=default_ckpt, val_fraction=0.0, progress=False)
    tok = Tokenizer.from_folder(default_ckpt)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == tok.vocab_size == 49152 and meta["dtype"] == "uint16"
    assert read_tokens(out, "train").tolist() == tok.encode(text) + [tok.eos_id]
