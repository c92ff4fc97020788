"""The main job as a new user runs it: `gptforge train` with no arguments, timed from the outside.

Records the wall time (built-in corpus preparation included when the cache is empty), the training time,
the first and last validation loss, throughput, and the samples' first lines.
Writes benchmarks/results/default_train_<device>.json.

    python benchmarks/default_train.py [--fresh-cache]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gptforge.observe.metrics import read_metrics


def _median(values: list[float]) -> float | None:
    """None when no step had an MFU (a peak that stayed implausible is reported as unknown)."""
    return sorted(values)[len(values) // 2] if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh-cache", action="store_true", help="prepare the built-in corpus again (timed too)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        if args.fresh_cache:
            env["GPTFORGE_CACHE"] = str(Path(tmp) / "cache")
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "gptforge", "train"], cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        run = Path(tmp) / "runs" / "gpt"
        records = read_metrics(run)
        environment = json.loads((run / "environment.json").read_text())
        samples = [json.loads(line)["sample"] for line in (run / "samples.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    steps = [r for r in records if "train_loss" in r]
    result = {
        **environment,
        "command": "gptforge train" + ("  (fresh cache: the built-in corpus prepared in the timed run)" if args.fresh_cache else ""),
        "wall_s": wall,
        "train_time_s": steps[-1]["time_s"],
        "steps": steps[-1]["step"],
        "tokens": steps[-1]["tokens"],
        "val_loss_first": evals[0]["val_loss"],
        "val_loss_last": evals[-1]["val_loss"],
        "val_bpb_last": evals[-1]["val_bpb"],
        "tokens_per_sec_median": sorted(r["tokens_per_sec"] for r in steps)[len(steps) // 2],
        "mfu_median": _median([r["mfu"] for r in steps if r.get("mfu") is not None]),
        "evals": [{k: r[k] for k in ("step", "time_s", "val_loss", "val_bpb")} for r in evals],
        "train_log": [{k: r[k] for k in ("step", "time_s", "train_loss", "tokens_per_sec")} for r in steps],
        "samples": samples,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"default_train_{environment['device_type']}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wall {wall:.0f}s, training {result['train_time_s']:.0f}s, {result['steps']} steps, {result['tokens']:,} tokens; "
          f"val loss {result['val_loss_first']:.3f} -> {result['val_loss_last']:.3f} ({result['val_bpb_last']:.3f} bits/byte); "
          f"{result['tokens_per_sec_median']:,.0f} tokens/s median")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
