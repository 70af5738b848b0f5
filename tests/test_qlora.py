"""QLoRA: NF4 (double-quantized) base weights equal bitsandbytes' own, the 4-bit model computes what its
dequantized weights give, a training step changes only the adapters, and the run lowers held-out loss."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from llmlab.args import LoRAConfig
from llmlab.checkpoint import load_checkpoint
from llmlab.cli import main
from llmlab.methods.lora import load_adapter
from llmlab.metrics import read_metrics

bnb = pytest.importorskip("bitsandbytes")
from llmlab.methods.qlora import Linear4bit, LoRALinear4bit, QLoRA  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import changed_after_steps, task_records, tiny_checkpoint, write_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("qlora")
    return tiny_checkpoint(folder / "base", std=0.2), write_jsonl(folder / "task.jsonl", task_records(80))


def reference_nf4(weight: torch.Tensor) -> torch.Tensor:
    """What bitsandbytes' own Linear4bit (NF4, double quantization) holds for `weight`, dequantized."""
    ref = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, compute_dtype=torch.float32,
                            compress_statistics=True, quant_type="nf4")
    ref.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4")
    ref = ref.to("cpu")
    assert ref.weight.quant_state.nested  # double quantization: the absmax scales are quantized too
    return bnb.functional.dequantize_4bit(ref.weight.data, ref.weight.quant_state)


def test_nf4_weights_equal_bitsandbytes_and_the_model_computes_with_them(setup: tuple[Path, Path]) -> None:
    ckpt, _ = setup
    base = load_checkpoint(ckpt)
    model = QLoRA(LoRAConfig(r=4, targets="q,v,down")).prepare(load_checkpoint(ckpt)).eval()
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, (Linear4bit, LoRALinear4bit))}
    assert len(quantized) == 2 * 4 and all(m.weight.dtype == torch.uint8 for m in quantized.values())
    dequantized = load_checkpoint(ckpt)
    with torch.no_grad():
        for name, module in quantized.items():
            w = base.get_submodule(name).weight
            deq = module.dequantized()
            assert torch.equal(deq, reference_nf4(w))
            assert 0 < (deq - w).abs().max() < 0.25 * w.abs().max()  # 4-bit: close, not equal
            dequantized.get_submodule(name).weight.copy_(deq)
        ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(model(ids), dequantized(ids), atol=1e-4, rtol=1e-4)
    assert model.model.embed_tokens.weight.dtype == torch.float32  # embeddings and head stay full precision


def test_qlora_step_changes_only_the_adapters(setup: tuple[Path, Path]) -> None:
    ckpt, data = setup
    changed, trained = changed_after_steps(ckpt, data, QLoRA(LoRAConfig(r=4, targets="all")))
    assert changed == trained and len(trained) == 2 * 7 * 2 and all(".lora_" in n for n in changed)


def test_qlora_finetune_lowers_held_out_loss_and_saves_a_peft_adapter(setup: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    ckpt, data = setup
    run = tmp_path / "run"
    assert main(["finetune", str(ckpt), "--data", str(data), "--out", str(run), "--method", "qlora",
                 "--lora.r", "8", "--lora.targets", "all", "--train.lr", "1e-2", "--train.max_steps", "30",
                 "--train.warmup_steps", "2", "--train.batch_size", "8", "--train.seq_len", "64",
                 "--train.eval_every", "0", "--train.eval_batches", "2", "--train.save_every", "0"]) == 0
    vals = [r["val_loss"] for r in read_metrics(run) if r.get("val_loss") is not None]
    assert vals[-1] < vals[0] - 0.5, vals
    model = load_adapter(load_checkpoint(ckpt), run / "final")  # a normal PEFT adapter on the fp32 base
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)
