"""Progress of long work, with elapsed time, rate and ETA, the same for every command.

On a terminal, a live bar (rich). Anywhere else (a log file, CI, a pipe), plain lines: one as the work
starts, then at most one every `every_s` seconds, and one at the end, each with the same figures:

    prepare: 12.4/40.0 MB (31%) | 4.12 MB/s | elapsed 0:03 | eta 0:07 | 3/10 files

The first line comes when the work starts, so a log says within seconds what a command is doing. Progress
goes to stderr, so that a command's results on stdout (`--json`) stay clean; `gptforge train`'s own step
lines are its results and go to stdout (observe/console.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Callable, TextIO, TypeVar

T = TypeVar("T")


def clock_text(seconds: float | None) -> str:
    """0:07, 12:34 or 1:02:03; ? when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def eta_s(elapsed: float, fraction: float, start_fraction: float = 0.0) -> float | None:
    """Seconds left if the rest goes at the pace since `start_fraction`; None before any pace is known."""
    done = fraction - start_fraction
    if done <= 0 or elapsed <= 0:
        return None
    return elapsed * max(1.0 - fraction, 0.0) / done


def _amount(value: float, scale: float) -> str:
    value /= scale
    return f"{value:,.0f}" if value == int(value) or value >= 100 else f"{value:,.1f}"


class Progress:
    """One piece of long work: `total` units (None: unknown), advanced with `update`."""

    def __init__(self, what: str, total: float | None = None, unit: str = "", *, scale: float = 1.0,
                 enabled: bool = True, every_s: float = 10.0, file: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, live: bool | None = None):
        self.what, self.total, self.unit, self.scale = what, total, unit, scale
        self.enabled, self.every_s, self.clock = enabled, every_s, clock
        self.file = file if file is not None else sys.stderr
        self.done, self.info = 0.0, ""
        self.start = clock()
        self._last_line = None  # when the last plain line was printed
        self._last_shown = None  # and what it showed
        self._bar = None
        if not enabled:
            return
        if live if live is not None else self.file.isatty():
            self._start_bar()
        else:
            self._print()

    # -------------------------------------------------------------------------------------------- updating

    def update(self, done: float | None = None, *, advance: float = 0.0, total: float | None = None,
               info: str | None = None) -> None:
        """Set `done` (or add `advance`); a new `total` or `info` text may come with it."""
        self.done = self.done + advance if done is None else done
        if total is not None:
            self.total = total
        if info is not None:
            self.info = info
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, total=self.total, info=self.info)
        elif self.clock() - self._last_line >= self.every_s:
            self._print()

    def track(self, items: Iterable[T], info: Callable[[T], str] | None = None) -> Iterator[T]:
        """Yield `items`, one unit each, advancing after each is handled."""
        for item in items:
            yield item
            self.update(advance=1, info=info(item) if info is not None else None)

    def close(self) -> None:
        """The last line (or the bar's last state); safe to call twice."""
        if not self.enabled:
            return
        self.enabled = False
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, info=self.info)
            self._bar.stop()
            self._bar = None
        elif self._last_shown != (self.done, self.total, self.info) or self.clock() - self._last_line >= 1:
            self._print()  # the last line, unless the same one has just been printed

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------- showing

    def elapsed(self) -> float:
        return self.clock() - self.start

    def line(self) -> str:
        """The plain line for the current state."""
        elapsed = self.elapsed()
        amount = f"{_amount(self.done, self.scale)}"
        if self.total:
            fraction = self.done / self.total
            amount += f"/{_amount(self.total, self.scale)} {self.unit} ({100 * fraction:.0f}%)".rstrip()
            eta = clock_text(eta_s(elapsed, fraction))
        else:
            amount += f" {self.unit}".rstrip()
            eta = None
        parts = [f"{self.what}: {amount}"]
        if self.done and elapsed > 0:
            rate = self.done / self.scale / elapsed
            parts.append(f"{rate:,.3g} {self.unit or 'units'}/s" if rate >= 1 else f"{1 / rate:,.3g} s each")
        parts.append(f"elapsed {clock_text(elapsed)}")
        if eta is not None:
            parts.append(f"eta {eta}")
        if self.info:
            parts.append(self.info)
        return " | ".join(parts)

    def _print(self) -> None:
        print(self.line(), file=self.file, flush=True)
        self._last_line, self._last_shown = self.clock(), (self.done, self.total, self.info)

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._bar = RichProgress(
            TextColumn(f"[bold]{self.what}"), BarColumn(), MofNCompleteColumn() if self.scale == 1 else
            TextColumn("{task.percentage:>3.0f}%"), TextColumn(self.unit), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=Console(file=self.file, highlight=False), transient=False,
        )
        self._task = self._bar.add_task(self.what, total=self.total, info="")
        self._bar.start()
