"""`gptforge doctor`'s measured steps of the other model families: an LSTM on random tokens and the small
ResNet on random images, through the same builder and Stepper as `gptforge train`, timed after a warm-up
step. What a recurrent and a convolutional model reach on this machine, without any prepared data."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptforge.runtime import synchronize


def time_steps(t) -> float:
    """The fastest of a built trainee's second and third training steps (the first warms up), in seconds;
    the trainee is closed after."""
    times = []
    try:
        for i in range(3):
            start = time.perf_counter()
            t.stepper.step(t.loader.next_step(), 1.0, i + 1)
            synchronize(t.device)
            if i:
                times.append(time.perf_counter() - start)
    finally:
        t.close()
    return min(times)


def measure_family_steps(device: torch.device, precision: str, quick: bool) -> dict[str, Any] | None:
    """{lstm: ..., cnn: ...}: model, batch, step seconds and tokens (images) per second; None when quick."""
    if quick:
        return None
    from gptforge.config import load_config
    from gptforge.data.datadir import DataDir
    from gptforge.data.images import ImageData
    from gptforge.data.shards import read_header, write_shard
    from gptforge.parallel.world import World
    from gptforge.train.builder import build

    common = [f"train.device={device}", f"speed.precision={precision}", "train.max_steps=1", "data.prefetch=0"]
    out: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    cfg = load_config(None, [*common, "model.arch=lstm", "model.n_layer=2", "model.n_embd=384", "train.batch_size=16"])
    with tempfile.TemporaryDirectory() as folder:
        shard = Path(folder) / "train_000000.bin"
        write_shard(shard, rng.integers(0, cfg.data.vocab_size, 16 * (cfg.model.block_size + 1) * 4), cfg.data.vocab_size)
        data = DataDir(Path(folder), [read_header(shard)], [], None, cfg.data.vocab_size, None)
        t = build(cfg, World(), data=data, report=lambda msg: None)
        step = time_steps(t)
    m = t.cfg.model
    out["lstm"] = {"model": f"lstm {m.n_layer} x {m.n_embd}, context {m.block_size}", "batch_size": 16, "step_s": step,
                   "tokens_per_sec": t.cfg.tokens_per_step() / step}
    cfg = load_config(None, [*common, "model.arch=cnn", "train.batch_size=128"])
    images = rng.integers(0, 256, (512, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 512)
    data = ImageData("random images", images, labels, images[:128], labels[:128], [str(c) for c in range(10)])
    t = build(cfg, World(), data=data, report=lambda msg: None)
    step = time_steps(t)
    m = t.cfg.model
    out["cnn"] = {"model": f"resnet width {m.cnn_width}, {m.cnn_stages} stages, 32x32x3", "batch_size": 128,
                  "step_s": step, "tokens_per_sec": t.cfg.tokens_per_step() / step}
    return out


def family_lines(steps: dict[str, Any] | None) -> list[str]:
    if not steps:
        return []
    return [f"  {name} step{' ' * (11 - len(name))}{s['tokens_per_sec']:,.0f} {'images' if name == 'cnn' else 'tokens'}/s, "
            f"{s['model']}, batch {s['batch_size']}" for name, s in steps.items()]
