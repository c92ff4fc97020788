"""The built-in digits: a convolutional model (model.arch=cnn) trained for a fixed time on this machine.

Target: >= 98% accuracy on the held-out 20% of scikit-learn's handwritten digits (360 images, never trained
on) within 60 s of training. Runs `gptforge train` as a new user would, with the recipe below, and reads
the accuracy of the final evaluation from metrics.jsonl. Writes benchmarks/results/digits_<device>.json.

    python benchmarks/digits.py [--max-time 30] [key=value ...]
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

RECIPE = ["model.arch=cnn", "model.cnn_width=32", "model.cnn_stages=2", "model.cnn_blocks=1",
          "data.aug_crop=1", "optim.lr=3e-3", "train.batch_size=64", "schedule.name=cosine",
          "eval.every=0", "train.log_every=20", "train.save_every=0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-time", type=float, default=30.0, help="seconds of training (train.max_time)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2], help="one run per seed")
    parser.add_argument("overrides", nargs="*", help="config keys changing the recipe")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    runs = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            keys = RECIPE + [f"train.max_time={args.max_time}", f"run.seed={seed}", f"run.dir={tmp}/run"] + args.overrides
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "gptforge", "train", *keys], capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                sys.exit(proc.stderr[-3000:])
            records = read_metrics(Path(tmp) / "run")
            environment = json.loads((Path(tmp) / "run" / "environment.json").read_text())
        evals = [r for r in records if "val_acc" in r]
        steps = [r for r in records if "train_loss" in r]
        runs.append({"seed": seed, "val_acc": evals[-1]["val_acc"], "val_loss": evals[-1]["val_loss"],
                     "train_time_s": evals[-1]["time_s"], "steps": evals[-1]["step"], "images": evals[-1]["tokens"],
                     "images_per_sec_median": sorted(r["tokens_per_sec"] for r in steps)[len(steps) // 2],
                     "wall_s": round(wall, 1)})
        print(f"seed {seed}: {100 * runs[-1]['val_acc']:.2f}% test accuracy after {runs[-1]['train_time_s']:.1f} s "
              f"of training ({runs[-1]['steps']} steps, {runs[-1]['images']:,} images)", flush=True)
    accs = [r["val_acc"] for r in runs]
    result = {**environment, "command": "gptforge train " + " ".join(RECIPE + args.overrides),
              "max_time_s": args.max_time, "runs": runs, "val_acc_min": min(accs), "val_acc_mean": sum(accs) / len(accs),
              "target": ">= 0.98 test accuracy in <= 60 s of training", "met": min(accs) >= 0.98 and args.max_time <= 60}
    print(f"test accuracy: min {100 * min(accs):.2f}%, mean {100 * result['val_acc_mean']:.2f}% over {len(runs)} seeds; "
          f"target met: {result['met']}")
    out = Path(args.out or Path(__file__).parent / "results" / f"digits_{environment.get('device_type', 'cpu')}.json")
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
