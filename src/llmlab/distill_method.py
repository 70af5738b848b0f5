"""The parts of knowledge distillation: the student, the teacher's top-k cache, `DistillMethod` (the training
method whose loss is `llmlab.distill_losses.DistillLoss` between the student's logits and the frozen teacher's)
and the data; `llmlab.distill` puts them together into the `distill` command.

The student is
- random, from a preset or a model config file (it takes the teacher's vocabulary: it has none of its own);
- a checkpoint (its tokenizer must be the teacher's: the losses compare distributions token by token);
- the teacher with only some of its blocks (`parse_layers`: `0,2,4`, `every-other`, `every-3`), embeddings,
  final norm and head copied (DistilBERT's initialisation).

The teacher runs frozen, in eval mode, under `torch.inference_mode`, optionally in bf16/fp16. With a top-k cache
(`TeacherCache`) its top-k log-probabilities over one epoch of the training data are computed once, written to a
safetensors file and looked up by the content of each training sequence, so later epochs and later runs skip
the teacher. With `on_policy_fraction` > 0 that share of training batches is replaced by the student's own
samples: it continues the batch's prompts and the teacher scores every sampled token (generalized KD, Agarwal et
al. 2024); such batches have no ground-truth labels, so only the divergence counts.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from llmlab.args import DistillConfig, TrainConfig
from llmlab.checkpoint import dtype_from_name, load_checkpoint, read_safetensors
from llmlab.config import ModelConfig
from llmlab.data import TokenDataset
from llmlab.distill_losses import DistillLoss, TopK, make_divergence
from llmlab.errors import LLMLabError
from llmlab.generate import SamplingParams, generate_tokens
from llmlab.instruct import InstructDataset
from llmlab.losses import IGNORE_INDEX
from llmlab.methods.base import model_inputs, state_dict_to_model
from llmlab.methods.full import Full
from llmlab.model import LLaMA, build_model
from llmlab.tokenizer import Tokenizer

CACHE_FORMAT = "llmlab-teacher-topk"
CACHE_FILE = "teacher_topk.safetensors"


# -- the student ---------------------------------------------------------------------------------------
def parse_layers(spec: str | list[int], num_layers: int) -> list[int]:
    """The teacher blocks a student keeps: `0,2,4` (ids), `every-other` (0, 2, 4, ...) or `every-N`."""
    option = "--student-layers"
    text = ",".join(map(str, spec)) if isinstance(spec, list | tuple) else str(spec).strip()
    if text == "every-other":
        text = "every-2"
    if text.startswith("every-"):
        step = text[len("every-"):]
        if not step.isdigit() or int(step) < 1:
            raise LLMLabError(f"{option} '{spec}': expected every-N with N a positive integer (e.g. every-2)")
        return list(range(0, num_layers, int(step)))
    items = [s.strip() for s in text.split(",")]
    if not text or any(not s.lstrip("-").isdigit() for s in items):
        raise LLMLabError(f"{option} '{spec}': expected block ids like 0,2,4, or every-other, or every-N")
    layers = [int(s) for s in items]
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise LLMLabError(f"{option} '{spec}': block ids {bad} are outside the teacher's 0..{num_layers - 1}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise LLMLabError(f"{option} '{spec}': block ids must be increasing and unique (they keep the teacher's order)")
    return layers


def student_from_teacher(teacher: LLaMA, layers: list[int]) -> LLaMA:
    """A copy of `teacher` with only blocks `layers` (in order); embeddings, final norm and head copied too."""
    cfg = ModelConfig.from_hf_dict(teacher.config.to_hf_dict(), name=f"{teacher.config.name}-{len(layers)}-blocks")
    cfg.num_hidden_layers = len(layers)
    new_index = {old: new for new, old in enumerate(layers)}
    sd: dict[str, Tensor] = {}
    for name, t in teacher.state_dict().items():
        if name.startswith("model.layers."):
            old, _, rest = name[len("model.layers."):].partition(".")
            if int(old) not in new_index:
                continue
            name = f"model.layers.{new_index[int(old)]}.{rest}"
        sd[name] = t.detach().clone()  # never share storage: the student trains, the teacher stays as it was
    return state_dict_to_model(cfg, sd)


def check_same_tokenizer(teacher: Tokenizer, other: Tokenizer, teacher_name: str, other_name: str) -> None:
    """Raise a clear error unless `other` maps every token to the same id as the teacher's tokenizer."""
    a, b = teacher.backend.get_vocab(), other.backend.get_vocab()
    if a == b and teacher.eos_token == other.eos_token:
        return
    differ = sorted(t for t in set(a) ^ set(b))[:3] or sorted(t for t in a if a[t] != b.get(t))[:3]
    detail = (f"vocabulary sizes {len(a)} vs {len(b)}" if len(a) != len(b) else
              f"eos tokens {teacher.eos_token!r} vs {other.eos_token!r}" if a == b else f"e.g. tokens {differ}")
    raise LLMLabError(f"the teacher {teacher_name} and {other_name} have different tokenizers ({detail}); "
                      "distillation compares next-token distributions token by token, so the student and the data "
                      "must use the teacher's tokenizer")


def make_student(spec: str | Path | None, layers: str | list[int] | None, teacher: LLaMA, teacher_name: str,
                 teacher_tokenizer: Tokenizer, seed: int = 0) -> LLaMA:
    """The student of a `--student` PRESET|config.yaml|CKPT or `--student-layers` SPEC (see the module doc)."""
    tcfg = teacher.config
    if layers is not None:
        if spec not in (None, "", "teacher"):
            raise LLMLabError(f"give either --student ({spec}) or --student-layers ({layers}), not both: "
                              "--student-layers builds the student from the teacher's blocks")
        return student_from_teacher(teacher, parse_layers(layers, tcfg.num_hidden_layers))
    if spec in (None, ""):
        raise LLMLabError("no student: give --student PRESET|config.yaml|CKPT or --student-layers (e.g. every-other)")
    path = Path(spec)
    if path.is_dir() and any((path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        model = load_checkpoint(path)
        if (path / "tokenizer.json").is_file():
            check_same_tokenizer(teacher_tokenizer, Tokenizer.from_folder(path), teacher_name, f"student {path}")
        if model.config.vocab_size != tcfg.vocab_size:
            raise LLMLabError(f"student {path} has vocab_size {model.config.vocab_size} but the teacher "
                              f"{teacher_name} has {tcfg.vocab_size}: their logits must cover the same tokens")
        return model.train()
    cfg = ModelConfig.from_spec(spec)
    if cfg.vocab_size != tcfg.vocab_size:
        print(f"llmlab: student {spec}: vocab_size {cfg.vocab_size} -> {tcfg.vocab_size}, the teacher's (a new "
              "student speaks the teacher's vocabulary)", file=sys.stderr)
    cfg.vocab_size = tcfg.vocab_size
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tcfg.bos_token_id, tcfg.eos_token_id, tcfg.pad_token_id
    torch.manual_seed(seed)
    return build_model(cfg)


# -- the teacher's top-k cache ---------------------------------------------------------------------------
def teacher_fingerprint(teacher: LLaMA, dtype: torch.dtype) -> str:
    """A short digest of the teacher's config, a sample of every tensor, and its run dtype."""
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps(teacher.config.to_hf_dict(), sort_keys=True, default=str).encode())
    h.update(str(dtype).encode())
    for name, t in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _scored_length(labels: Tensor) -> int:
    """Positions up to and including the last labelled one: the only ones a loss needs teacher targets for."""
    idx = (labels != IGNORE_INDEX).nonzero()
    return int(idx[-1]) + 1 if len(idx) else 0


def sequence_key(row: dict[str, Tensor], length: int) -> int:
    """A 64-bit digest of a training row's first `length` positions (tokens, labels, positions, segments)."""
    h = hashlib.blake2b(digest_size=8)
    for name in ("input_ids", "labels", "position_ids", "segment_ids"):
        if name in row:
            h.update(name.encode())
            h.update(row[name][:length].to(torch.int64).cpu().numpy().tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def num_train_samples(data: Any) -> int:
    """How many distinct training samples an epoch of `data` has (windows of a corpus, instruction units)."""
    if hasattr(data, "train_units"):
        return len(data.train_units)
    if hasattr(getattr(data, "train", None), "num_windows"):
        return int(data.train.num_windows)
    raise LLMLabError(f"the teacher cache needs a data set of known size (TokenDataset or InstructDataset), got "
                      f"{type(data).__name__}")


class TeacherCache:
    """The teacher's top-k log-probabilities for every training sequence, keyed by the sequence's content.

    File (safetensors): `keys` (N,) int64, `offsets` (N + 1,) int64 into `logprobs` (M, k) float32 and `indices`
    (M, k) int32, where sequence i owns rows offsets[i]:offsets[i+1], one per scored position; the metadata holds
    the teacher's fingerprint, k and the temperature, which must match for the file to be reused.
    """

    def __init__(self, meta: dict[str, str], keys: Tensor, offsets: Tensor, logprobs: Tensor, indices: Tensor):
        self.meta, self.logprobs, self.indices = meta, logprobs, indices
        self.offsets = offsets.tolist()
        self.where = {int(k): i for i, k in enumerate(keys.tolist())}
        self.hits = self.misses = 0

    @classmethod
    def build(cls, teacher_fn: Any, data: Any, batch_size: int, meta: dict[str, str], top_k: int,
              temperature: float) -> TeacherCache:
        """Run the teacher once over epoch 0 of `data` (every training sample once) and keep its top-k."""
        n = num_train_samples(data)
        keys: list[int] = []
        offsets, logprobs, indices = [0], [], []
        seen: set[int] = set()
        for start in tqdm(range(0, n, batch_size), desc="teacher cache", unit="batch", leave=False):
            batch = data.train_batch(start, min(batch_size, n - start))
            top = teacher_fn(batch)
            for b in range(batch["input_ids"].size(0)):
                row = {k: v[b] for k, v in batch.items()}
                length = _scored_length(row["labels"])
                key = sequence_key(row, length)
                if key in seen:
                    continue
                seen.add(key)
                keys.append(key)
                logprobs.append(top.logprobs[b, :length].float().cpu().clone())  # out of inference mode
                indices.append(top.indices[b, :length].cpu().to(torch.int32))
                offsets.append(offsets[-1] + length)
        return cls(meta, torch.tensor(keys, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64),
                   torch.cat(logprobs), torch.cat(indices))

    def save(self, path: Path) -> None:
        """Write the file atomically (a temporary sibling renamed into place)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
        try:
            keys = torch.tensor(list(self.where), dtype=torch.int64)
            save_file({"keys": keys, "offsets": torch.tensor(self.offsets, dtype=torch.int64),
                       "logprobs": self.logprobs.contiguous(), "indices": self.indices.contiguous()}, tmp,
                      metadata=self.meta)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path, meta: dict[str, str]) -> TeacherCache:
        """Read a cache file; raise a clear error when it was made by another teacher, k or temperature."""
        try:
            tensors, found = read_safetensors(path, with_metadata=True)
        except LLMLabError as e:
            raise LLMLabError(f"cannot read the teacher cache: {e}; delete it to rebuild it") from e
        differ = {k: (found.get(k), v) for k, v in meta.items() if found.get(k) != v}
        if differ:
            what = ", ".join(f"{k} {a!r} (this run: {b!r})" for k, (a, b) in differ.items())
            raise LLMLabError(f"{path} is a teacher cache of another setup: {what}; delete it or set "
                              "--kd.cache-path to another file")
        return cls(found, tensors["keys"], tensors["offsets"], tensors["logprobs"], tensors["indices"])

    def lookup(self, batch: dict[str, Tensor], temperature: float) -> TopK | None:
        """The cached top-k of every row of `batch` (B, T, k), or None if any row is not in the cache."""
        B, T = batch["input_ids"].shape
        k = self.logprobs.size(1)
        rows = []
        for b in range(B):
            row = {name: v[b] for name, v in batch.items()}
            length = _scored_length(row["labels"])
            i = self.where.get(sequence_key(row, length))
            if i is None:
                self.misses += 1
                return None
            rows.append((i, length))
        self.hits += B
        # unscored positions get a valid filler (half the mass on the k tokens); their loss is masked out
        logprobs = torch.full((B, T, k), math.log(0.5 / k))
        indices = torch.arange(k).expand(B, T, k).clone()
        for b, (i, length) in enumerate(rows):
            lo = self.offsets[i]
            logprobs[b, :length] = self.logprobs[lo: lo + length]
            indices[b, :length] = self.indices[lo: lo + length].long()
        device = batch["input_ids"].device
        return TopK(logprobs.to(device), indices.to(device), temperature)


# -- the method ------------------------------------------------------------------------------------------
class DistillMethod(Full):
    """Train every student parameter on `DistillLoss` against a frozen teacher (see the module doc).

    `data` is only needed for the teacher cache (`kd.cache`); `cache_path` is where it lives.
    `pad_id` and `eos_id` (the teacher tokenizer's) shape the on-policy batches.
    """

    name = "distill"

    def __init__(self, teacher: LLaMA, kd: DistillConfig | None = None, data: Any = None,
                 cache_path: str | Path | None = None, pad_id: int | None = None, eos_id: int | None = None,
                 cache_batch_size: int = 8) -> None:
        self.kd = kd or DistillConfig()
        self.kd.validate()
        self.teacher = teacher
        self.criterion = DistillLoss(make_divergence(self.kd.loss, self.kd.temperature, self.kd.beta), self.kd.alpha)
        self.data, self.cache_batch_size = data, cache_batch_size
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.pad_id = pad_id if pad_id is not None else 0
        self.eos_id = eos_id
        self.cache: TeacherCache | None = None
        self.student: LLaMA | None = None

    def prepare(self, model: nn.Module) -> nn.Module:
        """Student: every parameter trains. Teacher: frozen, eval mode, on the student's device and in teacher_dtype;
        the cache is read or built here, on that device."""
        model = super().prepare(model)
        if model.config.vocab_size != self.teacher.config.vocab_size:
            raise LLMLabError(f"student vocab_size {model.config.vocab_size} != teacher vocab_size "
                              f"{self.teacher.config.vocab_size}: their logits must cover the same tokens")
        self.student = model
        device = model.lm_head.weight.device
        dtype = dtype_from_name(self.kd.teacher_dtype, device)
        self.teacher.requires_grad_(False)
        self.teacher = self.teacher.to(device=device, dtype=dtype).eval()
        if self.kd.cache:
            self._attach_cache(dtype)
        return model

    def _attach_cache(self, dtype: torch.dtype) -> None:
        if self.cache_path is None:
            raise LLMLabError("distillation option 'cache' needs a cache file (cache_path)")
        meta = {"format": CACHE_FORMAT, "version": "1", "teacher": teacher_fingerprint(self.teacher, dtype),
                "top_k": str(self.kd.top_k), "temperature": repr(float(self.kd.temperature))}
        if self.cache_path.is_file():
            self.cache = TeacherCache.load(self.cache_path, meta)
            print(f"llmlab: teacher cache {self.cache_path}: {len(self.cache.where)} sequences reused",
                  file=sys.stderr)
            return
        if self.data is None:
            raise LLMLabError("distillation option 'cache' needs the training data to build the cache from")
        self.cache = TeacherCache.build(self._teacher_topk, self.data, self.cache_batch_size, meta, self.kd.top_k,
                                        self.kd.temperature)
        if int(os.environ.get("RANK", "0")) == 0:
            self.cache.save(self.cache_path)
        print(f"llmlab: teacher cache {self.cache_path}: {len(self.cache.where)} sequences written", file=sys.stderr)

    def _teacher_logits(self, batch: dict[str, Tensor]) -> Tensor:
        device = next(self.teacher.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.inference_mode():
            return self.teacher(batch["input_ids"], **model_inputs(batch))

    def _teacher_topk(self, batch: dict[str, Tensor]) -> TopK:
        with torch.inference_mode():
            return TopK.from_logits(self._teacher_logits(batch), self.kd.top_k, self.kd.temperature)

    def teacher_target(self, batch: dict[str, Tensor], use_cache: bool = True) -> Tensor | TopK:
        """The teacher's side of the loss for `batch`: cached or computed top-k, or full logits; a normal tensor
        (inference-mode tensors cannot be saved for the student's backward pass, so they are cloned out)."""
        if use_cache and self.cache is not None:
            found = self.cache.lookup(batch, self.kd.temperature)
            if found is not None:
                return found
        if self.kd.top_k:
            top = self._teacher_topk(batch)
            return TopK(top.logprobs.clone(), top.indices.clone(), top.temperature)
        return self._teacher_logits(batch).clone()

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        on_policy = (model.training and self.kd.on_policy_fraction > 0
                     and float(torch.rand(())) < self.kd.on_policy_fraction)
        if on_policy:
            batch = self.on_policy_batch(batch)
        logits = model(batch["input_ids"], **model_inputs(batch))
        target = self.teacher_target(batch, use_cache=not on_policy)
        return self.criterion(logits, target, batch["labels"], use_labels=not on_policy)

    def on_policy_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The student's continuations of the batch's prompts, labelled with its own sampled tokens.

        A row's prompt is everything before its first response token when the data masks prompts (instruction
        data), else its first half (a text corpus). Sampling draws its seed from torch's RNG, which the loop saves
        in checkpoints, so a resumed run samples the same continuations.
        """
        student = self.student
        if student is None:
            raise LLMLabError("DistillMethod.prepare must run before on-policy batches")
        ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
        T = ids.size(1)
        prompts = []
        for row_ids, row_labels in zip(ids, labels):
            scored = (row_labels != IGNORE_INDEX).nonzero()
            cut = int(scored[0]) + 1 if row_labels[0] == IGNORE_INDEX and len(scored) else max(1, T // 2)
            prompts.append(row_ids[:cut].tolist())
        room = student.config.max_position_embeddings - max(len(p) for p in prompts)
        n_new = min(self.kd.on_policy_tokens, room)
        if n_new < 1:
            raise LLMLabError(f"on-policy distillation: prompts of {max(len(p) for p in prompts)} tokens leave no room "
                              f"to sample in the student's context of {student.config.max_position_embeddings}")
        sampling = SamplingParams(temperature=self.kd.on_policy_temperature,
                                  seed=int(torch.randint(0, 2**31 - 1, ())))
        eos = {self.eos_id} if self.eos_id is not None else set()
        new: list[list[int]] = [[] for _ in prompts]
        was_training = student.training
        student.eval()
        try:
            for step in generate_tokens(student, prompts, n_new, sampling, eos, self.pad_id):
                for r, t in enumerate(step):
                    if t is not None:
                        new[r].append(t)
        finally:
            student.train(was_training)
        rows = []
        for p, g in zip(prompts, new):
            if len(g) < n_new and self.eos_id is not None:
                g = g + [self.eos_id]  # it stopped by sampling EOS: the teacher scores that choice too
            rows.append((p + g, len(p)))
        width = max(len(seq) for seq, _ in rows) - 1
        out_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        out_labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for b, (seq, n_prompt) in enumerate(rows):
            seq_t = torch.tensor(seq)
            out_ids[b, : len(seq) - 1] = seq_t[:-1]
            out_labels[b, n_prompt - 1: len(seq) - 1] = seq_t[n_prompt:]
        device = batch["input_ids"].device
        return {"input_ids": out_ids.to(device), "labels": out_labels.to(device)}


# -- the data -------------------------------------------------------------------------------------------
def load_data(data: str | Path, tokenizer: Tokenizer, cfg: TrainConfig, teacher_name: str,
              val_data: str | Path | None = None, val_fraction: float = 0.1, template: str = "auto",
              pack: bool = False) -> Any:
    """A prepared token folder (`llmlab prepare`, tokenized by the teacher's tokenizer) or instruction data."""
    path = Path(data)
    if path.is_dir():
        dataset = TokenDataset(path, cfg.seq_len, cfg.seed)
        check_same_tokenizer(tokenizer, dataset.tokenizer(), teacher_name, f"the data {path}")
        return dataset
    dataset = InstructDataset(path, tokenizer, cfg.seq_len, val_fraction=val_fraction, seed=cfg.seed, pack=pack,
                              template=template, val_path=val_data)
    print(f"llmlab: {path}: {dataset.stats.summary()}", file=sys.stderr)
    return dataset
