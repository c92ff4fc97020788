"""speed.compile on the other families: a compiled cnn and lstm train through the same loop and compute what
the eager ones do (the first step's loss, same seed and data; fp32)."""

from __future__ import annotations

import pytest

from gptforge.cli import main
from gptforge.observe.metrics import read_metrics

pytestmark = pytest.mark.slow


def first_loss(run) -> float:
    return next(r["train_loss"] for r in read_metrics(run) if "train_loss" in r)


@pytest.mark.parametrize("family", ["cnn", "lstm"])
def test_a_compiled_family_trains_and_matches_eager(family, small_data, tmp_path):
    if family == "cnn":
        keys = ["model.arch=cnn", "model.cnn_width=8", "model.cnn_stages=2"]
    else:
        keys = ["model.arch=lstm", f"data.dir={small_data}", "model.preset=tiny", "data.loader=sequential",
                "train.batch_size=4", "eval.tokens=1024"]
    common = [*keys, "train.max_steps=1", "train.max_time=null", "eval.every=0", "train.log_every=1",
              "train.samples=0", "speed.precision=fp32", "run.tensorboard=false"]
    assert main(["train", *common, f"run.dir={tmp_path / 'eager'}"]) == 0
    assert main(["train", *common, "speed.compile=true", f"run.dir={tmp_path / 'compiled'}"]) == 0
    assert first_loss(tmp_path / "compiled") == pytest.approx(first_loss(tmp_path / "eager"), rel=1e-4)
