"""LoRA: only adapters train, a fresh adapter changes nothing, merging is exact, adapters save and load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gptforge.adapt.lora import LoRALinear, apply_lora, merge_lora
from gptforge.config import LoraConfig
from gptforge.errors import ConfigError
from gptforge.model.gpt import GPT, GPTConfig

# Random output projections (not zero-initialized): every adapter gets a gradient from the first step.
CFG = GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True, zero_init_proj=False)
LORA = LoraConfig(rank=4, alpha=8.0)


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG)


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, CFG.block_size), generator=torch.Generator().manual_seed(seed))


def _adapters(model: GPT) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}


def _train(model: GPT, steps: int = 3) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for i in range(steps):
        model(_ids(i), _ids(i + 100)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def test_apply_wraps_targets_and_freezes_everything_else():
    model = _model()
    weight = model.transformer.h[0].attn.c_attn.weight
    names = apply_lora(model, LORA)
    layers = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert names == [f"transformer.h.{i}.{layer}" for i in range(2) for layer in layers]
    assert model.transformer.h[0].attn.c_attn.weight is weight  # the same tensor, not a copy
    assert not isinstance(model.lm_head, LoRALinear) and isinstance(model.transformer.h[0].attn.c_attn, LoRALinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in names for x in "AB"}
    only_mlp = apply_lora(_model(), LoraConfig(rank=2, targets="mlp.c_proj"))
    assert only_mlp == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]


def test_only_adapters_get_gradients_and_change():
    model = _model()
    apply_lora(model, LORA)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.clone() for n, p in _adapters(model).items()}
    model(_ids(), _ids(2)).backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    assert all(not torch.equal(p, adapters[n]) for n, p in _adapters(model).items())


def test_fresh_adapters_leave_the_output_unchanged():
    model = _model().eval()
    with torch.no_grad():
        before = model(_ids())
        apply_lora(model, LORA)
        assert torch.equal(model(_ids()), before)


def test_merge_is_exact_after_training():
    model = _model().eval()
    with torch.no_grad():
        base_out = model(_ids())
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, dropout=0.1))
    _train(model.train())
    model.eval()
    with torch.no_grad():
        lora_out = model(_ids())
        assert (lora_out - base_out).abs().max() > 1e-2  # the adapters learned something to merge
        merge_lora(model)
        merged_out = model(_ids())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.transformer.h[1].mlp.c_fc) is nn.Linear
    assert not any("lora" in n for n in model.state_dict())
    assert all(p.requires_grad for p in model.parameters())
    assert (merged_out - lora_out).abs().max() < 1e-6
    plain = _model(seed=5)
    plain.load_state_dict(model.state_dict())  # a plain GPT's keys, nothing more
    with torch.no_grad():
        assert torch.equal(plain.eval()(_ids()), merged_out)


def test_targets_matching_nothing_list_the_linear_layers():
    listed = "available: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj$"  # lm_head is never a target
    with pytest.raises(ConfigError, match=rf"finetune.lora.targets='q_proj,lm_head' matches no linear layer; {listed}"):
        apply_lora(_model(), LoraConfig(rank=4, targets="q_proj,lm_head"))
