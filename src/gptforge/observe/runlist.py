"""`gptforge runs [DIR]`: the runs under a folder, each with its state and figures, read from the files a
run keeps (run.lock, metrics.jsonl, checkpoints/) without importing torch, so the table answers at once.

A run's state is read in this order:
  running         another process holds its run.lock (train/runlock.py) now
  weights only    no metrics.jsonl: an imported, quantized or pruned run, never trained here
then from the last of its lifecycle events in metrics.jsonl:
  finished        `finished` (the budget was spent)
  stopped early   `finished` with reason early_stop (the evaluations stopped improving)
  stopped         `stopped`: stopped on purpose (a pruned tune trial)
  interrupted     `interrupted` (Ctrl-C), or a start (`resume`, `restart`, or none) that never ended: killed,
                  or the machine went down
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from gptforge.errors import GptforgeError
from gptforge.train import runlock

LIFECYCLE = ("finished", "stopped", "interrupted", "resume", "restart")
STEP_DIR = re.compile(r"^step_(\d+)$")
SKIP_DIRS = {"checkpoints", "best", "tensorboard"}  # inside a run: never runs of their own
MAX_DEPTH = 6


def find_runs(root: str | Path, depth: int = 0) -> Iterator[Path]:
    """Run directories under `root` (itself included): folders with metrics.jsonl or checkpoints/, found
    at most MAX_DEPTH levels down, in name order. Links are not followed."""
    root = Path(root)
    if _is_run(root):
        yield root
    if root.name in SKIP_DIRS or depth >= MAX_DEPTH:
        return
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:  # unreadable: nothing to list there
        return
    for child in children:
        if child.name not in SKIP_DIRS and not child.name.startswith("."):
            yield from find_runs(child, depth + 1)


def _is_run(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() or (path / "checkpoints").is_dir()


def describe_run(run_dir: Path) -> dict[str, Any]:
    """One row: state, step, best and last val loss, tokens, training time, size on disk, problems."""
    row: dict[str, Any] = {"run": str(run_dir), "state": None, "step": None, "best_val_loss": None,
                           "last_val_loss": None, "tokens": None, "time_s": None,
                           "checkpoints": _checkpoint_steps(run_dir), "size_bytes": disk_size(run_dir),
                           "unreadable_lines": 0}
    last_event: dict[str, Any] = {}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        with open(metrics, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # a line torn by a crash
                    row["unreadable_lines"] += 1
                    continue
                if not isinstance(record, dict):
                    row["unreadable_lines"] += 1
                    continue
                last_event = _take(row, record, last_event)
    if row["checkpoints"] and row["checkpoints"][0] >= (row["step"] or 0):  # may be newer than the last logged line
        _take_checkpoint(row, run_dir / "checkpoints" / f"step_{row['checkpoints'][0]:08d}" / "state.json")
    holder = runlock.holder(run_dir)
    if holder is not None:
        row["state"] = "running"
        row["holder"] = runlock.describe(holder)
    elif not metrics.is_file():
        row["state"] = "weights only"
    else:
        row["state"] = _state(last_event)
    return row


def _take(row: dict[str, Any], record: dict[str, Any], last_event: dict[str, Any]) -> dict[str, Any]:
    """Fold one metrics line into the row; returns the newest lifecycle event so far."""
    step = record.get("step")
    if isinstance(step, int):
        row["step"] = max(step, row["step"] or 0)
    event = record.get("event")
    if event is not None:
        return record if event in LIFECYCLE else last_event
    for key in ("tokens", "time_s"):
        if isinstance(record.get(key), (int, float)):
            row[key] = record[key]
    loss = record.get("val_loss")
    if isinstance(loss, (int, float)):
        row["last_val_loss"] = loss
        if row["best_val_loss"] is None or loss < row["best_val_loss"]:
            row["best_val_loss"] = loss
    return last_event


def _state(last_event: dict[str, Any]) -> str:
    event = last_event.get("event")
    if event == "finished":
        return "stopped early" if last_event.get("reason") == "early_stop" else "finished"
    return "stopped" if event == "stopped" else "interrupted"


def _take_checkpoint(row: dict[str, Any], state_file: Path) -> None:
    """Step, tokens and time from the newest checkpoint's state.json (unverified: figures for a table only)."""
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
    row["step"] = state.get("step") if isinstance(state.get("step"), int) else row["checkpoints"][0]
    for key in ("tokens", "time_s"):
        if isinstance(state.get(key), (int, float)):
            row[key] = round(state[key], 3) if key == "time_s" else state[key]


def _checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoint folders, newest first (by name: verifying them is `train`'s and `load`'s job)."""
    root = run_dir / "checkpoints"
    try:
        names = [p.name for p in root.iterdir()]
    except OSError:
        return []
    return sorted((int(m.group(1)) for m in map(STEP_DIR.match, names) if m), reverse=True)


def disk_size(path: Path) -> int:
    """Bytes of the files under `path` (links counted as links, not followed)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def list_runs(root: str | Path) -> list[dict[str, Any]]:
    root = Path(root)
    if not root.is_dir():
        raise GptforgeError(f"{root}: no such folder (runs are listed from a folder; the default is runs/)")
    return [describe_run(path) for path in find_runs(root)]


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s" if m else f"{s}s"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def print_table(rows: list[dict[str, Any]], root: Path) -> None:
    if not rows:
        print(f"no runs under {root}")
        return
    header = ("run", "state", "step", "best val", "last val", "tokens", "time", "size")
    table = [header] + [
        (r["run"], r["state"], "-" if r["step"] is None else f"{r['step']:,}", _loss(r["best_val_loss"]),
         _loss(r["last_val_loss"]), "-" if r["tokens"] is None else f"{r['tokens']:,}", _duration(r["time_s"]),
         _size(r["size_bytes"]))
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))).rstrip())
    for r in rows:
        if r.get("holder"):
            print(f"{r['run']}: {r['holder']}")
        if r["unreadable_lines"]:
            print(f"{r['run']}: {r['unreadable_lines']} unreadable line(s) in metrics.jsonl were skipped")


def run_runs(args: argparse.Namespace) -> int:
    rows = list_runs(args.dir)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows, Path(args.dir))
    return 0
