"""Regularization on a small data set: what dropout, weight decay, span deletion and token noise do to the
best and the final validation loss of a small model trained for many epochs of ~80 KB of text, and what
NEFTune does to a fine-tune on another slice.

Data: the first ~80 KB of the built-in corpus's public top-level standard-library modules (sorted by name),
cut into ~4 KB documents so the validation split (15% of the documents) is a fair sample, prepared with a
1024-token BPE. The fine-tune slice is the next ~50 KB, prepared with the same tokenizer. The slice is small
on purpose: in well under a minute of CPU training the model passes its best validation loss and starts to
memorize (with ~200 KB it is still improving when the budget ends, and no regularizer can show its use).

Every variant trains the same model from the same seed for the same number of steps: the number the
unregularized run manages in --seconds (measured on a short calibration run), so each run takes about
--seconds and sees the same data. The base recipe has no regularization at all (dropout 0, weight decay 0);
each variant changes one thing, and the base run again with another seed shows how far two runs differ
by chance alone. Fine-tunes start from the base run and take half as many steps.

    python benchmarks/regularization.py [--seconds 45] [--out FILE]

On a shared or small CPU, OMP_NUM_THREADS=1 keeps torch's threads from fighting over the cores.

Writes benchmarks/results/regularization.json: environment (device, torch, git sha), the command, the data,
and per run the steps, best val loss (and its step), final val loss, final train loss and fit-watch flags.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from gptforge.config import load_config
from gptforge.data.datadir import load_data_dir
from gptforge.data.prepare import prepare
from gptforge.observe.metrics import read_metrics
from gptforge.train.loop import train

SLICE_BYTES = 80_000
FINETUNE_BYTES = 50_000
DOC_BYTES = 4_000
MODEL = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=128"]
BASE = [*MODEL, "model.dropout=0", "optim.weight_decay=0", "train.batch_size=16", "optim.lr=3e-3",
        "schedule.warmup_steps=30", "eval.tokens=16384", "train.samples=0", "train.log_every=10",
        "run.tensorboard=false", "train.save_every=0", "train.max_time=null", "run.seed=1337"]
VARIANTS = {
    "none": [],
    "none, another seed": ["run.seed=7"],  # the noise floor: differences below this one mean nothing
    "dropout 0.1": ["model.dropout=0.1"],
    "weight decay 0.1": ["optim.weight_decay=0.1"],
    "span deletion 0.1": ["data.aug_span_delete=0.1"],
    "token noise 0.05": ["data.aug_token_noise=0.05"],
}
FINETUNES = {"fine-tune": [], "fine-tune + NEFTune 5": ["finetune.neftune_alpha=5"]}
EVALS_PER_RUN = 25


def stdlib_slices() -> tuple[list[Path], list[Path]]:
    """Public top-level standard-library modules in name order: up to SLICE_BYTES for training, then up to
    FINETUNE_BYTES of the following ones (a module too large for what is left is passed over)."""
    files = iter(sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if not p.name.startswith("_")))
    slices = []
    for budget in (SLICE_BYTES, FINETUNE_BYTES):
        taken, total = [], 0
        for path in files:
            if total + path.stat().st_size <= budget:
                taken.append(path)
                total += path.stat().st_size
            elif total > 0.9 * budget:
                break
        slices.append(taken)
    return slices[0], slices[1]


def write_documents(files: list[Path], out: Path) -> Path:
    """Each file cut at line ends into documents of about DOC_BYTES, one text file each."""
    out.mkdir(parents=True)
    n = 0
    for path in files:
        chunk: list[str] = []
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            chunk.append(line)
            if sum(map(len, chunk)) >= DOC_BYTES:
                (out / f"doc{n:05d}.txt").write_text("".join(chunk), encoding="utf-8")
                n, chunk = n + 1, []
        if chunk:
            (out / f"doc{n:05d}.txt").write_text("".join(chunk), encoding="utf-8")
            n += 1
    return out


def prepare_data(tmp: Path) -> tuple[Path, Path, dict]:
    first, second = stdlib_slices()
    data = tmp / "data"
    prepare([str(write_documents(first, tmp / "docs"))], data, vocab_size=1024, val_fraction=0.15, progress=False)
    tuned = tmp / "data_ft"
    prepare([str(write_documents(second, tmp / "docs_ft"))], tuned, tokenizer=str(data / "tokenizer.json"),
            val_fraction=0.15, progress=False)
    info = {"files": [p.name for p in first], "bytes": sum(p.stat().st_size for p in first),
            "finetune_files": [p.name for p in second], "finetune_bytes": sum(p.stat().st_size for p in second)}
    for key, path in (("tokens", data), ("finetune_tokens", tuned)):
        d = load_data_dir(path)
        info[key] = {split: sum(s.num_tokens for s in getattr(d, split)) for split in ("train", "val")}
    return data, tuned, info


def run(data: Path, run_dir: Path, steps: int, extra: list[str]) -> dict:
    eval_every = max(1, steps // EVALS_PER_RUN)
    start = time.perf_counter()
    train(load_config(None, [*BASE, f"data.dir={data}", f"run.dir={run_dir}", f"train.max_steps={steps}",
                             f"eval.every={eval_every}", *extra]))
    wall = time.perf_counter() - start
    records = read_metrics(run_dir)
    evals = [r for r in records if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    lines = [r for r in records if "train_loss" in r]
    tail = lines[-max(1, len(lines) // 10):]
    return {
        "overrides": extra, "steps": steps, "wall_s": round(wall, 1), "train_time_s": round(lines[-1]["time_s"], 1),
        "best_val_loss": round(best["val_loss"], 4), "best_step": best["step"],
        "final_val_loss": round(evals[-1]["val_loss"], 4),
        "final_train_loss": round(sum(r["train_loss"] for r in tail) / len(tail), 4),
        "fit_watch": [{"event": r["event"], "step": r["step"]} for r in records
                      if r.get("event") in ("overfitting", "underfitting")],
    }


def calibrate(data: Path, tmp: Path, seconds: float) -> int:
    """Steps the base recipe takes in `seconds`, from the rate of a short run."""
    probe = 30
    result = run(data, tmp / "calibrate", probe, [])
    return max(probe, int(seconds * probe / result["train_time_s"]))


def git_dirty() -> bool | None:
    """Whether the checkout has uncommitted changes (the git sha alone would not say what ran)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def table(runs: dict[str, dict]) -> str:
    rows = [f"{'run':<24} {'best val':>9} {'at step':>8} {'final val':>10} {'final train':>12}  fit watch"]
    for name, r in runs.items():
        flags = ", ".join(f"{f['event']}@{f['step']}" for f in r["fit_watch"]) or "-"
        rows.append(f"{name:<24} {r['best_val_loss']:>9.4f} {r['best_step']:>8} {r['final_val_loss']:>10.4f} "
                    f"{r['final_train_loss']:>12.4f}  {flags}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=45.0, help="training time of each run (default: 45)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "regularization.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data, tuned, info = prepare_data(tmp)
        steps = calibrate(data, tmp, args.seconds)
        runs = {name: run(data, tmp / f"run{i}", steps, extra) for i, (name, extra) in enumerate(VARIANTS.items())}
        init = f"finetune.init_from={tmp / 'run0'}"
        finetunes = {name: run(tuned, tmp / f"ft{i}", steps // 2, [init, *extra])
                     for i, (name, extra) in enumerate(FINETUNES.items())}
        for r in finetunes.values():  # the temporary folder means nothing once it is gone
            r["overrides"] = ["finetune.init_from=<the 'none' run>" if o == init else o for o in r["overrides"]]
        env = json.loads((tmp / "run0" / "environment.json").read_text())
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    env["command"] = f"{threads}python benchmarks/regularization.py --seconds {args.seconds:g}"
    result = {**env, "git_dirty": git_dirty(), "threads": torch.get_num_threads(), "seconds": args.seconds, "steps": steps,
              "recipe": BASE, "data": info, "runs": runs, "finetunes": finetunes}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(runs))
    print()
    print(table(finetunes))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
