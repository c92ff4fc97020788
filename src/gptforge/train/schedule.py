"""Learning-rate schedules as pure functions of progress, so a resumed run computes the same rates.

Progress is the fraction of the budget used: the largest of steps/max_steps, tokens/max_tokens and
time/max_time among the limits that are set. A time budget makes the schedule follow the wall clock, which
is what a user who says "train for five minutes" wants; step or token budgets keep it exactly reproducible.
"""

from __future__ import annotations

import math

from gptforge.config import TrainConfig


def progress(cfg: TrainConfig, step: int, tokens: int, time_s: float) -> float:
    fractions = []
    if cfg.max_steps is not None:
        fractions.append(step / cfg.max_steps)
    if cfg.max_tokens is not None:
        fractions.append(tokens / cfg.max_tokens)
    if cfg.max_time is not None:
        fractions.append(time_s / cfg.max_time)
    return min(1.0, max(fractions)) if fractions else 0.0


def lr_multiplier(cfg: TrainConfig, step: int, frac: float) -> float:
    """Multiplier of the peak rate at optimizer step `step` (0-based) with `frac` of the budget used."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if cfg.schedule == "wsd":
        start = 1.0 - cfg.cooldown_frac
        if frac <= start or cfg.cooldown_frac == 0:
            return 1.0
        return 1.0 - (1.0 - floor) * (frac - start) / cfg.cooldown_frac
    raise ValueError(f"unknown schedule {cfg.schedule!r}")
