"""Quantization-aware training: fake quantization equals real quantization, gradients pass straight through."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from gptforge.adapt.qat import FakeQuantLinear, apply_qat, remove_qat
from gptforge.adapt.qlinear import Int4Linear, Int8Linear, block_linears, fake_quantize, quantize_model
from gptforge.config import load_config
from gptforge.errors import GptforgeError
from gptforge.model.gpt import GPT, GPTConfig
from gptforge.runs import load_run
from gptforge.train.loop import train


def tiny_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=64, **kw))


def train_steps(model: GPT, steps: int = 5) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, 300, (4, 17))
        model(idx[:, :-1], idx[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_apply_qat_keeps_the_parameters_and_their_names():
    model = tiny_gpt()
    params, keys = list(model.parameters()), list(model.state_dict())
    names = apply_qat(model, "int4", group_size=32)
    assert names == block_linears(model)
    assert all(isinstance(model.get_submodule(n), FakeQuantLinear) for n in names)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert list(model.state_dict()) == keys
    assert remove_qat(model) == names
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]


@pytest.mark.parametrize("method,cls,atol", [("int4", Int4Linear, 1e-5), ("int8", Int8Linear, 2e-2)])
def test_fake_quantized_logits_equal_the_quantized_model(method, cls, atol):
    model = tiny_gpt()
    apply_qat(model, method, group_size=32)
    train_steps(model)
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        fake = model(idx)
        quantize_model(model, method, group_size=32)
        assert isinstance(model.transformer.h[1].mlp.c_proj, cls)
        real = model(idx)
    # int4 dequantizes exactly as the fake quantizer does; int8 on a CPU runs bf16 activations (W8A16).
    torch.testing.assert_close(real, fake, rtol=0, atol=atol * fake.abs().max().item())


def test_straight_through_estimator_passes_the_gradient_of_the_quantized_weight():
    model = tiny_gpt(zero_init_proj=False)  # zero projections would block the gradient to every layer before them
    names = apply_qat(model, "int4", group_size=32)
    idx = torch.randint(0, 300, (2, 17))
    model(idx[:, :-1], idx[:, 1:]).backward()
    assert all(model.get_submodule(n).weight.grad.abs().sum() > 0 for n in names)

    layer, x = model.transformer.h[0].mlp.c_fc, torch.randn(3, 64)
    layer.weight.grad = None
    layer(x).square().sum().backward()
    wq = fake_quantize(layer.weight, "int4", 32).detach().requires_grad_(True)
    assert not torch.equal(wq, layer.weight)  # the forward sees the quantized values ...
    F.linear(x, wq).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, wq.grad)  # ... and the weight gets their gradient unchanged


def test_qat_checkpoint_loads_into_a_plain_model(tmp_path):
    model = tiny_gpt()
    apply_qat(model, "int8")
    save_model(model, str(tmp_path / "m.safetensors"))
    load_model(tiny_gpt(), str(tmp_path / "m.safetensors"), strict=True)


def test_training_loop_with_train_qat(small_data, tmp_path):
    cfg = load_config(None, [f"data.dir={small_data}", "model.n_layer=2", "model.n_head=2", "model.n_embd=64",
                             "model.block_size=32", "train.batch_size=4", "train.max_steps=3", "train.max_time=null",
                             "eval.tokens=256", "eval.every=0", "train.samples=0", "finetune.qat=int4",
                             "run.tensorboard=false", f"run.dir={tmp_path / 'qat'}"])
    train(cfg)
    loaded = load_run(tmp_path / "qat", report=lambda m: None)  # plain nn.Linear names
    assert all(type(loaded.model.get_submodule(n)) is nn.Linear for n in block_linears(loaded.model))


def test_unknown_method_is_rejected():
    with pytest.raises(GptforgeError, match="'int2' is not one of: int8, int4"):
        apply_qat(tiny_gpt(), "int2")
    with pytest.raises(GptforgeError, match="--group-size 48 does not divide"):
        apply_qat(tiny_gpt(), "int4", group_size=48)
