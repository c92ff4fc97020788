"""What a person sees: a progress bar on a terminal, plain lines elsewhere (logs, CI), samples."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gptforge.progress import clock_text, eta_s

_console = Console(highlight=False, soft_wrap=True)  # a log line stays one line


def is_tty() -> bool:
    return sys.stdout.isatty()


def printer(enabled: bool = True) -> Callable[[str], None]:
    """print() for rank 0 only, with rich markup."""
    if not enabled:
        return lambda msg: None
    return _console.print


def show_sample(index: int, text: str) -> None:
    _console.print(Panel(escape(text), title=f"sample {index + 1}", title_align="left", expand=False))


def _line(record: dict[str, Any]) -> str:
    return (
        f"step {record['step']:>6} | loss {record['train_loss']:.4f} | lr {record['lr']:.2e} | "
        f"grad {record['grad_norm']:.3f} | {record['tokens_per_sec']:,.0f} tok/s | mfu {percent(record['mfu'])}"
    )


class TrainProgress:
    """A bar with loss, tokens/s, MFU, elapsed time and ETA on a terminal; one plain line per log step
    otherwise, with the same figures. The ETA is that of the budget, at the pace of this process so far
    (a resumed run counts from where it resumed)."""

    def __init__(self, enabled: bool = True, start_fraction: float = 0.0, clock=time.monotonic):
        self.enabled, self.start_fraction, self.clock = enabled, start_fraction, clock
        self.start = clock()
        self._progress = None
        if enabled and is_tty():
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=_console, transient=False,
            )
            self._task = self._progress.add_task("train", total=1.0, info="")
            self._progress.start()

    def update(self, record: dict[str, Any], fraction: float) -> None:
        if not self.enabled:
            return
        if self._progress is None:
            elapsed = self.clock() - self.start
            eta = eta_s(elapsed, fraction, self.start_fraction)
            _console.print(f"{_line(record)} | elapsed {clock_text(elapsed)} | eta {clock_text(eta)}")
        else:
            self._progress.update(self._task, completed=fraction, info=_line(record))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
