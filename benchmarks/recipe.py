"""Which recipe reaches the lowest validation loss in a fixed training time: the measurements behind the
defaults of `gptforge train`.

Every variant trains the same model shape (6 x 384, sequence 256, batch 16 unless a variant says otherwise)
on the built-in corpus for the same training time, evaluated once at the end on the same validation tokens.
Variants are cumulative where it makes sense (each adds one switch to a named base), so each line shows what
one switch is worth on this machine.

    python benchmarks/recipe.py [--seconds 150] [--only NAME,...]

Writes benchmarks/results/recipe_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from gptforge.config import load_config
from gptforge.observe.environment import environment
from gptforge.observe.metrics import read_metrics
from gptforge.train.loop import train

SHAPE = ["model.n_layer=6", "model.n_head=6", "model.n_embd=384", "model.block_size=256", "train.batch_size=16"]
# The starting point: gptforge's defaults before this comparison (AdamW at 3e-3, cosine, GPT-2 init).
# Warmup is 10 steps throughout: a few minutes on a CPU are ~100 steps of this shape.
BASE = ["optim.name=adamw", "model.mlp=gelu", "model.qk_norm=false", "model.zero_init_proj=false",
        "schedule.name=cosine", "model.tie_embeddings=true", "model.logit_softcap=0", "schedule.warmup_steps=10"]
ARCH = ["model.mlp=relu2", "model.qk_norm=true", "model.zero_init_proj=true"]
VARIANTS: dict[str, list[str]] = {
    "adamw": BASE,
    "adamw+arch": BASE + ARCH,
    "muon": BASE + ["optim.name=muon"],
    "muon+relu2": BASE + ["optim.name=muon", "model.mlp=relu2"],
    "muon+qk_norm": BASE + ["optim.name=muon", "model.qk_norm=true"],
    "muon+zero_init": BASE + ["optim.name=muon", "model.zero_init_proj=true"],
    "muon+arch": BASE + ["optim.name=muon"] + ARCH,
    "muon+arch+wsd": BASE + ["optim.name=muon"] + ARCH + ["schedule.name=wsd", "schedule.cooldown_frac=0.4"],
    "muon+arch+wsd+untied": BASE + ["optim.name=muon"] + ARCH + ["schedule.name=wsd", "schedule.cooldown_frac=0.4",
                                                                     "model.tie_embeddings=false"],
    "muon+arch+wsd+softcap": BASE + ["optim.name=muon"] + ARCH + ["schedule.name=wsd", "schedule.cooldown_frac=0.4",
                                                                      "model.logit_softcap=15"],
    "default": [],  # whatever `gptforge train` does today
    "default-zero_init": ["model.zero_init_proj=false"],  # the default with GPT-2's projection init
}


def run(name: str, overrides: list[str], seconds: float, root: Path) -> dict:
    run_dir = root / name
    cfg = load_config(None, [*SHAPE, *overrides, f"train.max_time={seconds}", "eval.every=0",
                             "eval.tokens=32768", "train.save_every=0", "train.samples=0",
                             "run.tensorboard=false", f"run.dir={run_dir}"])
    result = train(cfg)
    logs = [r for r in read_metrics(run_dir) if "tokens_per_sec" in r]
    return {"name": name, "overrides": overrides, "val_loss": result.val["val_loss"], "steps": result.step,
            "tokens": result.tokens, "train_time_s": result.time_s,
            "tokens_per_sec_median": sorted(r["tokens_per_sec"] for r in logs)[len(logs) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "recipe_cpu.json")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(VARIANTS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows.append(run(name, VARIANTS[name], args.seconds, Path(tmp)))
            print(f"{name:28s} val loss {rows[-1]['val_loss']:.4f}  steps {rows[-1]['steps']}")
    record = {**environment(torch.device("cpu"), "fp32", 1),
              "command": f"python benchmarks/recipe.py --seconds {args.seconds:g}" + (f" --only {args.only}" if args.only else ""),
              "shape": SHAPE, "seconds": args.seconds, "variants": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\n{'variant':28s} {'val loss':>9s} {'steps':>6s} {'tokens/s':>9s}")
    for r in sorted(rows, key=lambda r: r["val_loss"]):
        print(f"{r['name']:28s} {r['val_loss']:9.4f} {r['steps']:6d} {r['tokens_per_sec_median']:9.0f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
