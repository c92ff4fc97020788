"""Learning-rate schedules as pure functions of progress, so a resumed run computes the same rates.

Progress is the fraction of the budget used: the largest of steps/max_steps, tokens/max_tokens and
time/max_time among the limits that are set. A time budget makes the schedule follow the wall clock, which
is what a user who says "train for five minutes" wants; step or token budgets keep it exactly reproducible.

The wsd (warmup-stable-decay) cooldown is linear or cosine (schedule.cooldown). Batch-size warmup
(schedule.batch_warmup_steps) is a schedule too: micro_steps() is the number of micro-batches an optimizer
step accumulates, growing linearly from 1 to the full accumulation over the first steps.
"""

from __future__ import annotations

import math

from gptforge.config import ScheduleConfig, TrainConfig


def progress(cfg: TrainConfig, step: int, tokens: int, time_s: float) -> float:
    fractions = []
    if cfg.max_steps is not None:
        fractions.append(step / cfg.max_steps)
    if cfg.max_tokens is not None:
        fractions.append(tokens / cfg.max_tokens)
    if cfg.max_time is not None:
        fractions.append(time_s / cfg.max_time)
    return min(1.0, max(fractions)) if fractions else 0.0


def lr_multiplier(cfg: ScheduleConfig, step: int, frac: float) -> float:
    """Multiplier of the peak rate at optimizer step `step` (0-based) with `frac` of the budget used."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if cfg.name == "wsd":
        start = 1.0 - cfg.cooldown_frac
        if frac <= start or cfg.cooldown_frac == 0:
            return 1.0
        if cfg.cooldown == "cosine":
            t = (frac - start) / cfg.cooldown_frac  # 0 -> 1 over the cooldown
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
        return 1.0 - (1.0 - floor) * (frac - start) / cfg.cooldown_frac
    raise ValueError(f"unknown schedule {cfg.name!r}")


def micro_steps(cfg: ScheduleConfig, step: int, accum: int) -> int:
    """Micro-batches accumulated by optimizer step `step` (0-based) when the full step has `accum`.

    Over the first W = schedule.batch_warmup_steps steps: 1 + floor((accum - 1) * step / W), a line from 1 at
    step 0 towards accum at step W, rounded down; accum from step W on.
    """
    warmup = cfg.batch_warmup_steps
    if not warmup or step >= warmup:
        return accum
    return 1 + (accum - 1) * step // warmup
