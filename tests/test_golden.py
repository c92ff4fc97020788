"""A tiny fixed run's per-step losses, checked against tests/golden/tiny_losses.json.

The corpus is generated from a seed and byte-tokenized, so the file does not depend on the Python version's
standard library or on BPE training. Any change to initialization, data order, the model, the optimizer or
the schedule moves these numbers by far more than the tolerance, which only absorbs CPU kernel differences.
Regenerate deliberately with GPTFORGE_UPDATE_GOLDEN=1 after a change meant to alter them.
"""

import json
import os
import random
from pathlib import Path

import pytest

from gptforge.config import load_config
from gptforge.data.prepare import prepare
from gptforge.observe.metrics import read_metrics
from gptforge.train.loop import train

GOLDEN = Path(__file__).parent / "golden" / "tiny_losses.json"


def synthetic_corpus(root: Path, files: int = 40) -> Path:
    rng = random.Random(1234)
    words = ["value", "total", "item", "count", "name", "data", "index", "result"]
    root.mkdir(parents=True)
    for i in range(files):
        lines = []
        for j in range(rng.randint(5, 15)):
            a, b = rng.sample(words, 2)
            lines.append(f"def {a}_{j}({b}):\n    return {b} * {rng.randint(2, 99)} + {rng.randint(0, 9)}\n")
        (root / f"m{i:03d}.py").write_text("\n".join(lines))
    return root


def test_golden_losses(tmp_path):
    data = tmp_path / "data"
    prepare([str(synthetic_corpus(tmp_path / "src"))], data, tokenizer="bytes", val_fraction=0.1, progress=False)
    cfg = load_config(None, [
        f"data.dir={data}", f"run.dir={tmp_path / 'run'}", "model.preset=tiny", "train.batch_size=4",
        "train.batch_tokens=512", "train.max_steps=12", "train.max_time=null", "train.log_every=1",
        "eval.tokens=512", "train.samples=0", "run.deterministic=true", "run.tensorboard=false",
    ])
    train(cfg)
    got = [r["train_loss"] for r in read_metrics(tmp_path / "run") if "train_loss" in r]
    if os.environ.get("GPTFORGE_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"train_loss": got}, indent=1) + "\n")
    expected = json.loads(GOLDEN.read_text())["train_loss"]
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-4)
