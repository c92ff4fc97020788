"""The numerical guard: skip updates whose loss or gradient norm is not finite or spikes far above the
recent past, and ask for a rollback when too many in a row go wrong.

A spike is a value above mean + k standard deviations of the last `window` accepted steps (OLMo-core's
SkipStepOptimizer rule). The window is part of every checkpoint, so a resumed run decides exactly as the
uninterrupted one would. Every process sees the same all-reduced loss and the same global gradient norm,
so every process decides the same.
"""

from __future__ import annotations

import math
from collections import deque

from gptforge.config import GuardConfig


class Guard:
    def __init__(self, cfg: GuardConfig, state: dict | None = None):
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.grad_norms: deque[float] = deque(maxlen=cfg.window)
        self.consecutive = 0
        if state:
            self.losses.extend(state["losses"])
            self.grad_norms.extend(state["grad_norms"])
            self.consecutive = state["consecutive"]

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms), "consecutive": self.consecutive}

    def check(self, loss: float, grad_norm: float, spikes: bool = True) -> str | None:
        """Why this step must be skipped ("nonfinite", "loss_spike", "grad_spike"), or None to apply it.
        `spikes=False` (during warmup) looks for non-finite values only."""
        if not self.cfg.enabled:
            return None
        reason = None
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            reason = "nonfinite"
        elif spikes and self.cfg.spikes and self._spike(self.losses, loss):
            reason = "loss_spike"
        elif spikes and self.cfg.spikes and self._spike(self.grad_norms, grad_norm):
            reason = "grad_spike"
        if reason is None:
            self.losses.append(loss)
            self.grad_norms.append(grad_norm)
            self.consecutive = 0
        else:
            self.consecutive += 1
        return reason

    def threshold(self, values: deque[float]) -> float | None:
        if len(values) < self.cfg.min_history:
            return None
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        return mean + self.cfg.spike_sigmas * std

    def _spike(self, values: deque[float], value: float) -> bool:
        limit = self.threshold(values)
        return limit is not None and value > limit

    @property
    def needs_rollback(self) -> bool:
        return self.cfg.enabled and self.consecutive >= self.cfg.max_consecutive_skips
