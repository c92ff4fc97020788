"""The other model families and weight sharing, as modules: recurrent state carried across windows, BatchNorm's
two modes, a shared block that is one tensor with summed gradients. fp32 throughout."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gptforge.config import load_config
from gptforge.model import build_model
from gptforge.model.flops import flops_per_token, num_params
from gptforge.model.gpt import GPT, KVCache
from gptforge.model.rnn import RecurrentState


def model_cfg(*keys):
    return load_config(None, ["train.max_steps=1", *keys]).model


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_two_half_windows_carried_equal_one_whole_window(arch):
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(model_cfg(f"model.arch={arch}", "model.preset=tiny"), vocab_size=100)).eval()
    idx = torch.randint(0, 100, (3, 32))
    whole = model(idx)  # (3, 32, 100) from a zero state
    state = RecurrentState(3)
    halves = torch.cat([model(idx[:, :16], cache=state), model(idx[:, 16:], cache=state)], dim=1)
    assert state.pos == 32 and len(state.state) == (2 if arch == "lstm" else 1)
    torch.testing.assert_close(halves, whole, rtol=0, atol=1e-6)
    fresh = model(idx[:, 16:])  # the second half without the carried state is another computation
    assert (fresh - whole[:, 16:]).abs().max() > 1e-3


def test_recurrent_loss_matches_logits_and_sampling_uses_the_state():
    from gptforge.evaluate.generate import generate

    torch.manual_seed(0)
    model = build_model(dataclasses.replace(model_cfg("model.arch=lstm", "model.preset=tiny"), vocab_size=100)).eval()
    idx, y = torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8))
    logits = model(idx)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    torch.testing.assert_close(model(idx, y), expected)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    cached = generate(model, [1, 2, 3], 10, temperature=0, use_cache=True)
    full = generate(model, [1, 2, 3], 10, temperature=0, use_cache=False)
    assert cached == full


def test_batchnorm_normalizes_by_the_batch_in_training_and_by_running_statistics_in_eval():
    torch.manual_seed(0)
    model = build_model(model_cfg("model.arch=cnn", "model.image_size=8", "model.image_channels=1"))
    for block in model.modules():  # the zero-initialised residual gains would hide the batch dependence
        if isinstance(block, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(block.weight)
    images = torch.randint(0, 256, (8, 8, 8, 1), dtype=torch.uint8)
    bn = model.stem[1]
    assert bn.num_batches_tracked == 0 and torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    model.train()
    alone, together = model(images[:1].repeat(2, 1, 1, 1))[0], model(images)[0]
    assert (alone - together).abs().max() > 1e-3  # training: one image's output depends on its batch
    assert bn.num_batches_tracked == 2 and bn.running_mean.abs().sum() > 0
    model.eval()
    stats = bn.running_mean.clone()
    alone, together = model(images[:1])[0], model(images)[0]
    torch.testing.assert_close(alone, together, rtol=0, atol=1e-5)  # eval: the running statistics, per image
    assert torch.equal(bn.running_mean, stats) and bn.num_batches_tracked == 2
    assert {"stem.1.running_mean", "stem.1.running_var", "stem.1.num_batches_tracked"} <= set(model.state_dict())


@pytest.mark.parametrize("norm", ["batchnorm", "groupnorm"])
def test_cnn_gives_logits_and_its_flops(norm):
    cfg = model_cfg("model.arch=cnn", f"model.norm={norm}", "model.num_classes=7")
    model = build_model(cfg)
    images, labels = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8), torch.randint(0, 7, (4,))
    assert model(images).shape == (4, 7)
    assert model(images, labels, reduction="none").shape == (4,)
    flops = flops_per_token(cfg)
    first_conv = 2 * 3 * 9 * 32 * 32 * 32  # multiply-adds of the stem alone, forward, x2 for FLOPs
    assert flops > 3 * first_conv and num_params(cfg)["total"] == model.num_params()


def test_shared_layers_are_one_tensor_with_summed_gradients():
    torch.manual_seed(0)
    shared = GPT(model_cfg("model.preset=tiny", "model.n_layer=4", "model.share_layers=2", "model.vocab_size=128"))
    plain = GPT(model_cfg("model.preset=tiny", "model.n_layer=4", "model.vocab_size=128"))
    h = shared.transformer.h
    assert h[0] is h[2] and h[1] is h[3] and h[0] is not h[1]
    assert h[0].attn.c_attn.weight is h[2].attn.c_attn.weight
    per_block = sum(p.numel() for p in h[0].parameters())
    assert shared.num_params() == plain.num_params() - 2 * per_block
    assert flops_per_token(shared.config) == flops_per_token(plain.config)  # every layer still runs
    # The unshared model with each layer a copy of the block it would share: the same function ...
    state = {k: v for k, v in shared.state_dict().items()}
    plain.load_state_dict({k: state[k.replace("h.2.", "h.0.").replace("h.3.", "h.1.")] for k in plain.state_dict()})
    idx = torch.randint(0, 128, (2, 16))
    shared(idx, idx).backward()
    plain(idx, idx).backward()
    # ... whose gradients, summed over the layers a block serves, are the shared block's gradient.
    for name, p in h[0].named_parameters():
        summed = dict(plain.transformer.h[0].named_parameters())[name].grad + \
            dict(plain.transformer.h[2].named_parameters())[name].grad
        torch.testing.assert_close(p.grad, summed, rtol=1e-5, atol=1e-7)
    assert len(shared.state_dict()) == len(plain.state_dict())  # saved under every name, loaded either way


def test_shared_layers_decode_with_a_cache_as_without():
    torch.manual_seed(0)
    model = GPT(model_cfg("model.preset=tiny", "model.n_layer=4", "model.share_layers=1", "model.vocab_size=128")).eval()
    for block in model.transformer.h:  # zero-initialised projections would make every layer the identity
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.02)
    idx = torch.randint(0, 128, (1, 12))
    cache = KVCache(1, model.config)
    model(idx[:, :8], cache=cache)
    step = model(idx[:, 8:9], cache=cache)[0, -1]
    torch.testing.assert_close(step, model(idx[:, :9])[0, -1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("keys, message", [
    (["model.arch=cnn", "model.norm=rmsnorm"], "model.arch=cnn takes batchnorm or groupnorm"),
    (["model.norm=batchnorm"], "normalizes a convolutional model"),
    (["model.arch=cnn", "model.block_size=8"], "model.block_size is 1 for model.arch=cnn"),
    (["model.share_layers=9", "model.n_layer=4"], "model.share_layers"),
    (["model.arch=lstm", "finetune.lora.rank=4"], "finetune.lora.rank works on a GPT"),
    (["model.arch=cnn", "data.aug_token_noise=0.1"], "augment text"),
    (["data.aug_flip=true"], "augment images"),
    (["dist.sync_batchnorm=true"], "dist.sync_batchnorm is for model.arch=cnn"),
])
def test_family_keys_are_checked_before_any_work(keys, message):
    from gptforge.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, ["train.max_steps=1", *keys])


def test_a_classifier_skips_non_finite_steps_but_not_its_heavy_tailed_batches():
    from gptforge.train.guard import Guard

    cfg = load_config(None, ["model.arch=cnn", "train.max_steps=1", "guard.window=16", "guard.min_history=8"])
    assert not cfg.guard.spikes and load_config(None, ["train.max_steps=1"]).guard.spikes  # a GPT keeps the rule
    for spikes, expected in ((True, "loss_spike"), (False, None)):
        guard = Guard(dataclasses.replace(cfg.guard, spikes=spikes))
        for i in range(16):
            guard.check(0.001 + 1e-5 * (i % 3), 0.1)
        assert guard.check(0.08, 0.1) == expected  # one hard image in a batch that otherwise fits
        assert guard.check(float("nan"), 0.1) == "nonfinite"
