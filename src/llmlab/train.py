"""The one training loop: pretraining, every fine-tuning method and distillation run through `train`
(their commands: `llmlab.pretrain`, `llmlab.finetune`, `llmlab.distill`).

A run, in order:
1. the model moves to its device and the `Method` prepares it (which parameters train, module swaps);
2. under torchrun the model is wrapped for data parallelism: DDP, or FSDP2 `fully_shard` per block;
3. AdamW over the method's trainable parameters (no weight decay on 1-D parameters: norms and biases), the LR
   by linear warmup then cosine decay to min_lr_ratio * lr;
4. each step: grad_accum micro-batches per process under autocast (precision auto: bf16 on CUDA and on CPUs that
   compute bf16 natively, else fp32), gradient clipping, update;
5. validation loss at the start, every eval_every steps and at the end; a checkpoint every save_every steps
   into RUN_DIR/checkpoints/step-NNNNNN (written atomically, the last keep_last kept: an older one is renamed out
   of the way before it is deleted, so a kill never leaves a half-deleted step-N that looks complete);
6. RUN_DIR/final: what the method saves (full: an HF-format model folder).

Exact resume: the batch a step reads is a pure function of (seed, samples seen) and the LR a pure function of
the step, so restoring the weights, the optimizer state, the RNG states and those two counters continues a run
exactly as if it had never stopped. Checkpoints hold full (unsharded) tensors, so a run saved by N processes
loads in one. Only rank 0 writes files; every rank reads checkpoints (RUN_DIR must be on a shared filesystem
for runs over several machines). What a killed run leaves besides its checkpoints (the hidden temporary folders of an
interrupted save or prune) is swept when a run starts or resumes.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from llmlab.args import TrainConfig
from llmlab.checkpoint import check_folder_path, remove_folder, sweep_leftovers, write_json
from llmlab.errors import LLMLabError
from llmlab.methods import Method
from llmlab.metrics import RunLogger
from llmlab.precision import compile_auto, setup_precision

__all__ = ["TrainConfig", "TrainData", "TrainResult", "compile_blocks", "evaluate", "lr_at", "setup_precision", "train",
           "train_step"]

CHECKPOINTS = "checkpoints"
STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
STATE_FORMAT = "llmlab-training-state"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class TrainData(Protocol):
    """What the loop reads: deterministic batches addressed by sample number (see `llmlab.data.TokenDataset`)."""

    def train_batch(self, start: int, size: int) -> dict[str, Tensor]: ...

    def val_batch(self, start: int, size: int) -> dict[str, Tensor]: ...


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    samples: int = 0  # training sequences consumed, all processes together: the data position
    tokens: int = 0
    elapsed_s: float = 0.0  # training wall time, summed over resumed invocations


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final: Path | None  # None when the run stopped early (stop_at)
    losses: dict[int, float] = field(default_factory=dict)  # logged training losses of this invocation
    val_losses: dict[int, float] = field(default_factory=dict)


def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """LR of optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


# -- processes and devices ---------------------------------------------------------------------------
@dataclass
class Env:
    """This process's place in the run: rank, world size, device, data-parallel strategy."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "single"  # single | ddp | fsdp
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: Tensor) -> float:
        """Average of a scalar over all processes."""
        if self.world > 1:
            value = value.detach().clone()
            dist.all_reduce(value)
            value /= self.world
        return float(value)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def training_device(name: str) -> torch.device:
    """The device this process trains on for the `device` option: auto (CUDA if present), cuda (this process's GPU
    under torchrun: LOCAL_RANK), cpu or cuda:N."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise LLMLabError(f"training option 'device': '{name}' is not a device (auto, cpu, cuda or cuda:N)") from e


def setup_env(cfg: TrainConfig) -> Env:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), pick the device, join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = training_device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LLMLabError(f"training option 'device' is {cfg.device!r} but CUDA is not available")
        torch.cuda.set_device(device)
    env = Env(rank=rank, world=world, device=device)
    if world == 1:
        if cfg.strategy != "auto" and rank == 0:
            print(f"llmlab: strategy '{cfg.strategy}' needs torchrun with several processes; training in one",
                  file=sys.stderr)
        return env
    env.strategy = "ddp" if cfg.strategy == "auto" else cfg.strategy
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        env.owns_group = True
    return env


def wrap_model(model: nn.Module, env: Env) -> nn.Module:
    """The module the loop calls: the model itself, a DDP wrapper, or the model sharded in place by FSDP2."""
    if env.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # buffers (RoPE tables, quantized blocks and their dense copies) never change: not broadcast every forward
        return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                       broadcast_buffers=False)
    if env.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from llmlab.model import Block

        for module in model.modules():
            if isinstance(module, Block):
                fully_shard(module)
        fully_shard(model)
    return model


def _grad_sync(wrapped: nn.Module, raw: nn.Module, env: Env) -> Callable[[bool], Any]:
    """A context factory: `sync(False)` skips the gradient all-reduce of a non-final micro-batch."""
    @contextmanager
    def sync(enabled: bool) -> Iterator[None]:
        if enabled or env.strategy == "single":
            yield
        elif env.strategy == "ddp":
            with wrapped.no_sync():
                yield
        else:
            raw.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                raw.set_requires_gradient_sync(True)
    return sync


def compile_blocks(model: nn.Module) -> int:
    """torch.compile each transformer block of `model` in place (regional compilation); returns how many.

    The blocks share one compiled graph (only their parameters differ), so compiling costs one block's time
    whatever the depth; inductor fuses RMSNorm, RoPE and SwiGLU inside each block. The chunked head + loss stays
    eager (it is made of large matmuls). Parameter names do not change. A model without LLaMA blocks (the
    LSTM) gets 0 and is left alone (the loop compiles it whole).
    """
    from llmlab.model import Block

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile()
    return len(blocks)


def build_optimizer(named: Sequence[tuple[str, nn.Parameter]], cfg: TrainConfig, env: Env) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; fused kernels on CUDA and CPU (except for FSDP's sharded tensors)."""
    if not named:
        raise LLMLabError("the training method left no trainable parameters")
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    groups = [{"params": ps, "weight_decay": wd} for ps, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)) if ps]
    # fused: one kernel for every parameter (CUDA and CPU), instead of a dozen ops per parameter per step, which
    # dominate when LoRA trains a few hundred small tensors; FSDP's sharded tensors take the default implementation
    fused = env.device.type in ("cuda", "cpu") and env.strategy != "fsdp"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


# -- one step, one evaluation ------------------------------------------------------------------------
def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(model: nn.Module, method: Method, optimizer: torch.optim.Optimizer, params: Sequence[Tensor],
               batches: Sequence[dict[str, Tensor]], grad_clip: float = 1.0, amp: torch.dtype | None = None,
               sync: Callable[[bool], Any] | None = None) -> tuple[Tensor, Tensor]:
    """One optimizer step over micro-batches whose gradients accumulate; returns (mean loss, gradient norm).

    `model` is what the method's loss calls (possibly wrapped or compiled); `params` are the trainable
    parameters, clipped to a global norm of `grad_clip` (0: measured, not clipped).
    """
    device = params[0].device
    total = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        batch = _to(batch, device)
        with sync(i == len(batches) - 1) if sync is not None else nullcontext():
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = method.loss(model, batch)
            (loss / len(batches)).backward()
        total += loss.detach().float()
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(batches), norm


@torch.no_grad()
def evaluate(model: nn.Module, method: Method, data: TrainData, batch_size: int, batches: int, env: Env,
             amp: torch.dtype | None = None) -> float:
    """Mean validation loss over `batches` fixed micro-batches per process (the same samples every time)."""
    model.eval()
    total = torch.zeros((), device=env.device)
    for i in range(batches):
        batch = _to(data.val_batch((i * env.world + env.rank) * batch_size, batch_size), env.device)
        with torch.autocast(env.device.type, dtype=amp, enabled=amp is not None):
            total += method.loss(model, batch).float()
    model.train()
    return env.mean(total / batches)


# -- checkpoints -------------------------------------------------------------------------------------
def _full_state(raw: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """Full (unsharded, CPU) model and optimizer state dicts keyed by parameter name; collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(raw, options=options)
    optim_sd = get_optimizer_state_dict(raw, optimizer, options=options) if optimizer is not None else None
    return model_sd, optim_sd


def _rng_states(env: Env) -> dict[str, Tensor]:
    """Every process's torch RNG states (CPU, and CUDA when used); collective."""
    mine = {"cpu": torch.get_rng_state()}
    if env.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(env.device)
    everyone = [mine]
    if env.world > 1:
        everyone = [None] * env.world
        dist.all_gather_object(everyone, mine)
    return {f"rng/{kind}/{rank}": t.cpu() for rank, states in enumerate(everyone) for kind, t in states.items()}


def save_training_checkpoint(folder: Path, raw: nn.Module, optimizer: torch.optim.Optimizer, method: Method,
                             progress: Progress, cfg: TrainConfig, env: Env, tokenizer: Any = None) -> None:
    """Write a resumable checkpoint: the method's model folder plus training_state.{json,safetensors}."""
    from safetensors.torch import save_file

    model_sd, optim_sd = _full_state(raw, optimizer)
    rng = _rng_states(env)
    if env.main:
        tensors = {f"optim/{name}/{key}": t.contiguous() for name, state in optim_sd["state"].items()
                   for key, t in state.items() if isinstance(t, Tensor)}
        tensors.update(rng)
        state = {"format": STATE_FORMAT, "version": 1, "method": method.name, "world_size": env.world,
                 "progress": asdict(progress), "train_config": asdict(cfg),
                 "model_config": method.model_config(raw),
                 "param_groups": [g["params"] for g in optim_sd["param_groups"]]}

        def extra(tmp: Path) -> None:
            save_file(tensors, str(tmp / STATE_TENSORS))
            write_json(tmp / STATE_JSON, state)

        method.save(raw, folder, tokenizer, state_dict=model_sd, extra_files=extra)
    env.barrier()


def checkpoints(run_dir: Path) -> list[Path]:
    """The completed checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    found = [p for p in folder.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def find_resume(run_dir: Path, resume: str | Path | None) -> Path | None:
    """The checkpoint to resume from: `auto` = the latest in RUN_DIR, `no` = none, else a run or step folder."""
    if resume in (None, "no", "never", False):
        if checkpoints(run_dir):
            raise LLMLabError(f"{run_dir} already holds checkpoints of a run; continue it with --resume auto or "
                              "train into a new --out folder")
        return None
    if resume == "auto":
        found = checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if (path / STATE_JSON).is_file() or (path / "config.json").is_file():
        return path
    found = checkpoints(path)
    if not found:
        raise LLMLabError(f"--resume {path}: no checkpoint there (expected a run folder with {CHECKPOINTS}/step-N "
                          "or a checkpoint folder with training_state.json)")
    return found[-1]


def _read_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_JSON
    if not path.is_file():
        raise LLMLabError(f"{folder} is not an llmlab training checkpoint (no {STATE_JSON}); a model folder can "
                          "start a fine-tuning run but cannot resume one")
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LLMLabError(f"{path}: corrupt training state (not valid JSON: {e})") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != 1:
        raise LLMLabError(f"{path}: not an llmlab training state (format '{STATE_FORMAT}' version 1)")
    return state


def load_training_checkpoint(folder: Path, raw: nn.Module, optimizer: torch.optim.Optimizer, method: Method,
                             named: Sequence[tuple[str, nn.Parameter]], env: Env) -> Progress:
    """Restore model, optimizer and RNG states from `folder`; checks that it belongs to this run first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = _read_state(folder)
    hint = f"(resume from an earlier checkpoint with --resume {folder.parent}/step-N, or start a new --out)"
    if state["method"] != method.name:
        raise LLMLabError(f"{folder} was trained with method '{state['method']}', not '{method.name}' {hint}")
    ours = json.loads(json.dumps(method.model_config(raw)))
    diff = sorted(k for k in set(ours) | set(state["model_config"]) if ours.get(k) != state["model_config"].get(k))
    if diff:
        raise LLMLabError(f"{folder} holds a different model: config fields {diff} differ {hint}")
    name_of = {id(p): n for n, p in named}
    ours_groups = [sorted(name_of[id(p)] for p in g["params"]) for g in optimizer.param_groups]
    if [sorted(g) for g in state["param_groups"]] != ours_groups:
        raise LLMLabError(f"{folder} trained a different set of parameters than this run {hint}")
    try:
        tensors = load_file(str(folder / STATE_TENSORS))
    except (SafetensorError, OSError, ValueError) as e:
        raise LLMLabError(f"{folder / STATE_TENSORS}: cannot read training state (truncated or corrupt?): {e} "
                          f"{hint}") from e
    model_sd = method.load_state(raw, folder)
    shapes = {k: tuple(v.shape) for k, v in raw.state_dict().items()}
    bad = [k for k, t in model_sd.items() if shapes.get(k) != tuple(t.shape)]
    bad += [n for n, _ in named if n not in model_sd]
    if bad:
        raise LLMLabError(f"{folder}: tensors {bad[:5]} are missing or do not fit this model {hint}")

    optim_state: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("optim/"):
            name, _, slot = key[len("optim/"):].rpartition("/")
            optim_state.setdefault(name, {})[slot] = t
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": names}
              for g, names in zip(optimizer.param_groups, state["param_groups"])]
    full = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(raw, optimizer, {"state": optim_state, "param_groups": groups}, options=full)
    set_model_state_dict(raw, model_sd, options=StateDictOptions(full_state_dict=True, strict=False))

    if state["world_size"] == env.world and f"rng/cpu/{env.rank}" in tensors:
        torch.set_rng_state(tensors[f"rng/cpu/{env.rank}"])
        if env.device.type == "cuda" and f"rng/cuda/{env.rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng/cuda/{env.rank}"], env.device)
    else:  # another process count: the data stream is unchanged, per-process randomness is reseeded
        torch.manual_seed(state["train_config"]["seed"] + 1000 * state["progress"]["step"] + env.rank)
    return Progress(**state["progress"])


def _prune(run_dir: Path, keep_last: int) -> None:
    for old in checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        remove_folder(old)


def _sweep(run_dir: Path) -> None:
    """Remove what killed runs left in RUN_DIR: temporary folders of interrupted saves (`.step-N.tmp-*`,
    `.final.tmp-*`), checkpoints set aside by an interrupted prune or replace (`.step-N.old-*`), metrics rewrites."""
    removed = sweep_leftovers(run_dir / CHECKPOINTS, _STEP_DIR) + sweep_leftovers(run_dir, r"final|metrics\.csv")
    if removed:
        print(f"llmlab: removed what interrupted saves left in {run_dir}: {', '.join(p.name for p in removed)}",
              file=sys.stderr)


# -- the loop ----------------------------------------------------------------------------------------
def train(model: nn.Module, method: Method, data: TrainData, config: TrainConfig, run_dir: str | Path,
          tokenizer: Any = None, resume: str | Path | None = "auto") -> TrainResult:
    """Train `model` with `method` on `data` into RUN_DIR (checkpoints, metrics, final model); see the module doc.

    `resume`: `auto` continues from RUN_DIR's latest checkpoint if there is one, `no` refuses to touch a run
    that has checkpoints, a path resumes from that run or checkpoint folder.
    """
    cfg = config
    cfg.validate()
    run_dir = Path(run_dir)
    check_folder_path(run_dir)
    env = setup_env(cfg)
    try:
        return _train(model, method, data, cfg, run_dir, tokenizer, resume, env)
    finally:
        env.close()


def _train(model: nn.Module, method: Method, data: TrainData, cfg: TrainConfig, run_dir: Path, tokenizer: Any,
           resume: str | Path | None, env: Env) -> TrainResult:
    from tqdm import tqdm

    B, accum = cfg.batch_size, cfg.grad_accum
    samples_per_step = B * accum * env.world
    max_steps = math.ceil(cfg.max_tokens / (samples_per_step * cfg.seq_len)) if cfg.max_tokens else cfg.max_steps
    start = find_resume(run_dir, resume)
    if env.main:
        _sweep(run_dir)
    torch.manual_seed(cfg.seed + env.rank)  # per-process randomness of the methods (the data has its own)

    raw = method.prepare(model.to(env.device))
    amp = setup_precision(raw, method, cfg.precision, env.device, cfg.dense_base, cfg.int8_base)
    if cfg.activation_checkpointing:
        raw.gradient_checkpointing = True
    compiled = compile_auto(cfg.compile, method, amp, env.device, max_steps, raw)
    in_place = compiled and compile_blocks(raw) > 0  # before wrapping: FSDP2 shards the compiled blocks
    wrapped = wrap_model(raw, env)
    forward = torch.compile(wrapped) if compiled and not in_place else wrapped
    named = method.trainable_parameters(raw)  # after wrapping: FSDP replaces parameters by sharded ones
    params = [p for _, p in named]
    optimizer = build_optimizer(named, cfg, env)
    sync = _grad_sync(wrapped, raw, env)

    progress = Progress()
    if start is not None:
        progress = load_training_checkpoint(start, raw, optimizer, method, named, env)
        if env.main:
            print(f"llmlab: resuming from {start} (step {progress.step})", file=sys.stderr)
    logger = RunLogger(run_dir, enabled=env.main, resume_step=progress.step if start is not None else None)
    result = TrainResult(run_dir, progress.step, None)

    def validate() -> float:
        val = evaluate(forward, method, data, B, cfg.eval_batches, env, amp)
        result.val_losses[progress.step] = val
        return val

    bar = tqdm(total=max_steps, initial=progress.step, desc="train", unit="step", disable=not env.main,
               dynamic_ncols=True)
    try:
        if start is None:
            logger.log(0, val_loss=validate(), lr=lr_at(0, cfg, max_steps), tokens=0)
        t0 = t_log = time.perf_counter()
        elapsed0, tokens_log, paused = progress.elapsed_s, progress.tokens, 0.0  # paused: eval/save time
        step0 = progress.step
        while progress.step < max_steps and not (cfg.stop_at and progress.step >= cfg.stop_at):
            lr = lr_at(progress.step, cfg, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [data.train_batch(progress.samples + (m * env.world + env.rank) * B, B) for m in range(accum)]
            t_step = time.perf_counter()
            loss, norm = train_step(forward, method, optimizer, params, batches, cfg.grad_clip, amp, sync)
            if compiled and env.main and progress.step == step0:  # torch.compile compiles lazily, in this step
                print(f"llmlab: the first step took {time.perf_counter() - t_step:.1f} s, compiling the model's "
                      f"blocks included (train.compile {'auto' if cfg.compile is None else 'true'})", file=sys.stderr)
            progress.step += 1
            progress.samples += samples_per_step
            progress.tokens += env.world * sum(b["input_ids"].numel() for b in batches)
            progress.elapsed_s = elapsed0 + time.perf_counter() - t0
            step, last = progress.step, progress.step == max_steps
            row: dict[str, float | None] = {}
            if step % cfg.log_every == 0 or last:
                now = time.perf_counter()
                row = {"loss": env.mean(loss), "lr": lr, "grad_norm": float(norm), "tokens": progress.tokens,
                       "tokens_per_s": (progress.tokens - tokens_log) / max(now - t_log - paused, 1e-9),
                       "elapsed_s": progress.elapsed_s}
                t_log, tokens_log, paused = now, progress.tokens, 0.0
                result.losses[step] = row["loss"]
                bar.set_postfix_str(f"loss {row['loss']:.4f} | {row['tokens_per_s']:,.0f} tok/s")
            t_pause = time.perf_counter()
            if (cfg.eval_every and step % cfg.eval_every == 0) or last:
                row["val_loss"] = validate()
            if row:
                logger.log(step, **row)
            bar.update(1)
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.stop_at:
                save_training_checkpoint(run_dir / CHECKPOINTS / f"step-{step:06d}", raw, optimizer, method,
                                         progress, cfg, env, tokenizer)
                if env.main:
                    _prune(run_dir, cfg.keep_last)
            paused += time.perf_counter() - t_pause
        result.step = progress.step
        if progress.step >= max_steps:
            if progress.step not in result.val_losses:  # a finished run resumed: evaluate it once more
                logger.log(progress.step, val_loss=validate())
            model_sd, _ = _full_state(raw)
            if env.main:
                result.final = method.save(raw, run_dir / "final", tokenizer, state_dict=model_sd)
            env.barrier()
    finally:
        bar.close()
        logger.close()
    return result

