"""GGUF export: files read back through llmlab's GGUF import with the same weights, tokenizer and logits; the
pre-tokenizer name written is one llama.cpp splits the same way (or the export is refused); LoRA adapters as
llama.cpp LoRA GGUFs that give llmlab's logits when applied by hand; and, when llama-cpp-python is importable,
llama.cpp's greedy text equals `llmlab generate`'s."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from _tiny import tiny_checkpoint

from llmlab.args import LoRAConfig
from llmlab.checkpoint import load_checkpoint, load_config, load_into, load_safetensors, save_checkpoint
from llmlab.cli import main
from llmlab.errors import LLMLabError
from llmlab.gguf_export import PRE_TOKENIZER_NAMES, export_gguf, export_lora_gguf, pre_tokenizer_name
from llmlab.gguf_import import hf_tensor_name, import_gguf, open_gguf, read_gguf, unpermute_qk
from llmlab.methods import load_adapter
from llmlab.methods.adapters import adapter_params
from llmlab.methods.lora import LoRA, apply_lora
from llmlab.model import LLaMA
from llmlab.tokenizer import Tokenizer

TEXTS = ["What does the cat say? The cat says meow.", "  12345 héllo wörld\n\tcode()  ", "日本語 🙂",
         "<|im_start|>user\nhi<|im_end|>\n", "don't STOP'S 3.14159"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("export") / "base", std=0.1)


def ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(ids())


def rounded_model(ckpt: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The checkpoint with every matrix rounded to `dtype` (what an f16/bf16 GGUF holds; norms stay f32)."""
    sd = {k: (v.to(dtype).float() if v.ndim == 2 else v) for k, v in load_safetensors(ckpt).items()}
    with torch.device("meta"):
        model = LLaMA(load_config(ckpt))
    return load_into(model, sd, str(ckpt)).eval()


# -- round trips through the importer -------------------------------------------------------------------
def test_f32_export_reads_back_exactly(ckpt: Path, tmp_path: Path) -> None:
    path = export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    config, tensors, tok = read_gguf(path)
    ref_tensors = load_safetensors(ckpt)
    assert set(tensors) == set(ref_tensors) - {"lm_head.weight"} or set(tensors) == set(ref_tensors)
    for name, t in tensors.items():
        assert torch.equal(t, ref_tensors[name]), name
    ref = load_config(ckpt)
    assert dataclasses.replace(config, name=ref.name, extra=ref.extra) == ref
    ref_tok = Tokenizer.from_folder(ckpt)
    for text in TEXTS:
        assert tok.encode(text) == ref_tok.encode(text), text
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.add_bos) == \
        (ref_tok.bos_token, ref_tok.eos_token, ref_tok.pad_token, ref_tok.add_bos)
    assert tok.chat_template == ref_tok.chat_template
    reader = open_gguf(path)
    meta = {k: reader.fields[k].contents() for k in ("general.architecture", "general.type", "general.name",
                                                     "tokenizer.ggml.model", "tokenizer.ggml.pre")}
    assert meta == {"general.architecture": "llama", "general.type": "model", "general.name": "base",
                    "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2"}


@pytest.mark.parametrize("kind,dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_f16_and_bf16_give_the_same_logits_as_the_rounded_model(ckpt: Path, tmp_path: Path, kind: str,
                                                                   dtype: torch.dtype) -> None:
    folder = import_gguf(export_gguf(ckpt, tmp_path / f"m-{kind}.gguf", kind), tmp_path / "imported")
    reader = gguf.GGUFReader(tmp_path / f"m-{kind}.gguf")
    assert {t.tensor_type.name for t in reader.tensors} == {"F32", kind.upper()}
    got = logits(load_checkpoint(folder))
    assert torch.equal(got, logits(rounded_model(ckpt, dtype)))
    assert not torch.equal(got, logits(load_checkpoint(ckpt)))  # the rounding is real, so the test can fail


def quantized_model(ckpt: Path, kind: str) -> torch.nn.Module:
    """The checkpoint with every matrix quantized to `kind` and back by the gguf package (embedding and output
    matrix: q8_0)."""
    def roundtrip(name: str, w: torch.Tensor) -> torch.Tensor:
        big = name in ("model.embed_tokens.weight", "lm_head.weight")
        qtype = gguf.GGMLQuantizationType["Q8_0" if big else kind.upper()]
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype))

    sd = {k: (roundtrip(k, v) if v.ndim == 2 else v) for k, v in load_safetensors(ckpt).items()}
    with torch.device("meta"):
        model = LLaMA(load_config(ckpt))
    return load_into(model, sd, str(ckpt)).eval()


def test_quantized_exports_hold_the_quantized_weights(ckpt: Path, tmp_path: Path) -> None:
    exact = logits(load_checkpoint(ckpt))
    errors = {}
    for kind in ("q8_0", "q4_0"):
        path = export_gguf(ckpt, tmp_path / f"m-{kind}.gguf", kind)
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
        assert types["blk.0.attn_q.weight"] == kind.upper() and types["blk.0.ffn_norm.weight"] == "F32"
        assert types["token_embd.weight"] == types["output.weight"] == "Q8_0"  # q4_0 keeps these at 8 bits
        got = logits(load_checkpoint(import_gguf(path, tmp_path / kind)))
        assert torch.equal(got, logits(quantized_model(ckpt, kind)))  # exactly the quantization, nothing else
        w = load_safetensors(ckpt)["model.layers.0.mlp.down_proj.weight"]
        back = read_gguf(path)[1]["model.layers.0.mlp.down_proj.weight"]
        errors[kind] = ((back - w).norm() / w.norm()).item()
        assert not torch.equal(got, exact)
    assert 0 < errors["q8_0"] < 0.01 < errors["q4_0"] < 0.15, errors


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 2.0, "original_max_position_embeddings": 16384}])
def test_rope_scaling_survives_the_round_trip(tmp_path: Path, scaling: dict) -> None:
    from llmlab.config import ModelConfig
    from llmlab.model import build_model

    tok = Tokenizer.from_folder(tiny_checkpoint(tmp_path / "plain"))
    config = ModelConfig.from_name("tiny", vocab_size=300, num_attention_heads=1, num_key_value_heads=1,
                                   rope_theta=500000.0, rope_scaling=scaling)
    torch.manual_seed(0)
    ckpt = save_checkpoint(build_model(config), tmp_path / "scaled", tokenizer=tok)
    config_back, _, _ = read_gguf(export_gguf(ckpt, tmp_path / "s.gguf", "f32"))
    assert config_back.rope_scaling == load_config(ckpt).rope_scaling is not None


# -- the pre-tokenizer name ------------------------------------------------------------------------------
def _spec(pre: dict | None, ignore_merges: bool = False) -> dict:
    return {"pre_tokenizer": pre, "model": {"type": "BPE", "ignore_merges": ignore_merges}}


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
BYTES_ONLY = dict(BYTE_LEVEL, use_regex=False)


def split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def test_pre_tokenizer_names_follow_the_split_patterns() -> None:
    assert pre_tokenizer_name(_spec(BYTE_LEVEL), "t") == "gpt-2"  # what `llmlab prepare --train-tokenizer` makes
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name(_spec({"type": "Sequence", "pretokenizers": [digits, BYTE_LEVEL]}), "t") == "smollm"
    for name, (patterns, ignore_merges) in PRE_TOKENIZER_NAMES.items():
        steps = [split(p) for p in patterns] + [BYTES_ONLY]
        assert pre_tokenizer_name(_spec({"type": "Sequence", "pretokenizers": steps}, ignore_merges), "t") == name


def test_a_pre_tokenizer_llama_cpp_does_not_know_is_refused(ckpt: Path, tmp_path: Path) -> None:
    llama3 = PRE_TOKENIZER_NAMES["llama-bpe"][0][0]
    seq = {"type": "Sequence", "pretokenizers": [split(llama3), BYTES_ONLY]}
    with pytest.raises(LLMLabError, match="'llama-bpe' splits the same way but has ignore_merges=True"):
        pre_tokenizer_name(_spec(seq, ignore_merges=False), "t")
    with pytest.raises(LLMLabError, match=r"split patterns \['\\\\p\{N\}\+'"):
        pre_tokenizer_name(_spec({"type": "Sequence", "pretokenizers": [{"type": "Digits"}, BYTES_ONLY]}), "t")
    with pytest.raises(LLMLabError, match="no ByteLevel step"):
        pre_tokenizer_name(_spec(split(PRE_TOKENIZER_NAMES["qwen2"][0][0])), "t")
    after = {"type": "Sequence", "pretokenizers": [BYTE_LEVEL, {"type": "Digits", "individual_digits": True}]}
    with pytest.raises(LLMLabError, match="splits after its ByteLevel step"):
        pre_tokenizer_name(_spec(after), "t")
    with pytest.raises(LLMLabError, match="pre-tokenizer type 'Metaspace' has no llama.cpp equivalent"):
        pre_tokenizer_name(_spec({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first"}), "t")
    # through the exporter: a tokenizer with a pattern of its own is refused and the old file stays
    folder = tmp_path / "odd"
    folder.mkdir()
    for f in ckpt.iterdir():
        (folder / f.name).symlink_to(f)
    spec = json.loads((ckpt / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split(r"\p{L}+|\S"), BYTES_ONLY]}
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    out = tmp_path / "odd.gguf"
    out.write_bytes(b"GGUF: an earlier export")
    with pytest.raises(LLMLabError, match="tokenizer.json: no pre-tokenizer llama.cpp knows"):
        export_gguf(folder, out, "f16")
    assert out.read_bytes() == b"GGUF: an earlier export" and list(tmp_path.glob(".odd.gguf*")) == []


# -- LoRA adapters --------------------------------------------------------------------------------------
def _gguf_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        out[t.name] = torch.from_numpy(np.array(values, dtype=np.float32))
    return out


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_gguf_applied_by_hand_gives_llmlab_logits(ckpt: Path, tmp_path: Path, rslora: bool) -> None:
    model = apply_lora(load_checkpoint(ckpt), LoRAConfig(r=4, alpha=8.0, targets="all", rslora=rslora))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in adapter_params(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    LoRA(model.lora_config, base_model=str(ckpt)).save(model, tmp_path / "adapter")
    expected = logits(load_adapter(load_checkpoint(ckpt), tmp_path / "adapter"))
    base_path = export_gguf(ckpt, tmp_path / "base.gguf", "f32")
    lora_path = export_lora_gguf(ckpt, tmp_path / "adapter", tmp_path / "lora.gguf", "f32")
    reader = open_gguf(lora_path)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["general.architecture"].contents() == "llama"
    alpha = reader.fields["adapter.lora.alpha"].contents()
    assert alpha == pytest.approx(8.0 * 2 if rslora else 8.0)  # llama.cpp scales by alpha / r
    # llama.cpp's rule, W' = W + alpha / r * B A, on the base GGUF's tensors (its names, its q/k row order)
    weights, lora = _gguf_tensors(base_path), _gguf_tensors(lora_path)
    assert len(lora) == 2 * 7 * 2 and lora["blk.0.attn_q.weight.lora_a"].shape == (4, 64)
    for name in [n.removesuffix(".lora_a") for n in lora if n.endswith(".lora_a")]:
        a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
        weights[name] = weights[name] + alpha / a.shape[0] * (b @ a)
    config = load_config(ckpt)
    hf = {}
    for name, w in weights.items():
        hf_name = hf_tensor_name(name)
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
        proj = hf_name.split(".")[-2]
        hf[hf_name] = unpermute_qk(w, heads[proj]) if proj in heads else w
    with torch.device("meta"):
        by_hand = LLaMA(config)
    got = logits(load_into(by_hand, hf, "by hand").eval())
    assert (expected - logits(load_checkpoint(ckpt))).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_adapter_types_and_foreign_adapters(ckpt: Path, tmp_path: Path) -> None:
    model = apply_lora(load_checkpoint(ckpt), LoRAConfig(r=2, targets="q,v"))
    LoRA(model.lora_config, base_model=str(ckpt)).save(model, tmp_path / "adapter")
    with pytest.raises(LLMLabError, match="LoRA adapters are exported as one of f32, f16, bf16"):
        export_lora_gguf(ckpt, tmp_path / "adapter", tmp_path / "a.gguf", "q4_0")
    other = tiny_checkpoint(tmp_path / "other", seed=5)
    with pytest.raises(LLMLabError, match="made for another base model"):
        export_lora_gguf(other, tmp_path / "adapter", tmp_path / "a.gguf", "f16")
    assert not (tmp_path / "a.gguf").exists()


# -- command line ---------------------------------------------------------------------------------------
def test_cli_export_model_and_adapter(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", str(ckpt), "--gguf", str(tmp_path / "m.gguf"), "--type", "q8_0"]) == 0
    assert f"saved {tmp_path / 'm.gguf'}" in capsys.readouterr().out
    assert read_gguf(tmp_path / "m.gguf")[0].num_hidden_layers == 2
    model = apply_lora(load_checkpoint(ckpt), LoRAConfig(r=2, targets="q,v"))
    LoRA(model.lora_config, base_model=str(ckpt)).save(model, tmp_path / "adapter")
    assert main(["export", str(ckpt), "--adapter", str(tmp_path / "adapter"), "--gguf",
                 str(tmp_path / "lora.gguf")]) == 0
    assert {t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "lora.gguf").tensors} == {"F16"}
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(ckpt), "--gguf", str(tmp_path / "x.gguf"), "--type", "q5_k"])
    assert exit_info.value.code == 2 and "q5_k" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--adapter", str(tmp_path / "adapter"), "--gguf", str(tmp_path / "x.gguf"),
                 "--type", "q8_0"]) == 2
    assert capsys.readouterr().err.startswith("llmlab: error: --type 'q8_0': LoRA adapters are exported as")
    assert not (tmp_path / "x.gguf").exists()
    # an earlier export is replaced; another kind of file only with --overwrite true; a folder never
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["export", str(ckpt), "--gguf", str(tmp_path / "notes.txt")]) == 2
    assert "notes.txt exists and is not a GGUF file" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert main(["export", str(ckpt), "--gguf", str(tmp_path / "notes.txt"), "--overwrite", "true"]) == 0
    assert main(["export", str(ckpt), "--gguf", str(tmp_path / "notes.txt"), "--type", "f32"]) == 0  # now a GGUF
    assert main(["export", str(ckpt), "--gguf", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


# -- the default model, and llama.cpp itself ----------------------------------------------------------------
@pytest.mark.slow
def test_default_model_f16_export_reads_back_with_the_same_logits(default_ckpt: Path, tmp_path: Path) -> None:
    path = export_gguf(default_ckpt, tmp_path / "smollm2.gguf", "f16")
    assert open_gguf(path).fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    got = load_checkpoint(import_gguf(path, tmp_path / "back"))
    x = torch.tensor([Tokenizer.from_folder(default_ckpt).encode("The capital of France is")])
    with torch.no_grad():
        assert torch.equal(got(x), rounded_model(default_ckpt, torch.float16)(x))


CHECK = Path(__file__).parent.parent / "examples" / "llamacpp_check.py"


@pytest.mark.slow
def test_llama_cpp_greedy_text_equals_llmlab_generate(default_ckpt: Path, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional: it runs the exported "
                                            "GGUF in llama.cpp itself)")
    model = apply_lora(load_checkpoint(default_ckpt), LoRAConfig(r=8, alpha=16.0, targets="q,v,down"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in adapter_params(model):
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if ".lora_A." in name else 0.02))
    LoRA(model.lora_config, base_model=str(default_ckpt)).save(model, tmp_path / "adapter")
    base = export_gguf(default_ckpt, tmp_path / "smollm2.gguf", "f32")
    lora = export_lora_gguf(default_ckpt, tmp_path / "adapter", tmp_path / "lora.gguf", "f16")
    texts = []
    for adapter, lora_args in ((None, []), (tmp_path / "adapter", ["--lora", str(lora)])):
        expect = tmp_path / f"expect-{len(texts)}.json"
        cmd = [sys.executable, str(CHECK), "expect", str(default_ckpt), "--prompt", "Name three colours.",
               "--max-new-tokens", "24", "--out", str(expect)] + (["--adapter", str(adapter)] if adapter else [])
        subprocess.run(cmd, check=True, capture_output=True)
        run = subprocess.run([sys.executable, str(CHECK), "run", str(base), str(expect), *lora_args],
                             capture_output=True, text=True)
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert run.returncode == 0, result  # same prompt tokens, same greedy tokens, same text
        texts.append(result["llmlab"])
    assert texts[0] != texts[1]  # the adapter changes the answer, in llama.cpp as in llmlab
