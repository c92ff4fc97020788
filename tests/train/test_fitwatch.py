"""The fit watch: overfitting and underfitting flags on constructed curves (once per episode), silence on a
healthy curve and on a real healthy run, a resumed watch deciding like an uninterrupted one; EarlyStop's
counting; the unigram-entropy baseline."""

import json
import math

import numpy as np
import pytest

from gptforge.config import load_config
from gptforge.data.datadir import load_data_dir
from gptforge.data.loader import TokenStream
from gptforge.observe.metrics import read_metrics
from gptforge.train import checkpoint
from gptforge.train.fitwatch import HIGH_FRACTION, EarlyStop, FitWatch, unigram_entropy
from gptforge.train.loop import train

BASELINE = 5.0  # unigram entropy of the constructed curves: "high" is above 4.0


def feed(watch, curve, start=0):
    """Feed (train, val) pairs as evaluations every 10 steps; returns [(step, kind)] of the flags."""
    flags = []
    for i, (train_loss, val_loss) in enumerate(curve, start=start):
        flags += [(10 * i, f.kind) for f in watch.observe(10 * i, val_loss, train_loss)]
    return flags


def overfit_curve():
    healthy = [(3.0 - 0.1 * i, 3.05 - 0.1 * i) for i in range(5)]  # val lowest at i = 4: 2.65
    rising = [(2.55 - 0.05 * i, 2.70 + 0.05 * i) for i in range(6)]  # train falls, val rises: i = 5 .. 10
    return healthy + rising


def test_overfitting_fires_once_per_episode():
    watch = FitWatch(patience=3, baseline=BASELINE)
    assert feed(watch, overfit_curve()) == [(70, "overfitting")]  # the third rise in a row; then quiet
    # a new lowest val loss ends the episode; the next three rises flag again
    assert feed(watch, [(2.0, 2.5), (1.9, 2.6), (1.8, 2.7), (1.7, 2.8)], start=11) == [(140, "overfitting")]


def test_overfitting_needs_train_loss_falling_and_val_rising_every_time():
    both_rise = [(2.0, 2.0), (2.1, 2.1), (2.2, 2.2), (2.3, 2.3)]  # diverging, not overfitting
    assert feed(FitWatch(3, BASELINE), both_rise) == []
    one_dip = [(2.0, 2.0), (1.9, 2.1), (1.8, 2.05), (1.7, 2.2), (1.6, 2.3)]
    assert feed(FitWatch(3, BASELINE), one_dip) == []
    assert feed(FitWatch(4, BASELINE), overfit_curve()) == [(80, "overfitting")]  # patience is in evaluations


def test_underfitting_fires_once_when_flat_and_high():
    flat = [(4.6 - 0.001 * i, 4.7 - 0.001 * i) for i in range(10)]  # above 0.8 x 5.0, moving 0.1% per eval
    watch = FitWatch(patience=3, baseline=BASELINE)
    assert feed(watch, flat) == [(30, "underfitting")]
    # moving again (more than 2% over the window) ends the episode, a new plateau flags again
    assert feed(watch, [(4.4, 4.5), (4.3, 4.4), (4.3, 4.4), (4.3, 4.4), (4.3, 4.4), (4.3, 4.4)], start=10) == [
        (140, "underfitting")]


def test_no_underfitting_when_low_flat_or_without_baseline():
    flat_low = [(3.0, 3.1)] * 8  # flat, but below 0.8 x 5.0: converged, not underfitting
    assert feed(FitWatch(3, BASELINE), flat_low) == []
    assert feed(FitWatch(3, None), [(4.6, 4.7)] * 8) == []
    train_moves = [(4.6 - 0.1 * i, 4.7) for i in range(8)]  # val flat, train still falling
    assert feed(FitWatch(3, BASELINE), train_moves) == []


def test_healthy_curve_is_quiet():
    curve = [(6.0 * 0.93**i + 1.0, 6.1 * 0.93**i + 1.1) for i in range(40)]
    assert feed(FitWatch(3, BASELINE), curve) == []


def test_flag_messages_name_the_numbers_and_the_keys():
    watch = FitWatch(3, BASELINE)
    feed(watch, overfit_curve()[:7])
    [flag] = watch.observe(70, 2.85, 2.4)
    assert (flag.fields["val_loss_from"], flag.fields["val_loss_to"]) == pytest.approx((2.65, 2.85))
    assert "optim.weight_decay" in flag.message and "model.dropout" in flag.message
    assert not {"val_loss", "train_loss"} & set(flag.fields)  # those keys mark evaluation and training lines
    watch = FitWatch(3, BASELINE)
    [flag] = [f for i in range(4) for f in watch.observe(10 * i, 4.7, 4.6)]
    assert flag.fields["high_line"] == pytest.approx(HIGH_FRACTION * BASELINE)
    assert "model.depth" in flag.message and "optim.lr" in flag.message


def test_train_loss_is_the_mean_since_the_last_evaluation():
    watch = FitWatch(3, BASELINE)
    watch.observe(0, 6.0)  # no training yet: not part of the history
    assert watch.history == []
    for loss in (5.0, 4.0, math.nan, 3.0):  # a skipped (non-finite) step is left out
        watch.add_train_loss(loss)
    watch.observe(10, 4.5)
    assert watch.history == [[10, 4.0, 4.5]]


def test_resumed_watch_decides_like_an_uninterrupted_one():
    curve = overfit_curve() + [(4.6, 4.7)] * 6
    whole = feed(FitWatch(3, BASELINE), curve)
    first = FitWatch(3, BASELINE)
    flags = feed(first, curve[:8])
    first.add_train_loss(1.25)  # a pending mean survives too
    state = json.loads(json.dumps(first.state_dict()))
    second = FitWatch(3, None, state=state)
    assert second.train_count == 1 and second.baseline == BASELINE
    flags += feed(second, curve[8:], start=8)
    assert flags == whole and len(whole) == 2


def test_early_stop_counts_evaluations_without_improvement():
    early = EarlyStop(patience=2, min_delta=0.1)
    assert early.update(0, 5.0) and early.best_step == 0
    assert not early.update(10, 4.95)  # better, but not by more than min_delta
    assert early.update(20, 4.85) and early.bad_evals == 0 and not early.stopped
    assert not early.update(30, math.nan)  # a non-finite evaluation is no improvement
    state = json.loads(json.dumps(early.state_dict()))
    resumed = EarlyStop(2, 0.1, state=state)
    assert not resumed.update(40, 4.8) and resumed.stopped
    assert (resumed.best_step, resumed.best_loss, resumed.last_step) == (20, 4.85, 40)
    assert not EarlyStop(patience=0).stopped


def test_unigram_entropy(small_data, tmp_path):
    shards = load_data_dir(small_data).train
    tokens = TokenStream(shards).read(0, TokenStream(shards).total)
    p = np.bincount(tokens) / len(tokens)
    exact = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    assert unigram_entropy(shards) == pytest.approx(exact)
    assert unigram_entropy(shards, max_tokens=20_000) == pytest.approx(exact, rel=0.05)  # sampled chunks
    assert 3.0 < exact < math.log(512)


TINY = ["model.preset=tiny", "train.batch_size=8", "train.max_time=null", "eval.tokens=2048", "train.samples=0",
        "run.tensorboard=false", "train.log_every=10"]


def test_real_healthy_run_is_quiet(small_data, tmp_path):
    train(load_config(None, [*TINY, f"data.dir={small_data}", f"run.dir={tmp_path / 'r'}", "train.max_steps=120",
                             "eval.every=10", "optim.lr=0.01"]))
    records = read_metrics(tmp_path / "r")
    assert not [r for r in records if r.get("event") in ("overfitting", "underfitting")]
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(evals) == 13 and evals[-1] < evals[0] - 1.0  # it did learn
    watch = checkpoint.read_state(checkpoint.find_latest(tmp_path / "r"))["fit_watch"]
    assert len(watch["history"]) == 4 and watch["baseline"] == pytest.approx(unigram_entropy(load_data_dir(small_data).train))


def test_real_stuck_run_is_flagged_underfitting(small_data, tmp_path, capsys):
    train(load_config(None, [*TINY, f"data.dir={small_data}", f"run.dir={tmp_path / 'r'}", "train.max_steps=40",
                             "eval.every=5", "optim.lr=1e-5", "optim.muon_lr=1e-5",
                             "schedule.warmup_steps=0"]))
    flags = [r for r in read_metrics(tmp_path / "r") if r.get("event") in ("overfitting", "underfitting")]
    assert [(r["event"], r["step"]) for r in flags] == [("underfitting", 20)]  # once: the first full window
    assert flags[0]["val_loss_to"] > flags[0]["high_line"]
    assert "underfitting" in capsys.readouterr().out


def test_fit_watch_off(small_data, tmp_path):
    train(load_config(None, [*TINY, f"data.dir={small_data}", f"run.dir={tmp_path / 'r'}", "train.max_steps=20",
                             "eval.every=5", "optim.lr=1e-5", "guard.fit_watch=false"]))
    assert not [r for r in read_metrics(tmp_path / "r") if r.get("event") == "underfitting"]
    assert checkpoint.read_state(checkpoint.find_latest(tmp_path / "r"))["fit_watch"] is None
