"""Compute-budget planner: model size vs training tokens vs GPU-hours vs energy vs cost, and memory per use.

Two questions a user asks before training or buying hardware:
1. *Given a budget, which model should I train?* `plan_budget` spends a budget (FLOPs, GPU-hours or dollars)
   on a ladder of candidate sizes, predicts each one's loss with Chinchilla's fitted law, marks the
   compute-optimal one, and, for an expected inference load, the one that is cheapest over its life
   (trained on more tokens to reach the same loss, then served).
2. *What does this model need?* `memory_report` gives the memory for inference (bf16 / int8 / NF4 weights
   plus the KV cache) and for fine-tuning it fully, with LoRA or with QLoRA.

Formulas and assumptions (every number is an estimate; the docs page docs/plan.md repeats them):
- Training FLOPs per token = 6·N + 12·n_layer·d_attn·T (the count PaLM, Chowdhery et al. 2022, defines MFU
  with): 6·N for the forward and backward matmuls over N weights, 12·n_layer·d_attn·T for the attention scores
  and the weighted sum over a context of T tokens (no discount for the causal mask), d_attn = heads·head_dim.
  Here N = `num_params(include_embeddings=False)` plus the output head (vocab·hidden): the head is a matmul over
  every token even when it is tied to the input table, while the input embedding is a lookup that costs no FLOPs.
- Wall time = FLOPs / (n_gpus · peak · MFU); GPU-hours = n_gpus · wall hours; energy = GPU-hours · watts · PUE
  (the LLaMA paper's accounting, Touvron et al. 2023, section 6). Peak is the dense bf16/fp16 tensor rate.
- Predicted loss L(N, D) = E + A/N^α + B/D^β with Hoffmann et al. 2022's fitted constants (approach 3):
  E=1.69, A=406.4, B=410.7, α=0.34, β=0.28. Here N counts *all* parameters, embeddings included, as in that paper.
  The values are nats per token on their data and tokenizer: compare models with them, don't expect them on yours.
- Inference FLOPs per generated token ≈ 2·N (same N as training, attention ignored), served at `serve_mfu`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from llmlab.config import PRESETS, ModelConfig
from llmlab.errors import LLMLabError

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    """One accelerator: dense bf16/fp16 tensor peak, memory, board power and an hourly price.

    The prices are assumptions, rough 2024-25 on-demand rates per GPU at GPU-focused clouds (hyperscalers charge
    more, spot and reserved capacity less); pass `--price-per-hour` for yours.
    """

    name: str
    tflops: float  # dense bf16/fp16 tensor TFLOP/s (not the 2x "with sparsity" figure)
    memory_gib: float
    watts: float  # board power (TDP) of the stated form factor
    price_per_hour: float  # USD per GPU-hour, an assumption


GPUS: dict[str, GPU] = {g.name: g for g in [
    GPU("V100-32GB", 125.0, 32, 300, 0.80),  # SXM2; fp16 tensor cores (no bf16)
    GPU("A100-40GB", 312.0, 40, 400, 1.30),  # SXM4
    GPU("A100-80GB", 312.0, 80, 400, 1.75),  # SXM4, the LLaMA paper's GPU
    GPU("H100-PCIe", 756.0, 80, 350, 2.25),
    GPU("H100-SXM", 989.0, 80, 700, 2.75),
    GPU("H200", 989.0, 141, 700, 3.50),  # SXM; same compute as H100-SXM, more and faster memory
    GPU("L4", 121.0, 24, 72, 0.80),
    GPU("RTX-4090", 165.0, 24, 450, 0.50),  # fp32 accumulate (330 with fp16 accumulate)
]}
DEFAULT_GPU = "A100-80GB"
DEFAULT_MFU = 0.40  # well-tuned large runs reach 0.35-0.55; the LLaMA-65B run implies ~0.49 (see implied_mfu)
DEFAULT_SEQ_LEN = 2048  # LLaMA's and Chinchilla's training context


def resolve_gpu(name: str = DEFAULT_GPU, tflops: float | None = None, watts: float | None = None,
                price_per_hour: float | None = None, memory_gib: float | None = None) -> GPU:
    """The named GPU from `GPUS`, with any of its numbers overridden (a GPU missing from the table: name any and
    override all four)."""
    if name not in GPUS:
        raise LLMLabError(f"unknown GPU '{name}' for --gpu; known: {', '.join(GPUS)} "
                          "(or pick one and override --gpu-tflops, --gpu-watts, --price-per-hour)")
    for option, value in (("--gpu-tflops", tflops), ("--gpu-watts", watts), ("--price-per-hour", price_per_hour),
                          ("--gpu-memory", memory_gib)):
        _positive(option, value, allow_none=True)
    gpu = GPUS[name]
    changes = {k: v for k, v in dict(tflops=tflops, watts=watts, price_per_hour=price_per_hour,
                                     memory_gib=memory_gib).items() if v is not None and v != getattr(gpu, k)}
    return replace(gpu, name=f"{name} (custom)" if changes else name, **changes)


def _positive(option: str, value: float | None, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or isinstance(value, bool) or not math.isfinite(value) or value < 0 or (value == 0
                                                                                          and not allow_zero):
        raise LLMLabError(f"{option} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


# -- FLOPs ------------------------------------------------------------------------------------------------------
def matmul_params(config: ModelConfig) -> int:
    """Weights that multiply every token's activations: the non-embedding parameters plus the output head."""
    return config.num_params(include_embeddings=False) + config.vocab_size * config.hidden_size


def train_flops_per_token(config: ModelConfig, seq_len: int = DEFAULT_SEQ_LEN) -> float:
    """6·N + 12·n_layer·d_attn·T (PaLM's count): forward + backward FLOPs per training token."""
    d_attn = config.num_attention_heads * config.head_dim
    return 6 * matmul_params(config) + 12 * config.num_hidden_layers * d_attn * seq_len


def inference_flops_per_token(config: ModelConfig) -> float:
    """≈ 2·N: one multiply-add per weight per generated token (attention over the context ignored)."""
    return 2 * matmul_params(config)


def gpu_hours_for(flops: float, gpu: GPU, mfu: float) -> float:
    """GPU-hours that `flops` take at `mfu` of the GPU's peak."""
    return flops / (gpu.tflops * 1e12 * mfu) / 3600


def energy_mwh(gpu_hours: float, watts: float, pue: float) -> float:
    """GPU-hours · board power · PUE (the data centre's overhead factor), in MWh, as the LLaMA paper counts it."""
    return gpu_hours * watts * pue / 1e6


def implied_mfu(config: ModelConfig, tokens_per_s_per_gpu: float, gpu: GPU, seq_len: int = DEFAULT_SEQ_LEN) -> float:
    """The model-FLOPs utilisation a measured training throughput means: tokens/s · FLOPs per token / peak."""
    _positive("--tokens-per-s", tokens_per_s_per_gpu)
    return tokens_per_s_per_gpu * train_flops_per_token(config, seq_len) / (gpu.tflops * 1e12)


# -- the loss law ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossLaw:
    """L(N, D) = E + A/N^alpha + B/D^beta: predicted loss of N parameters trained on D tokens."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n_params: float, tokens: float) -> float:
        return self.E + self.A / n_params**self.alpha + self.B / tokens**self.beta

    def tokens_for_loss(self, n_params: float, loss: float) -> float | None:
        """Tokens N parameters need to reach `loss`; None where no amount of data gets there (too small a model)."""
        rest = loss - self.E - self.A / n_params**self.alpha
        return (self.B / rest) ** (1 / self.beta) if rest > 0 else None

    def optimum(self, flops: float) -> tuple[float, float]:
        """(N, D) minimising the loss at compute C = 6·N·D: the closed form in Hoffmann et al.'s section 3.3."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        a = self.beta / (self.alpha + self.beta)
        n = g * (flops / 6) ** a
        return n, flops / (6 * n)


CHINCHILLA = LossLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


# -- candidate models --------------------------------------------------------------------------------------------
LADDER = (2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 36, 40, 48, 56, 64, 72, 80, 96, 112, 128, 144, 160)


def llama_shape(n_layer: int, vocab_size: int = 32000) -> ModelConfig:
    """A LLaMA-like model of `n_layer` layers: 128 hidden units per layer and per head (LLaMA-7B and 13B follow this
    rule exactly), SwiGLU width 8/3·hidden rounded up to 256, multi-head attention, untied 32k vocabulary."""
    hidden = 128 * n_layer
    return ModelConfig(name=f"L{n_layer}-d{hidden}", vocab_size=vocab_size, hidden_size=hidden,
                       num_hidden_layers=n_layer, num_attention_heads=n_layer)


def candidate_models() -> list[ModelConfig]:
    """The presets (test sizes excepted) and the `llama_shape` ladder, smallest first, without duplicate shapes."""
    configs = [ModelConfig.from_name(n) for n in PRESETS if not n.startswith("tiny")]
    configs += [llama_shape(n) for n in LADDER]
    seen, out = set(), []
    for c in configs:
        key = (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
               c.num_key_value_heads, c.head_dim, c.tie_word_embeddings)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return sorted(out, key=lambda c: c.num_params())


# -- training one model -------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One training run: its tokens, FLOPs, GPU-hours, wall time, energy, cost and predicted loss."""

    tokens: float
    flops: float
    gpu_hours: float
    wall_hours: float
    energy_mwh: float
    cost_usd: float
    loss: float


def estimate_run(config: ModelConfig, tokens: float, gpu: GPU, mfu: float, n_gpus: int = 1, pue: float = 1.1,
                 seq_len: int = DEFAULT_SEQ_LEN, law: LossLaw = CHINCHILLA) -> Run:
    """What training `config` on `tokens` tokens costs on `n_gpus` GPUs at `mfu`."""
    flops = train_flops_per_token(config, seq_len) * tokens
    hours = gpu_hours_for(flops, gpu, mfu)
    return Run(tokens=tokens, flops=flops, gpu_hours=hours, wall_hours=hours / n_gpus,
               energy_mwh=energy_mwh(hours, gpu.watts, pue), cost_usd=hours * gpu.price_per_hour,
               loss=law.loss(config.num_params(), tokens))


# -- planning at a budget -----------------------------------------------------------------------------------------
def budget_flops(gpu: GPU, mfu: float, gpu_hours: float | None = None, flops: float | None = None,
                 budget_usd: float | None = None) -> float:
    """The training FLOPs that exactly one of the three budget forms buys."""
    given = {k: v for k, v in (("--gpu-hours", gpu_hours), ("--flops", flops), ("--budget-usd", budget_usd))
             if v is not None}
    if not given:
        raise LLMLabError("no budget given: pass one of --gpu-hours, --flops or --budget-usd "
                          "(or --model PRESET for one model's parameters and memory)")
    if len(given) > 1:
        raise LLMLabError(f"give one budget, not {len(given)}: {', '.join(given)}")
    (option, value), = given.items()
    _positive(option, value)
    if flops is not None:
        return float(flops)
    hours = gpu_hours if gpu_hours is not None else budget_usd / gpu.price_per_hour
    return hours * 3600 * gpu.tflops * 1e12 * mfu


@dataclass
class PlanRow:
    """One candidate at the budget, and trained to the target loss (`match`) then serving the inference load."""

    name: str
    params: int
    n_layer: int
    hidden: int
    tokens: float  # training tokens the budget buys
    tokens_per_param: float
    loss: float  # predicted at the budget
    match: Run | None  # trained to the target loss; None: the model is too small to get there
    serve_gpu_hours: float
    serve_cost_usd: float
    total_cost_usd: float | None  # match.cost_usd + serve_cost_usd
    optimal: bool = False
    cheapest: bool = False


@dataclass
class BudgetPlan:
    flops: float
    budget: Run  # the budget itself, spent by any one candidate (its loss: the compute-optimal one's)
    gpu: GPU
    mfu: float
    n_gpus: int
    pue: float
    seq_len: int
    serve_tokens: float
    serve_mfu: float
    target_loss: float
    chinchilla_n: float  # closed-form optimum of the law at C = 6ND, for reference
    chinchilla_d: float
    rows: list[PlanRow]
    at_edge: bool = False  # the compute-optimal model is the smallest or largest candidate: the optimum may be beyond

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_budget(flops: float, gpu: GPU, mfu: float = DEFAULT_MFU, n_gpus: int = 1, pue: float = 1.1,
                seq_len: int = DEFAULT_SEQ_LEN, serve_tokens: float = 0.0, serve_mfu: float = 0.2,
                loss_tolerance: float = 0.0, law: LossLaw = CHINCHILLA, window: float = 30.0,
                candidates: list[ModelConfig] | None = None) -> BudgetPlan:
    """Spend `flops` on each candidate and compare.

    Every candidate trains on the tokens the budget buys (D = C / FLOPs per token); the one with the lowest
    predicted loss is compute-optimal (`optimal`). Its loss plus `loss_tolerance` is the target; each candidate is
    then trained on as many tokens as it needs to reach the target (`match`: more for smaller models) and serves
    `serve_tokens` generated tokens at 2·N FLOPs each. The cheapest over training and serving is marked
    `cheapest`: with no inference load that is the compute-optimal model; the larger the load, the smaller it gets.
    Rows shown: within a factor `window` (below) and 4 (above) of the compute-optimal size, plus the marked rows;
    of the models too small to reach the target, only the largest.
    """
    _check_plan_options(mfu, n_gpus, pue, seq_len, serve_tokens, serve_mfu, loss_tolerance)
    _positive("--flops", flops)
    candidates = candidate_models() if candidates is None else candidates
    rows = []
    for c in candidates:
        n = c.num_params()
        tokens = flops / train_flops_per_token(c, seq_len)
        rows.append(PlanRow(name=c.name, params=n, n_layer=c.num_hidden_layers, hidden=c.hidden_size, tokens=tokens,
                            tokens_per_param=tokens / n, loss=law.loss(n, tokens), match=None, serve_gpu_hours=0.0,
                            serve_cost_usd=0.0, total_cost_usd=None))
    best = min(range(len(rows)), key=lambda i: rows[i].loss)
    target = rows[best].loss + loss_tolerance
    for c, row in zip(candidates, rows):
        tokens = law.tokens_for_loss(row.params, target)
        row.match = None if tokens is None else estimate_run(c, tokens, gpu, mfu, n_gpus, pue, seq_len, law)
        row.serve_gpu_hours = gpu_hours_for(serve_tokens * inference_flops_per_token(c), gpu, serve_mfu)
        row.serve_cost_usd = row.serve_gpu_hours * gpu.price_per_hour
        row.total_cost_usd = None if row.match is None else row.match.cost_usd + row.serve_cost_usd
    reachable = [i for i, r in enumerate(rows) if r.total_cost_usd is not None]
    cheapest = min(reachable, key=lambda i: (rows[i].total_cost_usd, rows[i].params))
    rows[best].optimal = rows[cheapest].cheapest = True
    n_best = rows[best].params
    shown = [r for r in rows if r.optimal or r.cheapest or n_best / window <= r.params <= 4 * n_best]
    too_small = [r for r in shown if r.match is None][-1:]
    shown = [r for r in shown if r.match is not None or r in too_small]  # one row shows where reach ends
    budget = estimate_run(candidates[best], rows[best].tokens, gpu, mfu, n_gpus, pue, seq_len, law)
    n_opt, d_opt = law.optimum(flops)
    return BudgetPlan(flops=flops, budget=budget, gpu=gpu, mfu=mfu, n_gpus=n_gpus, pue=pue, seq_len=seq_len,
                      serve_tokens=serve_tokens, serve_mfu=serve_mfu, target_loss=target, chinchilla_n=n_opt,
                      chinchilla_d=d_opt, rows=shown, at_edge=best in (0, len(rows) - 1))


def _check_plan_options(mfu: float, n_gpus: int, pue: float, seq_len: int, serve_tokens: float, serve_mfu: float,
                        loss_tolerance: float) -> None:
    for option, value in (("--mfu", mfu), ("--serve-mfu", serve_mfu)):
        _positive(option, value)
        if value > 1:
            raise LLMLabError(f"{option} is a fraction of the GPU's peak, between 0 and 1; got {value!r}")
    if not isinstance(n_gpus, int) or n_gpus < 1:
        raise LLMLabError(f"--n-gpus must be a positive integer, got {n_gpus!r}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise LLMLabError(f"--seq-len must be a positive integer, got {seq_len!r}")
    _positive("--pue", pue)
    if pue < 1:
        raise LLMLabError(f"--pue (total facility power / IT power) is at least 1, got {pue!r}")
    _positive("--serve-tokens", serve_tokens, allow_zero=True)
    _positive("--loss-tolerance", loss_tolerance, allow_zero=True)


# -- memory of one model ------------------------------------------------------------------------------------------
NF4_BYTES = 4.127 / 8  # 4-bit codes + double-quantized block scales (QLoRA paper: 0.127 bits/param of constants)


@dataclass
class MemoryRow:
    """Memory (bytes) one use of a model needs on the GPUs, by part."""

    use: str
    weights: float
    kv_cache: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.grads + self.optimizer + self.activations


def linear_weights(config: ModelConfig) -> int:
    """Weights of the projections inside the blocks: what int8/NF4 quantization and LoRA apply to."""
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return L * (h * (q + 2 * kv) + q * h + 3 * h * i)


def lora_params(config: ModelConfig, rank: int) -> int:
    """Adapter parameters for rank-`rank` LoRA on all seven projections of every block (q, k, v, o, gate, up, down;
    the QLoRA paper's choice): rank·(in + out) per projection."""
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return rank * L * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))


def kv_cache_bytes(config: ModelConfig, seq_len: int, batch: int, bytes_per: int = 2) -> float:
    """Keys and values of every layer for `batch` sequences of `seq_len` tokens (bf16)."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * seq_len * batch * bytes_per


def activation_bytes(config: ModelConfig, seq_len: int, batch: int, checkpointing: bool = False,
                     fp32_weights: bool = True) -> float:
    """Bytes llmlab's model saves for the backward pass over `batch` sequences of `seq_len` tokens.

    Counted from what autograd keeps for `llmlab.model.LLaMA` (tests/test_plan.py measures it), per token:
    - each RMSNorm + the projection after it: 10·h + 4 bytes with fp32 weights under bf16 autocast (the fp32
      residual, the fp32 normalised output, its bf16 copy for the matmul, the fp32 rsqrt), 8·h + 4 with bf16
      weights (the residual stays bf16);
    - attention, bf16: the fused q|k|v output (q + 2·kv), q and k after RoPE (q + kv), the SDPA output (q), i.e.
      6·q + 6·kv bytes, plus a float log-sum-exp per head: SDPA's flash/efficient kernels keep no T×T scores;
    - SwiGLU, bf16: the gate|up output (2·i), silu(gate) (i), the product (i): 8·i bytes;
    - once, outside the blocks: the final norm, the token ids, RoPE's cos/sin and the fp32 log-softmax of the
      logits (4·vocab bytes per token, the largest single item for small models).
    With activation checkpointing only each block's input is kept (4·h or 2·h bytes per token) and one block's
    activations exist at a time while it is recomputed. Excluded: the activation gradients of the backward pass
    (about one block's worth at a time), the bf16 logits, allocator slack; dropout would add its masks.
    """
    h, i, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    norm_linear = (10 if fp32_weights else 8) * h + 4
    per_layer = 2 * norm_linear + 6 * q + 6 * kv + 4 * config.num_attention_heads + 8 * i
    outside = norm_linear + 8 + 2 * hd * (4 if fp32_weights else 2) + 4 * config.vocab_size
    if checkpointing:
        kept = config.num_hidden_layers * (4 if fp32_weights else 2) * h + per_layer + outside
    else:
        kept = config.num_hidden_layers * per_layer + outside
    return kept * seq_len * batch


def autocast_weight_copies(config: ModelConfig, checkpointing: bool = False) -> float:
    """Bytes of the bf16 copies of fp32 weights that autocast makes for the matmuls and autograd keeps until the
    backward (every block's at once; with checkpointing one block's at a time, plus the output head's)."""
    if checkpointing:
        return 2 * (linear_weights(config) / config.num_hidden_layers + config.vocab_size * config.hidden_size)
    return 2 * matmul_params(config)


def memory_report(config: ModelConfig, seq_len: int, batch: int = 1, lora_rank: int = 16,
                  activation_checkpointing: bool = False) -> list[MemoryRow]:
    """Memory to run `config` and to fine-tune it, by part.

    Inference: bf16, int8 or NF4 weights plus a bf16 KV cache of `seq_len`·`batch` tokens. Fine-tuning on
    `batch` sequences of `seq_len` tokens:
    - full: the way llmlab's loop trains, fp32 weights under bf16 autocast: fp32 weights 4 + bf16 copies 2
      (`autocast_weight_copies`) + fp32 grads 4 + AdamW exp_avg and exp_avg_sq 4 + 4 bytes per parameter,
      activations of `activation_bytes`;
    - LoRA: a frozen bf16 base (2 bytes per parameter) + rank-`lora_rank` adapters on the seven projections of
      every block, trained in fp32 with AdamW (16 bytes per adapter parameter), activations with bf16 weights;
    - QLoRA: the same with the block projections in NF4 with double quantization (`NF4_BYTES` per weight).
    Quantization applies to the block projections only; embeddings, head and norms stay bf16 (as bitsandbytes
    does). Excludes the CUDA context and allocator slack (add 1-2 GiB) and, for inference, transient buffers.
    """
    for option, value in (("--seq-len", seq_len), ("--batch", batch), ("--lora-rank", lora_rank)):
        if not isinstance(value, int) or value < 1:
            raise LLMLabError(f"{option} must be a positive integer, got {value!r}")
    n, lin = config.num_params(), linear_weights(config)
    other = n - lin
    kv = kv_cache_bytes(config, seq_len, batch)
    adapter = lora_params(config, lora_rank)
    act_full = activation_bytes(config, seq_len, batch, activation_checkpointing, fp32_weights=True)
    act_bf16 = activation_bytes(config, seq_len, batch, activation_checkpointing, fp32_weights=False)
    return [
        MemoryRow("inference bf16", weights=2 * n, kv_cache=kv),
        MemoryRow("inference int8", weights=lin + 2 * other, kv_cache=kv),
        MemoryRow("inference nf4", weights=NF4_BYTES * lin + 2 * other, kv_cache=kv),
        MemoryRow("full fine-tune", weights=4 * n + autocast_weight_copies(config, activation_checkpointing),
                  grads=4 * n, optimizer=8 * n, activations=act_full),
        MemoryRow(f"LoRA r={lora_rank}", weights=2 * n + 4 * adapter, grads=4 * adapter, optimizer=8 * adapter,
                  activations=act_bf16),
        MemoryRow(f"QLoRA r={lora_rank}", weights=NF4_BYTES * lin + 2 * other + 4 * adapter, grads=4 * adapter,
                  optimizer=8 * adapter, activations=act_bf16),
    ]


# -- printing -------------------------------------------------------------------------------------------------------
def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns aligned with two spaces between them: text left, numbers right."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    numeric = [all(_is_number(r[j]) for r in rows) if rows else False for j in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _is_number(cell: str) -> bool:
    return cell == "-" or cell.lstrip("$+-")[:1].isdigit()  # "-" (no value) doesn't turn a column into text


def si(x: float) -> str:
    """3 significant digits with a k/M/B/T suffix: 1.4T, 65.3B, 380M, 12k (beyond 999T: 1.29e17)."""
    x = float(f"{x:.3g}")  # round first, so 999.99M reads 1B, not 1e+03M
    for value, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= value:
            return sci(x) if abs(x) >= 1000 * value else f"{x / value:.3g}{suffix}"
    return f"{x:.3g}"


def sci(x: float) -> str:
    """3 significant digits in e-notation without the plus sign: 5.69e23."""
    return f"{x:.3g}".replace("e+", "e")


def num(x: float) -> str:
    """3 significant digits, whole numbers with thousands separators: 0.979, 12.4, 449, 1,023."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def money(x: float | None) -> str:
    return "-" if x is None else ("-" if x < 0 else "") + (f"${si(abs(x))}" if abs(x) >= 1e3 else f"${abs(x):.2f}")


def duration(hours: float) -> str:
    if hours < 48:
        return f"{hours:.3g} h"
    if hours < 2 * 8766:
        return f"{hours / 24:.3g} d"
    return f"{hours / 8766:.3g} y"


def format_budget_plan(plan: BudgetPlan) -> str:
    """The budget line, the assumptions, and the table of candidates."""
    g, b = plan.gpu, plan.budget
    lines = [
        f"budget: {sci(plan.flops)} training FLOPs = {b.gpu_hours:,.0f} GPU-hours on {g.name} ({g.tflops:g} TFLOP/s "
        f"peak, MFU {plan.mfu:.2f}) = {duration(b.wall_hours)} on {plan.n_gpus} GPU(s), {num(b.energy_mwh)} MWh "
        f"({g.watts:g} W, PUE {plan.pue:g}), {money(b.cost_usd)} at ${g.price_per_hour:g}/GPU-hour",
        f"Chinchilla fit L = 1.69 + 406.4/N^0.34 + 410.7/D^0.28; its closed-form optimum at C = 6ND: "
        f"N = {si(plan.chinchilla_n)}, D = {si(plan.chinchilla_d)} ({plan.chinchilla_d / plan.chinchilla_n:.0f} "
        f"tokens/param)",
        f"FLOPs/token = 6N + 12·layers·d·T at T = {plan.seq_len}; serving {si(plan.serve_tokens)} generated tokens "
        f"at 2N FLOPs/token, MFU {plan.serve_mfu:.2f}; target loss L* = {plan.target_loss:.4f}",
        "",
    ]
    headers = ["", "model", "params", "tokens", "tok/param", "loss", "tokens to L*", "train FLOPs", "wall",
               "GPU-hours", "MWh", "train cost", "extra", "serve cost", "total cost"]
    rows = []
    for r in plan.rows:
        m = r.match
        mark = ("*" if r.optimal else "") + ("$" if r.cheapest else "")
        rows.append([mark, r.name, si(r.params), si(r.tokens), num(r.tokens_per_param), f"{r.loss:.4f}"]
                    + (["-"] * 7 if m is None else [
                        si(m.tokens), sci(m.flops), duration(m.wall_hours), si(m.gpu_hours),
                        num(m.energy_mwh), money(m.cost_usd), _signed_money(m.cost_usd - b.cost_usd)])
                    + [money(r.serve_cost_usd), money(r.total_cost_usd)])
    lines.append(format_table(headers, rows))
    lines += ["", "*  compute-optimal: lowest predicted loss at the budget (tokens, tok/param, loss: the budget spent "
              "on that model)",
              "$  cheapest: lowest total cost (trained to L*, then serving the inference load)",
              "from 'tokens to L*' on: each model trained to L* (smaller models need more tokens; '-': it can't "
              "get there); extra = train cost - budget"]
    if plan.at_edge:
        lines.append("note: the compute-optimal model is the smallest or largest candidate; the optimum may lie beyond")
    return "\n".join(lines)


def _signed_money(x: float) -> str:
    return ("+" if round(x, 2) >= 0 else "") + money(round(x, 2) + 0.0)  # + 0.0: no "-$0.00"


def format_memory(config: ModelConfig, rows: list[MemoryRow], gpu: GPU, seq_len: int, batch: int) -> str:
    """Parameter counts, FLOPs per token and the memory table, with how many of `gpu` each use needs."""
    n = config.num_params()
    emb = n - config.num_params(include_embeddings=False)
    lines = [
        f"{config.name}: {n:,} parameters ({si(n)}; {si(n - emb)} non-embedding, {si(emb)} embedding), "
        f"{config.num_hidden_layers} layers x {config.hidden_size} hidden, {config.num_attention_heads} heads "
        f"({config.num_key_value_heads} KV), vocab {config.vocab_size}",
        f"FLOPs/token: training {sci(train_flops_per_token(config, seq_len))} at T = {seq_len} "
        f"(6N + 12·layers·d·T, N = {si(matmul_params(config))} matmul weights), inference "
        f"{sci(inference_flops_per_token(config))} (2N)",
        f"memory in GiB at seq_len {seq_len}, batch {batch} ({gpu.name}: {gpu.memory_gib:g} GiB):",
        "",
    ]
    headers = ["use", "weights", "KV cache", "grads", "optimizer", "activations", "total", f"x {gpu.name}"]
    body = [[r.use] + [f"{v / GIB:.2f}" for v in (r.weights, r.kv_cache, r.grads, r.optimizer, r.activations,
                                                     r.total)] + [str(math.ceil(r.total / GIB / gpu.memory_gib))]
            for r in rows]
    return "\n".join(lines + [format_table(headers, body)])


def format_run(config: ModelConfig, run: Run, gpu: GPU, mfu: float, n_gpus: int, pue: float) -> str:
    return (f"training {config.name} on {si(run.tokens)} tokens: {sci(run.flops)} FLOPs = {run.gpu_hours:,.0f} "
            f"GPU-hours on {gpu.name} at MFU {mfu:.3f} = {duration(run.wall_hours)} on {n_gpus} GPU(s); "
            f"{num(run.energy_mwh)} MWh ({gpu.watts:g} W, PUE {pue:g}); {money(run.cost_usd)}; "
            f"predicted loss {run.loss:.4f}")


def run_plan(gpu_hours: float | None = None, flops: float | None = None, budget_usd: float | None = None,
             model: str | None = None, tokens: float | None = None, gpu: str = DEFAULT_GPU, n_gpus: int = 1,
             mfu: float | None = None, tokens_per_s: float | None = None, gpu_tflops: float | None = None,
             gpu_watts: float | None = None, gpu_memory: float | None = None, price_per_hour: float | None = None,
             pue: float = 1.1, seq_len: int | None = None, serve_tokens: float = 0.0, serve_mfu: float = 0.2,
             loss_tolerance: float = 0.0, batch: int = 1, lora_rank: int = 16,
             activation_checkpointing: bool = False) -> tuple[str, dict[str, Any]]:
    """The `llmlab plan` command without the printing: (text to print, rows for --json). See `llmlab plan --help`."""
    hw = resolve_gpu(gpu, gpu_tflops, gpu_watts, price_per_hour, gpu_memory)
    if mfu is not None and tokens_per_s is not None:
        raise LLMLabError("give --mfu or --tokens-per-s (which implies an MFU), not both")
    if model is None:
        for option, value in (("--tokens", tokens), ("--tokens-per-s", tokens_per_s)):
            if value is not None:
                raise LLMLabError(f"{option} describes one model's run: use it with --model")
        mfu = DEFAULT_MFU if mfu is None else mfu
        _check_plan_options(mfu, n_gpus, pue, DEFAULT_SEQ_LEN if seq_len is None else seq_len, serve_tokens,
                            serve_mfu, loss_tolerance)
        budget = budget_flops(hw, mfu, gpu_hours=gpu_hours, flops=flops, budget_usd=budget_usd)
        result = plan_budget(budget, hw, mfu, n_gpus, pue, DEFAULT_SEQ_LEN if seq_len is None else seq_len,
                             serve_tokens, serve_mfu, loss_tolerance)
        return format_budget_plan(result), result.to_dict()
    given = [o for o, v in (("--gpu-hours", gpu_hours), ("--flops", flops), ("--budget-usd", budget_usd)) if v]
    if given:
        raise LLMLabError(f"--model reports one model; {given[0]} compares sizes at a budget: drop one of them "
                          "(--model with --tokens estimates that model's training run)")
    config = ModelConfig.from_spec(model)
    seq_len = min(DEFAULT_SEQ_LEN, config.max_position_embeddings) if seq_len is None else seq_len
    rows = memory_report(config, seq_len, batch, lora_rank, activation_checkpointing)
    text = format_memory(config, rows, hw, seq_len, batch)
    data: dict[str, Any] = {"model": config.name, "params": config.num_params(),
                            "non_embedding_params": config.num_params(include_embeddings=False),
                            "train_flops_per_token": train_flops_per_token(config, seq_len),
                            "inference_flops_per_token": inference_flops_per_token(config),
                            "seq_len": seq_len, "batch": batch, "gpu": asdict(hw),
                            "memory_bytes": [{**asdict(r), "total": r.total} for r in rows]}
    if tokens is not None:
        _positive("--tokens", tokens)
        mfu = implied_mfu(config, tokens_per_s, hw, seq_len) if tokens_per_s is not None else (
            DEFAULT_MFU if mfu is None else mfu)
        _check_plan_options(mfu, n_gpus, pue, seq_len, serve_tokens, serve_mfu, loss_tolerance)
        run = estimate_run(config, tokens, hw, mfu, n_gpus, pue, seq_len)
        text += "\n\n" + format_run(config, run, hw, mfu, n_gpus, pue)
        data["run"] = {**asdict(run), "mfu": mfu, "n_gpus": n_gpus, "pue": pue}
    elif tokens_per_s is not None:
        raise LLMLabError("--tokens-per-s needs --tokens (the training run whose time it sets)")
    return text, data
