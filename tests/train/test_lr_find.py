"""The learning-rate range test: the sweep's grid and record, early stop on divergence, the suggestion, the
files it writes, and Muon's groups following the same multiplier."""

import importlib.util
import json
import math
import sys

import numpy as np
import pytest

from gptforge.cli import main
from gptforge.config import load_config
from gptforge.train import lr_find as lrf

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=32", "train.batch_size=4",
        "train.max_steps=4", "eval.tokens=512", "train.samples=0", "run.tensorboard=false"]


def config(data, *extra):
    return load_config(None, [f"data.dir={data}", *TINY, *extra])


def test_smoothing_is_bias_corrected_and_steepest_descent_is_found():
    assert lrf.smooth([5.0] * 10, 0.9) == pytest.approx([5.0] * 10)  # no pull towards 0 at the start
    lrs = lrf.lr_sweep(1e-4, 1.0, 81)
    x = np.log10(lrs)
    # Falls fastest at 1e-2 (log10 = -2), lowest at 1e-1, then rises.
    curve = list(5 - 2 * np.tanh(3 * (x + 2)) + 20 * np.clip(x + 1, 0, None) ** 2)
    s = lrf.suggest(lrs, curve)
    assert s["steepest"] == pytest.approx(1e-2, rel=0.15)
    assert s["min_loss_lr"] == pytest.approx(1e-1, rel=0.15)
    assert s["conservative"] == pytest.approx(s["min_loss_lr"] / 10)
    assert s["loss_fell"]
    rising = lrf.suggest(lrs, list(1 + x - x[0]))
    assert not rising["loss_fell"] and rising["steepest"] == lrs[0]


def test_sweep_records_every_step_on_an_exponential_grid(small_data, capsys):
    record = lrf.lr_find(config(small_data), min_lr=1e-5, max_lr=1e-2, steps=12)
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lr-find: ")]
    assert progress[0].startswith("lr-find: 0/12 steps") and progress[-1].startswith("lr-find: 12/12 steps (100%)")
    assert "| eta 0:00 | lr 1.00e-02 | loss " in progress[-1]
    lrs = record["lrs"]
    assert len(lrs) == len(record["losses"]) == len(record["smoothed"]) == 12
    assert lrs[0] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(1e-2)
    ratios = np.array(lrs[1:]) / np.array(lrs[:-1])
    assert np.allclose(ratios, ratios[0]) and ratios[0] == pytest.approx(1000 ** (1 / 11))
    assert not record["diverged"]
    assert all(math.isfinite(v) and v > 0 for v in record["losses"])
    s = record["suggestion"]
    assert 1e-5 <= s["steepest"] <= 1e-2 and 1e-5 <= s["min_loss_lr"] <= 1e-2
    assert s["conservative"] == pytest.approx(s["min_loss_lr"] / 10) and s["key"] == "optim.lr"


def test_a_huge_max_lr_diverges_and_stops_early(small_data):
    record = lrf.lr_find(config(small_data), min_lr=1e-3, max_lr=1e6, steps=40)
    assert record["diverged"]
    assert 2 <= len(record["losses"]) < 40
    assert record["lrs"] == pytest.approx(lrf.lr_sweep(1e-3, 1e6, 40)[: len(record["losses"])])
    assert record["suggestion"]["min_loss_lr"] <= record["lrs"][-1]


def test_muon_groups_follow_the_same_multiplier(small_data, monkeypatch):
    seen = []

    from gptforge.train import builder

    class Recording(builder.Stepper):
        def step(self, batches, lr_scale, step):
            out = super().step(batches, lr_scale, step)
            seen.append({g["use_muon"]: g["lr"] for g in self.optimizer.param_groups})
            return out

    monkeypatch.setattr(builder, "Stepper", Recording)  # the sweep steps what the builder builds
    cfg = config(small_data, "optim.name=muon", "optim.lr=0.004", "optim.muon_lr=0.02")
    record = lrf.lr_find(cfg, min_lr=1e-4, max_lr=1e-2, steps=6)
    for lr, groups in zip(record["lrs"], seen):
        assert groups[False] == pytest.approx(lr)  # the AdamW groups sweep optim.lr itself
        assert groups[True] == pytest.approx(lr * 0.02 / 0.004)  # Muon's rate, scaled alike
    muon = record["suggestion"]["follows"]["optim.muon_lr"]
    assert muon["steepest"] == pytest.approx(record["suggestion"]["steepest"] * 5)


def test_command_writes_json_and_plot(small_data, tmp_path, capsys):
    out = tmp_path / "lr"
    argv = ["lr-find", f"data.dir={small_data}", *TINY, "--steps", "8", "--max-lr", "1e-2", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "steepest descent" in printed and "optim.lr=" in printed and "min loss / 10" in printed
    record = json.loads((out / "lr_find.json").read_text())
    for key in ("lrs", "losses", "smoothed", "suggestion", "device", "torch", "git_sha", "command", "config"):
        assert key in record
    assert len(record["lrs"]) == 8
    if importlib.util.find_spec("matplotlib") is None:
        assert "skipped lr_find.png" in printed and "gptforge[plot]" in printed
    else:
        assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_plot_is_skipped_with_a_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    lrs = [1e-3, 1e-2, 1e-1]
    record = {"lrs": lrs, "losses": [2.0, 1.0, 1.2], "smoothed": [2.0, 1.5, 1.4], "steps": 3, "diverged": False,
              "suggestion": {**lrf.suggest(lrs, [2.0, 1.5, 1.4]), "key": "optim.lr"}}
    assert lrf.write_plot(record, tmp_path) is None
    monkeypatch.setattr(lrf, "lr_find", lambda *args, **kwargs: record)
    assert main(["lr-find", "--out", str(tmp_path)]) == 0
    assert "skipped lr_find.png" in capsys.readouterr().out
    assert (tmp_path / "lr_find.json").is_file() and not (tmp_path / "lr_find.png").exists()


@pytest.mark.parametrize("flags, words", [
    (["--min-lr", "1", "--max-lr", "0.1"], ["--min-lr", "below --max-lr"]),
    (["--steps", "2"], ["at least 5 steps"]),
])
def test_bad_arguments_exit_2(flags, words, capsys):
    assert main(["lr-find", *flags]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
