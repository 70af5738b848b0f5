"""lm-evaluation-harness model adapter: runs any harness task on an llmlab checkpoint (optionally with an adapter).

    python -m llmlab.eval.harness --model llmlab --model_args ckpt=checkpoints/smollm2-135m-instruct \\
        --batch_size 8 --tasks arc_easy --limit 50

lm-evaluation-harness (0.4.x) finds models in its own registry and has no plugin discovery, so a third-party model
is available to it once the module that registers it has been imported: `python -m llmlab.eval.harness` imports
this module and then runs the harness's own command line with the same arguments; from Python,
`import llmlab.eval.harness` before `lm_eval.simple_evaluate(model="llmlab", ...)`. Model arguments: ckpt (required),
adapter, dtype, quantize (as `llmlab evaluate`'s options), max_gen_toks; batch size and device come from the
harness's own --batch_size and --device.

Scoring goes through `llmlab.eval.runner.TextModel`, the same code `llmlab evaluate` uses; the harness's requests
map onto it one to one (loglikelihood, loglikelihood_rolling, generate_until).
"""

from __future__ import annotations

import sys
from typing import Any

import lm_eval.models  # noqa: F401  (fills the harness's registry first: it imports its models only when empty)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from llmlab.errors import LLMLabError
from llmlab.eval.runner import TextModel
from llmlab.generate import eos_token_ids
from llmlab.loading import load_for_inference


class LLMLabLM(LM):
    """An llmlab checkpoint as an lm-evaluation-harness `LM`."""

    def __init__(self, ckpt: str | None = None, adapter: str | None = None, batch_size: int | str = 8,
                 device: str | None = None, dtype: str = "auto", quantize: str = "auto",
                 max_gen_toks: int | str = 256, text_model: TextModel | None = None, **unused: Any) -> None:
        super().__init__()
        if text_model is None:
            if not ckpt:
                raise LLMLabError("lm_eval --model llmlab needs --model_args ckpt=<checkpoint folder>")
            if device and device.startswith("cuda") and not torch.cuda.is_available():
                # the harness's --device defaults to cuda; on a machine without one, run on the CPU instead
                print(f"llmlab: --device {device} is not available here; using cpu", file=sys.stderr)
                device = "cpu"
            model, tokenizer, gen_config = load_for_inference(ckpt, [adapter] if adapter else [],
                                                              device=device or "auto", dtype=dtype,
                                                              quantize=quantize)
            size = int(batch_size) if str(batch_size).isdigit() else 8  # the harness's "auto" -> our default
            text_model = TextModel(model, tokenizer, eos_token_ids(tokenizer, gen_config), batch_size=size)
        self.lm = text_model
        self.max_gen_toks = int(max_gen_toks)
        self.name = str(ckpt or "llmlab-model")

    # -- the three request kinds -------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is greedy) per request; an empty context scores after BOS/EOS."""
        return self.lm.loglikelihood([tuple(r.args) for r in requests], "lm_eval loglikelihood")

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, every token scored once (perplexity tasks)."""
        return self.lm.loglikelihood_rolling([r.args[0] for r in requests], "lm_eval rolling")

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continuations until a stop string of the request's `until`, grouped by identical generation settings."""
        groups: dict[tuple, list[int]] = {}
        settings: dict[tuple, dict[str, Any]] = {}
        for i, r in enumerate(requests):
            kwargs = dict(r.args[1]) if len(r.args) > 1 and r.args[1] else {}
            until = kwargs.pop("until", [])
            until = [until] if isinstance(until, str) else list(until or [])
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            key = (tuple(until), max_new, temperature)
            groups.setdefault(key, []).append(i)
            settings[key] = {"stop": until, "max_new_tokens": max_new, "temperature": temperature}
        out: list[str] = [""] * len(requests)
        for key, idx in groups.items():
            texts = self.lm.generate([requests[i].args[0] for i in idx], desc="lm_eval generate", **settings[key])
            for i, t in zip(idx, texts):
                out[i] = t
        return out

    # -- chat templates (`--apply_chat_template`) ---------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.lm.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.lm.tokenizer.apply_chat_template(chat_history, add_generation_prompt)


def main(argv: list[str] | None = None) -> None:
    """`lm_eval`'s command line with the `llmlab` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":  # `python -m llmlab.eval.harness`: register the importable class, not __main__'s copy
    from llmlab.eval.harness import main as _main

    _main()
else:
    register_model("llmlab")(LLMLabLM)
