"""`gptforge lr-find`: the learning-rate range test (Smith 2017, "Cyclical Learning Rates"; fastai's lr_find).

A fresh model trains for a few steps while the learning rate grows exponentially from --min-lr to --max-lr;
the loss of each step is recorded and smoothed (an exponential moving average with bias correction). The
sweep stops early once the smoothed loss exceeds 4x the best so far (it diverged). Two suggestions come from
the curve: the rate where the smoothed loss falls fastest (steepest descent against log lr), and a
conservative one, a tenth of the rate at the lowest loss.

The sweep steps what the one builder (train/builder.py) builds for `gptforge train`: the same model with
every technique, optimizer, loader and Stepper, so it measures the optimizer users train with. The rate swept is optim.lr; every parameter group
follows it the way it follows the schedule in training (with optim.name=muon the hidden matrices' rate
optim.muon_lr is scaled by the same multiplier), so the suggestion is a value of optim.lr.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gptforge.config import Config, load_config
from gptforge.data.loader import TokenLoader
from gptforge.errors import GptforgeError
from gptforge.fileio import atomic_write_text
from gptforge.observe.environment import environment
from gptforge.progress import Progress
from gptforge.parallel.world import World, running_world
from gptforge.train.builder import build
from gptforge.train.optim import OPTIMIZERS
from gptforge.train.step import Stepper

DIVERGE_FACTOR = 4.0  # the sweep stops once the smoothed loss exceeds this many times its best


def lr_sweep(min_lr: float, max_lr: float, steps: int) -> list[float]:
    """`steps` rates from min_lr to max_lr, evenly spaced on a log scale (a constant ratio between steps)."""
    ratio = max_lr / min_lr
    return [min_lr * ratio ** (i / (steps - 1)) for i in range(steps)]


def smoothing_beta(steps: int) -> float:
    """EMA coefficient averaging over about a tenth of the sweep: little lag, still steady."""
    return min(0.98, max(0.6, 1.0 - 10.0 / steps))


def smooth(losses: list[float], beta: float) -> list[float]:
    """Exponential moving average with bias correction (the first values are not pulled towards 0)."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta**i))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> dict[str, Any]:
    """The rate of steepest descent of the smoothed loss (before its minimum), and a tenth of the rate at the
    minimum."""
    values = np.array([v if math.isfinite(v) else np.inf for v in smoothed])
    best = int(np.argmin(values))
    steepest = lrs[0]
    if best >= 2:
        slope = np.gradient(values[: best + 1], np.log10(lrs[: best + 1]))
        skip = min(len(lrs) // 10, best - 1)  # the first steps are noisy
        steepest = lrs[skip + int(np.argmin(slope[skip:]))]
    return {"steepest": steepest, "conservative": lrs[best] / 10, "min_loss_lr": lrs[best],
            "min_loss": float(values[best]), "loss_fell": best > 0}


def _check_args(cfg: Config, min_lr: float, max_lr: float, steps: int) -> None:
    if not 0 < min_lr < max_lr:
        raise GptforgeError(f"--min-lr must be positive and below --max-lr; got {min_lr:g} and {max_lr:g}")
    if steps < 5:
        raise GptforgeError(f"--steps: a sweep needs at least 5 steps, got {steps}")
    if isinstance(cfg.train.batch_size, str):
        raise GptforgeError("lr-find needs a number for train.batch_size (not auto), e.g. train.batch_size=16")


def lr_find(cfg: Config, min_lr: float = 1e-5, max_lr: float = 10.0, steps: int = 100,
            report: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the range test on the run `cfg` describes; returns the record written to lr_find.json."""
    _check_args(cfg, min_lr, max_lr, steps)
    with running_world(cfg.dist.backend) as world:
        return _lr_find(cfg, world, min_lr, max_lr, steps, report or (lambda msg: None))


def _lr_find(cfg: Config, world: World, min_lr: float, max_lr: float, steps: int,
             report: Callable[[str], None]) -> dict[str, Any]:
    t = build(cfg, world, report=report)  # a fresh model (or finetune.init_from's), never a run to resume
    planned = lr_sweep(min_lr, max_lr, steps)
    beta = smoothing_beta(steps)
    try:
        with Progress("lr-find", len(planned), "steps", enabled=world.is_main) as bar:
            losses, smoothed, diverged = _sweep(t.stepper, t.loader, planned, t.cfg.optim.lr, beta, report, bar)
    finally:
        t.close()
    lrs = planned[: len(losses)]
    return {
        **environment(t.device, t.precision.name, world.world_size),
        "min_lr": min_lr, "max_lr": max_lr, "steps": steps, "beta": beta, "diverged": diverged,
        "lrs": lrs, "losses": [_finite(v) for v in losses], "smoothed": [_finite(v) for v in smoothed],
        "suggestion": _suggestion(t.cfg, lrs, smoothed),
        "config": t.cfg.to_dict(),
    }


def _sweep(stepper: Stepper, loader: TokenLoader, lrs: list[float], base_lr: float, beta: float,
           report: Callable[[str], None], bar: Progress) -> tuple[list[float], list[float], bool]:
    """One optimizer step per rate; stops when the smoothed loss diverges. Returns raw and smoothed losses.
    Stepper takes a multiplier of every group's base_lr, as the schedule does: lr / optim.lr."""
    losses, smoothed, best = [], [], math.inf
    stepper.model.train()
    for i, lr in enumerate(lrs):
        loss, _, _ = stepper.step(loader.next_step(), lr / base_lr, i + 1)
        losses.append(loss)
        smoothed = smooth(losses, beta)
        bar.update(i + 1, info=f"lr {lr:.2e} | loss {loss:.4f} | smoothed {smoothed[-1]:.4f}")
        if not math.isfinite(smoothed[-1]) or smoothed[-1] > DIVERGE_FACTOR * best:
            report(f"step {i + 1:>4} | lr {lr:.2e} | loss diverged (smoothed {smoothed[-1]:.4g}, "
                   f"best {best:.4g}); stopping")
            return losses, smoothed, True
        best = min(best, smoothed[-1])
    return losses, smoothed, False


def _suggestion(cfg: Config, lrs: list[float], smoothed: list[float]) -> dict[str, Any]:
    """suggest(), plus the config key to set and the rates that follow it under the run's optimizer (muon:
    optim.muon_lr, scaled by the same multiplier in the sweep)."""
    found = {**suggest(lrs, smoothed), "key": "optim.lr"}
    follows = OPTIMIZERS[cfg.optim.name].follows_lr(cfg.optim)
    found["follows"] = {key: {"steepest": found["steepest"] * ratio, "conservative": found["conservative"] * ratio}
                        for key, ratio in follows.items()}
    return found


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN or infinity


# ----------------------------------------------------------------------------------------------------------
# Output


def write_json(record: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "lr_find.json"
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return path


def write_plot(record: dict[str, Any], out: Path) -> Path | None:
    """lr_find.png: loss against the rate on a log axis, the suggestions marked; None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    lrs = record["lrs"]
    raw = [np.nan if v is None else v for v in record["losses"]]
    ax.plot(lrs, raw, color="0.75", linewidth=1, label="loss")
    ax.plot(lrs, [np.nan if v is None else v for v in record["smoothed"]], color="C0", label="smoothed")
    s = record["suggestion"]
    ax.axvline(s["steepest"], color="C3", linestyle="--", label=f"steepest descent {s['steepest']:.2e}")
    ax.axvline(s["conservative"], color="C2", linestyle=":", label=f"min loss / 10 {s['conservative']:.2e}")
    ax.set_xscale("log")
    finite = [v for v in raw if math.isfinite(v)]
    first = record["smoothed"][0]
    if finite and first is not None:  # keep the divergence from flattening the interesting part
        top = first + 0.5 * max(first - s["min_loss"], 0.0)
        ax.set_ylim(min(finite) - 0.1, min(max(finite), top) + 0.1)
    ax.set_xlabel(f"{s['key']} (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title("learning-rate range test")
    ax.legend()
    path = out / "lr_find.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def summary(record: dict[str, Any]) -> list[str]:
    """What to print: the sweep, both suggestions and the key to set."""
    s, lrs = record["suggestion"], record["lrs"]
    end = "loss diverged" if record["diverged"] else "end of the sweep"
    lines = [f"lr-find: {len(lrs)} of {record['steps']} steps, {s['key']} {lrs[0]:.2e} .. {lrs[-1]:.2e} ({end})"]
    if not s["loss_fell"]:
        lines.append("the loss never fell below its first value: lower --min-lr (or check the data)")
    follows = s.get("follows", {})
    for name, label in (("steepest", "steepest descent"), ("conservative", "min loss / 10   ")):
        extra = "".join(f" {key}={rates[name]:.2e}" for key, rates in follows.items())
        lines.append(f"  {label}  {s['key']}={s[name]:.2e}{extra}")
    lines.append(f"  (lowest smoothed loss {s['min_loss']:.4f} at {s['min_loss_lr']:.2e})")
    lines.append(f"set it with {s['key']}=VALUE, e.g. gptforge train {s['key']}={s['steepest']:.2e}"
                 + (f" ({', '.join(follows)} scale with it)" if follows else ""))
    return lines


# ----------------------------------------------------------------------------------------------------------
# Command line


def run_lr_find(args: argparse.Namespace) -> int:
    """`gptforge lr-find`: sweep, print the suggestions, write the JSON record and the plot."""
    from gptforge.observe import console

    cfg = load_config(args.config, args.overrides)
    say = console.printer()
    record = lr_find(cfg, args.min_lr, args.max_lr, args.steps, report=say)
    for line in summary(record):
        print(line)
    out = Path(args.out or cfg.run.dir)
    print(f"wrote {write_json(record, out)}")
    png = write_plot(record, out)
    if png is None:
        print("skipped lr_find.png: matplotlib is not installed (pip install 'gptforge[plot]')")
    else:
        print(f"wrote {png}")
    return 0
