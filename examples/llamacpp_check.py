"""Check that llama.cpp runs an exported GGUF exactly as llmlab runs the checkpoint: same prompt tokens, same greedy
tokens, same text (with a LoRA adapter too).

Two steps, so that the llama.cpp side needs nothing but llama-cpp-python (a separate venv is fine):

    python examples/llamacpp_check.py expect CKPT --prompt "What is the capital of France?" [--adapter DIR] \\
        --out expect.json                                   # llmlab: greedy tokens and text of `llmlab generate`
    llmlab export CKPT --gguf model.gguf --type f32         # [+ llmlab export CKPT --adapter DIR --gguf lora.gguf]
    /path/to/venv/bin/python examples/llamacpp_check.py run model.gguf expect.json [--lora lora.gguf]

`run` prints what llama.cpp generated and exits 0 when prompt tokens, generated tokens and text all equal llmlab's.
"""

from __future__ import annotations

import argparse
import json
import sys


def expect(args: argparse.Namespace) -> None:
    """Greedy generation with llmlab, as `llmlab generate CKPT --prompt P --temperature 0` does it."""
    from llmlab.generate import SamplingParams, eos_token_ids, generate
    from llmlab.loading import load_for_inference

    model, tokenizer, gen_config = load_for_inference(args.checkpoint, [args.adapter] if args.adapter else [],
                                                      device="cpu", dtype="float32")
    chat = tokenizer.chat_template is not None  # as `llmlab generate` decides by default
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}]) if chat else args.prompt
    ids = tokenizer.encode(prompt, add_bos=False)
    eos = sorted(eos_token_ids(tokenizer, gen_config))
    done = generate(model, tokenizer, [ids], args.max_new_tokens, SamplingParams(temperature=0.0), eos)[0]
    result = {"prompt": prompt, "prompt_ids": ids, "ids": done.token_ids, "text": done.text, "eos_ids": eos,
              "max_new_tokens": args.max_new_tokens}
    with open(args.out, "w") as f:
        json.dump(result, f, ensure_ascii=False, indent=1)
    print(f"llmlab: {done.text!r}")


def run(args: argparse.Namespace) -> int:
    """Greedy generation with llama.cpp from the same prompt text; compare with what `expect` wrote."""
    from llama_cpp import Llama

    with open(args.expect) as f:
        want = json.load(f)
    llm = Llama(model_path=args.model, lora_path=args.lora, n_ctx=0, n_threads=args.threads, seed=0, verbose=False)
    ids = llm.tokenize(want["prompt"].encode("utf-8"), add_bos=False, special=True)
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        if token in want["eos_ids"]:
            break
        out.append(token)
        if len(out) == want["max_new_tokens"]:
            break
    text = llm.detokenize(out).decode("utf-8", errors="replace")
    checks = {"prompt tokens": ids == want["prompt_ids"], "generated tokens": out == want["ids"],
              "text": text == want["text"]}
    print(json.dumps({"llama.cpp": text, "llmlab": want["text"], "same": checks}, ensure_ascii=False))
    return 0 if all(checks.values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    e = sub.add_parser("expect", help="greedy tokens and text from llmlab")
    e.add_argument("checkpoint")
    e.add_argument("--prompt", required=True)
    e.add_argument("--adapter")
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--out", required=True)
    r = sub.add_parser("run", help="the same with llama.cpp, compared")
    r.add_argument("model")
    r.add_argument("expect")
    r.add_argument("--lora")
    r.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.step == "expect":
        expect(args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
