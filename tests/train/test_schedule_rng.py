import math
import random

import numpy as np
import pytest
import torch

from gptforge.config import ScheduleConfig, TrainConfig, load_config
from gptforge.data.loader import Layout, TokenLoader
from gptforge.data.shards import read_header, write_shard
from gptforge.errors import ConfigError
from gptforge.train import rng
from gptforge.train.schedule import lr_multiplier, micro_steps, progress


def test_warmup_then_cosine():
    cfg = ScheduleConfig(warmup_steps=10, name="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(cfg, 0, 0.0) == pytest.approx(0.1)
    assert lr_multiplier(cfg, 9, 0.09) == pytest.approx(1.0)
    assert lr_multiplier(cfg, 50, 0.5) == pytest.approx(0.55)
    assert lr_multiplier(cfg, 99, 1.0) == pytest.approx(0.1)


def test_wsd_and_constant():
    cfg = ScheduleConfig(warmup_steps=0, name="wsd", cooldown_frac=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(cfg, 10, 0.5) == 1.0
    assert lr_multiplier(cfg, 10, 0.8) == pytest.approx(1.0)
    assert lr_multiplier(cfg, 10, 0.9) == pytest.approx(0.5)
    assert lr_multiplier(cfg, 10, 1.0) == pytest.approx(0.0)
    cfg = ScheduleConfig(warmup_steps=0, name="constant")
    assert lr_multiplier(cfg, 5, 0.99) == 1.0


@pytest.mark.parametrize("cooldown, quarter, three_quarters", [
    ("linear", 1 - 0.9 * 0.25, 1 - 0.9 * 0.75),
    ("cosine", 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 0.1 + 0.45 * (1 + math.cos(3 * math.pi / 4))),
])
def test_wsd_cooldown_shapes_at_key_steps(cooldown, quarter, three_quarters):
    cfg = ScheduleConfig(warmup_steps=10, name="wsd", cooldown=cooldown, cooldown_frac=0.2, min_lr_ratio=0.1)
    assert lr_multiplier(cfg, 0, 0.0) == pytest.approx(0.1)  # warmup starts at 1/10
    assert lr_multiplier(cfg, 9, 0.09) == pytest.approx(1.0)  # warmup's last step: the peak
    assert lr_multiplier(cfg, 50, 0.5) == 1.0  # stable
    assert lr_multiplier(cfg, 80, 0.8) == 1.0  # cooldown starts
    assert lr_multiplier(cfg, 85, 0.85) == pytest.approx(quarter)
    assert lr_multiplier(cfg, 90, 0.9) == pytest.approx(0.55)  # both shapes cross half-way at the middle
    assert lr_multiplier(cfg, 95, 0.95) == pytest.approx(three_quarters)
    assert lr_multiplier(cfg, 100, 1.0) == pytest.approx(0.1)  # the floor at the end


def test_wsd_cosine_cooldown_starts_flat_and_lands_flat():
    cfg = ScheduleConfig(warmup_steps=0, name="wsd", cooldown="cosine", cooldown_frac=0.2, min_lr_ratio=0.0)
    linear = ScheduleConfig(warmup_steps=0, name="wsd", cooldown="linear", cooldown_frac=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(cfg, 0, 0.81) > lr_multiplier(linear, 0, 0.81)  # gentler at first
    assert lr_multiplier(cfg, 0, 0.99) < lr_multiplier(linear, 0, 0.99)  # lower near the end
    rates = [lr_multiplier(cfg, 0, 0.8 + i / 1000) for i in range(201)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_micro_steps_grow_linearly_from_one():
    cfg = ScheduleConfig(batch_warmup_steps=8)
    assert [micro_steps(cfg, s, 4) for s in range(10)] == [1, 1, 1, 2, 2, 2, 3, 3, 4, 4]
    cfg = ScheduleConfig(batch_warmup_steps=2)
    assert [micro_steps(cfg, s, 8) for s in range(4)] == [1, 4, 8, 8]
    assert [micro_steps(ScheduleConfig(batch_warmup_steps=0), s, 4) for s in range(3)] == [4, 4, 4]
    assert [micro_steps(ScheduleConfig(batch_warmup_steps=5), s, 1) for s in range(6)] == [1] * 6


def test_batch_warmup_needs_accumulation():
    base = ["model.preset=tiny", "train.batch_size=4"]  # 4 x 64 = 256 tokens per micro-step
    with pytest.raises(ConfigError, match="schedule.batch_warmup_steps"):
        load_config(None, [*base, "schedule.batch_warmup_steps=10"])
    with pytest.raises(ConfigError, match="train.batch_tokens"):
        load_config(None, [*base, "schedule.batch_warmup_steps=10", "train.batch_tokens=256"])
    assert load_config(None, [*base, "schedule.batch_warmup_steps=10", "train.batch_tokens=512"]).schedule.batch_warmup_steps == 10


@pytest.fixture
def shards(tmp_path):
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.random.default_rng(0).integers(0, 500, 20000).astype(np.uint16), vocab_size=500)
    return [read_header(path)]


def _rows(loader, counts):
    return [[x.clone() for x, _ in loader.next_step(n)] for n in counts]


def test_smaller_steps_waste_no_data(shards):
    counts = [1, 2, 3, 4, 4]
    sequential = TokenLoader(shards, Layout(16, 2, 4), mode="sequential", prefetch=0)
    steps = _rows(sequential, counts)
    assert [len(step) for step in steps] == counts
    got = torch.cat([x for step in steps for x in step])  # (windows, 16)
    stream = torch.from_numpy(sequential.stream.read(0, sum(counts) * 2 * 16).astype(np.int64)).view(-1, 16)
    assert torch.equal(got, stream)  # consecutive windows: nothing skipped between steps
    assert sequential.state_dict()["cursor"] == sum(counts) * 2 * 16


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_batch_warmup_stream_is_the_same_with_prefetch_and_after_resume(shards, mode):
    counts = [1, 2, 3, 4, 4, 4]
    inline = _rows(TokenLoader(shards, Layout(16, 2, 4), mode=mode, seed=3, prefetch=0), counts)
    ahead = TokenLoader(shards, Layout(16, 2, 4), mode=mode, seed=3, prefetch=2)
    first = _rows(ahead, counts[:2])
    state = ahead.state_dict()
    rest = _rows(ahead, counts[2:])
    ahead.close()
    resumed = _rows(TokenLoader(shards, Layout(16, 2, 4), mode=mode, seed=3, prefetch=2, state=state), counts[2:])
    for a, b, c in zip(inline, first + rest, inline[:2] + resumed):
        assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c))
    with pytest.raises(ValueError, match="micro_steps"):
        TokenLoader(shards, Layout(16, 2, 4), prefetch=0).next_step(5)


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
