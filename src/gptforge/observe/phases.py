"""Where a training step's time goes: forward, backward, optimizer, timed with device events.

A PhaseTimer is handed to the Stepper by `gptforge bench`; the Stepper marks the end of each phase. On a
GPU the marks are CUDA events, so the split measures the device's work, not when the host queued it, and
timing adds no synchronization inside the step: events are read once, after it. Elsewhere the marks are
host clocks, which on a CPU is where the work happens.
"""

from __future__ import annotations

import time

import torch

PHASES = ("forward", "backward", "optimizer")


class PhaseTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[str, object]] = []

    def _now(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._marks = [("start", self._now())]

    def mark(self, phase: str) -> None:
        """The phase named has just ended (it began at the previous mark)."""
        self._marks.append((phase, self._now()))

    def split(self) -> dict[str, float]:
        """Seconds per phase since start(), summed over repeats (one forward and backward per micro-step)."""
        if self.cuda and self._marks:
            self._marks[-1][1].synchronize()
        totals = dict.fromkeys(PHASES, 0.0)
        for (_, begin), (phase, end) in zip(self._marks, self._marks[1:]):
            seconds = begin.elapsed_time(end) / 1000 if self.cuda else end - begin
            totals[phase] = totals.get(phase, 0.0) + seconds
        return totals
