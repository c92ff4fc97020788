"""NEFTune: uniform noise of half-width alpha / sqrt(T x C) on the token embeddings, in training mode only,
from a hook that removes cleanly; the training loop hooks it on when finetune.neftune_alpha > 0."""

import math

import pytest
import torch

import gptforge
from gptforge.adapt.neftune import apply_neftune, neftune_scale, remove_neftune
from gptforge.config import load_config
from gptforge.errors import ConfigError
from gptforge.model.gpt import GPT, GPTConfig
from gptforge.observe.metrics import read_metrics
from gptforge.train.loop import train


def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=300, n_layer=1, n_head=2, n_embd=64, block_size=128))


def embed(m, ids):
    return m.transformer.wte(ids)


def test_noise_only_in_training_mode():
    m = model()
    ids = torch.randint(0, 300, (2, 100))
    m.eval()
    clean_logits = m(ids)
    apply_neftune(m, 5.0)
    assert torch.equal(m(ids), clean_logits)  # evaluation and generation see no noise
    m.train()
    assert not torch.equal(m(ids), clean_logits)


@pytest.mark.parametrize("alpha,T", [(5.0, 100), (15.0, 25)])
def test_noise_is_uniform_with_the_right_scale(alpha, T):
    m = model().train()
    ids = torch.randint(0, 300, (64, T))
    clean = embed(m, ids)
    apply_neftune(m, alpha)
    noise = embed(m, ids) - clean
    scale = alpha / math.sqrt(T * 64)
    assert neftune_scale(alpha, T, 64) == pytest.approx(scale)
    assert noise.abs().max().item() <= scale * (1 + 1e-5)
    assert noise.abs().max().item() > 0.99 * scale
    assert noise.mean().item() == pytest.approx(0.0, abs=0.01 * scale)
    assert noise.std().item() == pytest.approx(scale / math.sqrt(3), rel=0.02)  # uniform on [-s, s]


def test_removed_cleanly_and_never_twice():
    m = model().train()
    ids = torch.randint(0, 300, (4, 50))
    clean = embed(m, ids)
    apply_neftune(m, 5.0)
    apply_neftune(m, 5.0)  # replaces the hook, does not add a second one
    assert (embed(m, ids) - clean).abs().max().item() <= neftune_scale(5.0, 50, 64) * (1 + 1e-5)
    assert remove_neftune(m) is True
    assert torch.equal(embed(m, ids), clean)
    assert remove_neftune(m) is False
    assert set(m.state_dict()) == set(model().state_dict())  # never part of the weights


def test_bad_alpha_and_model():
    with pytest.raises(ConfigError, match="neftune_alpha"):
        apply_neftune(model(), 0.0)
    with pytest.raises(ConfigError, match="transformer.wte"):
        apply_neftune(torch.nn.Linear(2, 2), 5.0)


def test_training_loop_applies_it(small_data, tmp_path):
    base = ["model.preset=tiny", "train.batch_size=4", "train.max_time=null", "eval.tokens=1024",
            "train.samples=0", "run.tensorboard=false", "train.log_every=1", "train.max_steps=3", f"data.dir={small_data}"]
    train(load_config(None, [*base, f"run.dir={tmp_path / 'plain'}"]))
    train(load_config(None, [*base, f"run.dir={tmp_path / 'nef'}", "finetune.neftune_alpha=10"]))

    def lines(run, key):
        return [r[key] for r in read_metrics(tmp_path / run) if key in r]

    assert lines("plain", "val_loss")[0] == lines("nef", "val_loss")[0]  # step 0: evaluation sees no noise
    assert lines("plain", "train_loss")[0] != lines("nef", "train_loss")[0]  # training does
    loaded, _ = gptforge.load(tmp_path / "nef")
    assert not loaded.transformer.wte._forward_hooks  # a loaded run carries no hook
