"""The GPT module: shapes, loss, causality, KV cache, init, saving, and that it can learn."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model

from gptforge.model.gpt import GPT, GPTConfig, KVCache


def tiny(**overrides) -> GPTConfig:
    """A 2-layer, 64-wide model whose 100-token vocabulary is padded to 128 rows."""
    fields = dict(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_embd=64, vocab_multiple=64)
    return GPTConfig(**{**fields, **overrides})


def build(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(**overrides)).eval()


ARCHITECTURES = [
    dict(pos=pos, norm=norm, mlp=mlp, tie_embeddings=tie, qk_norm=qk_norm, bias=bias)
    for pos, norm, mlp, tie, qk_norm, bias in itertools.product(
        ["learned", "rope"], ["layernorm", "rmsnorm"], ["gelu", "relu2", "swiglu"],
        [True, False], [True, False], [True, False])
]


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()))
def test_every_architecture_gives_logits_and_the_matching_loss(arch):
    model = build(**arch)
    idx = torch.randint(0, 100, (2, 16))
    targets = torch.randint(0, 100, (2, 16))

    logits = model(idx)
    loss = model(idx, targets)

    assert logits.shape == (2, 16, 100)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 100), targets.flatten()))


def test_padded_vocab_rows_exist_in_the_embedding_but_not_in_the_logits():
    model = build(tie_embeddings=False)
    assert model.config.padded_vocab_size == 128
    assert model.transformer.wte.weight.shape == (128, 64)
    assert model.lm_head.weight.shape == (128, 64)
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 100)


def test_reductions_and_ignore_index():
    model = build()
    idx = torch.randint(0, 100, (2, 8))
    targets = torch.randint(0, 100, (2, 8))
    targets[0, :3] = -1
    logits = model(idx).reshape(-1, 100)
    keep = targets.flatten() != -1

    per_token = model(idx, targets, reduction="none")
    expected = F.cross_entropy(logits, targets.flatten(), ignore_index=-1, reduction="none").view(2, 8)

    assert per_token.shape == (2, 8)
    torch.testing.assert_close(per_token, expected)
    assert (per_token[0, :3] == 0).all()
    torch.testing.assert_close(model(idx, targets, reduction="sum"), per_token.sum())
    torch.testing.assert_close(model(idx, targets), per_token.sum() / keep.sum())


def test_logit_softcap_squashes_logits_and_the_loss_uses_them():
    plain, capped = build(seed=0), build(seed=0, logit_softcap=0.3)
    idx = torch.randint(0, 100, (1, 8))
    logits = capped(idx)
    assert plain(idx).abs().max() > 0.3  # the cap is binding
    torch.testing.assert_close(logits, 0.3 * torch.tanh(plain(idx) / 0.3))
    torch.testing.assert_close(capped(idx, idx), F.cross_entropy(logits.view(-1, 100), idx.flatten()))


def test_sequences_longer_than_block_size_are_rejected():
    model = build()
    with pytest.raises(ValueError, match="block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    cache = KVCache(1, model.config)
    model(torch.zeros(1, 30, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="30 cached"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("overrides", [dict(n_embd=66), dict(mlp="geglu"), dict(pos="alibi"), dict(norm="batchnorm")])
def test_invalid_configs_raise(overrides):
    with pytest.raises(ValueError):
        GPT(tiny(**overrides))


def test_init_follows_gpt2():
    model = build(bias=True, n_layer=8, n_embd=256, tie_embeddings=False, zero_init_proj=False)
    residual = [m for m in model.modules() if getattr(m, "is_residual_proj", False)]
    assert len(residual) == 2 * 8  # attention and MLP output projections of every block
    for m in residual:
        assert abs(m.weight.std().item() - 0.02 / (2 * 8) ** 0.5) < 5e-4
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 5e-4
    assert abs(model.lm_head.weight.std().item() - 0.02) < 5e-4
    assert all((m.bias == 0).all() for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None)


def test_zero_init_proj_starts_every_block_as_the_identity():
    model = build(zero_init_proj=True)
    residual = [m for m in model.modules() if getattr(m, "is_residual_proj", False)]
    assert residual and all((m.weight == 0).all() for m in residual)
    assert model.transformer.h[0].attn.c_attn.weight.abs().sum() > 0  # only the output projections


def test_tied_head_shares_the_embedding_matrix():
    tied = build(tie_embeddings=True)
    untied = build(tie_embeddings=False)
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.lm_head.weight is not untied.transformer.wte.weight


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_changing_a_future_token_leaves_earlier_logits_alone(pos):
    model = build(pos=pos)
    idx = torch.randint(0, 100, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 100
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("chunks", [(12, 1, 1, 1, 1), (12, 20), (5, 9, 1, 17)], ids=str)
def test_incremental_decoding_with_a_kv_cache_matches_full_recomputation(pos, chunks):
    model = build(pos=pos, qk_norm=True)
    idx = torch.randint(0, 100, (2, sum(chunks)))
    full = model(idx)
    cache = KVCache(2, model.config)

    pieces, start = [], 0
    for size in chunks:
        pieces.append(model(idx[:, start:start + size], cache=cache))
        start += size

    assert cache.pos == sum(chunks)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
    cache.reset()
    torch.testing.assert_close(model(idx[:, :4], cache=cache), full[:, :4], rtol=0, atol=1e-5)


def test_kv_cache_keeps_the_dtype_it_was_given():
    model = build()
    cache = KVCache(1, model.config, max_len=16, dtype=torch.float64)
    idx = torch.randint(0, 100, (1, 10))
    model(idx[:, :6], cache=cache)
    out = model(idx[:, 6:], cache=cache)
    assert cache.k.dtype == torch.float64 and cache.k.shape == (2, 1, 4, 16, 16)
    torch.testing.assert_close(out, model(idx)[:, 6:], rtol=0, atol=1e-5)


def test_dropout_only_acts_in_training():
    model = build(dropout=0.5, zero_init_proj=False)  # zero projections would hide the dropped branches
    idx = torch.randint(0, 100, (1, 16))
    torch.testing.assert_close(model(idx), model(idx))
    model.train()
    assert not torch.allclose(model(idx), model(idx))


def test_state_dict_leaves_out_the_rotary_tables():
    model = build(pos="rope")
    assert {"rope_cos", "rope_sin"} <= {name for name, _ in model.named_buffers()}
    assert not any("rope" in key for key in model.state_dict())
    assert model.rope_cos.dtype == torch.float32


@pytest.mark.parametrize("tie", [True, False])
def test_safetensors_round_trip(tmp_path, tie):
    model = build(seed=0, tie_embeddings=tie, pos="rope")
    path = tmp_path / "model.safetensors"
    save_model(model, str(path))

    loaded = build(seed=1, tie_embeddings=tie, pos="rope")
    load_model(loaded, str(path))

    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == tie
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    idx = torch.randint(0, 100, (1, 8))
    torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)


def test_a_tiny_model_overfits_a_fixed_batch():
    model = build(mlp="swiglu").train()
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 100, (4, 33), generator=generator)
    x, y = idx[:, :-1], idx[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)

    first = model(x, y).item()
    for _ in range(100):
        loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    assert first > 4.0  # about ln(100) = 4.6 at init
    assert loss.item() < 0.05  # memorised: geometric-mean probability of the right token > 0.95


def test_gelu_exact_is_the_erf_form_and_gelu_the_tanh_one():
    x = torch.randn(2, 16, 64) * 3
    exact, tanh = build(mlp="gelu_exact", zero_init_proj=False), build(mlp="gelu", zero_init_proj=False)  # same weights
    mlp_exact, mlp_tanh = exact.transformer.h[0].mlp, tanh.transformer.h[0].mlp
    h = mlp_exact.c_fc(x)
    torch.testing.assert_close(mlp_exact(x), mlp_exact.c_proj(torch.nn.functional.gelu(h)))
    torch.testing.assert_close(mlp_tanh(x), mlp_tanh.c_proj(torch.nn.functional.gelu(h, approximate="tanh")))
    assert not torch.allclose(mlp_exact(x), mlp_tanh(x), atol=1e-6)


def test_relu_squared_matches_autograd_of_relu_square():
    from gptforge.model.gpt import relu_squared

    x = torch.randn(64, 48, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(relu_squared, (x,))
    x32 = torch.randn(4, 16, 96) * 2
    a, b = x32.clone().requires_grad_(), x32.clone().requires_grad_()
    grad = torch.randn(4, 16, 96)
    relu_squared(a).backward(grad)
    torch.nn.functional.relu(b).square().backward(grad)
    torch.testing.assert_close(relu_squared(x32), torch.nn.functional.relu(x32).square())
    torch.testing.assert_close(a.grad, b.grad)
