"""`gptforge bench --nproc N`: the same per-process step on 1 and on N processes, side by side.

Weak scaling: each process keeps its micro-batch, so N processes do N times the work per step. Efficiency is
N-process throughput over N times the 1-process throughput; the time above the 1-process step is what going
distributed costs (gradient communication and waiting for the slowest process). More processes are not
always better, and this shows by how much.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from gptforge.errors import GptforgeError


def _run(nproc: int, overrides: list[str], steps: int, warmup: int, out: Path) -> dict[str, Any]:
    args = ["bench", *overrides, f"--steps={steps}", f"--warmup={warmup}", f"--json={out}"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "gptforge", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "gptforge", *args]
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # share the cores between the processes instead of oversubscribing
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise GptforgeError(f"the {nproc}-process benchmark failed:\n{result.stderr[-2000:]}")
    return json.loads(out.read_text())


def scaling(overrides: list[str], nproc: int, steps: int, warmup: int) -> dict[str, Any]:
    per_process = [o for o in overrides if not o.startswith("train.batch_tokens=")]  # accumulation 1 everywhere
    with tempfile.TemporaryDirectory() as tmp:
        one = _run(1, per_process, steps, warmup, Path(tmp) / "one.json")
        many = _run(nproc, per_process, steps, warmup, Path(tmp) / "many.json")
    efficiency = many["tokens_per_sec"] / (nproc * one["tokens_per_sec"])
    overhead = max(0.0, many["median_step_s"] - one["median_step_s"])
    return {
        "nproc": nproc,
        "one": one,
        "many": many,
        "scaling_efficiency": efficiency,
        "speedup": many["tokens_per_sec"] / one["tokens_per_sec"],
        "distributed_overhead_s": overhead,
        "distributed_overhead_frac": overhead / many["median_step_s"],
    }


def print_scaling(report: dict[str, Any]) -> None:
    one, many, n = report["one"], report["many"], report["nproc"]
    print(f"{'processes':>9} | {'tokens/s':>10} | {'per process':>11} | {'step ms':>8} | {'comm MB/step':>12}")
    for r in (one, many):
        print(f"{r['world_size']:>9} | {r['tokens_per_sec']:>10,.0f} | {r['tokens_per_sec_per_process']:>11,.0f} | "
              f"{1000 * r['median_step_s']:>8.1f} | {r['comm_bytes_per_step'] / 1e6:>12.2f}")
    print(
        f"speedup {report['speedup']:.2f}x on {n} processes, scaling efficiency {100 * report['scaling_efficiency']:.0f}%; "
        f"{1000 * report['distributed_overhead_s']:.1f} ms per step ({100 * report['distributed_overhead_frac']:.0f}%) "
        "spent communicating and waiting"
    )
    if report["speedup"] < 1.0:
        print(f"{n} processes are slower than 1 here: more processes are not always better.")
