"""RUN_DIR/best and early stopping: the run stops when val loss stalls, RUN_DIR/best holds the best step's
weights and loads like any run, rotation never deletes it, resume never takes it, and a resumed run keeps
counting where it stopped."""

import json

import pytest
import torch
from safetensors.torch import load_file

import gptforge
from gptforge.cli import main
from gptforge.config import load_config
from gptforge.data.datadir import load_data_dir
from gptforge.data.loader import val_batches
from gptforge.evaluate.loss import evaluate
from gptforge.observe.metrics import read_metrics
from gptforge.runs import load_run
from gptforge.train import checkpoint
from gptforge.train.loop import train
from gptforge.runtime import resolve_precision

# A constant learning rate (the schedule does not depend on max_steps, so a run cut short is the same run)
# and a large min_delta: val loss improves fast for a few evaluations, then by less than 0.15 per evaluation.
STALLS = ["model.preset=tiny", "train.batch_size=8", "train.max_time=null", "eval.tokens=1024",
          "train.samples=0", "run.tensorboard=false", "run.deterministic=true", "data.prefetch=0",
          "optim.lr=0.01", "schedule.warmup_steps=2", "schedule.name=constant", "eval.every=4",
          "train.save_every=4", "train.keep_checkpoints=1", "eval.early_stop_patience=2",
          "eval.early_stop_min_delta=0.15", "speed.precision=fp32"]


def run(data, run_dir, *extra):
    return train(load_config(None, [*STALLS, f"data.dir={data}", f"run.dir={run_dir}", *extra]))


def events(run_dir, name):
    return [r for r in read_metrics(run_dir) if r.get("event") == name]


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def stalled(small_data, tmp_path_factory):
    """A run that stops early, long before its 60-step budget."""
    run_dir = tmp_path_factory.mktemp("stalled") / "r"
    result = run(small_data, run_dir, "train.max_steps=60")
    return run_dir, result


def test_early_stop_fires_and_keeps_the_best(small_data, stalled):
    run_dir, result = stalled
    [stop] = events(run_dir, "early_stop")
    assert stop["step"] == result.step < 60
    evals = {r["step"]: r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r}
    best_step = stop["best_step"]
    assert 0 < best_step < result.step and evals[best_step] == stop["best_val_loss"]
    assert [s for s in evals if s > best_step] == [best_step + 4, best_step + 8]  # patience: 2 evaluations
    assert all(evals[s] > stop["best_val_loss"] - 0.15 for s in evals if s > best_step)

    best = run_dir / "best"
    assert checkpoint.verify(best) == []
    assert checkpoint.read_state(best)["step"] == best_step
    # the final save happened, rotation kept one step checkpoint, and RUN_DIR/best is none of them
    assert checkpoint.list_checkpoints(run_dir / "checkpoints") == [run_dir / "checkpoints" / f"step_{result.step:08d}"]
    assert checkpoint.find_latest(run_dir) == run_dir / "checkpoints" / f"step_{result.step:08d}"

    # its weights are the best step's: evaluating them gives the loss logged at that step
    loaded = load_run(best)
    cfg = loaded.config
    data = load_data_dir(small_data)
    val = val_batches(data.val, cfg.model.block_size, cfg.train.batch_size, cfg.eval.tokens)
    got = evaluate(loaded.model, val, resolve_precision("fp32", torch.device("cpu")))["val_loss"]
    assert got == pytest.approx(stop["best_val_loss"], abs=1e-6)


def test_best_loads_and_samples(stalled, capsys):
    run_dir, _ = stalled
    model, tok = gptforge.load(run_dir / "best")
    assert not model.training and tok is not None
    assert main(["sample", str(run_dir / "best"), "--prompt", "def ", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_best_holds_the_weights_of_its_step_and_resume_keeps_counting(small_data, stalled, tmp_path):
    run_dir, result = stalled
    [stop] = events(run_dir, "early_stop")
    best_step = stop["best_step"]
    # the same run cut at the best step: its last checkpoint is, bit for bit, what RUN_DIR/best holds
    cut = run(small_data, tmp_path / "r", f"train.max_steps={best_step}")
    assert cut.step == best_step and not events(tmp_path / "r", "early_stop")
    assert_same_weights(weights(tmp_path / "r" / "checkpoints" / f"step_{best_step:08d}"), weights(run_dir / "best"))

    # resumed with the full budget, it stops where the uninterrupted run stopped, for the same reason
    resumed = run(small_data, tmp_path / "r", "train.max_steps=60")
    assert resumed.resumed_from == best_step and resumed.step == result.step
    [again] = events(tmp_path / "r", "early_stop")
    assert {k: again[k] for k in stop} == stop
    assert_same_weights(weights(tmp_path / "r" / "best"), weights(run_dir / "best"))
    state = checkpoint.read_state(checkpoint.find_latest(tmp_path / "r"))
    assert state["early_stop"] == checkpoint.read_state(checkpoint.find_latest(run_dir))["early_stop"]


def test_a_stopped_run_stays_stopped(small_data, stalled, capsys):
    run_dir, result = stalled
    lines = len(read_metrics(run_dir))
    again = run(small_data, run_dir, "train.max_steps=60")
    assert again.step == result.step
    assert "stopped early" in capsys.readouterr().out
    assert [r.get("event") for r in read_metrics(run_dir)[lines:]] == ["resume", "finished"]
    assert read_metrics(run_dir)[-1]["reason"] == "early_stop"


def test_keep_best_off_and_patience_off(small_data, tmp_path):
    result = run(small_data, tmp_path / "off", "train.max_steps=8", "eval.keep_best=false")
    assert result.step == 8 and not (tmp_path / "off" / "best").exists()
    result = run(small_data, tmp_path / "on", "train.max_steps=8", "eval.early_stop_patience=0",
                 "eval.early_stop_min_delta=100")
    assert result.step == 8 and not events(tmp_path / "on", "early_stop")
    state = json.loads((tmp_path / "on" / "best" / "state.json").read_text())
    assert state["step"] == 4  # the first evaluation after training began; with a min_delta of 100 nothing after it
