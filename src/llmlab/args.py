"""Option groups of the training commands (pretrain, finetune, distill): `--train.*`, `--lora.*`, `--freeze.*`,
`--bottleneck.*` and `--kd.*`, each a dataclass whose fields and defaults are stated only here.

Kept free of torch imports so that the command line can build its parser (and `--help`) without loading torch.
jsonargparse reads the `Args:` section of each docstring, so every field is documented in `--help`.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmlab.errors import LLMLabError


@dataclass
class TrainConfig:
    """Options of the training loop (`llmlab.train.train`).

    Args:
        lr: Peak learning rate, reached after the warmup.
        min_lr_ratio: The cosine decay ends at min_lr_ratio * lr (LLaMA: 0.1).
        warmup_steps: Steps of linear warmup from ~0 to lr.
        max_steps: Optimizer steps of the whole run (the LR schedule spans them).
        max_tokens: If set, the run length in training tokens instead; max_steps is derived from it.
        batch_size: Sequences per micro-batch on each process.
        grad_accum: Micro-batches accumulated per optimizer step; global batch = batch_size * grad_accum * processes.
        seq_len: Tokens per training sequence.
        beta1: AdamW beta1.
        beta2: AdamW beta2 (LLaMA: 0.95).
        weight_decay: AdamW decoupled weight decay, applied to matrices only (not to norms and biases).
        grad_clip: Clip the global gradient norm to this value (0 = no clipping).
        precision: auto (bf16 autocast on CUDA and on CPUs that compute bf16 natively: AVX-512 BF16 or AMX; fp32
            on other CPUs, where bf16 is emulated and slower), fp32, bf16 (autocast; trained weights stay fp32,
            frozen ones of LoRA/adapter/QLoRA runs are kept in bf16), or bf16-true (every weight in bf16, no
            autocast: least memory, fastest, updates rounded to bf16).
        activation_checkpointing: Recompute each block's activations in the backward pass (less memory, ~30% slower).
        compile: Compile the model with torch.compile (each transformer block, in place: one block's compile time,
            5-30 s). Unset (null, the default) = auto: compiled for LoRA/adapter training under bf16 autocast on a
            CPU, runs of 100 steps or more (~10% faster steps there, docs/finetune.md), eager otherwise.
        dense_base: Keep a dense copy of a quantized base (LoRA/adapters on GGUF blocks) in the autocast dtype while
            training, beside the blocks: the same weights, multiplied with one GEMM instead of dequantized a chunk at
            a time twice a step (2 bytes a weight in bf16; ~30% faster CPU LoRA steps, docs/finetune.md). Unset
            (null, the default) = auto: under autocast, when the copies take at most a quarter of the memory
            available; false keeps only the blocks (least memory).
        int8_base: Multiply a quantized base (LoRA/adapters on GGUF blocks) in int8 while training: its weights
            requantized per output row (1 byte a weight beside the blocks), inputs and gradients quantized per row,
            one int8 GEMM each way; the MLP's down projection and the head stay on the float path, and the SwiGLU
            and LoRA A inputs are saved in bf16 for the backward (llmlab/lean.py). An approximation (the
            loss moves ~0.3%, docs/finetune.md) for CPUs without native bf16, whose int8 GEMM runs at 2-4x their
            fp32 one. Unset (null, the default) = auto: where precision auto trains in fp32 and the CPU's int8 GEMM
            was measured at least 1.3x faster, if the copies fit in a quarter of the memory available (an explicit
            --train.precision fp32 keeps fp32 products).
        eval_every: Validation loss every this many steps (0 = only at the start and the end).
        eval_batches: Micro-batches per validation (per process).
        save_every: Write a checkpoint every this many steps (0 = only at the end).
        keep_last: Keep this many most recent checkpoints (0 = keep all).
        log_every: Write a metrics row every this many steps.
        seed: Seed of the model initialisation, the data order and every random choice in training.
        device: auto (CUDA if present, one GPU per process under torchrun), cpu, cuda or cuda:N.
        strategy: auto (ddp under torchrun, else one process), ddp, or fsdp (FSDP2 fully_shard), for torchrun runs.
        stop_at: End this invocation after this step with a checkpoint (the schedule still spans max_steps);
            resume continues the run. For jobs with a time slot shorter than the run.
    """

    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    max_steps: int = 1000
    max_tokens: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    precision: str = "auto"
    activation_checkpointing: bool = False
    compile: bool | None = None
    dense_base: bool | None = None
    int8_base: bool | None = None
    eval_every: int = 100
    eval_batches: int = 10
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    strategy: str = "auto"
    stop_at: int | None = None

    def validate(self) -> None:
        """Raise a clear error naming the option for values the loop cannot run with."""
        positive = ("max_steps", "batch_size", "grad_accum", "seq_len", "log_every", "eval_batches")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise LLMLabError(f"training option '{name}' must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "keep_last"):
            if getattr(self, name) < 0:
                raise LLMLabError(f"training option '{name}' must be >= 0, got {getattr(self, name)!r}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise LLMLabError(f"training option 'max_tokens' must be positive, got {self.max_tokens!r}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise LLMLabError(f"training options need lr > 0 and 0 <= min_lr_ratio <= 1, got lr={self.lr}, "
                              f"min_lr_ratio={self.min_lr_ratio}")
        if self.precision not in ("auto", "fp32", "bf16", "bf16-true"):
            raise LLMLabError(f"training option 'precision' must be auto, fp32, bf16 or bf16-true, got "
                              f"{self.precision!r}")
        if self.strategy not in ("auto", "ddp", "fsdp"):
            raise LLMLabError(f"training option 'strategy' must be auto, ddp or fsdp, got {self.strategy!r}")
        if self.stop_at is not None and self.stop_at <= 0:
            raise LLMLabError(f"training option 'stop_at' must be a positive step, got {self.stop_at!r}")


METHOD_NAMES = ("full", "freeze", "adapter", "lora", "qlora")  # `finetune --method`: llmlab.methods.METHODS' keys
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class LoRAConfig:
    """Options of LoRA fine-tuning (`--method lora`): W = W0 + scale * B A on the chosen projections.

    Args:
        r: Rank of the update B A (A: r x in, B: out x r).
        alpha: Scale numerator: scale = alpha / r (or alpha / sqrt(r) with rslora).
        dropout: Dropout on the adapter's input during training.
        targets: Projections to adapt, among q, k, v, o, gate, up, down (also q_proj ... down_proj), or `all`.
        rslora: Rank-stabilised LoRA: scale = alpha / sqrt(r), so larger ranks keep learning.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | str = "q,v"
    rslora: bool = False

    def target_list(self) -> list[str]:
        """The targets as short names (q, k, ...), checked."""
        raw = self.targets.split(",") if isinstance(self.targets, str) else list(self.targets)
        names = [t.strip().removesuffix("_proj") for t in raw if t.strip()]
        if names == ["all"]:
            return list(LORA_TARGETS)
        bad = [t for t in names if t not in LORA_TARGETS]
        if bad or not names:
            raise LLMLabError(f"LoRA target(s) {bad or raw} match no module: expected some of "
                              f"{', '.join(LORA_TARGETS)} (or q_proj ... down_proj, or all)")
        return list(dict.fromkeys(names))

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise LLMLabError(f"LoRA option 'r' must be a positive integer, got {self.r!r}")
        if not 0 <= self.dropout < 1:
            raise LLMLabError(f"LoRA option 'dropout' must be in [0, 1), got {self.dropout!r}")
        self.target_list()


@dataclass
class FreezeConfig:
    """Options of partial fine-tuning (`--method freeze`): the bottom blocks stay fixed, the top ones train.

    Args:
        top_blocks: How many of the last transformer blocks train (0: none, only what the options below add).
        train_norm: Also train the final RMSNorm (model.norm).
        train_head: Also train the output head (lm_head; with tied embeddings that is the embedding matrix too).
        modules: More modules to train, by name prefix (e.g. model.embed_tokens, model.layers.0.mlp).
    """

    top_blocks: int = 2
    train_norm: bool = True
    train_head: bool = False
    modules: list[str] | None = None


@dataclass
class BottleneckConfig:
    """Options of bottleneck adapters (`--method adapter`): x + up(act(down(x))) after attention and after the MLP.

    Args:
        dim: Bottleneck width (the down-projection's output size).
        activation: Nonlinearity between the projections: gelu, silu or relu.
    """

    dim: int = 16
    activation: str = "gelu"

    def validate(self) -> None:
        if not isinstance(self.dim, int) or self.dim <= 0:
            raise LLMLabError(f"adapter option 'dim' must be a positive integer, got {self.dim!r}")
        if self.activation not in ("gelu", "silu", "relu"):
            raise LLMLabError(f"adapter option 'activation' must be gelu, silu or relu, got {self.activation!r}")


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
