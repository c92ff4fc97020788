"""CIFAR-10 with the convolutional model, from the standard binary files, when you have them.

gptforge downloads nothing: point --data (or GPTFORGE_CIFAR10) at the folder of cifar-10-batches-bin
(data_batch_1.bin ... data_batch_5.bin, test_batch.bin; https://www.cs.toronto.edu/~kriz/cifar.html). The
run trains with the recipe below for --seconds and records the test accuracy at every evaluation and the
training time at which it first reached --target (the public one-GPU speed record class, airbench, reaches
94% in seconds on an A100; a CPU is far from that). Without the files it says so and measures nothing.
Writes benchmarks/results/cifar10_<device>.json.

    python benchmarks/cifar10.py --data ~/data/cifar-10-batches-bin [--seconds 120] [--target 0.94]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from gptforge.data.images import is_image_dir
from gptforge.observe.metrics import read_metrics

RECIPE = ["model.arch=cnn", "model.cnn_width=64", "model.cnn_stages=3", "model.cnn_blocks=1",
          "model.label_smoothing=0.2", "data.aug_crop=4", "data.aug_flip=true", "data.aug_cutout=8",
          "train.batch_size=512", "optim.lr=4e-3", "optim.weight_decay=5e-4", "schedule.name=cosine",
          "schedule.warmup_steps=50", "eval.every=50", "eval.tokens=10000", "train.log_every=25", "train.save_every=0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("GPTFORGE_CIFAR10"), help="cifar-10-batches-bin folder")
    parser.add_argument("--seconds", type=float, default=120.0, help="training seconds")
    parser.add_argument("--target", type=float, default=0.94, help="test accuracy whose time is recorded")
    parser.add_argument("overrides", nargs="*", help="config keys changing the recipe")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not args.data or not is_image_dir(args.data):
        print(f"CIFAR-10 binary files not found ({args.data or 'no --data and no GPTFORGE_CIFAR10'}); nothing measured")
        return

    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        keys = [*RECIPE, f"data.dir={args.data}", f"train.max_time={args.seconds}", f"run.dir={tmp}/run", *args.overrides]
        proc = subprocess.run([sys.executable, "-m", "gptforge", "train", *keys], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        records = read_metrics(Path(tmp) / "run")
        environment = json.loads((Path(tmp) / "run" / "environment.json").read_text())
    evals = [{k: r.get(k) for k in ("step", "time_s", "val_loss", "val_acc", "val_top5")} for r in records if "val_acc" in r]
    reached = next((e["time_s"] for e in evals if e["val_acc"] >= args.target), None)
    result = {**environment, "command": "gptforge train " + " ".join(keys[:-1]), "evals": evals,
              "best_val_acc": max(e["val_acc"] for e in evals), "target": args.target, "time_to_target_s": reached}
    print(f"best test accuracy {100 * result['best_val_acc']:.2f}% in {evals[-1]['time_s']:.0f} s of training; "
          + (f"{100 * args.target:.0f}% reached after {reached:.1f} s" if reached else f"{100 * args.target:.0f}% not reached"))
    out = Path(args.out or Path(__file__).parent / "results" / f"cifar10_{environment['device_type']}.json")
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
