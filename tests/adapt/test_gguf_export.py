"""GGUF export read back with gguf's own reader: every tensor and key, in f32, f16 and q8_0; the rotary
permutation that llama.cpp's adjacent-pair rotation needs; refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gptforge.adapt.gguf_export import XIELU_ALPHA_P, _interleave_rotary, export_gguf
from gptforge.config import from_dict
from gptforge.data.tokenizer import Tokenizer
from gptforge.errors import GptforgeError
from gptforge.model.gpt import GPT, apply_rotary, rope_tables
from gptforge.train.checkpoint import save_weights

gguf = pytest.importorskip("gguf")

TEXTS = ["def parse(text):\n    return [line.split(',') for line in text.splitlines()]\n" * 20]
SHAPE = dict(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_embd=64)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_bpe(TEXTS, vocab_size=290)  # fewer ids than the model: the rest are unused


def _run(path, tokenizer, **model) -> GPT:
    cfg = from_dict({"model": {**SHAPE, **model}})
    torch.manual_seed(0)
    gpt = GPT(cfg.model)
    with torch.no_grad():
        for p in gpt.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    tok_file = path.parent / "tokenizer.json"
    tokenizer.save(tok_file)
    save_weights(path, gpt, cfg.to_dict(), step=1, tokenizer_file=tok_file)
    return gpt


def _read(path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    keys = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = (t.tensor_type.name, data.reshape(tuple(reversed([int(d) for d in t.shape]))))
    return keys, tensors


@pytest.mark.parametrize("dtype, tol", [("f32", 0.0), ("f16", 1e-3), ("q8_0", 0.3 / 127)])
def test_default_recipe_reads_back_tensor_by_tensor(tokenizer, tmp_path, dtype, tol):
    gpt = _run(tmp_path / "run", tokenizer)
    export_gguf(tmp_path / "run", tmp_path / "m.gguf", dtype, report=lambda m: None)
    keys, tensors = _read(tmp_path / "m.gguf")
    m, s = gpt.config, gpt.state_dict()
    assert keys["general.architecture"] == "apertus" and keys["apertus.block_count"] == 2
    assert keys["apertus.context_length"] == 32 and keys["apertus.embedding_length"] == 64
    assert keys["apertus.feed_forward_length"] == m.mlp_hidden and keys["apertus.attention.head_count_kv"] == 4
    assert keys["apertus.rope.freq_base"] == m.rope_theta and keys["apertus.rope.dimension_count"] == 16
    assert keys["apertus.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert keys["xielu.alpha_p"] == [pytest.approx(XIELU_ALPHA_P)] * 2 and keys["xielu.beta"] == [0.0, 0.0]
    assert math.log1p(math.exp(keys["xielu.alpha_p"][0])) == pytest.approx(1.0, abs=1e-7)  # softplus -> 1
    tokens = keys["tokenizer.ggml.tokens"]
    assert len(tokens) == 300 and tokens[0] == "<|endoftext|>" and tokens[299] == "[PAD299]"
    assert keys["tokenizer.ggml.token_type"][0] == gguf.TokenType.CONTROL
    assert keys["tokenizer.ggml.token_type"][299] == gguf.TokenType.UNUSED
    assert keys["tokenizer.ggml.bos_token_id"] == keys["tokenizer.ggml.eos_token_id"] == tokenizer.eot_id
    assert keys["tokenizer.ggml.model"] == "gpt2" and len(keys["tokenizer.ggml.merges"]) > 0

    C = m.n_embd
    expected = {"token_embd.weight": s["transformer.wte.weight"][:300], "output.weight": s["lm_head.weight"][:300],
                "output_norm.weight": s["transformer.ln_f.weight"]}
    for i in range(2):
        g = f"transformer.h.{i}"
        qkv = s[f"{g}.attn.c_attn.weight"]
        expected.update({f"blk.{i}.attn_norm.weight": s[f"{g}.ln_1.weight"],
                         f"blk.{i}.attn_q.weight": qkv[:C], f"blk.{i}.attn_k.weight": qkv[C:2 * C],
                         f"blk.{i}.attn_v.weight": qkv[2 * C:],
                         f"blk.{i}.attn_output.weight": s[f"{g}.attn.c_proj.weight"],
                         f"blk.{i}.attn_q_norm.weight": s[f"{g}.attn.q_norm.weight"],
                         f"blk.{i}.attn_k_norm.weight": s[f"{g}.attn.k_norm.weight"],
                         f"blk.{i}.ffn_norm.weight": s[f"{g}.ln_2.weight"],
                         f"blk.{i}.ffn_up.weight": s[f"{g}.mlp.c_fc.weight"],
                         f"blk.{i}.ffn_down.weight": s[f"{g}.mlp.c_proj.weight"]})
    assert set(tensors) == set(expected)
    for name, want in expected.items():
        kind, got = tensors[name]
        want = want.detach().numpy()
        assert got.shape == want.shape, name
        assert kind == ("F32" if want.ndim == 1 or dtype == "f32" else dtype.upper()), name
        assert np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max()), name


@pytest.mark.parametrize("model, arch, count", [(dict(mlp="swiglu", qk_norm=False), "llama", 2 + 1 + 9 * 2),
                                               (dict(mlp="swiglu"), "qwen3", 3 + 11 * 2),
                                               (dict(qk_norm=False, tie_embeddings=False), "arcee", 3 + 8 * 2),
                                               (dict(preset="gpt2-124m", **SHAPE), "gpt2", 5 + 12 * 2)])
def test_each_family_has_its_architecture_and_tensors(tokenizer, tmp_path, model, arch, count):
    _run(tmp_path / "run", tokenizer, **model)
    export_gguf(tmp_path / "run", tmp_path / "m.gguf", "f32", report=lambda m: None)
    keys, tensors = _read(tmp_path / "m.gguf")
    assert keys["general.architecture"] == arch and len(tensors) == count


def test_the_permutation_makes_adjacent_pair_rotation_compute_half_split_rotation():
    """llama.cpp's NORM rope rotates (x[2j], x[2j+1]) by pos * theta^(-2j/hd); gptforge rotates (x[j], x[j+hd/2])."""
    torch.manual_seed(0)
    n_head, hd, T = 2, 8, 5
    w = torch.randn(n_head * hd, 16)
    x = torch.randn(T, 16)
    cos, sin = rope_tables(T, hd, 10000.0)  # (T, hd/2)
    q = (x @ w.t()).view(T, n_head, hd).transpose(0, 1)  # (nh, T, hd)
    half_split = apply_rotary(q, cos, sin)  # what gptforge and HF compute
    p = (x @ _interleave_rotary(w, n_head).t()).view(T, n_head, hd // 2, 2).transpose(0, 1)  # (nh, T, hd/2, 2)
    a, b = p[..., 0], p[..., 1]
    adjacent = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)  # llama.cpp's NORM rotation
    pairs = torch.arange(hd).view(2, hd // 2).t().flatten()  # [0, hd/2, 1, hd/2 + 1, ...]
    assert torch.allclose(adjacent, half_split[..., pairs], atol=1e-5)  # the same values, pairs side by side
    assert not torch.allclose(adjacent, half_split, atol=1e-2)


def test_refusals_name_the_switch(tokenizer, tmp_path):
    _run(tmp_path / "run", tokenizer, mlp="gelu")  # Apertus layout with GELU: llama.cpp's apertus is xIELU
    with pytest.raises(GptforgeError, match="model.mlp=gelu .* llama.cpp's apertus computes model.mlp=relu2 only"):
        export_gguf(tmp_path / "run", tmp_path / "m.gguf", report=lambda m: None)
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf*"))
