import random

import numpy as np
import pytest
import torch

from gptforge.config import TrainConfig
from gptforge.train import rng
from gptforge.train.schedule import lr_multiplier, progress


def test_warmup_then_cosine():
    cfg = TrainConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1, max_steps=100, max_time=None)
    assert lr_multiplier(cfg, 0, 0.0) == pytest.approx(0.1)
    assert lr_multiplier(cfg, 9, 0.09) == pytest.approx(1.0)
    assert lr_multiplier(cfg, 50, 0.5) == pytest.approx(0.55)
    assert lr_multiplier(cfg, 99, 1.0) == pytest.approx(0.1)


def test_wsd_and_constant():
    cfg = TrainConfig(warmup_steps=0, schedule="wsd", cooldown_frac=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(cfg, 10, 0.5) == 1.0
    assert lr_multiplier(cfg, 10, 0.8) == pytest.approx(1.0)
    assert lr_multiplier(cfg, 10, 0.9) == pytest.approx(0.5)
    assert lr_multiplier(cfg, 10, 1.0) == pytest.approx(0.0)
    cfg = TrainConfig(warmup_steps=0, schedule="constant")
    assert lr_multiplier(cfg, 5, 0.99) == 1.0


def test_progress_takes_the_tightest_budget():
    cfg = TrainConfig(max_steps=100, max_tokens=1000, max_time=None)
    assert progress(cfg, 10, 500, 0.0) == 0.5
    cfg = TrainConfig(max_steps=None, max_tokens=None, max_time=60.0)
    assert progress(cfg, 10, 500, 30.0) == 0.5
    assert progress(cfg, 10, 500, 90.0) == 1.0


def test_rng_round_trip_through_json():
    import json

    rng.seed_everything(3)
    random.random(), np.random.rand(), torch.rand(1)
    saved = json.loads(json.dumps(rng.capture()))
    expected = (random.random(), np.random.rand(), torch.rand(3).tolist(), np.random.randn())
    rng.seed_everything(99)
    random.random(), np.random.rand(), torch.rand(5)
    rng.restore(saved)
    assert (random.random(), np.random.rand(), torch.rand(3).tolist(), np.random.randn()) == expected
