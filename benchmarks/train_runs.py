"""Shared by the family benchmarks: one `gptforge train` run in a fresh folder, as a new user runs it, and
what its metrics.jsonl and checkpoint say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from gptforge.observe.metrics import read_metrics
from gptforge.train import checkpoint


def train_run(keys: list[str]) -> dict:
    """Train with `keys` (a budget among them); the evaluations (time_s, val_loss, ...), the median
    throughput, the parameter count from the banner's model and the final checkpoint's weight file size."""
    load_before = os.getloadavg()[0]  # a busy machine shows here: the lock keeps out only those who take it
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        proc = subprocess.run([sys.executable, "-m", "gptforge", "train", f"run.dir={run}", "train.samples=0",
                               "run.tensorboard=false", *keys], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(proc.stdout[-2000:] + proc.stderr[-3000:])
        records = read_metrics(run)
        weights_bytes = (checkpoint.list_checkpoints(run / "checkpoints")[0] / "model.safetensors").stat().st_size
        environment = json.loads((run / "environment.json").read_text())
        banner = next(line for line in proc.stdout.splitlines() if "parameters" in line)
    evals = [{k: r[k] for k in ("step", "tokens", "time_s", "val_loss", "val_bpb") if k in r}
             for r in records if "val_loss" in r]
    steps = [r for r in records if "train_loss" in r]
    return {
        "keys": keys,
        "banner": banner,
        "environment": environment,
        "evals": evals,
        "final_val_loss": evals[-1]["val_loss"],
        "final_val_bpb": evals[-1].get("val_bpb"),
        "train_time_s": steps[-1]["time_s"],
        "steps": steps[-1]["step"],
        "tokens": steps[-1]["tokens"],
        "tokens_per_sec_median": sorted(r["tokens_per_sec"] for r in steps)[len(steps) // 2],
        "weights_bytes": weights_bytes,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
    }
