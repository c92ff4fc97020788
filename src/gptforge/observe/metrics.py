"""RUN_DIR/metrics.jsonl: one JSON object per line (training lines, eval lines, events), and TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from gptforge.fileio import atomic_write_text


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as strings so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record and "event" not in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, record["step"])

    def event(self, name: str, step: int, **fields: Any) -> None:
        self.write({"event": name, "step": step, **fields})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def truncate_after(run_dir: str | Path, step: int) -> int:
    """Drop lines of steps after `step` (written before a crash, to be redone on resume). Returns how many."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by the crash
            dropped += 1
            continue
        if record.get("step", 0) > step:
            dropped += 1
        else:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
