"""Speed and memory on one GPU: every case of issue 9 for llmlab and its baselines, side by side, one Markdown table.

Random weights, bf16, sequence length 2048, the same batches and the same training step (`llmlab.train.train_step`:
forward, loss, backward, clipping, fused AdamW) for every engine; only the model differs:

- training, full and LoRA r16 on every linear (smollm2-135m batch 16, tinyllama-1.1b batch 8): llmlab with its
  transformer blocks compiled, the chunked head + cross-entropy and bf16 autocast (LoRA: the frozen base held in
  bf16) against HF transformers (SDPA, eager) and HF + PEFT; tokens/s, MFU of the GPU's bf16 dense peak
  (6 x matmul parameters + 12 x layers x width x sequence FLOPs per token), peak GiB;
- QLoRA (NF4 base, activation checkpointing) on tinyllama-1.1b at the LoRA batch, against HF + PEFT LoRA;
- decoding: batch 1 through llmlab's static KV cache with the decode step compiled (`mode="reduce-overhead"`:
  CUDA graphs) against HF `generate` eager and with its static cache + compile; batch 32 against HF eager; the
  batch-1 speed as a fraction of the memory-bandwidth bound (weights + KV bytes read per token / bandwidth);
- memory: the largest batch of tinyllama-1.1b full training at sequence 4096, llmlab (activation checkpointing +
  chunked loss) against HF (gradient checkpointing), found by doubling then bisecting until out of memory.
- litgpt's own model, compiled, for the training rows when `litgpt` is importable.

Each group of cases runs in a subprocess (its compile caches and memory are its own) that prints one JSON line per
case; peak memory is `torch.cuda.max_memory_allocated` after a reset at the start of each case. The whole run keeps
to `--budget` seconds (default 450, compilation included): cases that would not fit are reported as skipped.
Run it as `python benchmarks/gpu.py` on the GPU; `--smoke` runs every code path at tiny sizes on the CPU.
Only torch, transformers and (for LoRA/QLoRA rows) peft and bitsandbytes are needed besides llmlab.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# bf16 dense tensor-core peak (FLOP/s) and memory bandwidth (bytes/s), by device-name fragment; first match wins
GPUS = [("H200 NVL", 835e12, 4.8e12), ("H200", 989e12, 4.8e12), ("GH200", 989e12, 4.0e12),
        ("H100 NVL", 835e12, 3.9e12), ("H100 PCIe", 756e12, 2.0e12), ("H100", 989e12, 3.35e12),
        ("A100-SXM4-80GB", 312e12, 2.039e12), ("A100 80GB PCIe", 312e12, 1.935e12), ("A100", 312e12, 1.555e12),
        ("L40S", 362e12, 0.864e12), ("L4", 121e12, 0.3e12), ("RTX 4090", 165e12, 1.008e12)]
MODELS = {"smollm2-135m": 16, "tinyllama-1.1b": 8}  # preset -> training batch (the issue's table)
SMOKE_MODELS = {"tiny": 2}
LORA = dict(r=16, alpha=32.0, targets="all")
# seconds a case needs at least (compilation included) before it is started, on a GPU
COST = {"train": 25, "train-compiled": 60, "decode": 20, "decode-compiled": 60, "hf-compile": 90, "maxbatch": 60}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny models and sizes on the CPU: every code path, no numbers")
    p.add_argument("--device", default=None, help="cuda (default) or cpu (implied by --smoke)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run, compilation included")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=4, help="timed training steps per case (after --warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed first training steps (compilation)")
    p.add_argument("--new-tokens", type=int, default=128, help="decoded tokens per timed generation")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-batch-seq", type=int, default=4096, help="sequence length of the max-batch search")
    p.add_argument("--no-compile", action="store_true", help="llmlab eager everywhere (faster smoke runs)")
    p.add_argument("--skip", default="", help="comma-separated groups to leave out: train, decode, qlora, maxbatch, "
                   "hf-compile, litgpt")
    p.add_argument("--peak-tflops", type=float, help="bf16 dense peak of an unlisted GPU")
    p.add_argument("--bandwidth-tbs", type=float, help="memory bandwidth (TB/s) of an unlisted GPU")
    p.add_argument("--json", type=Path, help="also write every result row here")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a child: "engine:model:case,case"
    p.add_argument("--deadline", type=float, default=math.inf, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    if args.smoke:
        args.budget = 3600.0 if "--budget" not in (argv or sys.argv) else args.budget
        args.seq_len, args.steps, args.warmup = min(args.seq_len, 64), 1, 1
        args.new_tokens, args.prompt_len, args.max_batch_seq = 8, 8, 64
    args.skip_set = {s.strip() for s in args.skip.split(",") if s.strip()}
    return args


# -- numbers -------------------------------------------------------------------------------------------
def gpu_specs(name: str, args: argparse.Namespace) -> tuple[float | None, float | None]:
    """(bf16 dense peak FLOP/s, bandwidth bytes/s) of a device name; overrides win; None where unknown."""
    peak = bw = None
    for fragment, p, b in GPUS:
        if fragment in name:
            peak, bw = p, b
            break
    if args.peak_tflops:
        peak = args.peak_tflops * 1e12
    if args.bandwidth_tbs:
        bw = args.bandwidth_tbs * 1e12
    return peak, bw


def matmul_params(config) -> int:
    """Parameters that take part in a matmul per token: every block projection and the output head."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    block = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * block + c.vocab_size * c.hidden_size


def train_flops_per_token(config, seq_len: int) -> float:
    """6 N (forward + backward of the matmuls) + 12 L d T (attention scores and values), as PaLM's MFU counts."""
    width = config.num_attention_heads * config.head_dim
    return 6 * matmul_params(config) + 12 * config.num_hidden_layers * width * seq_len


def decode_bytes_per_step(config, batch: int, context: float, bytes_per: int = 2) -> float:
    """Bytes a decode step must read at least: every matmul weight once, plus each row's keys and values."""
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * bytes_per
    return matmul_params(config) * bytes_per + batch * context * kv


# -- the child: one engine, one model, several cases -------------------------------------------------------
class Worker:
    """Runs cases for one engine (llmlab, hf, litgpt) and one model preset in this process."""

    def __init__(self, args: argparse.Namespace, engine: str, preset: str) -> None:
        import torch

        from llmlab.config import ModelConfig

        self.args, self.engine, self.preset = args, engine, preset
        self.device = torch.device(args.device)
        self.config = ModelConfig.from_name(preset)
        self.cuda = self.device.type == "cuda"
        self.device_name = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"
        self.peak_flops, self.bandwidth = gpu_specs(self.device_name, args)
        self.batch = (SMOKE_MODELS if args.smoke else MODELS)[preset]
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True

    # measuring
    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_memory(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def reset_peak(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        import torch

        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None

    def batches(self, n: int, batch: int, seq_len: int) -> list[dict]:
        import torch

        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, self.config.vocab_size, (n, batch, seq_len + 1), generator=g)
        return [{"input_ids": t[:, :-1].to(self.device), "labels": t[:, 1:].to(self.device)} for t in tokens]

    # models
    def llmlab_model(self, dtype=None):
        import torch

        from llmlab.model import build_model

        return build_model(self.config, device=self.device, dtype=dtype or torch.float32)

    def hf_model(self, dtype=None):
        import torch
        from bench_train import hf_llama

        return hf_llama(self.config, device=str(self.device)).to(dtype or torch.float32)

    # training
    def train_setup(self, method_name: str, checkpointing: bool = False, compile: bool = True):
        """(model the step calls, method, trainable params, autocast dtype) for this engine and method."""
        import torch

        from llmlab.args import LoRAConfig
        from llmlab.methods import make_method
        from llmlab.precision import setup_precision
        from llmlab.train import compile_blocks

        lora = LoRAConfig(**LORA)
        if self.engine == "llmlab":
            method = make_method(method_name, lora=lora)
            model = method.prepare(self.llmlab_model())
            amp = setup_precision(model, method, "bf16", self.device)
            model.gradient_checkpointing = checkpointing
            if compile and not self.args.no_compile and method_name != "qlora":
                compile_blocks(model)
            return model, method, method.trainable_parameters(model), amp
        if self.engine == "hf":
            from bench_train import hf_method

            model = self.hf_model(torch.bfloat16 if method_name == "lora" else torch.float32)
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.config.use_cache = False
            if method_name == "lora":
                from bench_finetune import peft_lora

                model = peft_lora(model, lora)
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            return model, hf_method(), named, torch.bfloat16
        # litgpt: its own GPT, compiled whole, as its recipes do
        from litgpt.config import Config
        from litgpt.model import GPT

        from llmlab.losses import next_token_loss
        from llmlab.methods import Method

        class LitMethod(Method):
            def loss(self, model, batch):
                return next_token_loss(model(batch["input_ids"]), batch["labels"])

        name = {"smollm2-135m": "SmolLM2-135M", "tinyllama-1.1b": "tiny-llama-1.1b"}[self.preset]
        with torch.device(self.device):
            model = GPT(Config.from_name(name))
        named = list(model.named_parameters())
        return torch.compile(model), LitMethod(), named, torch.bfloat16

    def train(self, method_name: str, label: str) -> dict:
        from llmlab.args import TrainConfig
        from llmlab.train import Env, build_optimizer, train_step

        a = self.args
        self.reset_memory()
        model, method, named, amp = self.train_setup(method_name, checkpointing=method_name == "qlora")
        model.train()
        optimizer = build_optimizer(named, TrainConfig(lr=1e-4), Env(device=self.device))
        self.reset_peak()  # weights stay counted; the transient fp32 copies made while building do not
        params = [p for _, p in named]
        data = self.batches(a.warmup + a.steps, self.batch, a.seq_len)
        t0 = 0.0
        for i, batch in enumerate(data):
            if i == a.warmup:
                self.sync()
                t0 = time.perf_counter()
            loss, _ = train_step(model, method, optimizer, params, [batch], 1.0, amp)
        self.sync()
        tps = a.steps * self.batch * a.seq_len / (time.perf_counter() - t0)
        full = method_name == "full"
        flops = train_flops_per_token(self.config, a.seq_len)
        mfu = tps * flops / self.peak_flops if full and self.peak_flops else None
        return {"case": f"{'full' if full else 'LoRA r16'} b{self.batch}", "label": label, "tokens_per_s": tps,
                "mfu": mfu, "peak_gib": self.peak_gib(), "loss": float(loss)}

    def max_batch(self, label: str) -> dict:
        """Largest batch of full training at --max-batch-seq that fits: double until out of memory, then bisect."""
        import torch

        from llmlab.args import TrainConfig
        from llmlab.train import Env, build_optimizer, train_step

        seq, fits, fails, best = self.args.max_batch_seq, 0, None, {}
        self.reset_memory()
        model, method, named, amp = self.train_setup("full", checkpointing=True, compile=False)  # shapes change
        model.train()
        optimizer = build_optimizer(named, TrainConfig(lr=1e-4), Env(device=self.device))
        params = [p for _, p in named]
        fake_limit = 4 if self.args.smoke else None  # the CPU never runs out: simulate it to test the search
        batch = 1
        while (fails is None and batch <= 1024) or (fails is not None and fails - fits > max(1, fits // 8)):
            if time.time() + 15 > self.args.deadline:
                break
            try:
                if fake_limit is not None and batch > fake_limit:
                    raise torch.OutOfMemoryError("simulated out of memory (smoke run)")
                self.reset_peak()
                data = self.batches(1, batch, seq)[0]
                self.sync()
                t0 = time.perf_counter()
                train_step(model, method, optimizer, params, [data], 1.0, amp)
                self.sync()
                fits = batch
                best = {"tokens_per_s": batch * seq / (time.perf_counter() - t0), "peak_gib": self.peak_gib()}
            except torch.OutOfMemoryError:
                fails = batch
                optimizer.zero_grad(set_to_none=True)
            data = None
            self.reset_memory()
            batch = batch * 2 if fails is None else (fits + fails) // 2
        note = f"largest batch {fits}" + (f" ({fails} OOM)" if fails else " (search stopped)")
        return {"case": f"full, seq {seq}, max batch", "label": label, "max_batch": fits, "note": note,
                "mfu": None, **best}

    # decoding
    def decode(self, batch: int, label: str, hf_static: bool = False) -> dict:
        import torch

        a = self.args
        self.reset_memory()
        g = torch.Generator().manual_seed(1)
        prompts = torch.randint(0, self.config.vocab_size, (batch, a.prompt_len), generator=g)
        n = a.new_tokens
        if self.engine == "llmlab":
            from llmlab.generate import generate_tokens

            model = self.llmlab_model(torch.bfloat16).eval()
            compile = not a.no_compile

            def run(n: int = n) -> int:
                return sum(1 for _ in generate_tokens(model, prompts.tolist(), n, compile=compile))
        else:
            model = self.hf_model(torch.bfloat16).eval()
            x = prompts.to(self.device)
            extra = {"cache_implementation": "static"} if hf_static else {}

            def run(n: int = n) -> int:
                with torch.inference_mode():
                    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                         do_sample=False, eos_token_id=None, pad_token_id=0, **extra)
                return out.shape[1] - x.shape[1]

        self.reset_peak()
        # warm-up: compilation, CUDA graph capture, allocator; llmlab's cache (rounded up to 256 slots when
        # compiled) has the same shape for 8 new tokens, HF's static cache is sized to the call
        run(n if hf_static else min(n, 8))
        if hf_static:
            run()  # HF compiles its static-cache decode step on the first call or two
        self.sync()
        t0 = time.perf_counter()
        steps = run()
        self.sync()
        seconds = time.perf_counter() - t0
        assert steps == n, f"decoded {steps} tokens, expected {n}"
        if self.engine == "llmlab" and compile:  # the compiled step (and its CUDA graphs) holds this model
            from llmlab.generate import _COMPILED

            _COMPILED.clear()
            torch._dynamo.reset()
        tps = batch * n / seconds
        row = {"case": f"decode b{batch}", "label": label, "tokens_per_s": tps, "mfu": None,
               "peak_gib": self.peak_gib()}
        if self.bandwidth:
            bound = batch * self.bandwidth / decode_bytes_per_step(self.config, batch, a.prompt_len + n / 2)
            row["bandwidth_fraction"] = tps / bound
            row["note"] = f"{tps / bound:.0%} of the bandwidth bound ({bound:,.0f} tokens/s)"
        return row


def worker_cases(args: argparse.Namespace, engine: str) -> list[tuple[str, str, float]]:
    """(case id, engine label, seconds it needs) this engine runs for one model, in priority order."""
    compiled = not args.no_compile
    tc = COST["train-compiled" if compiled else "train"]
    dc = COST["decode-compiled" if compiled else "decode"]
    if engine == "llmlab":
        c = " (compiled blocks)" if compiled else ""
        return [("train-full", f"llmlab{c}", tc), ("train-lora", f"llmlab LoRA{c}", tc),
                ("decode-1", "llmlab static cache" + (" + compile" if compiled else "")
                 + (" + CUDA graphs" if compiled and args.device.startswith("cuda") else ""), dc),
                ("decode-32", "llmlab static cache" + (" + compile" if compiled else ""), dc),
                ("train-qlora", "llmlab QLoRA (NF4, act. ckpt, eager)", COST["train"])]
    if engine == "hf":
        return [("train-full", "HF transformers", COST["train"]), ("train-lora", "HF + PEFT LoRA", COST["train"]),
                ("decode-1", "HF generate, eager", COST["decode"]), ("decode-32", "HF generate, eager", COST["decode"])]
    if engine == "hf-compile":
        return [("decode-1-static", "HF generate, static cache + compile", COST["hf-compile"])]
    if engine == "maxbatch-llmlab":
        return [("maxbatch", "llmlab (act. ckpt + chunked loss)", COST["maxbatch"])]
    if engine == "maxbatch-hf":
        return [("maxbatch", "HF transformers (gradient ckpt)", COST["maxbatch"])]
    return [("train-full", "litgpt (compiled)", COST["train-compiled"])]


def run_worker(args: argparse.Namespace) -> None:
    """Child process: run this engine's cases for one model, one JSON line each (errors and OOM included)."""
    import torch

    engine, preset, case_ids = args.worker.split(":")
    base = engine.removeprefix("maxbatch-").replace("hf-compile", "hf")
    w = Worker(args, base, preset)
    cases = {c: (label, cost) for c, label, cost in worker_cases(args, engine)}
    for case in case_ids.split(","):
        label, cost = cases[case]
        row = {"model": preset, "case": case, "label": label}
        needs = {"train-qlora": "bitsandbytes", "train-lora": "peft" if base == "hf" else None}.get(case)
        if needs and not importable(needs):
            row["status"] = f"skipped ({needs} not installed)"
        elif time.time() + cost > args.deadline:
            row["status"] = "skipped (time budget)"
        else:
            try:
                if case.startswith("train-"):
                    row.update(w.train(case.removeprefix("train-"), label))
                elif case == "maxbatch":
                    row.update(w.max_batch(label))
                else:
                    batch = 1 if case.startswith("decode-1") else (32 if not args.smoke else 4)
                    row.update(w.decode(batch, label, hf_static=case == "decode-1-static"))
                row["status"] = "ok"
            except torch.OutOfMemoryError:
                row["status"] = "OOM"
            except Exception as e:  # report and go on with the next case
                traceback.print_exc()
                row["status"] = f"error: {type(e).__name__}: {str(e)[:120]}"
        row["case_id"], row["device"] = case, w.device_name
        print(json.dumps(row), flush=True)
        w.reset_memory()


# -- the parent: schedule, collect, print -------------------------------------------------------------------
def version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version(name)
    except PackageNotFoundError:
        return "not installed"


def importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def jobs(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(engine, model, case ids) in the order they run: the main comparisons first, the costly extras last."""
    models = list(SMOKE_MODELS if args.smoke else MODELS)
    skip = args.skip_set
    out = []
    for preset in models:
        for engine in ("hf", "llmlab"):
            cases = [c for c, _, _ in worker_cases(args, engine)]
            cases = [c for c in cases if not (c.startswith("train") and "train" in skip)
                     and not (c.startswith("decode") and "decode" in skip)]
            if engine == "llmlab" and ("qlora" in skip or preset != models[-1]):
                cases = [c for c in cases if c != "train-qlora"]
            out.append((engine, preset, cases))
    big = models[-1]
    if "maxbatch" not in skip:
        out += [("maxbatch-llmlab", big, ["maxbatch"]), ("maxbatch-hf", big, ["maxbatch"])]
    if "hf-compile" not in skip and "decode" not in skip:
        out += [("hf-compile", p, ["decode-1-static"]) for p in models]
    if "litgpt" not in skip and importable("litgpt") and not args.smoke:
        out += [("litgpt", p, ["train-full"]) for p in models]
    return [(e, p, c) for e, p, c in out if c]


def run_all(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    start = time.time()
    deadline = start + args.budget
    rows: list[dict] = []
    for engine, preset, cases in jobs(args):
        labels = {c: label for c, label, _ in worker_cases(args, engine)}
        left = deadline - time.time()
        if left < 20:
            rows += [{"model": preset, "case_id": c, "label": labels[c], "status": "skipped (time budget)"}
                     for c in cases]
            continue
        cmd = [sys.executable, __file__, *argv, "--worker", f"{engine}:{preset}:{','.join(cases)}",
               "--deadline", str(deadline)]
        print(f"[{time.time() - start:5.0f}s] {engine} {preset}: {', '.join(cases)}", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(left + 15, 30))
            out, err, code = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            out, err, code = (e.stdout or b"").decode(), (e.stderr or b"").decode(), "timeout"
        got = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        done = {r["case_id"] for r in got}
        status = "timeout (budget)" if code == "timeout" else f"crashed (exit {code})"
        got += [{"model": preset, "case_id": c, "label": labels[c], "status": status} for c in cases if c not in done]
        if code != 0 or any(r["status"].startswith("error") for r in got):
            print(err[-3000:], file=sys.stderr)
        rows += got
    return rows


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    """One Markdown table; each llmlab row's ratios are against the HF row of the same model and case."""
    order = ["train-full", "train-lora", "train-qlora", "decode-1", "decode-1-static", "decode-32", "maxbatch"]
    group = {"train-qlora": "train-lora", "decode-1-static": "decode-1"}
    lines = ["| model | case | engine | tokens/s | MFU | peak GiB | tokens/s vs HF | memory vs HF | notes |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    key = lambda r: (r["model"], order.index(r["case_id"]) if r["case_id"] in order else 99)  # noqa: E731
    ok = [r for r in rows if r.get("status") == "ok"]
    for r in sorted(rows, key=key):
        g = group.get(r["case_id"], r["case_id"])
        refs = [h for h in ok if h["model"] == r["model"] and group.get(h["case_id"], h["case_id"]) == g
                and h["label"].startswith("HF")]
        ref = max(refs, key=lambda h: h.get("tokens_per_s") or 0, default=None)  # HF's best (decode b1)
        speed = mem = "-"
        if r.get("status") == "ok" and ref is not None and not r["label"].startswith("HF"):
            if g == "maxbatch":
                speed = f"batch {r['max_batch']} vs {ref['max_batch']}"
            elif ref.get("tokens_per_s"):
                speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x"
            if r.get("peak_gib") and ref.get("peak_gib") and g != "maxbatch":
                mem = f"{r['peak_gib'] / ref['peak_gib']:.2f}x"
        status = r.get("status", "?")
        tps = fmt(r.get("tokens_per_s"), ",.0f") if status == "ok" else status
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        lines.append(f"| {r['model']} | {r.get('case', r['case_id'])} | {r['label']} | {tps} | {mfu} | "
                     f"{fmt(r.get('peak_gib'), '.1f')} | {speed} | {mem} | {r.get('note', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    for name in filter(None, os.environ.get("GPU_BENCH_FORBID", "").split(",")):
        sys.modules[name] = None  # tests: prove the script never imports these (jsonargparse, gguf)
    if args.worker:
        run_worker(args)
        return []
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():  # no CUDA context here: the GPU is the workers'
        sys.exit("gpu.py: no CUDA device (run with --smoke or --device cpu for a CPU check)")
    t0 = time.time()
    rows = run_all(args, argv)
    name = next((r["device"] for r in rows if r.get("device")), args.device)
    peak, bw = gpu_specs(name, args)
    versions = ", ".join(f"{m} {version(m)}" for m in ("torch", "transformers", "peft", "bitsandbytes", "litgpt"))
    print(f"\n{name}: bf16 peak {fmt(peak and peak / 1e12, '.0f')} TFLOP/s, bandwidth "
          f"{fmt(bw and bw / 1e12, '.2f')} TB/s; {versions}; seq {args.seq_len}, {args.steps} timed steps after "
          f"{args.warmup}, random weights, bf16; {time.time() - t0:.0f} s in all\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
