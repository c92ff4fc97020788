"""Augmentation of training batches: off is the identity, shapes stay, rates match what was asked for,
targets stay the true next tokens of the edited text, resume stays bitwise, evaluation is never touched."""

import pytest
import torch

from gptforge.config import load_config
from gptforge.data.augment import Augmenter, delete_spans, token_noise
from gptforge.data.datadir import load_data_dir
from gptforge.data.loader import val_batches
from gptforge.errors import ConfigError
from gptforge.evaluate.loss import evaluate
from gptforge.observe.metrics import read_metrics
from gptforge.runs import load_run
from gptforge.train.loop import train
from gptforge.runtime import resolve_precision

V = 1000


def windows(b=512, t=128, seed=0):
    """A batch as the loader makes it: x and y are the first and last T tokens of T + 1 distinct ids."""
    g = torch.Generator().manual_seed(seed)
    w = torch.stack([torch.randperm(V, generator=g)[: t + 1] for _ in range(b)])  # no repeats: positions are traceable
    return w[:, :-1], w[:, 1:], w


def test_off_is_the_identity():
    x, y, _ = windows(4, 16)
    batches = [(x, y)]
    assert Augmenter(0.0, 0.0, V)(batches) is batches
    assert Augmenter.from_config(load_config(None, []).data, V).enabled is False


def test_token_noise_rate_shapes_and_targets():
    x, y, _ = windows()
    g = torch.Generator().manual_seed(1)
    noisy = token_noise(x, 0.05, V, generator=g)
    assert noisy.shape == x.shape and noisy.dtype == x.dtype
    assert noisy.min() >= 0 and noisy.max() < V
    changed = (noisy != x).float().mean().item()
    assert changed == pytest.approx(0.05 * (1 - 1 / V), abs=0.003)  # a draw may pick the same token
    ax, ay = Augmenter(token_noise=0.05, vocab_size=V, generator=torch.Generator().manual_seed(1)).apply(x, y)
    assert torch.equal(ax, noisy) and ay is y  # targets stay the real text


def test_span_deletion_rate_and_lengths():
    b, t = 4096, 64
    x, y, w = windows(b, t)
    ex, ey = delete_spans(x, y, 0.1, generator=torch.Generator().manual_seed(2))
    assert ex.shape == x.shape and ey.shape == y.shape
    lengths = (ey == -1).sum(1)
    edited = lengths > 0
    assert edited.float().mean().item() == pytest.approx(0.1, abs=0.015)
    assert lengths[edited].min() == 1 and lengths[edited].max() == t // 8
    assert lengths[edited].float().mean().item() == pytest.approx((1 + t // 8) / 2, abs=0.3)
    assert torch.equal(ex[~edited], x[~edited]) and torch.equal(ey[~edited], y[~edited])


def test_span_deletion_keeps_targets_the_next_tokens_of_the_edited_text():
    t = 64
    x, y, w = windows(2048, t, seed=3)
    ex, ey = delete_spans(x, y, 0.5, generator=torch.Generator().manual_seed(4))
    for row in range(len(x)):
        length = int((ey[row] == -1).sum())
        kept = t + 1 - length
        text = torch.cat([ex[row, :1], ey[row, : kept - 1]])  # the edited window: input then its targets
        inputs = min(kept, t)
        assert torch.equal(ex[row, :inputs], text[:inputs])  # every target is the next input token
        assert (ey[row, kept - 1 :] == -1).all()
        if length:
            # the edited text is the window with one contiguous span removed, first and last token kept
            start = int((text != w[row, :kept]).nonzero()[0])
            assert 1 <= start and start + length <= t
            assert torch.equal(text, torch.cat([w[row, :start], w[row, start + length :]]))
        else:
            assert torch.equal(text, w[row])


def test_both_together_noise_after_deletion():
    x, y, _ = windows(256, 64, seed=5)
    aug = Augmenter(0.5, 0.2, V, generator=torch.Generator().manual_seed(6))
    [(ax, ay)] = aug([(x, y)])
    dx, dy = delete_spans(x, y, 0.5, generator=torch.Generator().manual_seed(6))
    assert torch.equal(ay, dy)  # noise touches inputs only; targets are those of the edited text
    assert 0.15 < (ax != dx).float().mean().item() < 0.25


def test_global_generator_makes_it_repeatable():
    x, y, _ = windows(64, 32)
    aug = Augmenter(0.3, 0.1, V)
    torch.manual_seed(7)
    first = aug.apply(x, y)
    torch.manual_seed(7)
    second = aug.apply(x, y)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(aug.apply(x, y)[0], first[0])


def test_bad_rates_are_config_errors():
    with pytest.raises(ConfigError, match="data.aug_token_noise"):
        Augmenter(0.0, 1.5, V)
    with pytest.raises(ConfigError, match="data.aug_span_delete"):
        load_config(None, ["data.aug_span_delete=-0.1"])


TINY = ["model.preset=tiny", "train.batch_size=4", "train.max_time=null", "eval.tokens=1024",
        "train.samples=0", "run.tensorboard=false", "train.log_every=1", "run.deterministic=true"]
AUG = ["data.aug_span_delete=0.5", "data.aug_token_noise=0.3"]


def run(data, run_dir, *extra):
    return train(load_config(None, [*TINY, f"data.dir={data}", f"run.dir={run_dir}", *extra]))


def losses(run_dir):
    return [(r["step"], r["train_loss"]) for r in read_metrics(run_dir) if "train_loss" in r]


@pytest.mark.parametrize("cpu_kind", ["no native bf16", "native bf16"])
def test_training_is_augmented_and_evaluation_is_not(small_data, tmp_path, cpu_kind, request):
    if cpu_kind == "native bf16":
        request.getfixturevalue("native_bf16_cpu")  # precision=auto picks bf16: the check holds there too
    run(small_data, tmp_path / "plain", "train.max_steps=4")
    run(small_data, tmp_path / "aug", "train.max_steps=4", *AUG)
    assert losses(tmp_path / "plain")[0] != losses(tmp_path / "aug")[0]  # the first batch was edited
    # the logged val loss is that of the saved weights on the plain validation windows
    final = [r["val_loss"] for r in read_metrics(tmp_path / "aug") if "val_loss" in r][-1]
    loaded = load_run(tmp_path / "aug")
    cfg = loaded.config
    val = val_batches(load_data_dir(small_data).val, cfg.model.block_size, cfg.train.batch_size, cfg.eval.tokens)
    precision = resolve_precision(cfg.speed.precision, torch.device("cpu"))  # the run's own: auto
    assert precision.name == ("bf16" if cpu_kind == "native bf16" else "fp32")
    got = evaluate(loaded.model, val, precision)["val_loss"]
    assert got == pytest.approx(final, abs=1e-6)


def test_resume_draws_the_same_augmentations(small_data, tmp_path):
    run(small_data, tmp_path / "whole", "train.max_steps=8", *AUG)
    run(small_data, tmp_path / "split", "train.max_steps=4", "train.save_every=4", *AUG)
    run(small_data, tmp_path / "split", "train.max_steps=8", *AUG)
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
