"""Options of knowledge distillation (`llmlab distill`), kept free of torch imports like `llmlab.args`, so that the
command line builds its parser and `--help` without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

from llmlab.errors import LLMLabError

LOSS_NAMES = ("forward_kl", "reverse_kl", "jsd")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class DistillConfig:
    """How the student learns from the teacher (see `llmlab.distill_losses` for the formulas).

    Args:
        loss: The divergence D(teacher, student): forward_kl (KL(P||Q), mean-seeking), reverse_kl (KL(Q||P),
            mode-seeking) or jsd (generalized Jensen-Shannon with weight beta).
        temperature: Both distributions are softened by this temperature; the divergence is scaled by its square.
        alpha: Weight of the divergence; the label cross-entropy gets 1 - alpha (1 = pure distillation).
        beta: The JSD weight in (0, 1): M = beta P + (1 - beta) Q (0.5 = symmetric JSD).
        top_k: Match the teacher only on its k most likely tokens plus "all others" (needed by the cache).
        cache: Compute the teacher's top-k log-probabilities once over the training data, store them in a
            safetensors file and reuse them (later epochs and later runs do not run the teacher again).
        cache_path: The cache file (default: RUN_DIR/teacher_topk.safetensors); an existing one is reused when it
            was made by the same teacher with the same top_k and temperature.
        teacher_dtype: Precision of the frozen teacher's weights: auto (bfloat16 on CUDA, float32 on CPU), float32,
            bfloat16 or float16.
        on_policy_fraction: Share of training batches on which the student samples continuations of the batch's
            prompts and learns the teacher's distribution on its own samples (generalized KD); 0 = off.
        on_policy_tokens: Tokens the student samples per on-policy sequence.
        on_policy_temperature: Sampling temperature of the student's on-policy continuations.
    """

    loss: str = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.5
    beta: float = 0.5
    top_k: int | None = None
    cache: bool = False
    cache_path: str | None = None
    teacher_dtype: str = "auto"
    on_policy_fraction: float = 0.0
    on_policy_tokens: int = 64
    on_policy_temperature: float = 1.0

    def validate(self) -> None:
        """Raise a clear error naming the option for values distillation cannot run with."""
        if self.loss not in LOSS_NAMES:
            raise LLMLabError(f"distillation option 'loss' must be one of {', '.join(LOSS_NAMES)}, got {self.loss!r}")
        if not self.temperature > 0:
            raise LLMLabError(f"distillation option 'temperature' must be > 0, got {self.temperature!r}")
        if not 0 <= self.alpha <= 1:
            raise LLMLabError(f"distillation option 'alpha' must be in [0, 1], got {self.alpha!r}")
        if self.loss == "jsd" and not 0 < self.beta < 1:
            raise LLMLabError(f"distillation option 'beta' must be strictly between 0 and 1, got {self.beta!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise LLMLabError(f"distillation option 'top_k' must be a positive integer, got {self.top_k!r}")
        if self.cache and self.top_k is None:
            raise LLMLabError("distillation option 'cache' stores the teacher's top-k log-probabilities: set top_k "
                              "too (e.g. 64)")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise LLMLabError(f"distillation option 'teacher_dtype' must be one of {', '.join(TEACHER_DTYPES)}, got "
                              f"{self.teacher_dtype!r}")
        if not 0 <= self.on_policy_fraction <= 1:
            raise LLMLabError(f"distillation option 'on_policy_fraction' must be in [0, 1], got "
                              f"{self.on_policy_fraction!r}")
        if not isinstance(self.on_policy_tokens, int) or self.on_policy_tokens < 1:
            raise LLMLabError(f"distillation option 'on_policy_tokens' must be a positive integer, got "
                              f"{self.on_policy_tokens!r}")
        if not self.on_policy_temperature >= 0:
            raise LLMLabError(f"distillation option 'on_policy_temperature' must be >= 0, got "
                              f"{self.on_policy_temperature!r}")
