"""torchrun with 2 CPU processes (gloo) training the convolutional model, against 1 process.

Plain BatchNorm normalizes each process's micro-batch, as one process with accumulation normalizes each
micro-step's: the training losses agree (relative 1e-4, fp32). Their running statistics do not, and are not
compared: DDP broadcasts rank 0's buffers, so they follow rank 0's micro-batches only, where one process
updates them on every micro-step. With dist.sync_batchnorm the two processes normalize their global batch
together, as one process does a batch twice the size: training and validation losses agree (relative 1e-4).
"""

import pytest

from test_distributed import close, curve, launch

pytestmark = pytest.mark.slow


def cnn_args(run_dir, batch_size, batch_tokens, *extra):
    return ["train", "model.arch=cnn", f"run.dir={run_dir}", "model.cnn_width=8", "model.cnn_stages=2",
            f"train.batch_size={batch_size}", f"train.batch_tokens={batch_tokens}", "train.max_steps=6",
            "train.max_time=null", "train.log_every=1", "eval.every=3", "eval.tokens=64", "train.save_every=0",
            "train.samples=0", "run.tensorboard=false", "speed.precision=fp32", *extra]


@pytest.fixture(scope="module")
def two_plain(tmp_path_factory):
    """2 processes of 8 images each, plain BatchNorm."""
    run = tmp_path_factory.mktemp("cnn") / "two"
    launch(2, cnn_args(run, 8, 16))
    return run


def test_two_processes_equal_one_with_accumulation(two_plain, tmp_path):
    launch(1, cnn_args(tmp_path / "one", 8, 16))
    close(curve(tmp_path / "one"), curve(two_plain))


def test_sync_batchnorm_equals_one_process_with_the_whole_batch(two_plain, tmp_path):
    launch(1, cnn_args(tmp_path / "one", 16, 16))
    launch(2, cnn_args(tmp_path / "two", 8, 16, "dist.sync_batchnorm=true"))
    close(curve(tmp_path / "one"), curve(tmp_path / "two"))
    close(curve(tmp_path / "one", "val_loss"), curve(tmp_path / "two", "val_loss"))
    # Without the switch each process normalizes its own half: another run.
    assert curve(two_plain)[6] != pytest.approx(curve(tmp_path / "one")[6], rel=1e-4)
