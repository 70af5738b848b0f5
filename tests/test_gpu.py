"""The same model, generation and training loop on a CUDA device (skipped without one; run with `pytest -m gpu`)."""

import pytest
import torch

from llmlab.config import ModelConfig
from llmlab.generate import generate_tokens
from llmlab.model import build_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_fp32_logits_match_hf_on_cuda():
    transformers = pytest.importorskip("transformers")
    from llmlab.checkpoint import hf_to_llmlab

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    hf = transformers.LlamaForCausalLM(cfg).cuda().eval()
    ours = build_model(ModelConfig.from_hf_dict(cfg.to_dict()), device="cuda").eval()
    ours.load_state_dict(hf_to_llmlab(hf.state_dict(), ours.config))
    idx = torch.randint(0, 512, (2, 64), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-4, rtol=0)


def test_bf16_compiled_decode_equals_eager():
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny"), device="cuda", dtype=torch.bfloat16).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    eager = list(generate_tokens(model, prompts, 12))
    compiled = list(generate_tokens(model, prompts, 12, compile=True))
    assert eager == compiled and len(eager) == 12


def test_bf16_training_on_cuda_learns(tmp_path):
    from _corpus import make_text

    from llmlab.args import TrainConfig
    from llmlab.data import TokenDataset, prepare
    from llmlab.methods import Full
    from llmlab.train import train

    (tmp_path / "corpus.txt").write_text(make_text(3000))
    data = prepare([tmp_path / "corpus.txt"], tmp_path / "data", train_tokenizer=300, progress=False)
    cfg = TrainConfig(lr=3e-3, warmup_steps=2, max_steps=40, batch_size=8, seq_len=32, eval_every=20, eval_batches=2,
                      save_every=0, log_every=5, device="cuda", precision="bf16")
    dataset = TokenDataset(data, cfg.seq_len, cfg.seed)
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny", vocab_size=300))
    result = train(model, Full(), dataset, cfg, tmp_path / "run", tokenizer=dataset.tokenizer())
    val = result.val_losses
    assert val[max(val)] < 0.5 * val[0]
