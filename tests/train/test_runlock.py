"""One writer per run directory: a second `train` on a run directory in use is refused, naming the process
that holds it; a holder that died, however it died, never blocks."""

import os
import signal
import subprocess
import sys
import time

import pytest

from gptforge.config import load_config
from gptforge.observe.metrics import read_metrics
from gptforge.train import checkpoint
from gptforge.train.loop import train
from gptforge.train.runlock import LOCK_FILE, RunInUse, holder, run_lock

# A process that takes the lock of argv[1], says so on stdout, and holds it until killed.
HOLDER = r"""
import sys, time
from gptforge.train.runlock import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def held(tmp_path):
    """A run directory whose lock another (live) process holds; yields (run_dir, that process)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield tmp_path, proc
    finally:
        proc.kill()
        proc.wait()


def tiny(data, run_dir, *extra):
    return ["train", f"data.dir={data}", f"run.dir={run_dir}", "model.preset=tiny", "train.batch_size=4",
            "train.batch_tokens=512", "train.max_time=null", "eval.tokens=512", "train.samples=0",
            "run.tensorboard=false", "train.log_every=1", *extra]


def test_holder_names_the_live_process_and_nobody_after_it_dies(held):
    run_dir, proc = held
    info = holder(run_dir)
    assert info is not None and info["pid"] == proc.pid and info["host"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run_dir / LOCK_FILE).exists()  # the file stays behind ...
    assert holder(run_dir) is None  # ... but nobody holds it
    with run_lock(run_dir):  # and it never blocks
        assert holder(run_dir)["pid"] == os.getpid()
    assert holder(run_dir) is None


def test_train_on_a_run_dir_in_use_is_refused_before_any_work(small_data, held):
    run_dir, proc = held
    cfg = load_config(None, tiny(small_data, run_dir, "train.max_steps=2")[1:])
    with pytest.raises(RunInUse, match=rf"in use: held by pid {proc.pid} on .* since "):
        train(cfg)
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # nothing written


def test_the_command_line_says_who_holds_it(small_data, held):
    run_dir, proc = held
    out = subprocess.run([sys.executable, "-m", "gptforge", *tiny(small_data, run_dir, "train.max_steps=2")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert f"held by pid {proc.pid}" in out.stderr and "another run.dir" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


@pytest.mark.slow
def test_two_trains_on_one_run_dir_never_interleave(small_data, tmp_path):
    """The second `gptforge train`, started while the first trains, is refused; the first goes on alone (until
    Ctrl-C) and metrics.jsonl has one line per step."""
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "gptforge", *tiny(small_data, run_dir, "train.max_steps=100000", "train.save_every=5")]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while first.poll() is None and time.time() < deadline:
            if any(r.get("step", 0) >= 1 for r in _metrics_so_far(run_dir)):
                break
            time.sleep(0.05)
        second = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first run ended before the second started: the test proves nothing"
        assert second.returncode == 2 and f"held by pid {first.pid}" in second.stderr
        first.send_signal(signal.SIGINT)
    finally:
        out, _ = first.communicate(timeout=300)
        first.kill()
    assert first.returncode == 130, out
    steps = [r["step"] for r in read_metrics(run_dir) if "train_loss" in r]
    assert len(steps) > 1 and steps == list(range(1, steps[-1] + 1))
    assert checkpoint.find_latest(run_dir).name == f"step_{steps[-1]:08d}"  # Ctrl-C saved the step it ended on


def _metrics_so_far(run_dir):
    try:
        return read_metrics(run_dir)
    except ValueError:  # a line being written
        return []
