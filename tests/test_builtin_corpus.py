"""The main job's path: no data given, so the built-in corpus (the standard library's source) is prepared
into the cache once, and a tiny model learns from it."""

import pytest

from gptforge.config import load_config
from gptforge.observe.metrics import read_metrics
from gptforge.train.loop import train

pytestmark = pytest.mark.slow


def test_tiny_model_learns_on_the_builtin_corpus(tmp_path):
    cfg = load_config(None, [
        "model.preset=tiny", "train.max_steps=100", "train.max_time=null", "optim.lr=0.01", "eval.every=50",
        "eval.tokens=8192", f"run.dir={tmp_path / 'run'}", "train.samples=1", "train.sample_tokens=40",
        "run.tensorboard=false",
    ])
    result = train(cfg)
    evals = [r["val_loss"] for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert evals[0] > 8.5  # ln(8192) = 9.01: the untrained model guesses uniformly
    assert evals[-1] < evals[0] - 2.0, evals
    assert result.samples and result.samples[0].strip()
    manifest = read_manifest(result)
    assert manifest["splits"]["train"]["tokens"] > 1_000_000 and manifest["splits"]["val"]["tokens"] > 0


def read_manifest(result):
    import json

    import yaml

    from gptforge.data.corpus import cache_root

    data_dirs = list((cache_root() / "data").iterdir())
    assert len(data_dirs) == 1 and yaml.safe_load((result.run_dir / "config.yaml").read_text())["data"]["dir"] is None
    return json.loads((data_dirs[0] / "manifest.json").read_text())
