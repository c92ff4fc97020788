"""SIGKILL or Ctrl-C at any moment, then run again: per-step losses, metrics.jsonl line for line, and final
weights bit-for-bit equal to a run that was never interrupted (CPU, run.deterministic=true, gradient
accumulation, dropout, random windows)."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from gptforge.observe.metrics import read_metrics
from gptforge.train import checkpoint

pytestmark = pytest.mark.slow

# The child dies by its own hand at an exact point when KILL_AT=<what>:<n> names one.
CHILD = r"""
import os, signal, sys
from gptforge.cli import main
what, _, n = os.environ.get("KILL_AT", ":0").partition(":")
count = {"n": 0}

def killer(fn):
    def wrapped(*args, **kwargs):
        count["n"] += 1
        if count["n"] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return wrapped

if what == "before_rename":      # every checkpoint file written and fsynced, the folder not yet renamed
    import gptforge.train.checkpoint as c
    c.fsync_dir = killer(c.fsync_dir)
elif what == "before_prune":     # the new checkpoint is in place, older ones not yet pruned
    import gptforge.train.checkpoint as c
    c.prune = killer(c.prune)
elif what == "mid_step":         # after backward, before the optimizer update (whichever optim.name is)
    import torch
    from gptforge.train.muon import Muon
    torch.optim.AdamW.step = killer(torch.optim.AdamW.step)
    Muon.step = killer(Muon.step)
elif what == "in_eval":           # the language task's evaluation (train/task.py)
    import gptforge.train.task as task
    task.evaluate = killer(task.evaluate)
sys.exit(main(sys.argv[1:]))
"""


def args(data, run_dir, steps):
    return [
        "train", f"data.dir={data}", f"run.dir={run_dir}", "model.preset=tiny", "model.dropout=0.1",
        "train.batch_size=4", "train.batch_tokens=512", f"train.max_steps={steps}", "train.max_time=null",
        "train.save_every=3", "eval.every=5", "train.log_every=1", "eval.tokens=1024",
        "train.samples=0", "run.deterministic=true", "run.tensorboard=false", "data.prefetch=2",
    ]


def child(argv, kill_at=None, kill_when_step=None, signals=(signal.SIGKILL,), delay=0.0):
    """Run `gptforge train argv`; once the run has logged step `kill_when_step`, wait `delay` seconds and
    send `signals` (a second one, if given, 20 ms after the first)."""
    env = {**os.environ, "KILL_AT": kill_at or ":0", "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if kill_when_step is not None:
        run_dir = [a.split("=", 1)[1] for a in argv if a.startswith("run.dir=")][0]
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            steps = [r.get("step", 0) for r in _safe_metrics(run_dir)]
            if steps and max(steps) >= kill_when_step:
                time.sleep(delay)
                for i, sig in enumerate(signals):
                    if proc.poll() is None:
                        proc.send_signal(sig)
                    if i + 1 < len(signals):
                        time.sleep(0.02)
                break
            time.sleep(0.005)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out.decode()


def _safe_metrics(run_dir):
    try:
        return read_metrics(run_dir)
    except (ValueError, OSError):
        return []


def per_step(run_dir):
    """The training and evaluation lines of metrics.jsonl in file order: a duplicated or missing step shows."""
    out = []
    for r in read_metrics(run_dir):
        if "train_loss" in r:
            out.append(("train", r["step"], r["train_loss"]))
        if "val_loss" in r:
            out.append(("val", r["step"], r["val_loss"]))
    return out


def assert_same_run(ref, run, steps):
    expected, got = per_step(ref), per_step(run)
    assert len(expected) == steps + steps // 5 + 1  # a training line a step, evals at 0, 5, ..., steps
    assert got == expected  # exact float equality, every line, in order
    ref_w, got_w = final_weights(ref), final_weights(run)
    assert ref_w.keys() == got_w.keys()
    for key in ref_w:
        assert torch.equal(ref_w[key], got_w[key]), key


def final_weights(run_dir):
    return load_file(str(checkpoint.list_checkpoints(run_dir / "checkpoints")[0] / "model.safetensors"))


def test_sigkill_anywhere_resumes_bitwise(small_data, tmp_path):
    steps = 40
    code, out = child(args(small_data, tmp_path / "ref", steps))
    assert code == 0, out

    run = tmp_path / "killed"
    kills = [
        (None, None, 2),  # killed before its first checkpoint: starts again from step 0
        ("before_rename", 2, None),  # dies writing the step-6 checkpoint: resumes from step 3
        ("mid_step", 9, None),  # dies inside an optimizer step
        ("in_eval", 3, None),  # dies while evaluating
        ("before_prune", 3, None),  # dies right after a checkpoint lands
        (None, None, 30),  # killed from outside at whatever it is doing once step 30 is logged
    ]
    for what, n, when in kills:
        code, out = child(args(small_data, run, steps), kill_at=f"{what}:{n}" if what else None, kill_when_step=when)
        if what is not None:
            assert code == -signal.SIGKILL, out
        assert not (run / "checkpoints" / f"step_{steps:08d}").exists() or when is not None
    code, out = child(args(small_data, run, steps))
    assert code == 0, out
    assert "resumed from" in out
    assert_same_run(tmp_path / "ref", run, steps)


def test_ctrl_c_at_random_moments_resumes_bitwise(small_data, tmp_path):
    """SIGINT at random moments, sometimes twice in a row (stop at once, nothing saved), then finish."""
    steps, seed = 40, int(os.environ.get("GPTFORGE_KILL_SEED", "0"))
    code, out = child(args(small_data, tmp_path / "ref", steps))
    assert code == 0, out
    draw, run = random.Random(seed), tmp_path / "interrupted"
    for _ in range(6):
        at = max([r["step"] for r in _safe_metrics(run) if "train_loss" in r], default=0) + draw.randint(1, 6)
        if at > steps - 2:
            break
        twice, delay = draw.random() < 0.35, draw.uniform(0.0, 0.1)
        code, out = child(args(small_data, run, steps), kill_when_step=at, delay=delay,
                          signals=(signal.SIGINT, signal.SIGINT) if twice else (signal.SIGINT,))
        assert code in (130, 0), f"seed {seed}: {out}"  # 0: it finished a step or two before the signal
        assert "Traceback" not in out, f"seed {seed}: {out}"
        if code == 130 and not twice:  # one Ctrl-C: the step in progress is finished and saved
            saved = int(out.split("interrupted: saved step ")[1].split()[0])
            assert checkpoint.find_latest(run).name == f"step_{saved:08d}", f"seed {seed}: {out}"
    code, out = child(args(small_data, run, steps))
    assert code == 0, out
    assert_same_run(tmp_path / "ref", run, steps)
