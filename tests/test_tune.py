"""Hyperparameter search: the on_eval hook of train(), a small Optuna study end to end (results, best.yaml,
resume), pruning, failed trials, and clear errors for a bad --space file or a missing Optuna."""

import json
import sys

import pytest

from gptforge.cli import main
from gptforge.config import load_config
from gptforge.errors import ConfigError
from gptforge.observe.metrics import read_metrics
from gptforge.train.loop import StopTraining, train

optuna = pytest.importorskip("optuna")
from gptforge import tune as tn  # noqa: E402

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=32", "train.batch_size=4",
        "train.max_steps=4", "train.max_time=null", "eval.every=2", "eval.tokens=512",
        "train.samples=0", "train.save_every=0", "run.tensorboard=false", "data.prefetch=0"]


def overrides(data, *extra):
    return [f"data.dir={data}", *TINY, *extra]


def test_on_eval_sees_every_evaluation_and_can_stop_the_run(small_data, tmp_path):
    seen = []
    result = train(load_config(None, overrides(small_data, f"run.dir={tmp_path / 'a'}")),
                   on_eval=lambda step, r: seen.append((step, r["val_loss"])))
    assert [s for s, _ in seen] == [0, 2, 4] and seen[-1][1] == result.val["val_loss"]

    def stop_at_2(step, r):
        if step == 2:
            raise StopTraining("enough")

    with pytest.raises(StopTraining):
        train(load_config(None, overrides(small_data, f"run.dir={tmp_path / 'b'}")), on_eval=stop_at_2)
    events = [r for r in read_metrics(tmp_path / "b") if r.get("event") == "stopped"]
    assert len(events) == 1 and events[0]["step"] == 2
    assert not list((tmp_path / "b").glob("checkpoints/*"))


def test_study_runs_writes_best_and_resumes(small_data, tmp_path, capsys):
    study = tmp_path / "study"
    argv = ["tune", *overrides(small_data), "--study-dir", str(study)]
    assert main([*argv, "--trials", "2"]) == 0
    out = capsys.readouterr().out
    assert f"gptforge train --config {study / 'best.yaml'}" in out and "COMPLETE" in out
    first = json.loads((study / "results.json").read_text())
    assert [t["state"] for t in first["trials"]] == ["COMPLETE", "COMPLETE"]
    losses = [t["val_loss"] for t in first["trials"]]
    assert losses == sorted(losses) and first["best"]["trial"] == first["trials"][0]["trial"]
    # the default optimizer is Muon, so its own learning rate is searched too
    assert {"optim.lr", "optim.weight_decay", "model.dropout", "schedule.warmup_steps",
            "optim.muon_lr"} == set(first["best"]["params"])
    assert (study / "trials" / "0000" / "config.yaml").is_file() and (study / "trials" / "0001").is_dir()

    best = load_config(study / "best.yaml")
    assert best.optim.lr == pytest.approx(first["best"]["params"]["optim.lr"])
    assert best.model.dropout == pytest.approx(first["best"]["params"]["model.dropout"])
    assert best.optim.muon_lr == pytest.approx(first["best"]["params"]["optim.muon_lr"])
    assert best.train.max_steps == 4 and best.run.dir == str(study / "best")

    # A trial left RUNNING by a killed process is failed on resume; --trials counts every trial.
    optuna.load_study(study_name=tn.STUDY_NAME, storage=f"sqlite:///{study / 'study.db'}").ask()
    assert main([*argv, "--trials", "4"]) == 0
    capsys.readouterr()
    again = json.loads((study / "results.json").read_text())
    by_number = {t["trial"]: t for t in again["trials"]}
    assert sorted(by_number) == [0, 1, 2, 3]
    assert by_number[2]["state"] == "FAIL" and by_number[3]["state"] == "COMPLETE"
    for old in first["trials"]:  # the first two trials are the same trials, not re-run
        assert by_number[old["trial"]]["params"] == old["params"]
        assert by_number[old["trial"]]["val_loss"] == old["val_loss"]
    assert by_number[3]["params"] not in [t["params"] for t in first["trials"]]

    # Resuming with another config would mix incomparable trials.
    assert main(["tune", *overrides(small_data, "optim.lr=0.01"), "--study-dir", str(study), "--trials", "5"]) == 2
    assert "made with another config" in capsys.readouterr().err


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


def test_pruned_trial_stops_early_and_is_marked_pruned(small_data, tmp_path):
    cfg = load_config(None, overrides(small_data))
    results = tn.tune(cfg, 1, tmp_path / "s", pruner=AlwaysPrune(), report=lambda m: None)
    (trial,) = results["trials"]
    assert trial["state"] == "PRUNED" and trial["step"] == 2  # never at step 0: the model is untrained there
    assert results["best"] is None and not (tmp_path / "s" / "best.yaml").exists()
    stopped = [r for r in read_metrics(tmp_path / "s" / "trials" / "0000") if r.get("event") == "stopped"]
    assert stopped and stopped[0]["step"] == 2


def test_failed_trial_is_recorded_and_its_folder_removed(small_data, tmp_path):
    # Every step's loss is NaN and the guard may skip only one in a row: the run fails without a checkpoint.
    cfg = load_config(None, overrides(small_data, "debug.inject_nan_at_step=1", "debug.inject_count=4",
                                      "guard.max_consecutive_skips=1"))
    results = tn.tune(cfg, 1, tmp_path / "s", report=lambda m: None)
    (trial,) = results["trials"]
    assert trial["state"] == "FAIL" and "skipped" in trial["error"]
    assert not (tmp_path / "s" / "trials" / "0000").exists()
    assert json.loads((tmp_path / "s" / "results.json").read_text())["best"] is None


@pytest.mark.parametrize("text, words", [
    ("train.lrr: {low: 1.0e-4, high: 1.0e-2}\n", ["line 1", "train.lrr", "optim.lr"]),
    ("optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\nmodel.dropout: {low: 0, hgh: 0.2}\n",
     ["line 2", "model.dropout", "hgh"]),
    ("optim.lr: {low: 1e-2, high: 1e-4}\n", ["line 1", "optim.lr", "low must be below high"]),
    ("optim.lr: {low: 0, high: 1, log: true}\n", ["optim.lr", "low > 0"]),
    ("model.mlp: {choices: []}\n", ["model.mlp", "non-empty list"]),
    ("schedule.warmup_steps: {low: 0.5, high: 4, type: int}\n", ["schedule.warmup_steps", "whole-number"]),
    ("optim.lr: 0.01\n", ["optim.lr", "low: A, high: B"]),
    ("- optim.lr\n", ["expected a mapping"]),
    ("run.dir: [a, b]\n", ["run.dir"]),
    ("model.dropout: {low: 0.0, high: 1.5}\n", ["model.dropout=1.5", "invalid config", "probability"]),
])
def test_bad_space_file_is_a_clear_error(text, words, tmp_path, capsys):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    code = main(["tune", "--trials", "1", "--space", str(path), "--study-dir", str(tmp_path / "s"), *TINY])
    assert code == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not (tmp_path / "s" / "study.db").exists()  # nothing ran


def test_space_file_replaces_the_default(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("optim.lr: {low: 1e-4, high: 1e-2, log: true}\nmodel.mlp: [gelu, swiglu]\n"
                    "schedule.warmup_steps: {low: 0, high: 10}\n")
    space = tn.load_space(path)
    assert set(space) == {"optim.lr", "model.mlp", "schedule.warmup_steps"}
    assert space["optim.lr"].low == pytest.approx(1e-4) and space["optim.lr"].log
    assert space["model.mlp"].choices == ("gelu", "swiglu") and space["schedule.warmup_steps"].kind == "int"
    with pytest.raises(ConfigError, match="not a config key"):
        tn._parse_param("train.nope", {"low": 0, "high": 1}, "here", ["optim.lr"])


def test_default_space_follows_the_config():
    space = tn.default_space(load_config(None, ["optim.lr=0.002", "train.max_steps=400", "optim.name=muon"]))
    assert space["optim.lr"].low == pytest.approx(0.0002) and space["optim.lr"].high == pytest.approx(0.02)
    assert space["schedule.warmup_steps"].high == 100 and "optim.muon_lr" in space
    adamw = tn.default_space(load_config(None, ["optim.lr=0.002", "optim.name=adamw"]))
    assert "optim.muon_lr" not in adamw and adamw["optim.lr"].high == pytest.approx(0.02)
    assert set(adamw) == {"optim.lr", "optim.weight_decay", "model.dropout", "schedule.warmup_steps"}
    cfg = load_config(None, [])  # the default optimizer is Muon
    assert cfg.optim.name == "muon"
    muon = tn.default_space(cfg)["optim.muon_lr"]
    assert muon.log and muon.low == pytest.approx(cfg.optim.muon_lr / 5)
    assert muon.high == pytest.approx(cfg.optim.muon_lr * 5)


def test_missing_optuna_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)
    assert main(["tune", "--trials", "1"]) == 2
    assert "pip install 'gptforge[tune]'" in capsys.readouterr().err
