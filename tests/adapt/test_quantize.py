"""int8 / int4 weight-only quantization: the arithmetic, the modules, quantized runs end to end, and errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from support import random_weights_run

import gptforge
from gptforge.adapt.lora import apply_lora
from gptforge.adapt.qlinear import (
    Int4Linear, Int8Linear, build_quantized, dequantize_int4, dequantize_int8, linear_bytes, pack_int4,
    quantize_int4, quantize_int8, quantize_model, unpack_int4,
)
from gptforge.adapt.quantize import quantize_run
from gptforge.cli import main
from gptforge.config import load_config
from gptforge.data.datadir import load_data_dir
from gptforge.errors import GptforgeError
from gptforge.model.gpt import GPT, GPTConfig
from gptforge.train.checkpoint import save_weights


def tiny_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=64, **kw)).eval()


@pytest.fixture(scope="module")
def run(small_data, tmp_path_factory):
    """A weights-only run of a small random GPT on the shared small corpus (enough to load, sample and eval)."""
    return random_weights_run(small_data, tmp_path_factory.mktemp("run") / "base", step=7)


def test_int8_round_trip_error_is_at_most_half_a_step():
    w = torch.randn(48, 128)
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (48,)
    err = (dequantize_int8(q, scales, torch.float32) - w).abs()
    assert (err <= scales[:, None] / 2 + 1e-6).all()
    assert torch.equal(q.abs().amax(dim=1), torch.full((48,), 127, dtype=torch.int8))  # the range is used fully


def test_int4_round_trip_error_is_at_most_half_a_step_per_group():
    w = torch.randn(32, 128) * torch.linspace(0.1, 3, 128)  # groups of very different ranges
    packed, scales, zeros = quantize_int4(w, 32)
    assert packed.shape == (32, 64) and packed.dtype == torch.uint8 and scales.shape == zeros.shape == (32, 4)
    err = (dequantize_int4(packed, scales, zeros, torch.float32) - w).abs()
    assert (err.view(32, 4, 32) <= scales[..., None] / 2 + 1e-5).all()


def test_int4_packing_is_exact_and_two_codes_per_byte():
    q = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    assert pack_int4(torch.tensor([[1, 2]])).item() == 0x21  # column 0 low nibble, column 1 high nibble


@pytest.mark.parametrize("in_features", [128, 100])  # 100: not a multiple of 32, takes the dequantize path
def test_int8_linear_matches_the_dequantized_reference(in_features):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 96, bias=True)
    q = Int8Linear.from_linear(linear)
    x = torch.randn(3, 5, in_features)
    ref = F.linear(x, q.dequantize(), q.bias)
    y = q(x)
    assert y.shape == ref.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, ref, rtol=0, atol=2e-2 * ref.abs().max().item())  # bf16 activations (W8A16)


@pytest.mark.parametrize("method,tol", [("int8", 0.02), ("int4", 0.15)])
def test_quantized_logits_stay_close(method, tol):
    model = tiny_gpt()
    idx = torch.randint(0, 300, (2, 16))
    ref = model(idx)
    spec = quantize_model(model, method, group_size=32)
    assert spec == {"method": method, "group_size": 32 if method == "int4" else None,
                    "modules": [f"transformer.h.{i}.{m}" for i in range(2)
                                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]}
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if n.startswith("transformer.h."))
    assert (model(idx) - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_state_dict_loads_strictly_after_build_quantized(tmp_path, method):
    model = tiny_gpt(bias=True)
    spec = quantize_model(model, method, group_size=64)
    save_model(model, str(tmp_path / "m.safetensors"))
    keys = set(model.state_dict())
    assert {"transformer.h.0.attn.c_attn.qweight", "transformer.h.0.attn.c_attn.scales",
            "transformer.h.0.attn.c_attn.bias"} <= keys
    assert ("transformer.h.0.attn.c_attn.zeros" in keys) == (method == "int4")

    fresh = tiny_gpt(bias=True)
    torch.nn.init.zeros_(fresh.transformer.wte.weight)
    build_quantized(fresh, json.loads(json.dumps(spec)))  # as read back from state.json
    load_model(fresh, str(tmp_path / "m.safetensors"), strict=True)
    idx = torch.randint(0, 300, (1, 12))
    torch.testing.assert_close(fresh(idx), model(idx), rtol=0, atol=0)


def test_int8_linear_weights_are_at_least_3_5_times_smaller():
    model = tiny_gpt()
    before = linear_bytes(model)
    quantize_model(model, "int8")
    assert before / linear_bytes(model) >= 3.5
    int4 = tiny_gpt()
    quantize_model(int4, "int4", group_size=64)
    assert before / linear_bytes(int4) >= 5


def test_an_untied_head_is_quantized_by_int8_only():
    int8 = tiny_gpt(tie_embeddings=False)
    assert "lm_head" in quantize_model(int8, "int8")["modules"] and isinstance(int8.lm_head, Int8Linear)
    int4 = tiny_gpt(tie_embeddings=False)
    assert "lm_head" not in quantize_model(int4, "int4", 64)["modules"] and type(int4.lm_head) is nn.Linear
    tied = tiny_gpt()
    quantize_model(tied, "int8")
    assert tied.lm_head.weight is tied.transformer.wte.weight


def test_quantized_run_loads_samples_and_evaluates(run, tmp_path, capsys):
    out = quantize_run(run, tmp_path / "int4", "int4", group_size=32, report=lambda m: None)
    model, tokenizer = gptforge.load(out)
    assert isinstance(model.transformer.h[0].mlp.c_fc, Int4Linear) and tokenizer is not None
    base, _ = gptforge.load(run)
    idx = torch.tensor([tokenizer.encode("def f(x):")])
    assert (model(idx) - base(idx)).abs().max() <= 0.15 * base(idx).abs().max()

    assert main(["sample", str(out), "--prompt", "import", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("import")
    results = []
    for path in (run, out):
        assert main(["eval", str(path), "--json", "--device", "cpu"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[1]["val_loss"] == pytest.approx(results[0]["val_loss"], rel=0.02)


def test_a_lora_run_is_quantized_with_its_adapters_merged(small_data, tmp_path):
    vocab = load_data_dir(small_data).vocab_size
    # GPT-2 style attention (no qk_norm): the 2% bound below is calibrated on its error; sharper qk-normed
    # attention amplifies the (correct) int8 rounding of the large random adapters a little past it.
    cfg = load_config(None, [f"data.dir={small_data}", f"model.vocab_size={vocab}", "model.n_layer=2", "model.n_head=2",
                             "model.n_embd=64", "model.block_size=32", "model.qk_norm=false", "finetune.lora.rank=4"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    apply_lora(model, cfg.finetune.lora)
    for name, tensor in model.named_parameters():
        if name.endswith("lora_B"):
            nn.init.normal_(tensor, std=0.1)
    save_weights(tmp_path / "lora", model, cfg.to_dict(), tokenizer_file=small_data / "tokenizer.json")
    out = quantize_run(tmp_path / "lora", tmp_path / "int8", "int8", report=lambda m: None)
    merged, _ = gptforge.load(tmp_path / "lora")
    quantized, _ = gptforge.load(out)
    idx = torch.randint(0, vocab, (1, 16))
    assert (quantized(idx) - merged(idx)).abs().max() <= 0.02 * merged(idx).abs().max()


def test_bad_inputs_give_clear_errors(run, tmp_path):
    with pytest.raises(GptforgeError, match="'int3' is not one of: int8, int4"):
        quantize_model(tiny_gpt(), "int3")
    with pytest.raises(GptforgeError, match="--group-size 48 does not divide in_features=64 of transformer.h.0.attn.c_attn"):
        quantize_model(tiny_gpt(), "int4", group_size=48)
    with pytest.raises(GptforgeError, match="positive even number"):
        quantize_model(tiny_gpt(), "int4", group_size=3)
    with pytest.raises(GptforgeError, match="no such run directory"):
        quantize_run(tmp_path / "missing", tmp_path / "out", "int8")
    with pytest.raises(GptforgeError, match="would overwrite the source"):
        quantize_run(run, run, "int8", report=lambda m: None)
    out = quantize_run(run, tmp_path / "q", "int8", report=lambda m: None)
    with pytest.raises(GptforgeError, match="already exists and is not empty; pass --force"):
        quantize_run(run, out, "int8", report=lambda m: None)
    quantize_run(run, out, "int4", group_size=32, force=True, report=lambda m: None)
    with pytest.raises(GptforgeError, match="already quantized"):
        quantize_run(out, tmp_path / "again", "int8", report=lambda m: None)
