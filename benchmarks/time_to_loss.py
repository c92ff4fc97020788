"""Time to loss, side by side: nanoGPT's small-model recipe and gptforge's default recipe, same data, model
size, sequence length, batch and machine, the same wall-clock budget; val loss against training time.

nanoGPT (karpathy/nanoGPT) is fetched separately and never part of this repository: pass its checkout with
--nanogpt. Its recipe is the one it ships for a 6 x 384 model (config/train_shakespeare_char.py: AdamW with
beta2 0.99, lr 1e-3 decayed by cosine to 1e-4, weight decay 0.1, gradient clipping 1.0), with its cosine
stretched over the iterations that fit in the budget (measured first), warmup scaled to 2% of them as in its
5000-iteration original, and dropout 0 (the built-in corpus is far larger than the budget can see, so
dropout would only slow it down). Both read the same tokens: gptforge's prepared shards written out as
nanoGPT's uint16 train.bin / val.bin.

Training time excludes evaluation on both sides (gptforge counts it so itself; nanoGPT's evaluation
iterations are replaced by its median iteration time). Both evaluate on the same number of validation
tokens: nanoGPT on random windows of val.bin, gptforge on a fixed prefix of the same split.

    python benchmarks/time_to_loss.py --nanogpt PATH/TO/nanoGPT [--seconds 300] [key=value ...]

Extra key=value arguments go to the gptforge run (for measuring recipe variants). Writes
benchmarks/results/time_to_loss_cpu.json (or --out) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import pickle  # written for the peer only: nanoGPT reads its vocabulary size from meta.pkl; nothing is loaded
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from nanogpt_speed import write_peer_data as write_tokens  # the shard -> uint16 conversion, streamed

from gptforge.config import load_config
from gptforge.observe.environment import environment
from gptforge.observe.metrics import read_metrics
from gptforge.train.builder import resolve_data
from gptforge.train.loop import train

DATASET = "gptforge_builtin"
SHAPE = dict(n_layer=6, n_head=6, n_embd=384, block_size=256)
BATCH = 16
EVAL_TOKENS = 32768  # per evaluation, both sides: 8 batches of 16 x 256


def write_peer_data(nanogpt: Path, data) -> Path:
    """gptforge shards as nanoGPT's raw uint16 token files, and the meta.pkl it reads its vocabulary from."""
    out = nanogpt / "data" / DATASET
    out.mkdir(parents=True, exist_ok=True)
    if data.vocab_size > 1 << 16:
        sys.exit(f"vocabulary of {data.vocab_size} does not fit nanoGPT's uint16 files")
    write_tokens(data.train, out / "train.bin")
    write_tokens(data.val, out / "val.bin")
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": data.vocab_size}, f)
    return out


def run_nanogpt(nanogpt: Path, out_dir: Path, iters: int, eval_interval: int) -> str:
    args = [
        sys.executable, "train.py", f"--dataset={DATASET}", f"--out_dir={out_dir}", "--device=cpu", "--compile=False",
        "--dtype=float32", *(f"--{k}={v}" for k, v in SHAPE.items()), f"--batch_size={BATCH}",
        "--gradient_accumulation_steps=1", "--dropout=0.0", "--bias=False", "--learning_rate=1e-3",
        f"--max_iters={iters}", f"--lr_decay_iters={iters}", "--min_lr=1e-4", "--beta2=0.99",
        f"--warmup_iters={max(1, iters // 50)}", "--weight_decay=0.1", "--grad_clip=1.0",
        f"--eval_interval={eval_interval}", f"--eval_iters={EVAL_TOKENS // (BATCH * SHAPE['block_size'])}",
        "--log_interval=1", "--always_save_checkpoint=False", "--wandb_log=False",
    ]
    proc = subprocess.run(args, cwd=nanogpt, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"nanoGPT failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def nanogpt_curve(log: str) -> tuple[list[dict], list[float]]:
    """(evaluations with training time, per-iteration times) from nanoGPT's log. An iteration that began with
    an evaluation (and perhaps a checkpoint) counts as the median iteration."""
    dts = {int(m[1]): float(m[2]) / 1000 for m in re.finditer(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", log)}
    evals = {int(m[1]): float(m[2]) for m in re.finditer(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", log)}
    median = statistics.median(dts.values())
    times, elapsed, curve = [], 0.0, []
    for it in sorted(dts):
        if it in evals:
            curve.append({"step": it, "time_s": elapsed, "val_loss": evals[it]})
        dt = median if it in evals or it == 0 else dts[it]
        times.append(dt)
        elapsed += dt
    return curve, times


def run_gptforge(data_dir: Path, run_dir: Path, seconds: float, extra: list[str]) -> list[dict]:
    shape = [f"model.{k}={v}" for k, v in SHAPE.items()]
    cfg = load_config(None, [
        f"data.dir={data_dir}", *shape, f"train.batch_size={BATCH}", f"train.max_time={seconds}",
        f"eval.tokens={EVAL_TOKENS}", "eval.every=20", "train.save_every=0", "train.samples=0",
        f"run.dir={run_dir}", *extra,
    ])
    train(cfg)
    return [{"step": r["step"], "time_s": r["time_s"], "val_loss": r["val_loss"]}
            for r in read_metrics(run_dir) if "val_loss" in r]


def time_to_reach(curve: list[dict], loss: float) -> float | None:
    """Training time of the first evaluation at or below `loss`, interpolated linearly from the one before."""
    for before, after in zip(curve, curve[1:]):
        if after["val_loss"] <= loss:
            if before["val_loss"] <= loss:
                return before["time_s"]
            frac = (before["val_loss"] - loss) / (before["val_loss"] - after["val_loss"])
            return before["time_s"] + frac * (after["time_s"] - before["time_s"])
    return None


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install 'gptforge[plot]')")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in ("nanogpt", "gptforge"):
        curve = result[name]["evals"]
        ax.plot([c["time_s"] for c in curve], [c["val_loss"] for c in curve], marker=".", label=name)
    ax.axhline(result["nanogpt"]["final_val_loss"], color="gray", lw=0.8, ls="--")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("val loss")
    ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
    ax.set_title(f"6x384, seq 256, batch {BATCH}, {result['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", required=True, type=Path, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--seconds", type=float, default=300.0, help="training-time budget of each side")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "time_to_loss_cpu.json")
    parser.add_argument("overrides", nargs="*", help="key=value settings for the gptforge run")
    args = parser.parse_args()

    default = load_config(None, [])
    data = resolve_data(default)
    write_peer_data(args.nanogpt, data)
    with tempfile.TemporaryDirectory() as tmp:
        calib = nanogpt_curve(run_nanogpt(args.nanogpt, Path(tmp) / "calib", 12, 1000))[1][3:]
        iters = int(args.seconds / statistics.median(calib))
        print(f"nanoGPT: {statistics.median(calib) * 1000:.0f} ms per iteration -> {iters} iterations in {args.seconds:.0f} s")
        peer_curve, peer_times = nanogpt_curve(run_nanogpt(args.nanogpt, Path(tmp) / "nanogpt", iters, max(1, iters // 12)))
        ours = run_gptforge(Path(data.path), Path(tmp) / "gptforge", args.seconds, args.overrides)
        shutil.rmtree(Path(tmp), ignore_errors=True)

    peer_total = sum(peer_times)
    target = peer_curve[-1]["val_loss"]
    reached = time_to_reach(ours, target)
    result = {
        **environment(__import__("torch").device("cpu"), "fp32", 1),
        "command": " ".join(["python", "benchmarks/time_to_loss.py", "--nanogpt", "NANOGPT", "--seconds",
                             f"{args.seconds:g}", *args.overrides]),
        "shape": {**SHAPE, "batch_size": BATCH, "eval_tokens": EVAL_TOKENS},
        "nanogpt": {"iterations": iters, "train_time_s": peer_total, "final_val_loss": target, "evals": peer_curve,
                    "median_iter_s": statistics.median(peer_times)},
        "gptforge": {"overrides": args.overrides, "train_time_s": ours[-1]["time_s"],
                     "final_val_loss": ours[-1]["val_loss"], "evals": ours},
        "gptforge_time_to_nanogpt_final_s": reached,
        "time_ratio": reached / peer_total if reached is not None else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"nanoGPT:  final val loss {target:.4f} after {peer_total:.0f} s of training ({iters} iterations)")
    print(f"gptforge: final val loss {ours[-1]['val_loss']:.4f} after {ours[-1]['time_s']:.0f} s")
    if reached is None:
        print("gptforge did not reach nanoGPT's final val loss within the budget")
    else:
        print(f"gptforge reached {target:.4f} after {reached:.0f} s: {reached / peer_total:.2f} of nanoGPT's time")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
