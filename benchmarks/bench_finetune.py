"""Fine-tuning speed, memory and held-out loss: llmlab's methods (as `llmlab finetune` runs them) beside HF
transformers' full fine-tuning and HF + PEFT LoRA.

Rows (`--methods`), each llmlab one with the base weights and precision it trains with:
- lora: LoRA on the GGUF's quantized blocks kept by the checkpoint folder, precision auto (bf16 autocast on a CPU
  that computes bf16 natively, else fp32 with int8 products of the blocks where train.int8_base auto takes them:
  `--int8-base`), blocks compiled where train.compile auto compiles them (`--compile`): what
  `llmlab finetune --method lora` does by default;
- lora-float: LoRA on the float weights, precision auto; lora-fp32: on the float weights in fp32 (the old default);
- adapter (bottleneck, GGUF blocks, auto), freeze, full and qlora (float weights, auto);
- hf-peft-lora and hf-full: HF transformers (+ PEFT) in fp32, SDPA attention.
Every row trains the same checkpoint on the same batches of real text (README and docs, tokenized by the
checkpoint's tokenizer) with the same step (`llmlab.train.train_step`: forward, next-token loss, backward,
clipping, AdamW with the loop's parameter groups); the LoRA rows share rank, alpha and targets. After the steps,
the loss on held-out batches of the same text. Each row runs in its own subprocess so that its peak memory is its
own: the growth of the peak resident set over the process's size before the model was loaded (weights, gradients,
optimizer state and activations together). Ratios: tokens/s and memory against the HF row of the same kind (LoRA
and adapters: HF + PEFT LoRA; full and freeze: HF full), held-out loss against lora-fp32.

    python benchmarks/bench_finetune.py --batch-size 4 --seq-len 128 --steps 8 --docs docs/finetune.md
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import rss_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# row -> (llmlab method, base weights, precision); the HF rows are built apart
ROWS = {"lora": ("lora", "gguf", "auto"), "lora-float": ("lora", "float", "auto"),
        "lora-fp32": ("lora", "float", "fp32"), "adapter": ("adapter", "gguf", "auto"),
        "freeze": ("freeze", "float", "auto"), "full": ("full", "float", "auto"), "qlora": ("qlora", "float", "auto")}
HF_ROWS = ("hf-peft-lora", "hf-full")
METHODS = (*ROWS, *HF_ROWS)
DEFAULT_METHODS = "lora,lora-fp32,hf-peft-lora,full,hf-full"  # the rows of issue 17
REFERENCE = "hf-peft-lora"
LOSS_REFERENCE = "lora-fp32"
FULL_ROWS = ("full", "freeze", "hf-full")  # trained at --full-lr, compared with hf-full
MARK_BEGIN, MARK_END = "<!-- bench_finetune:begin -->", "<!-- bench_finetune:end -->"
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (checked: steps > warmup, known methods)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="checkpoint folder (default: the default model's cached import, which keeps "
                        "its GGUF as model.gguf)")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, among {', '.join(METHODS)}")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="training steps, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--eval-batches", type=int, default=4, help="held-out batches for the loss after training")
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate of the adapter rows")
    parser.add_argument("--full-lr", type=float, default=2e-5, help="learning rate of full, freeze and hf-full")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lora-targets", default="q,k,v,o,gate,up,down")
    parser.add_argument("--text", type=Path, nargs="*", help="text files to train on (default: README.md and "
                        "docs/*.md of the repository); the last 20%% of their tokens are held out")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--docs", type=Path, help="write the table into this markdown file (between markers) and "
                        "the bar chart into img/finetune-bench.png beside it")
    parser.add_argument("--compile", default="auto", choices=("auto", "yes", "no"),
                        help="compile the llmlab rows' blocks (auto: as `llmlab finetune`'s train.compile auto)")
    parser.add_argument("--int8-base", default="auto", choices=("auto", "yes", "no"),
                        help="int8 copies of the GGUF blocks for the llmlab rows on them (auto: as `llmlab finetune`'s "
                        "train.int8_base auto, taken where precision auto trains in fp32)")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # a child process's row
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must be larger than --warmup")
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.method_list if m not in METHODS]
    if bad or not args.method_list:
        parser.error(f"--methods: unknown {bad or args.methods!r}; choose among {', '.join(METHODS)}")
    return args


def cpu_summary(threads: int = 0) -> str:
    """The CPU features that decide the numbers: flags, torch's kernel capability, native bf16, threads (`threads`,
    0: torch's default)."""
    import torch

    from llmlab.hardware import cpu_capability, cpu_flags, native_bf16

    flags = [f for f in CPU_FLAGS if f in cpu_flags()]
    return (f"CPU flags: {' '.join(flags) or 'none of ' + ' '.join(CPU_FLAGS)}; torch capability "
            f"{cpu_capability()}; native bf16: {'yes' if native_bf16() else 'no'}; "
            f"{threads or torch.get_num_threads()} threads")


def text_tokens(ckpt: str, files: list[Path] | None) -> list[int]:
    """The token ids of the benchmark's text (README.md and docs/*.md unless `files`), one document after another."""
    from llmlab.tokenizer import Tokenizer

    files = files or [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    tok = Tokenizer.from_folder(ckpt)
    ids: list[int] = []
    for f in files:
        ids += tok.encode(Path(f).read_text(encoding="utf-8"))
    return ids


def batches_of(ids: list[int], count: int, batch: int, seq: int, start: int = 0) -> list[dict]:
    """`count` batches of `batch` consecutive windows of seq + 1 tokens from `start` (wrapping around the span)."""
    import torch

    t = torch.tensor(ids)
    width = seq + 1
    n = max(1, (len(ids) - start) // width)
    out = []
    for i in range(count):
        rows = torch.stack([t[start + ((i * batch + j) % n) * width:][:width] for j in range(batch)])
        out.append({"input_ids": rows[:, :-1], "labels": rows[:, 1:]})
    return out


def peft_lora(model, cfg):
    """`model` (HF) with PEFT LoRA adapters of the same rank, alpha, dropout and targets as LoRAConfig `cfg`."""
    import peft

    targets = [f"{t}_proj" for t in cfg.target_list()]
    return peft.get_peft_model(model, peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                      target_modules=targets))


def _hf_model(row: str, ckpt: str, cfg) -> tuple:
    import torch
    import transformers
    from bench_train import hf_method

    model = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa")
    return (peft_lora(model, cfg) if row == REFERENCE else model), hf_method()


def _llmlab_model(row: str, ckpt: str, lora, compile: str = "auto", int8_base: str = "auto") -> tuple:
    """The prepared model, its method, the autocast dtype of a row and whether its blocks were compiled, loaded as
    `llmlab finetune` loads it (train.compile auto decides for a run of the default length, 1,000 steps)."""
    import torch

    from llmlab.args import TrainConfig
    from llmlab.finetune import load_base
    from llmlab.methods import make_method
    from llmlab.precision import compile_auto, setup_precision
    from llmlab.train import compile_blocks

    name, base, precision = ROWS[row]
    method = make_method(name, ckpt, lora=lora)
    model, _ = load_base(Path(ckpt), name, base, "cpu")
    model = method.prepare(model)
    choice = {"auto": None, "yes": True, "no": False}
    int8 = choice[int8_base] if base == "gguf" and name in ("lora", "adapter") else None
    amp = setup_precision(model, method, precision, torch.device("cpu"), int8_base=int8)
    wanted = choice[compile]
    compiled = compile_auto(wanted, method, amp, torch.device("cpu"), TrainConfig().max_steps, model)
    if compiled:
        compile_blocks(model)  # compiled lazily, in the first (untimed) warm-up step
    return model, method, amp, compiled


def run_method(args: argparse.Namespace) -> dict:
    """Train row `args.method` for `args.steps` steps in this process; tokens/s, peak memory, losses."""
    import torch

    from llmlab.args import LoRAConfig, TrainConfig
    from llmlab.train import Env, build_optimizer, train_step

    if args.threads:
        torch.set_num_threads(args.threads)
    lora = LoRAConfig(r=args.lora_r, alpha=args.lora_alpha, targets=args.lora_targets)
    import peft  # noqa: F401  every side imports the same libraries before the baseline, so none pays for them
    import transformers  # noqa: F401

    from llmlab.quantized import trains_in_int8
    if args.method == "qlora":
        import bitsandbytes  # noqa: F401
    ids = text_tokens(args.ckpt, args.text)
    split = len(ids) * 4 // 5
    train_batches = batches_of(ids[:split], args.steps, args.batch_size, args.seq_len)
    held_out = batches_of(ids, args.eval_batches, args.batch_size, args.seq_len, start=split)
    base_rss = rss_bytes()
    amp, compiled = None, False
    if args.method in HF_ROWS:
        model, method = _hf_model(args.method, args.ckpt, lora)
    else:
        model, method, amp, compiled = _llmlab_model(args.method, args.ckpt, lora, args.compile, args.int8_base)
    model.train()
    lr = args.full_lr if args.method in FULL_ROWS else args.lr
    cfg = TrainConfig(lr=lr, weight_decay=0.0, grad_clip=1.0)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(named, cfg, Env(device=torch.device("cpu")))
    params = [p for _, p in named]
    losses, t0 = [], 0.0
    for i, batch in enumerate(train_batches):
        if i == args.warmup:
            t0 = time.perf_counter()
        loss, _ = train_step(model, method, optimizer, params, [batch], cfg.grad_clip, amp)
        losses.append(float(loss))
    seconds = time.perf_counter() - t0
    int8 = args.method not in HF_ROWS and trains_in_int8(model)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        held = sum(float(method.loss(model, b)) for b in held_out) / len(held_out)
    return {"tokens_per_s": (args.steps - args.warmup) * args.batch_size * args.seq_len / seconds,
            "peak_bytes": peak, "trainable": sum(p.numel() for p in params), "first_loss": losses[0],
            "last_loss": losses[-1], "held_out_loss": held,
            "autocast": (str(amp).replace("torch.", "") if amp else "fp32") + (", int8 base" if int8 else "")
            + (", compiled" if compiled else "")}


def hf_counterpart(row: str) -> str:
    """The HF row a row's speed and memory are compared with."""
    return "hf-full" if row in FULL_ROWS else REFERENCE


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}x" if b else "-"


def table(results: dict[str, dict]) -> str:
    """Markdown table of the results: tokens/s and peak memory against each row's HF counterpart (`hf_counterpart`),
    held-out loss against lora-fp32 (when they ran)."""
    loss_ref = results.get(LOSS_REFERENCE, {}).get("held_out_loss")
    lines = ["| row | base weights | compute | trainable params | tokens/s | vs HF | peak memory (MiB) | vs HF | "
             "held-out loss | vs lora-fp32 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        hf = results.get(hf_counterpart(name)) if name not in HF_ROWS else None
        base = ROWS[name][1] if name in ROWS else "float (HF)"
        held = r.get("held_out_loss")
        lines.append(f"| {name} | {base} | {r.get('autocast', 'fp32')} | {r['trainable'] / 1e6:,.2f}M | "
                     f"{r['tokens_per_s']:,.0f} | {_ratio(r['tokens_per_s'], hf and hf['tokens_per_s'])} | "
                     f"{r['peak_bytes'] / 2**20:,.0f} | {_ratio(r['peak_bytes'], hf and max(hf['peak_bytes'], 1))} | "
                     f"{'-' if held is None else f'{held:.4f}'} | "
                     f"{'-' if held is None or not loss_ref else f'{(held / loss_ref - 1) * 100:+.2f}%'} |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    """Two bar charts side by side: tokens/s and peak memory per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    colors = ["tab:gray" if n in HF_ROWS else "tab:blue" for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(names, [results[n]["tokens_per_s"] for n in names], color=colors)
    a.set_ylabel("training tokens/s (higher is better)")
    b.bar(names, [results[n]["peak_bytes"] / 2**20 for n in names], color=colors)
    b.set_ylabel("peak memory growth, MiB (lower is better)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title, fontsize=8, wrap=True)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(doc: Path, block: str) -> None:
    """Put `block` between the markers of `doc` (appended, with the markers, when they are missing)."""
    text = doc.read_text() if doc.is_file() else "# Fine-tuning\n"
    new = f"{MARK_BEGIN}\n{block}\n{MARK_END}"
    if MARK_BEGIN in text and MARK_END in text:
        text = re.sub(re.escape(MARK_BEGIN) + ".*?" + re.escape(MARK_END), lambda _: new, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    if args.method:
        print(json.dumps(run_method(args)))
        return {}
    if args.ckpt is None:
        from llmlab.hub import ensure_default_model

        args.ckpt = str(ensure_default_model())
    if not (Path(args.ckpt) / "config.json").is_file():
        sys.exit(f"bench_finetune: no checkpoint at {args.ckpt} (llmlab download smollm2-135m-instruct --out ...)")
    raw = [*(sys.argv[1:] if argv is None else argv), "--ckpt", args.ckpt]
    results = {}
    for name in args.method_list:
        proc = subprocess.run([sys.executable, __file__, *raw, "--method", name], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{name} run failed:\n{proc.stderr[-4000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name}: {r['tokens_per_s']:,.0f} tokens/s, {r['peak_bytes'] / 2**20:,.0f} MiB, held-out loss "
              f"{r['held_out_loss']:.4f}", file=sys.stderr, flush=True)
    title = (f"{args.ckpt}, batch {args.batch_size} x {args.seq_len} tokens, {args.steps - args.warmup} timed steps "
             f"after {args.warmup}, LoRA r={args.lora_r} alpha={args.lora_alpha} on {args.lora_targets}, "
             f"lr {args.lr} (full, freeze: {args.full_lr}); {cpu_summary(args.threads)}")
    text = table(results)
    print(title + "\n" + text)
    if args.docs:
        png = args.docs.parent / "img" / "finetune-bench.png"
        plot(results, png, title)
        write_docs(args.docs, f"{title}\n\n{text}\n\n![tokens/s and peak memory per method](img/{png.name})")
    return results


if __name__ == "__main__":
    main()
