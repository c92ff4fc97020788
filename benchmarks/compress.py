"""Measure int8, int4 and 2:4 pruning (with and without a recovery fine-tune) against the run they came from.

    GPTFORGE_CACHE=... python benchmarks/compress.py --run runs/gpt --recover-steps 150

The run is copied first and never modified. Every variant goes through `gptforge.adapt.compare.compare`
(same validation tokens, same greedy decode), the targets are checked, and everything is written to
benchmarks/results/compress_cpu.json. A pruned model recovered for N steps has also trained N more steps
than its source; the "dense +N" control fine-tunes the unpruned run for the same N steps with the same
settings, so the recovery's loss can be judged against training alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptforge.adapt.compare import compare, print_table
from gptforge.adapt.prune import prune_run
from gptforge.adapt.quantize import quantize_run
from gptforge.config import from_dict
from gptforge.runs import load_run
from gptforge.train.loop import train

ROOT = Path(__file__).resolve().parent.parent
# (variant, largest val-loss increase over the source run, smallest linear-weight size ratio)
TARGETS = {"int8": (0.01, 3.5), "int4": (0.05, None), "2:4 +recovery": (0.03, None)}


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def fine_tune(source: Path, out: Path, steps: int) -> None:
    """The dense control: the source run trained `steps` more steps with its own settings."""
    tree = load_run(source, report=lambda m: None).config.to_dict()
    tree["finetune"]["init_from"] = str(source)
    tree["train"].update(max_steps=steps, max_tokens=None, max_time=None)
    tree["run"]["dir"] = str(out)
    train(from_dict(tree))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/gpt", help="the trained run to compress (default: runs/gpt)")
    parser.add_argument("--work", default=None, help="folder for the variants (default: a temporary one)")
    parser.add_argument("--recover-steps", type=int, default=150, help="recovery fine-tune after 2:4 pruning")
    parser.add_argument("--tokens", type=int, default=128, help="generated tokens per speed measurement")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/compress_cpu.json"))
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="gptforge-compress-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        parser.error(f"--work {work} is not empty")
    base = work / "base"
    shutil.copytree(args.run, base)
    load_avg = [os.getloadavg()]
    seconds = {}
    n = args.recover_steps
    variants = {"source": base}
    jobs = {
        "int8": lambda out: quantize_run(base, out, "int8"),
        "int4": lambda out: quantize_run(base, out, "int4", group_size=64),
        "2:4": lambda out: prune_run(base, out, 0.5, "2:4"),
        "2:4 +recovery": lambda out: prune_run(base, out, 0.5, "2:4", recover_steps=n),
        f"dense +{n}": lambda out: fine_tune(base, out, n),
    }
    for name, job in jobs.items():
        out = work / name.replace(" ", "_").replace(":", "of").replace("+", "")
        start = time.perf_counter()
        job(out)
        seconds[name] = round(time.perf_counter() - start, 1)
        variants[name] = out
    load_avg.append(os.getloadavg())

    rows = compare(list(variants.values()), tokens=args.tokens, device="cpu")
    load_avg.append(os.getloadavg())
    source = rows[0]
    for name, row in zip(variants, rows):
        row["variant"] = name
        row["val_loss_change"] = row["val_loss"] / source["val_loss"] - 1
        row["linear_ratio"] = source["linear_bytes"] / row["linear_bytes"]
        row["build_seconds"] = seconds.get(name)
    by_name = {row["variant"]: row for row in rows}
    targets = []
    for name, (max_change, min_ratio) in TARGETS.items():
        row = by_name[name]
        met = row["val_loss_change"] <= max_change and (min_ratio is None or row["linear_ratio"] >= min_ratio)
        targets.append({"variant": name, "max_val_loss_change": max_change, "min_linear_ratio": min_ratio,
                        "val_loss_change": row["val_loss_change"], "linear_ratio": row["linear_ratio"], "met": met})

    state = load_run(base, report=lambda m: None).state
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {
        "device": f"cpu: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "git_sha": git or None,
        "git_uncommitted_changes": bool(dirty),
        "command": " ".join(["python", *sys.argv]),
        "gptforge_cache": os.environ.get("GPTFORGE_CACHE"),
        "load_average_1m": {"start": load_avg[0][0], "after_building": load_avg[1][0], "after_measuring": load_avg[2][0]},
        "source_run": {"path": str(Path(args.run).resolve()), "step": state["step"], "tokens": state.get("tokens"),
                       "model": state["config"]["model"]},
        "recover_steps": n,
        "generated_tokens": args.tokens,
        "variants": rows,
        "targets": targets,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

    print_table([{**row, "name": row["variant"]} for row in rows])
    for t in targets:
        ratio = (f", linear weights {t['linear_ratio']:.2f}x smaller (target >= {t['min_linear_ratio']}x)"
                 if t["min_linear_ratio"] else "")
        print(f"{'MET ' if t['met'] else 'MISSED'} {t['variant']}: val loss {100 * t['val_loss_change']:+.2f}% "
              f"(target <= +{100 * t['max_val_loss_change']:.0f}%){ratio}")
    print(f"wrote {args.out}")
    return 0 if all(t["met"] for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
