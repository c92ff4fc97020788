"""The weights being served, on an engine thread, and their swap for a newer checkpoint without downtime.

A `Served` bundles one loaded checkpoint with its engine, its thread, tokenizer and chat template. A request
takes the current bundle when it starts and keeps it to the end. `Host.reload()` loads the run's newest
intact checkpoint beside the old one and makes it current; the old bundle's engine finishes the requests it
holds, then its thread ends and its memory goes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from gptforge.evaluate.engine import Engine


@dataclass(eq=False)
class Served:
    run: object  # runs.LoadedRun
    engine: Engine
    template: object | None  # data.chat.ChatTemplate
    step: int
    val_ppl: float | None
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    @property
    def tokenizer(self):
        return self.run.tokenizer

    @property
    def block_size(self) -> int:
        return self.run.config.model.block_size

    def start(self) -> None:
        self.thread = threading.Thread(target=self.engine.run, args=(self.stop,), daemon=True,
                                       name=f"engine-step-{self.step}")
        self.thread.start()

    def retire(self, timeout: float = 600.0) -> None:
        """Stop once the requests it holds are done (called on a thread of its own)."""
        deadline = time.monotonic() + timeout
        while not self.engine.idle() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.stop.set()
        self.engine.wake()


def validation_perplexity(state: dict) -> float | None:
    last = state.get("last_val") or {}
    ppl = last.get("perplexity")
    return float(ppl) if isinstance(ppl, (int, float)) else None


class Host:
    """Loads the run, keeps the current Served, swaps in newer checkpoints (SIGHUP, --watch).

    The weights are served in `dtype`, cast once at load (not autocast at every step: a decode step is
    small, and a cast of every weight per step would cost more than the step's matmuls save)."""

    def __init__(self, run_path: str | Path, device, slots: int, dtype: torch.dtype = torch.float32,
                 report: Callable[[str], None] = print):
        self.run_path, self.device, self.slots, self.dtype = Path(run_path), device, slots, dtype
        self.report = report
        self._lock = threading.Lock()
        self.current = self._load()
        self.current.start()
        self.on_swap: list[Callable[[Served], None]] = []

    def _load(self) -> Served:
        from gptforge.data.chat import ChatTemplate
        from gptforge.runs import load_run

        run = load_run(self.run_path, self.device, report=self.report)
        if run.tokenizer is None:
            from gptforge.errors import GptforgeError

            raise GptforgeError(f"{run.checkpoint} has no tokenizer.json: a server needs one to read prompts")
        engine = Engine(run.model.to(self.dtype), slots=self.slots)
        return Served(run, engine, ChatTemplate.from_tokenizer(run.tokenizer), int(run.state.get("step", 0)),
                      validation_perplexity(run.state))

    def newest_step(self) -> int | None:
        from gptforge.train import checkpoint

        try:
            return checkpoint.step_of(checkpoint.resolve(self.run_path, report=lambda m: None))
        except Exception:  # no checkpoint intact right now (one being written): try again later
            return None

    def reload(self) -> bool:
        """Swap in the newest intact checkpoint; False (and the old weights kept) when there is none newer."""
        with self._lock:
            old = self.current
            new = self._load()
            if new.run.checkpoint == old.run.checkpoint and new.step == old.step:
                return False
            new.start()
            self.current = new
            for hook in self.on_swap:
                hook(new)
            threading.Thread(target=old.retire, daemon=True, name="engine-retire").start()
            self.report(f"serving {new.run.checkpoint} (step {new.step}); step {old.step} finishes its requests")
            return True

    def watch(self, every: float, stop: threading.Event) -> None:
        """Reload whenever a newer checkpoint appears (polled every `every` seconds)."""
        while not stop.wait(every):
            step = self.newest_step()
            if step is not None and step != self.current.step:
                try:
                    self.reload()
                except Exception as e:  # a bad checkpoint must not take the server down
                    self.report(f"reload failed, still serving step {self.current.step}: {e}")

    def close(self) -> None:
        self.current.stop.set()
        self.current.engine.wake()
