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

compare() is the whole comparison for any shape, batch, device and nanoGPT recipe (RECIPES: the 6 x 384 one
above, and train.py's own GPT-2 124M defaults, which benchmarks/gpu_proof.py runs on a GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Recipe:
    """nanoGPT's optimizer settings for a shape, as one of its configs ships them; the cosine is stretched
    over the iterations that fit in the budget and the warmup keeps its share of the original run."""

    source: str
    learning_rate: float
    min_lr: float
    beta2: float
    warmup_fraction: float  # warmup_iters / max_iters of the original


RECIPES = {
    "small": Recipe("config/train_shakespeare_char.py", 1e-3, 1e-4, 0.99, 100 / 5000),
    "gpt2-124m": Recipe("train.py's defaults (GPT-2 124M on OpenWebText)", 6e-4, 6e-5, 0.95, 2000 / 600000),
}


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


def warmup_iters(iters: int, recipe: Recipe) -> int:
    """The recipe's share of warmup, at least one iteration and fewer than `iters` (nanoGPT's cosine divides
    by the iterations after the warmup)."""
    return max(1, min(iters - 1, round(iters * recipe.warmup_fraction)))


def run_nanogpt(nanogpt: Path, out_dir: Path, iters: int, eval_interval: int, shape: dict = SHAPE,
                batch: int = BATCH, device: str = "cpu", compile: bool = False, recipe: Recipe = RECIPES["small"],
                eval_tokens: int = EVAL_TOKENS) -> str:
    """nanoGPT's train.py for `iters` iterations: fp32 on a CPU, bf16 autocast on a GPU, as it runs there."""
    dtype = "float32" if device.split(":")[0] == "cpu" else "bfloat16"
    args = [
        sys.executable, "train.py", f"--dataset={DATASET}", f"--out_dir={out_dir}", f"--device={device}",
        f"--compile={compile}", f"--dtype={dtype}", *(f"--{k}={v}" for k, v in shape.items()), f"--batch_size={batch}",
        "--gradient_accumulation_steps=1", "--dropout=0.0", "--bias=False", f"--learning_rate={recipe.learning_rate}",
        f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--min_lr={recipe.min_lr}", f"--beta2={recipe.beta2}",
        f"--warmup_iters={warmup_iters(iters, recipe)}", "--weight_decay=0.1", "--grad_clip=1.0",
        f"--eval_interval={eval_interval}", f"--eval_iters={max(1, eval_tokens // (batch * shape['block_size']))}",
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


def run_gptforge(data_dir: Path, run_dir: Path, seconds: float, extra: list[str], shape: dict = SHAPE,
                 batch: int = BATCH, eval_tokens: int = EVAL_TOKENS, eval_every: int = 20) -> list[dict]:
    cfg = load_config(None, [
        f"data.dir={data_dir}", *(f"model.{k}={v}" for k, v in shape.items()), f"train.batch_size={batch}",
        f"train.max_time={seconds}", f"eval.tokens={eval_tokens}", f"eval.every={eval_every}", "train.save_every=0",
        "train.samples=0", f"run.dir={run_dir}", *extra,
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
    shape = result["shape"]
    ax.set_title(f"{shape['n_layer']}x{shape['n_embd']}, seq {shape['block_size']}, batch {shape['batch_size']}, "
                 f"{result['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def compare(nanogpt: Path, data, seconds: float, overrides: list[str], shape: dict = SHAPE, batch: int = BATCH,
            device: str = "cpu", compile: bool = False, recipe: Recipe = RECIPES["small"],
            eval_tokens: int = EVAL_TOKENS, iter_s: float | None = None, eval_every: int | None = None) -> dict:
    """Both sides on `data` (a DataDir) for `seconds` of training each, the same shape, batch and device; the
    record main() writes. nanoGPT's iteration count comes from `iter_s` (seconds per iteration, measured
    elsewhere on the same shape and device) or from a short calibration run of its own. nanoGPT evaluates
    12 times; gptforge every `eval_every` steps (default: as often as nanoGPT)."""
    write_peer_data(nanogpt, data)
    peer = dict(shape=shape, batch=batch, device=device, compile=compile, recipe=recipe, eval_tokens=eval_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        if iter_s is None:
            iter_s = statistics.median(nanogpt_curve(run_nanogpt(nanogpt, Path(tmp) / "calib", 12, 1000, **peer))[1][3:])
        iters = max(2, int(seconds / iter_s))  # one to warm up, at least one to decay
        print(f"nanoGPT: {iter_s * 1000:.0f} ms per iteration -> {iters} iterations in {seconds:.0f} s", flush=True)
        every = max(1, iters // 12)
        peer_curve, peer_times = nanogpt_curve(run_nanogpt(nanogpt, Path(tmp) / "nanogpt", iters, every, **peer))
        ours = run_gptforge(Path(data.path), Path(tmp) / "gptforge", seconds, overrides, shape, batch, eval_tokens,
                            eval_every or every)
        shutil.rmtree(Path(tmp), ignore_errors=True)

    peer_total = sum(peer_times)
    target = peer_curve[-1]["val_loss"]
    reached = time_to_reach(ours, target)
    return {
        **environment(__import__("torch").device(device), "fp32" if device == "cpu" else "bf16", 1),
        "shape": {**shape, "batch_size": batch, "eval_tokens": eval_tokens},
        "nanogpt": {"iterations": iters, "train_time_s": peer_total, "final_val_loss": target, "evals": peer_curve,
                    "median_iter_s": statistics.median(peer_times), "recipe": dataclasses.asdict(recipe),
                    "compile": compile},
        "gptforge": {"overrides": overrides, "train_time_s": ours[-1]["time_s"],
                     "final_val_loss": ours[-1]["val_loss"], "evals": ours},
        "gptforge_time_to_nanogpt_final_s": reached,
        "time_ratio": reached / peer_total if reached is not None else None,
    }


def print_comparison(result: dict) -> None:
    target, ours = result["nanogpt"]["final_val_loss"], result["gptforge"]
    reached = result["gptforge_time_to_nanogpt_final_s"]
    print(f"nanoGPT:  final val loss {target:.4f} after {result['nanogpt']['train_time_s']:.0f} s of training "
          f"({result['nanogpt']['iterations']} iterations)")
    print(f"gptforge: final val loss {ours['final_val_loss']:.4f} after {ours['train_time_s']:.0f} s")
    if reached is None:
        print("gptforge did not reach nanoGPT's final val loss within the budget")
    else:
        print(f"gptforge reached {target:.4f} after {reached:.0f} s: {result['time_ratio']:.2f} of nanoGPT's time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", required=True, type=Path, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--seconds", type=float, default=300.0, help="training-time budget of each side")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "time_to_loss_cpu.json")
    parser.add_argument("overrides", nargs="*", help="key=value settings for the gptforge run")
    args = parser.parse_args()

    result = compare(args.nanogpt, resolve_data(load_config(None, [])), args.seconds, args.overrides, eval_every=20)
    result["command"] = " ".join(["python", "benchmarks/time_to_loss.py", "--nanogpt", "NANOGPT", "--seconds",
                                  f"{args.seconds:g}", *args.overrides])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print_comparison(result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
