"""Batch-1 greedy decoding speed: llmlab vs HF transformers (and llama.cpp when installed), same weights, same run.

Every engine decodes the same prompt for the same number of new tokens (EOS ignored); each is timed `--rounds`
times, interleaved, and the median is reported. llmlab's reduced-precision variants are only fair if they keep
quality, so the perplexity of each on a fixed text is printed beside its speed (fp32 is the reference), and the
bytes its weights occupy.

llmlab variants (`--variants`, comma-separated, each optionally `+compile` for the torch.compile'd decode step):
float32 / bfloat16 (the float checkpoint), gguf (the GGUF's own quantized blocks, `llmlab.quantized`, activations
in bf16), int8 / int4 (the float checkpoint quantized at load time). `--breakdown` profiles 16 decode steps of each
llmlab variant and splits a token's time into weight matmuls, attention and the rest; `--memory` runs each variant
in a fresh process (load, then 32 generated tokens) and reports its peak resident memory. `--startup` times what a
user waits for at each `llmlab generate`: a fresh process from launch to its first generated token (interpreter,
imports, loading the weights, prefill), for the GGUF variant building its packed cache (`llmlab.packed_cache`), the
same reading it back, the float32 folder, and llama.cpp.

`--draft CKPT` adds a speculative-decoding row (`llmlab.speculative`) for each compiled variant: the draft (a folder,
quantized at load like the variant (`--draft-quantize`), or a GGUF file) proposes `--draft-tokens` per check; the
row reports tokens/s, the share of drafted tokens kept, kept drafts per verifying forward and whether the text is
token for token the variant's own greedy text. The natural draft: `llmlab distill --student-layers every-other`.

    python benchmarks/bench_decode.py --ckpt checkpoints/smollm2-135m-instruct --variants float32,gguf+compile
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from llmlab.generate import generate_tokens
from llmlab.loading import load_for_inference
from llmlab.model import LLaMA
from llmlab.quantized import quantized_bytes
from llmlab.speculative import Draft
from llmlab.tokenizer import Tokenizer

WEIGHTS = ("float32", "bfloat16", "gguf", "int8", "int4")
# profiler events of a token's weight matmuls and of its attention (the rest of the token's time is "other")
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm"}
ATTENTION_OPS = {"aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::_scaled_dot_product_attention_math"}

PROMPT = [{"role": "user", "content": "Explain in a few paragraphs how a bicycle stays upright while moving."}]
# A fixed text (written for this benchmark) on which each variant's perplexity is measured.
TEXT = (
    "The river town woke slowly. Fishermen pushed their boats into the grey water while the baker opened his "
    "shutters and the smell of bread drifted over the square. Children ran past the church on their way to "
    "school, and an old dog followed them as far as the bridge before lying down in the sun. At the market, "
    "farmers set out baskets of apples, onions and late summer plums. Prices were written in chalk on small "
    "boards, and the women who ran the stalls argued cheerfully with their first customers. By nine o'clock the "
    "post office was busy: letters to cousins in the city, a parcel of books for a student, a form for a new "
    "fishing licence. The clerk, who had worked there for thirty years, knew every name and most of the news. "
    "In the afternoon clouds came in from the sea. The wind turned, the boats came back early, and people "
    "hurried home with their shopping held close. When the rain finally arrived it was heavy and warm, and it "
    "washed the dust from the streets. In the evening the lamps came on one by one, the cafe filled with "
    "fishermen comparing their catches, and the town settled into the quiet rhythm it had kept for centuries."
)


@torch.inference_mode()
def perplexity(model: LLaMA, ids: list[int]) -> float:
    x = torch.tensor([ids])
    logits = model(x[:, :-1]).float()
    nll = torch.nn.functional.cross_entropy(logits[0], x[0, 1:])
    return math.exp(nll.item())


def time_llmlab(model: LLaMA, prompt: list[int], n: int, compile: bool = False, draft: Draft | None = None,
                tokens: list[int] | None = None) -> float:
    """Tokens/s of one greedy generation of exactly n tokens (EOS ignored); its tokens go into `tokens`."""
    out = [] if tokens is None else tokens
    t0 = time.perf_counter()
    out.extend(step[0] for step in generate_tokens(model, [prompt], n, compile=compile, draft=draft))
    dt = time.perf_counter() - t0
    assert len(out) == n, f"generated {len(out)} tokens, expected {n}"
    return n / dt


def load_draft_for(variant: str, path: Path, target: LLaMA, tok: Tokenizer, k: int, quantize: str) -> Draft:
    """The draft of a variant's speculative row: a GGUF as it is, a folder in the variant's dtype, quantized by
    `quantize` (auto: int4 when the variant's weights are quantized)."""
    from llmlab.speculative import load_draft

    weights = variant.removesuffix("+compile")
    dtype = "float32" if weights == "float32" else "bfloat16"
    if quantize == "auto":
        quantize = "int4" if weights in ("gguf", "int8", "int4") else "none"
    if path.is_file() or quantize == "none":
        return load_draft(path, target, tok, k, dtype=dtype)
    model = load_for_inference(path, device="cpu", dtype=dtype, quantize=quantize)[0]
    draft = Draft(model, k)
    draft.check(target)
    return draft


def load_variant(weights: str, ckpt: Path, gguf: Path | None) -> LLaMA:
    """The model of a variant's weights (see the module docstring), on the CPU, in eval mode."""
    if weights in ("float32", "bfloat16"):
        return load_for_inference(ckpt, device="cpu", dtype=weights, quantize="none")[0]
    if weights == "gguf":
        from llmlab.hub import ensure_default_gguf

        return load_for_inference(gguf or ensure_default_gguf(), device="cpu", dtype="bfloat16")[0]
    return load_for_inference(ckpt, device="cpu", dtype="bfloat16", quantize=weights)[0]


def breakdown(model: LLaMA, prompt: list[int], compile: bool, steps: int = 16) -> dict[str, float]:
    """Milliseconds per decode token: all of it (timed without the profiler), and, from a profiled run, the part
    spent in weight matmuls and in attention; "other" is the rest (norms, RoPE, Python, guards, sampling)."""
    from torch.profiler import ProfilerActivity, profile

    gen = generate_tokens(model, [prompt], steps + 8 + 1, compile=compile)
    for _ in range(8):  # prefill and warm-up (and compilation) are not part of a decode token
        next(gen)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(gen)
    total = (time.perf_counter() - t0) / steps * 1e3
    gen.close()
    gen = generate_tokens(model, [prompt], steps + 8 + 1, compile=compile)
    for _ in range(8):
        next(gen)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            next(gen)
    gen.close()
    events = prof.key_averages()
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / steps / 1e3
    attention = sum(e.self_cpu_time_total for e in events if e.key in ATTENTION_OPS) / steps / 1e3
    return {"total": total, "matmul": matmul, "attention": attention, "other": total - matmul - attention}


def memory(variant: str, args: argparse.Namespace) -> tuple[float, float]:
    """Resident and peak resident MB of a fresh process that loads `variant` and generates 32 tokens (what
    `llmlab chat` holds), from /proc/self/status (Linux)."""
    cmd = [sys.executable, __file__, "--memory-probe", variant, "--threads", str(args.threads)]
    cmd += [f"--{k}={getattr(args, k)}" for k in ("ckpt", "gguf") if getattr(args, k) is not None]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rss, peak = out.stdout.strip().splitlines()[-1].split()
    return float(rss), float(peak)


def memory_probe(variant: str, ckpt: Path, gguf: Path | None) -> None:
    model = load_variant(variant.removesuffix("+compile"), ckpt, gguf)
    time_llmlab(model, [1, 2, 3, 4, 5, 6, 7, 8], 32, compile=variant.endswith("+compile"))
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    print(int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024)


STARTUP_KINDS = ("gguf, first load", "gguf, cached", "float32", "llama.cpp")


# llama.cpp's probe imports nothing but llama_cpp (no torch, no llmlab): its start-up is its own
LLAMA_PROBE = """import json, sys
import llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=1024, n_threads=int(sys.argv[3]), verbose=False)
llm.eval(json.loads(sys.argv[2]))
llm.sample(temp=0.0)
"""


def startup(kind: str, args: argparse.Namespace, cache: Path, prompt: list[int], gguf: Path) -> float:
    """Seconds from launching a fresh process to its first generated token (`kind`: one of STARTUP_KINDS)."""
    import json
    import os

    if kind == "llama.cpp":
        cmd = [sys.executable, "-c", LLAMA_PROBE, str(gguf), json.dumps(prompt), str(args.threads)]
    else:
        cmd = [sys.executable, __file__, "--startup-probe", kind, "--threads", str(args.threads)]
        cmd += [f"--{k}={getattr(args, k)}" for k in ("ckpt", "gguf") if getattr(args, k) is not None]
    env = {**os.environ, "LLMLAB_PACKED_CACHE": str(cache)}
    if kind == "gguf, first load":
        env["LLMLAB_PACKED_CACHE"] = str(cache / f"cold-{time.monotonic_ns()}")  # a cache that holds nothing
    t0 = time.perf_counter()
    subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return time.perf_counter() - t0


def startup_probe(kind: str, ckpt: Path, gguf: Path | None) -> None:
    """The llmlab side of `startup`: load the variant, prefill the prompt, pick one token."""
    prompt = Tokenizer.from_folder(ckpt).encode_chat(PROMPT)
    model = load_variant("float32" if kind == "float32" else "gguf", ckpt, gguf)
    time_llmlab(model, prompt, 1)


def time_hf(hf, prompt: list[int], n: int) -> float:
    x = torch.tensor([prompt])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    dt = time.perf_counter() - t0
    assert out.shape[1] - x.shape[1] == n
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=None, help="HF-format folder (default: the imported SmolLM2)")
    ap.add_argument("--gguf", type=Path, default=None,
                    help="GGUF for llama.cpp and the gguf variants (default: the SmolLM2 GGUF)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--variants", default="float32,bfloat16,bfloat16+compile,gguf,gguf+compile",
                    help=f"llmlab weights to time ({', '.join(WEIGHTS)}); '+compile' wraps the decode step in "
                         "torch.compile")
    ap.add_argument("--breakdown", action="store_true", help="split each llmlab variant's token time (profiled)")
    ap.add_argument("--memory", action="store_true", help="peak resident memory of each llmlab variant, own process")
    ap.add_argument("--no-hf", action="store_true", help="skip HF transformers (ratios are then vs the first variant)")
    ap.add_argument("--draft", type=Path, default=None,
                    help="a draft checkpoint (folder or GGUF): adds a speculative row for each compiled variant")
    ap.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per check")
    ap.add_argument("--draft-quantize", default="auto", choices=["auto", "none", "int8", "int4"],
                    help="how a draft folder's weights are held (auto: int4 for quantized variants)")
    ap.add_argument("--startup", action="store_true",
                    help="seconds from launching a fresh process to its first token (GGUF cold and cached, fp32, "
                         "llama.cpp)")
    ap.add_argument("--memory-probe", help=argparse.SUPPRESS)
    ap.add_argument("--startup-probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    bad = [v for v in args.variants.split(",") if v.removesuffix("+compile") not in WEIGHTS]
    if bad:
        ap.error(f"--variants: unknown {bad}; expected {', '.join(WEIGHTS)}, each optionally with +compile")
    torch.set_num_threads(args.threads)

    from llmlab.hub import ensure_default_gguf, ensure_default_model

    ckpt = args.ckpt or ensure_default_model()
    if args.memory_probe:
        return memory_probe(args.memory_probe, ckpt, args.gguf)
    if args.startup_probe:
        return startup_probe(args.startup_probe, ckpt, args.gguf)
    tok = Tokenizer.from_folder(ckpt)
    prompt = tok.encode_chat(PROMPT)
    text_ids = tok.encode(TEXT)

    engines: dict[str, object] = {}
    quality: dict[str, float] = {}
    sizes: dict[str, float] = {}
    models: dict[str, LLaMA] = {}
    for variant in args.variants.split(","):
        weights = variant.removesuffix("+compile")
        if weights not in models:
            models[weights] = load_variant(weights, ckpt, args.gguf)
        engines[f"llmlab {variant}"] = models[weights]
        quality[f"llmlab {variant}"] = perplexity(models[weights], text_ids)
        sizes[f"llmlab {variant}"] = quantized_bytes(models[weights]) / 2**20

    drafts: dict[str, tuple[LLaMA, Draft]] = {}  # speculative row -> (the variant's model, its draft)
    if args.draft is not None:
        for variant in args.variants.split(","):
            if variant.endswith("+compile"):
                model = models[variant.removesuffix("+compile")]
                name = f"llmlab {variant} draft k={args.draft_tokens}"
                drafts[name] = (model, load_draft_for(variant, args.draft, model, tok, args.draft_tokens,
                                                      args.draft_quantize))
                engines[name] = model
                sizes[name] = sizes[f"llmlab {variant}"] + quantized_bytes(drafts[name][1].model) / 2**20

    if not args.no_hf:
        import transformers

        hf = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        engines["HF transformers float32"] = hf
        with torch.inference_mode():
            x = torch.tensor([text_ids])
            quality["HF transformers float32"] = math.exp(hf(x, labels=x).loss.item())

    llama_cpp = None
    try:
        import llama_cpp  # optional: pip install llama-cpp-python (builds from source)
    except ImportError:
        print("llama.cpp: not installed (pip install llama-cpp-python to compare)")
    if llama_cpp is not None:
        gguf = args.gguf or ensure_default_gguf()
        engines["llama.cpp (GGUF as shipped)"] = llama_cpp.Llama(str(gguf), n_ctx=1024, n_threads=args.threads,
                                                                 verbose=False)

    texts: dict[str, list[int]] = {}  # each llmlab engine's last generated tokens

    def run(name: str, engine: object) -> float:
        if name in drafts:
            texts[name] = []
            return time_llmlab(engine, prompt, args.new_tokens, True, drafts[name][1], texts[name])
        if name.startswith("llmlab"):
            texts[name] = []
            return time_llmlab(engine, prompt, args.new_tokens, name.endswith("+compile"), tokens=texts[name])
        if name.startswith("HF"):
            return time_hf(engine, prompt, args.new_tokens)
        t0 = time.perf_counter()
        engine.reset()
        engine.eval(prompt)
        for _ in range(args.new_tokens - 1):
            engine.eval([engine.sample(temp=0.0)])
        return args.new_tokens / (time.perf_counter() - t0)

    for name, engine in engines.items():  # warm-up (and compilation, for the compiled variant)
        run(name, engine)
    for _, draft in drafts.values():  # the speculative rows' statistics are those of the timed rounds
        draft.stats = type(draft.stats)()
    speeds: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            speeds[name].append(run(name, engine))

    base = "HF transformers float32" if not args.no_hf else next(iter(engines))
    base_speed = statistics.median(speeds[base])
    ref_ppl = quality["llmlab float32"] if "llmlab float32" in quality else None
    from llmlab.hardware import cpu_capability, native_bf16

    print(f"\nbatch-1 greedy decode, {args.new_tokens} new tokens after a {len(prompt)}-token prompt, "
          f"{args.threads} threads, median of {args.rounds} (torch {torch.__version__}, CPU {cpu_capability()}, "
          f"native bf16 {native_bf16()}); ratios vs {base}")
    print(f"{'engine':30} {'tokens/s':>9} {'ratio':>7} {'perplexity':>11} {'vs fp32':>8} {'weights MB':>11}")
    for name in engines:
        s = statistics.median(speeds[name])
        ppl = quality.get(name)
        ppl_s = f"{ppl:11.3f}" if ppl else f"{'-':>11}"
        rel = f"{(ppl / ref_ppl - 1) * 100:+7.2f}%" if ppl and ref_ppl else f"{'-':>8}"
        size = f"{sizes[name]:11.1f}" if name in sizes else f"{'-':>11}"
        print(f"{name:30} {s:9.1f} {s / base_speed:6.2f}x {ppl_s} {rel} {size}")
    llama_name = "llama.cpp (GGUF as shipped)"
    if drafts:
        print(f"\nspeculative decoding, draft {args.draft} (ratios vs the variant without a draft"
              f"{' and vs llama.cpp' if llama_name in speeds else ''})")
        print(f"{'engine':36} {'tokens/s':>9} {'vs plain':>9} {'vs llama.cpp':>13} {'kept':>6} {'kept/check':>11} "
              f"{'same text':>10}")
        for name, (model, draft) in drafts.items():
            plain = name.rsplit(" draft", 1)[0]
            s = statistics.median(speeds[name])
            vs_llama = f"{s / statistics.median(speeds[llama_name]):12.2f}x" if llama_name in speeds else f"{'-':>13}"
            st = draft.stats
            same = "yes" if texts[name] == texts[plain] else "no"
            print(f"{name:36} {s:9.1f} {s / statistics.median(speeds[plain]):8.2f}x {vs_llama} "
                  f"{st.acceptance_rate:6.0%} {st.accepted_per_verify:11.2f} {same:>10}")
    if args.breakdown:
        print(f"\nper decode token, ms (profiled; {args.threads} threads)")
        print(f"{'engine':30} {'total':>7} {'matmul':>7} {'attention':>10} {'other':>7}")
        for name, engine in engines.items():
            if name.startswith("llmlab") and name not in drafts:
                b = breakdown(engine, prompt, name.endswith("+compile"))
                print(f"{name:30} {b['total']:7.2f} {b['matmul']:7.2f} {b['attention']:10.2f} {b['other']:7.2f}")
    if args.memory:
        print("\nresident memory of a fresh process after loading and generating 32 tokens (and its peak), MB")
        for variant in args.variants.split(","):
            rss, peak = memory(variant, args)
            print(f"{'llmlab ' + variant:30} {rss:8.0f} {peak:8.0f}")
    if args.startup:
        import tempfile

        kinds = [k for k in STARTUP_KINDS if k != "llama.cpp" or llama_cpp is not None]
        with tempfile.TemporaryDirectory(prefix="llmlab-startup-") as tmp:
            gguf = args.gguf or ensure_default_gguf()
            startup("gguf, cached", args, Path(tmp), prompt, gguf)  # fills the cache the cached rows read
            times = {k: statistics.median(startup(k, args, Path(tmp), prompt, gguf) for _ in range(args.rounds))
                     for k in kinds}
        ref = times.get("llama.cpp")
        print(f"\nstart-up: a fresh process from launch to its first generated token, s (median of {args.rounds})")
        for kind, sec in times.items():
            print(f"{kind:30} {sec:8.2f}" + (f" {sec / ref:6.1f}x llama.cpp's" if ref else ""))


if __name__ == "__main__":
    main()
