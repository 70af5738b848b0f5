"""Load test of `llmlab serve`: N concurrent streaming chat clients on loopback for a bounded time, against one.

For each server setting (`--settings`: "old" = fp32 float weights and an eager decode step, `--quantize none --dtype
float32 --compile off`, issue 16's before; "default" = `llmlab serve`'s defaults, the fast path) it starts the server
(`llmlab serve CKPT`, a subprocess), then runs two phases of `--duration` seconds each: one client, then `--clients`
clients. Every client loops: send a streaming chat completion (the official `openai` client,
`stream_options.include_usage`), read it to the end, send the next. A phase stops starting requests after
`--duration` and waits for the ones in flight; its throughput is the completion tokens of all its requests over its
wall time. Prints the CPU flags, both phases of each setting (tokens/s, requests, errors, median time to first
token), the ratio aggregate / single, and one client's speed-up of the default over the old setting; exits 1 if any
request failed.

With `--draft CKPT` the default setting is measured a second time as "default+draft" (`llmlab serve --draft CKPT
--draft-tokens K`), so one run shows one client with and without speculative decoding (which only a request running
alone uses: the clients' phase mostly batches), with the share of drafted tokens kept. With a draft the "mean batch"
column counts tokens per decoding forward (a round's kept drafts included).

    flock /tmp/llmlab-cpu.lock .venv/bin/python benchmarks/bench_serve.py --clients 16 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

QUESTIONS = [
    "What is the capital of France?", "Give me three tips for learning to cook.", "Explain photosynthesis simply.",
    "Write a haiku about the sea.", "Why is the sky blue?", "How do I boil an egg?", "What is a prime number?",
    "Name some planets of the solar system.", "What does a compiler do?", "Describe a cat to a child.",
    "How can I sleep better?", "What is machine learning?", "Suggest a name for a bakery.",
    "What is the boiling point of water?", "How do bees make honey?", "Tell me a fun fact about octopuses.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def client_loop(client, model: str, worker: int, deadline: float, max_tokens: int, stats: dict) -> None:
    i = 0
    while time.perf_counter() < deadline:
        question = QUESTIONS[(worker * 7 + i) % len(QUESTIONS)]
        start, first, tokens = time.perf_counter(), None, 0
        try:
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                temperature=0.7, seed=worker * 1000 + i, stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - start
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
        except Exception as e:  # counted and shown; the run fails at the end
            stats["errors"].append(f"{type(e).__name__}: {e}")
        else:
            stats["tokens"] += tokens
            stats["requests"] += 1
            if first is not None:
                stats["ttft"].append(first)
        i += 1


def health(base_url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=10) as r:
        return json.loads(r.read())


async def phase(base_url: str, model: str, clients: int, duration: float, max_tokens: int) -> dict:
    import openai

    before = health(base_url)

    async with openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600) as client:
        stats = {"tokens": 0, "requests": 0, "errors": [], "ttft": []}
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client, model, w, start + duration, max_tokens, stats)
                               for w in range(clients)))
        wall = time.perf_counter() - start
    after = health(base_url)
    steps = after["steps"] - before["steps"]
    drafted, kept = (after.get(k, 0) - before.get(k, 0) for k in ("drafted", "kept"))
    return {"clients": clients, "mean_batch": round((after["tokens"] - before["tokens"]) / max(steps, 1), 1),
            "prefill_tokens_reused": after["prefix_tokens"] - before["prefix_tokens"], "wall_s": round(wall, 1),
            "requests": stats["requests"], "tokens": stats["tokens"],
            "tokens_per_s": round(stats["tokens"] / wall, 2), "errors": len(stats["errors"]),
            "first_errors": stats["errors"][:3],
            "median_ttft_s": round(statistics.median(stats["ttft"]), 3) if stats["ttft"] else None,
            "drafted": drafted, "kept": kept}


# (--quantize, --dtype, --compile) of each server setting measured; "old" is issue 16's before: fp32 float weights,
# eager steps
SETTINGS = {"old": ("none", "float32", "off"), "default": ("auto", "auto", "auto")}


def run_setting(args: argparse.Namespace, quantize: str, dtype: str, compile: str, draft: Path | None = None
                ) -> dict | None:
    """Start `llmlab serve` with these weights (and `draft`), run the warm-up, one client, then `--clients` clients;
    stop it."""
    port = free_port()
    cmd = [sys.executable, "-m", "llmlab.cli", "serve", str(args.ckpt), "--port", str(port), "--model-name", "bench",
           "--max-batch", str(args.clients), "--queue-size", str(4 * args.clients), "--max-seq-len",
           str(args.max_seq_len), "--dtype", dtype, "--quantize", quantize, "--compile", compile]
    if draft is not None:
        cmd += ["--draft", str(draft), "--draft-tokens", str(args.draft_tokens)]
    env = {**os.environ, "LLMLAB_API_KEY": ""}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    server = subprocess.Popen(cmd, env=env)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        import urllib.request

        for _ in range(6000):  # loading, the first run's kernel measurements, compiling the decode step
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
                break
            except OSError:
                if server.poll() is not None:
                    print("bench_serve: the server exited", file=sys.stderr)
                    return None
                time.sleep(0.2)
        asyncio.run(phase(base_url, "bench", 1, args.warmup, args.max_tokens))  # allocator, first calls
        one = asyncio.run(phase(base_url, "bench", 1, args.duration, args.max_tokens))
        many = asyncio.run(phase(base_url, "bench", args.clients, args.duration, args.max_tokens))
    finally:
        server.terminate()
        server.wait(60)
    ratio = many["tokens_per_s"] / one["tokens_per_s"] if one["tokens_per_s"] else float("nan")
    return {"quantize": quantize, "dtype": dtype, "compile": compile, "single": one, "concurrent": many,
            "ratio": round(ratio, 2), "draft": None if draft is None else str(draft)}


def cpu_line() -> str:
    """The CPU flags that decide the fast path (native bf16, VNNI, AMX, AVX-512/AVX2) and torch's dispatch."""
    from llmlab.hardware import cpu_capability, cpu_flags, native_bf16

    shown = sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx_vnni")) or f in ("avx2", "fma"))
    return (f"CPU flags: {' '.join(shown) or 'unknown'}; torch dispatch {cpu_capability()}; "
            f"native bf16: {native_bf16('cpu')}; threads {os.environ.get('OMP_NUM_THREADS', 'torch default')}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, help="checkpoint folder (default: the default model's cached import, "
                                              "which keeps its GGUF)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds each phase starts requests")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of one client before measuring")
    ap.add_argument("--max-seq-len", type=int, default=512, help="the server's --max-seq-len")
    ap.add_argument("--threads", type=int, help="the server's intra-op threads (OMP_NUM_THREADS; default: torch's)")
    ap.add_argument("--settings", default="old,default", help="comma-separated: old (--quantize none --dtype float32 "
                    "--compile off), default (the server's defaults)")
    ap.add_argument("--draft", type=Path, help="also measure the default setting with this draft model "
                                               "(`llmlab serve --draft`)")
    ap.add_argument("--draft-tokens", type=int, default=4, help="with --draft: tokens drafted per round")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.ckpt is None:
        from llmlab.hub import ensure_default_model

        args.ckpt = ensure_default_model()
    if not (Path(args.ckpt) / "config.json").is_file():
        print(f"bench_serve: {args.ckpt} is not a checkpoint folder (run `make model`)", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or not names:
        print(f"bench_serve: --settings: unknown {unknown}; expected some of {', '.join(SETTINGS)}", file=sys.stderr)
        return 2
    runs = [(name, *SETTINGS[name], None) for name in names]
    if args.draft is not None:
        runs.append(("default+draft", *SETTINGS["default"], args.draft))
    results = {}
    for name, *setting in runs:
        result = run_setting(args, *setting)
        if result is None:
            return 2
        results[name] = result
    print(cpu_line())
    header = ("setting", "clients", "wall s", "requests", "tokens", "tokens/s", "TTFT p50 s", "mean batch", "errors")
    widths = (34, 8, 7, 9, 7, 9, 11, 11, 7)
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    for name, res in results.items():
        label = f"{name} ({res['quantize']}/{res['dtype']}/{res['compile']})"
        for r in (res["single"], res["concurrent"]):
            print(f"{label:>34} {r['clients']:>8} {r['wall_s']:>7} {r['requests']:>9} {r['tokens']:>7} "
                  f"{r['tokens_per_s']:>9} {r['median_ttft_s']!s:>11} {r['mean_batch']:>11} {r['errors']:>7}")
    for name, res in results.items():
        print(f"{name}: aggregate throughput ratio, {args.clients} clients / 1 client: {res['ratio']:.2f}x "
              "(goal >= 6x)")
    if "old" in results and "default" in results:
        old, new = results["old"], results["default"]
        speedup = new["single"]["tokens_per_s"] / old["single"]["tokens_per_s"] if old["single"]["tokens_per_s"] else 0
        print(f"1 client, default / old: {speedup:.2f}x (goal >= 3x); TTFT p50 default {new['single']['median_ttft_s']}"
              f" s vs old {old['single']['median_ttft_s']} s (goal: no worse)")
    if "default" in results and "default+draft" in results:
        plain, spec = results["default"]["single"], results["default+draft"]["single"]
        ratio = spec["tokens_per_s"] / plain["tokens_per_s"] if plain["tokens_per_s"] else float("nan")
        kept = f"{spec['kept'] / spec['drafted']:.0%}" if spec["drafted"] else "n/a"
        print(f"1 client, default+draft / default: {ratio:.2f}x; drafts kept {kept} ({spec['kept']} of "
              f"{spec['drafted']}); {args.clients} clients kept {results['default+draft']['concurrent']['kept']} of "
              f"{results['default+draft']['concurrent']['drafted']}")
    errors = False
    for name, res in results.items():
        for r in (res["single"], res["concurrent"]):
            errors |= bool(r["errors"])
            for e in r["first_errors"]:
                print(f"error ({name}, {r['clients']} clients): {e}", file=sys.stderr)
    if args.json:
        first = next(iter(results.values()))  # the first setting's rows also at the top, as before
        args.json.write_text(json.dumps({**{k: first[k] for k in ("single", "concurrent", "ratio")},
                                         "settings": results, "cpu": cpu_line(), "command": " ".join(sys.argv)},
                                        indent=2))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
