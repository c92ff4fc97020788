"""Where the main job ends for each token budget: the table `gptforge doctor` predicts the main job from.

    python benchmarks/main_job_curve.py [--tokens 100000 250000 600000 1200000] [--precision auto]

`gptforge train` with no arguments trains the default recipe for 300 s, so how far it gets depends on the
machine's tokens/s (and on what else runs there). Its end depends on the tokens alone: the schedule decays
to its end on any budget, and the data order is the seed's. So each budget here is a full default run
with `train.max_tokens=N` instead of the time budget, and the final validation loss is recorded. Writes
benchmarks/results/main_job_curve_cpu.json and src/gptforge/observe/main_job_curve.json (the table the
package reads; the same figures).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gptforge.observe.metrics import read_metrics

PACKAGE_TABLE = Path(__file__).resolve().parent.parent / "src" / "gptforge" / "observe" / "main_job_curve.json"


def one_budget(tokens: int, precision: str, work: Path) -> dict:
    run = work / f"tokens{tokens}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gptforge", "train", f"train.max_tokens={tokens}", "train.samples=0",
                    f"train.precision={precision}", f"run.dir={run}"], check=True, capture_output=True)
    wall = time.perf_counter() - start
    records = read_metrics(run)
    evals = [r for r in records if "val_loss" in r]
    steps = [r for r in records if "train_loss" in r]
    environment = json.loads((run / "environment.json").read_text())
    return {"max_tokens": tokens, "tokens": steps[-1]["tokens"], "steps": steps[-1]["step"],
            "val_loss": round(evals[-1]["val_loss"], 4), "val_bpb": round(evals[-1]["val_bpb"], 4),
            "train_time_s": steps[-1]["time_s"], "wall_s": round(wall, 1), "precision": environment["precision"],
            "device": environment["device"], "git_sha": environment["git_sha"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[100_000, 250_000, 600_000, 1_200_000])
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--json", default="benchmarks/results/main_job_curve_cpu.json")
    parser.add_argument("--add", action="store_true", help="keep the budgets already in --json, add these")
    args = parser.parse_args()
    kept = json.loads(Path(args.json).read_text())["rows"] if args.add else []
    rows = [r for r in kept if r["max_tokens"] not in args.tokens]
    with tempfile.TemporaryDirectory() as tmp:
        for tokens in sorted(args.tokens):
            rows.append(one_budget(tokens, args.precision, Path(tmp)))
            r = rows[-1]
            print(f"{r['tokens']:>9,} tokens ({r['steps']} steps, {r['precision']}, {r['train_time_s']:.0f} s): "
                  f"val loss {r['val_loss']:.4f}", flush=True)
    rows.sort(key=lambda r: r["tokens"])
    command = " ".join(["python", "benchmarks/main_job_curve.py", *sys.argv[1:]])
    if args.add:
        command = f"{json.loads(Path(args.json).read_text())['command']}; {command}"
    record = {"benchmark": "main_job_curve", "command": command, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    table = {"about": "final validation loss of `gptforge train`'s default recipe for a token budget; written by "
                      "benchmarks/main_job_curve.py", "command": command, "device": rows[0]["device"],
             "git_sha": rows[0]["git_sha"],
             "points": [{k: r[k] for k in ("tokens", "val_loss", "precision")} for r in rows]}
    PACKAGE_TABLE.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {args.json} and {PACKAGE_TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
