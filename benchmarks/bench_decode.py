"""Batch-1 greedy decoding speed: llmlab vs HF transformers (and llama.cpp when installed), same weights, same run.

Every engine decodes the same prompt for the same number of new tokens (EOS ignored); each is timed `--rounds`
times, interleaved, and the median is reported. llmlab's reduced-precision variants are only fair if they keep
quality, so the perplexity of each on a fixed text is printed beside its speed (fp32 is the reference).

    python benchmarks/bench_decode.py --ckpt checkpoints/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from llmlab.checkpoint import dtype_from_name, load_checkpoint
from llmlab.generate import generate_tokens
from llmlab.model import LLaMA
from llmlab.tokenizer import Tokenizer

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


def time_llmlab(model: LLaMA, prompt: list[int], n: int, compile: bool = False) -> float:
    t0 = time.perf_counter()
    steps = sum(1 for _ in generate_tokens(model, [prompt], n, compile=compile))
    dt = time.perf_counter() - t0
    assert steps == n, f"generated {steps} tokens, expected {n}"
    return n / dt


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
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF for llama.cpp (default: the SmolLM2 GGUF)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--variants", default="float32,bfloat16,bfloat16+compile",
                    help="llmlab weight dtypes to time; '+compile' wraps the decode step in torch.compile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from llmlab.hub import ensure_default_gguf, ensure_default_model

    ckpt = args.ckpt or ensure_default_model()
    tok = Tokenizer.from_folder(ckpt)
    prompt = tok.encode_chat(PROMPT)
    text_ids = tok.encode(TEXT)

    engines: dict[str, object] = {}
    quality: dict[str, float] = {}
    for variant in args.variants.split(","):
        model = load_checkpoint(ckpt, dtype=dtype_from_name(variant.removesuffix("+compile")))
        engines[f"llmlab {variant}"] = model
        quality[f"llmlab {variant}"] = perplexity(model, text_ids)

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

    def run(name: str, engine: object) -> float:
        if name.startswith("llmlab"):
            return time_llmlab(engine, prompt, args.new_tokens, compile=name.endswith("+compile"))
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
    speeds: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            speeds[name].append(run(name, engine))

    hf_speed = statistics.median(speeds["HF transformers float32"])
    ref_ppl = quality["llmlab float32"] if "llmlab float32" in quality else None
    print(f"\nbatch-1 greedy decode, {args.new_tokens} new tokens after a {len(prompt)}-token prompt, "
          f"{args.threads} threads, median of {args.rounds} (torch {torch.__version__})")
    print(f"{'engine':30} {'tokens/s':>9} {'vs HF':>7} {'perplexity':>11} {'vs fp32':>8}")
    for name in engines:
        s = statistics.median(speeds[name])
        ppl = quality.get(name)
        ppl_s = f"{ppl:11.3f}" if ppl else f"{'-':>11}"
        rel = f"{(ppl / ref_ppl - 1) * 100:+7.2f}%" if ppl and ref_ppl else f"{'-':>8}"
        print(f"{name:30} {s:9.1f} {s / hf_speed:6.2f}x {ppl_s} {rel}")


if __name__ == "__main__":
    main()
