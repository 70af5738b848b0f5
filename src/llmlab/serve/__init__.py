"""Serving: an OpenAI-compatible HTTP API with continuous batching and per-request LoRA adapters.

`engine.Engine` owns the model and batches requests (continuous batching over a static KV cache, log-probabilities,
adapters loaded while it runs); a request and what it gets back are `request.GenerationRequest` and `request.Event`;
`draft.EngineDraft` decodes a request that runs alone speculatively with a draft model, `lora_multi.MultiLoRA`
applies a different LoRA adapter to each batch row, `api.create_app` is the FastAPI app: its routes and checks in
`api`, request schemas in `protocol`, what the routes share in `server`, the logic of each endpoint in
`completions`, `chat`, `responses` and `embeddings`, OpenAI's log-probability formats in `logprobs`, tools and
grounding in `copilot`, the chat page in `static/`. `load_engine` + `create_app` is what `llmlab serve` runs (with
`default_allowed_hosts` for its Host check); see docs/serve.md.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmlab.errors import LLMLabError
from llmlab.generate import eos_token_ids
from llmlab.loading import load_for_inference
from llmlab.quantized import QuantLinear
from llmlab.serve.engine import Engine
from llmlab.serve.lora_multi import MultiLoRA
from llmlab.speculative import check_draft_options, load_draft


def parse_adapters(specs: list[str] | None) -> dict[str, Path]:
    """`NAME=DIR` strings (the --adapter option) -> {name: folder}; a bare DIR is named after its folder."""
    out: dict[str, Path] = {}
    for spec in specs or []:
        name, eq, folder = spec.partition("=")
        if not eq:
            name, folder = Path(spec).name, spec
        if not name or not folder:
            raise LLMLabError(f"--adapter: expected NAME=DIR, got '{spec}'")
        if name in out:
            raise LLMLabError(f"--adapter: the name '{name}' is given twice")
        out[name] = Path(folder)
    return out


def default_allowed_hosts(bind_host: str) -> list[str]:
    """The Host names a server listening on `bind_host` accepts by default: on a loopback address only the local
    names, so a web page whose domain an attacker re-points at 127.0.0.1 (DNS rebinding) cannot reach it; on any
    other address every name (say --allowed-hosts there)."""
    import ipaddress

    local = ["localhost", "127.0.0.1", "[::1]"]
    if bind_host == "localhost":
        return local
    try:
        address = ipaddress.ip_address(bind_host.strip("[]"))
    except ValueError:
        return ["*"]
    if not address.is_loopback:
        return ["*"]
    own = f"[{address}]" if address.version == 6 else str(address)
    return list(dict.fromkeys([*local, own]))


COMPILE_CHOICES = ("auto", "on", "off")


def compile_possible(compile: str) -> bool:
    """Whether `--compile` may compile the decode step on this machine at all, before any model is loaded: on; auto
    on a CPU the compiled step was verified on (`hardware.compile_verified_cpu`: AVX-512 or AMX) with a C++ compiler
    for inductor; off never."""
    from llmlab.hardware import compile_verified_cpu, cpp_compiler

    if compile != "auto":
        return compile == "on"
    return compile_verified_cpu() and cpp_compiler() is not None


def _compiles(compile: str, model: Any) -> bool:
    """Whether the engine compiles its decode step (`--compile`): auto = on a CPU over quantized weights, where it
    measured faster (a step's many small kernels are where eager PyTorch's per-op cost shows), where
    `compile_possible` allows; on; off."""
    if compile != "auto":
        return compile == "on"
    return (compile_possible(compile) and model.device.type == "cpu"
            and any(isinstance(m, QuantLinear) for m in model.modules()))


def load_engine(checkpoint: str | Path, adapters: Mapping[str, str | Path] | None = None, max_batch: int = 16,
                max_seq_len: int = 2048, queue_size: int = 64, dtype: str = "auto", quantize: str = "auto",
                device: str = "auto", compile: str = "auto", draft: str | Path | None = None,
                draft_tokens: int = 4) -> Any:
    """Load CHECKPOINT (`load_for_inference`'s weights, dtype and device choices), its LoRA adapters and the `draft`
    model (`speculative.load_draft`: the model's tokenizer, dtype and device; `draft_tokens` a round) and start an
    `Engine` on them (its decode step compiled as `_compiles` says); returns (engine, tokenizer).

    The loading, the compilation and every step run on the engine's own thread (`Engine.run` says why: one thread
    computing keeps torch's OpenMP workers fast); this call waits until the engine is ready, and raises what loading
    raised."""
    if compile not in COMPILE_CHOICES:  # before the slow part
        raise LLMLabError(f"--compile: expected one of {', '.join(COMPILE_CHOICES)}, got '{compile}'")
    check_draft_options(draft, draft_tokens)
    built: list[Any] = []
    ready = threading.Event()

    def build_and_run() -> None:
        try:
            model, tokenizer, gen_config = load_for_inference(checkpoint, device=device, dtype=dtype,
                                                              quantize=quantize)
            multi = None
            if adapters:
                multi = MultiLoRA(model)
                for name, folder in adapters.items():
                    multi.add(name, folder)
            drafter = None if draft is None else load_draft(draft, model, tokenizer, draft_tokens, dtype=dtype)
            engine = Engine(model, tokenizer, eos_token_ids(tokenizer, gen_config), max_batch=max_batch,
                            max_seq_len=max_seq_len, queue_size=queue_size, adapters=multi,
                            compile=_compiles(compile, model), start=False, draft=drafter)
            built.append((engine, tokenizer))
        except BaseException as e:  # noqa: BLE001 - handed to the caller, raised there
            built.append(e)
            return
        finally:
            ready.set()
        engine.run()

    threading.Thread(target=build_and_run, name="llmlab-engine", daemon=True).start()
    ready.wait()
    if isinstance(built[0], BaseException):
        raise built[0]
    return built[0]
