"""Ctrl-C during training: finish the step, save it, stop; a second Ctrl-C stops at once.

A SIGINT lands anywhere, often halfway through a step, after the loader and the RNGs have moved into the next
batch. A checkpoint written from there would pair the step-N counters with step N+1's data position, and
the resumed run would diverge. So the first SIGINT only asks: the loop stops at the next step boundary, where
the state belongs to one completed step, and saves that (with several processes, the request travels in the
step's own all-reduce, so every process stops after the same step). A second SIGINT raises at once; nothing
is saved then, and the run resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator


class Interrupt:
    """Whether Ctrl-C has asked the run to stop."""

    def __init__(self) -> None:
        self.requested = False


@contextlib.contextmanager
def deferred_interrupt(say: Callable[[str], None]) -> Iterator[Interrupt]:
    """Within the block the first SIGINT sets `requested`; the second raises KeyboardInterrupt. Outside the
    main thread (where no signal handler can be installed) SIGINT keeps its usual meaning."""
    interrupt = Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield interrupt
        return

    def handler(signum, frame):
        if interrupt.requested:
            raise KeyboardInterrupt
        interrupt.requested = True
        say("[yellow]Ctrl-C: stopping after this step and saving it; press Ctrl-C again to stop at once "
            "(the run then resumes from its last checkpoint)[/]")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield interrupt
    finally:
        signal.signal(signal.SIGINT, previous)
