"""The numerical guard: non-finite values and spikes are skipped, repeated failures roll back, and a resumed
run decides exactly as an uninterrupted one."""

import math
import random

import pytest
import torch

import gptforge
from gptforge.config import GuardConfig, load_config
from gptforge.errors import GptforgeError
from gptforge.observe.metrics import read_metrics
from gptforge.train.guard import Guard
from gptforge.train.loop import train


def healthy(n, seed=0):
    rng = random.Random(seed)
    return [(4.0 * math.exp(-i / 200) + 2 + rng.gauss(0, 0.05), 1.0 + rng.gauss(0, 0.05)) for i in range(n)]


def test_quiet_on_a_healthy_run():
    guard = Guard(GuardConfig(window=64, min_history=32))
    assert all(guard.check(loss, gn) is None for loss, gn in healthy(1000))


def test_flags_nonfinite_and_spikes_and_counts_in_a_row():
    guard = Guard(GuardConfig(window=64, min_history=32, max_consecutive_skips=3))
    for loss, gn in healthy(100):
        guard.check(loss, gn)
    assert guard.check(float("nan"), 1.0) == "nonfinite"
    assert guard.check(2.5, float("inf")) == "nonfinite"
    assert guard.check(50.0, 1.0) == "loss_spike"
    assert guard.needs_rollback and guard.consecutive == 3
    assert guard.check(2.5, 1.0) is None and guard.consecutive == 0
    assert guard.check(2.5, 40.0) == "grad_spike"
    assert guard.check(50.0, 1.0, spikes=False) is None  # during warmup only non-finite values count


def test_no_spike_rule_before_the_window_fills():
    guard = Guard(GuardConfig(window=64, min_history=32))
    for loss, gn in healthy(10):
        guard.check(loss, gn)
    assert guard.check(100.0, 100.0) is None


def test_state_round_trip_decides_the_same():
    a = Guard(GuardConfig(window=16, min_history=8))
    for loss, gn in healthy(50):
        a.check(loss, gn)
    b = Guard(GuardConfig(window=16, min_history=8), state=a.state_dict())
    for loss, gn in [(2.1, 1.0), (9.0, 1.0), (2.2, 7.0), (2.0, 1.0)]:
        assert a.check(loss, gn) == b.check(loss, gn)
    assert a.state_dict() == b.state_dict()


GUARDED = ["model.preset=tiny", "train.batch_size=4", "train.max_time=null", "eval.tokens=1024",
           "train.samples=0", "run.tensorboard=false", "train.log_every=1", "schedule.warmup_steps=5",
           "schedule.name=constant", "optim.lr=0.001", "guard.window=32", "guard.min_history=16",
           "run.deterministic=true"]


def run(data, run_dir, *extra):
    return train(load_config(None, [*GUARDED, f"data.dir={data}", f"run.dir={run_dir}", *extra]))


def events(run_dir):
    return [(r["event"], r["step"]) for r in read_metrics(run_dir) if r.get("event") not in (None, "resume", "finished")]


def test_injected_nan_and_spike_are_skipped(small_data, tmp_path):
    run(small_data, tmp_path / "r", "train.max_steps=32", "debug.inject_nan_at_step=8", "debug.inject_spike_at_step=28")
    assert events(tmp_path / "r") == [("skip_nonfinite", 8), ("skip_loss_spike", 28)]
    assert all(torch.isfinite(p).all() for p in gptforge.load(tmp_path / "r")[0].parameters())


def test_repeated_failures_roll_back_to_the_last_checkpoint(small_data, tmp_path):
    run(small_data, tmp_path / "r", "train.max_steps=20", "train.save_every=10", "guard.max_consecutive_skips=3",
        "debug.inject_nan_at_step=12", "debug.inject_count=3")
    assert events(tmp_path / "r") == [("skip_nonfinite", 12), ("skip_nonfinite", 13), ("skip_nonfinite", 14), ("rollback", 14)]
    rollback = [r for r in read_metrics(tmp_path / "r") if r.get("event") == "rollback"][0]
    assert rollback["checkpoint"] == "step_00000010"
    assert max(r["step"] for r in read_metrics(tmp_path / "r") if "train_loss" in r) == 20  # and it went on


def test_no_checkpoint_to_roll_back_to_is_a_clear_error(small_data, tmp_path):
    with pytest.raises(GptforgeError, match="no checkpoint to go back to"):
        run(small_data, tmp_path / "r", "train.max_steps=10", "guard.max_consecutive_skips=2",
            "debug.inject_nan_at_step=3", "debug.inject_count=2")


def test_a_resumed_run_decides_the_same(small_data, tmp_path):
    spike = ["debug.inject_spike_at_step=28"]
    run(small_data, tmp_path / "a", "train.max_steps=32", *spike)
    run(small_data, tmp_path / "b", "train.max_steps=24", *spike)  # stops (and saves) with the window mid-way
    run(small_data, tmp_path / "b", "train.max_steps=32", *spike)
    assert events(tmp_path / "a") == events(tmp_path / "b") == [("skip_loss_spike", 28)]
    losses = lambda d: [(r["step"], r["train_loss"]) for r in read_metrics(d) if "train_loss" in r]
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
