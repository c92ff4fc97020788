"""A convolutional model (BatchNorm statistics, augmentation) and a recurrent one (its hidden state carried
along the sequential loader's lanes) killed with SIGKILL at several moments, then run again: per-step losses,
evaluations and final weights bit-for-bit those of a run never interrupted (CPU, fp32, deterministic)."""

import signal

import pytest
from safetensors.torch import load_file

from gptforge.train import checkpoint
from test_resume_kill import assert_same_run, child

pytestmark = pytest.mark.slow

COMMON = ["train.max_time=null", "train.save_every=3", "eval.every=5", "train.log_every=1", "train.samples=0",
          "run.deterministic=true", "run.tensorboard=false", "speed.precision=fp32"]


def cnn_args(run_dir, steps):
    return ["train", "model.arch=cnn", f"run.dir={run_dir}", "model.cnn_width=8", "model.cnn_stages=2",
            "model.dropout=0.1", "model.label_smoothing=0.1", "data.aug_crop=1", "data.aug_cutout=2",
            "train.batch_size=8", "train.batch_tokens=16", "eval.tokens=64", f"train.max_steps={steps}", *COMMON]


def lstm_args(data, run_dir, steps):
    return ["train", "model.arch=lstm", f"data.dir={data}", f"run.dir={run_dir}", "model.preset=tiny",
            "model.block_size=16", "model.dropout=0.1", "data.loader=sequential", "train.batch_size=2",
            "train.batch_tokens=64", "eval.tokens=256", f"train.max_steps={steps}", *COMMON]


def kill_and_finish(make_args, tmp_path, steps, inside):
    """Killed with SIGKILL at `inside` (KILL_AT's what and n), then run again to the end."""
    code, out = child(make_args(tmp_path / "ref", steps))
    assert code == 0, out
    run = tmp_path / "killed"
    code, out = child(make_args(run, steps), kill_at="%s:%d" % inside)
    assert code == -signal.SIGKILL, out
    code, out = child(make_args(run, steps))
    assert code == 0 and "resumed from" in out, out
    assert_same_run(tmp_path / "ref", run, steps)
    return run


def test_cnn_with_batchnorm_resumes_bitwise_after_sigkill(tmp_path):
    run = kill_and_finish(cnn_args, tmp_path, 15, inside=("mid_step", 8))
    weights = load_file(str(checkpoint.list_checkpoints(run / "checkpoints")[0] / "model.safetensors"))
    assert weights["stem.1.num_batches_tracked"].item() == 30  # 15 steps x 2 micro-steps: every one counted once


def test_lstm_with_carried_state_resumes_bitwise_after_sigkill(small_data, tmp_path):
    run = kill_and_finish(lambda r, s: lstm_args(small_data, r, s), tmp_path, 15, inside=("before_rename", 2))
    carry = load_file(str(checkpoint.list_checkpoints(run / "checkpoints")[0] / "carry.safetensors"))
    assert sorted(carry) == ["block0.0", "block0.1", "block1.0", "block1.1"]  # (h, c) of 2 row blocks
    assert carry["block0.0"].shape == (2, 2, 64) and carry["block0.0"].abs().sum() > 0
