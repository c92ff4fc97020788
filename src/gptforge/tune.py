"""`gptforge tune`: hyperparameter search with Optuna, each trial a real `gptforge train` run.

Why these choices: a seeded TPE sampler (model-based, good with a few dozen trials, repeatable), a
MedianPruner fed with the validation loss of every evaluation (a trial whose loss is worse than the median of
the completed trials at the same step is stopped early; cheap and robust, no assumption about the budget),
and an SQLite study file so that running the same command again resumes the study. The objective is the
final validation loss of each trial's run, with the user's own budget (train.max_steps, max_tokens or
max_time). Optuna is an optional extra: it is imported only here, when the command runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from gptforge import __version__
from gptforge.config import Config, canonical_key, close_keys, describe_keys, from_dict, load_config, save_config
from gptforge.errors import CheckpointError, ConfigError, DataError, GptforgeError
from gptforge.progress import clock_text, eta_s

STUDY_NAME = "gptforge"
PRUNER_STARTUP_TRIALS = 5  # no pruning until this many trials have completed

TUNE_HELP = """\
Search hyperparameters with Optuna (pip install 'gptforge[tune]'). Every trial is a full training run with
your config and budget (train.max_steps, train.max_tokens or train.max_time) in STUDY_DIR/trials/NNNN; the
objective is its final validation loss (lower is better).

Sampler: TPE, seeded with run.seed. Pruner: median; from the first evaluation after step 0 on, a trial whose
validation loss is worse than the median of the completed trials at the same step is stopped (pruned), once
5 trials have completed. The study lives in STUDY_DIR/study.db (SQLite): run the same command again to
resume it; --trials N is the total number of trials in the study (finished, pruned or failed), so a second
run with a larger N adds the difference. A trial that fails is marked FAIL and its run folder is removed.
One tune process per study at a time.

Default search space (around your config's values):
  optim.lr               log-uniform, optim.lr / 10 .. optim.lr x 10
  optim.weight_decay     uniform, 0 .. 0.2
  model.dropout          uniform, 0 .. 0.2
  schedule.warmup_steps  integer, 0 .. train.max_steps / 4 (without max_steps: 0 .. 2 x schedule.warmup_steps)
  optim.muon_lr          log-uniform, optim.muon_lr / 5 .. optim.muon_lr x 5 (optim.name=muon only: each
                         optimizer adds the ranges of its own keys)

--space FILE replaces it with a YAML mapping of config keys, each a range or a list of choices:
  optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
  schedule.warmup_steps: {low: 0, high: 100, type: int}
  model.mlp: {choices: [gelu, swiglu]}
  model.n_layer: [2, 4, 6]

At the end: a table of the trials by validation loss, STUDY_DIR/results.json, and STUDY_DIR/best.yaml, the
full config of the best trial (train it with gptforge train --config STUDY_DIR/best.yaml).
"""


def require_optuna():
    """The optuna module, or a GptforgeError saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise GptforgeError("gptforge tune needs Optuna, which is not installed: "
                            "pip install 'gptforge[tune]'") from None
    return optuna


# ----------------------------------------------------------------------------------------------------------
# The search space


@dataclass(frozen=True)
class Param:
    """One searched config key: a numeric range (float or int, optionally log-scaled) or a list of choices."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    kind: str = "float"
    choices: tuple | None = None

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def extremes(self) -> list[Any]:
        """The values to try against the config before any trial runs."""
        if self.choices is not None:
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def to_dict(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log, "type": self.kind}

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.key} in {list(self.choices)}"
        scale = "log " if self.log else ""
        return f"{self.key} {scale}{self.kind} {self.low:g}..{self.high:g}"


def default_space(cfg: Config) -> dict[str, Param]:
    """The default search space, around the config's own values (see TUNE_HELP)."""
    optim, steps = cfg.optim, cfg.train.max_steps
    warmup_high = steps // 4 if steps is not None else 2 * cfg.schedule.warmup_steps
    space = [
        Param("optim.lr", optim.lr / 10, optim.lr * 10, log=True),
        Param("optim.weight_decay", 0.0, 0.2),
        Param("model.dropout", 0.0, 0.2),
        Param("schedule.warmup_steps", 0, max(1, warmup_high), kind="int"),
    ]
    from gptforge.train.optim import OPTIMIZERS

    for key, low, high in OPTIMIZERS[optim.name].tune_ranges:  # the optimizer's own keys, around their values
        value = getattr(optim, key.split(".", 1)[1])
        space.append(Param(key, value * low, value * high, log=True))
    return {p.key: p for p in space}


def load_space(path: str | Path) -> dict[str, Param]:
    """A --space YAML file; every mistake names the file, the line and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--space: file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict) or not tree:
        raise ConfigError(f"{path}: expected a mapping of config keys to ranges or choices, e.g. "
                          "optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}")
    lines = {str(k.value): k.start_mark.line + 1 for k, _ in node.value}
    valid = [key for key, _, _ in describe_keys()]
    params = [_parse_param(canonical_key(str(key)), spec, f"{path}, line {lines.get(str(key), '?')}", valid)
              for key, spec in tree.items()]  # a key of an earlier version (train.lr) searches its current one
    return {p.key: p for p in params}


def _parse_param(key: str, spec: Any, where: str, valid: list[str]) -> Param:
    if key not in valid:
        close = close_keys(key)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"{where}: {key!r} is not a config key{hint}")
    if key == "run.dir":
        raise ConfigError(f"{where}: run.dir cannot be searched: every trial gets its own folder in the study")
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: {key}: expected {{low: A, high: B}} (with optional log, type) or "
                          f"{{choices: [...]}}, got {spec!r}")
    unknown = set(spec) - {"low", "high", "log", "type", "choices"}
    if unknown:
        raise ConfigError(f"{where}: {key}: unknown field(s) {', '.join(sorted(map(str, unknown)))}; "
                          "use low, high, log, type or choices")
    if "choices" in spec:
        return _parse_choices(key, spec, where)
    return _parse_range(key, spec, where)


def _parse_choices(key: str, spec: dict, where: str) -> Param:
    choices = spec["choices"]
    if len(spec) > 1:
        raise ConfigError(f"{where}: {key}: choices cannot be combined with low, high, log or type")
    if not isinstance(choices, list) or not choices or any(isinstance(c, (list, dict)) for c in choices):
        raise ConfigError(f"{where}: {key}: choices must be a non-empty list of values, got {choices!r}")
    return Param(key, choices=tuple(choices))


def _number(key: str, field: str, value: Any, where: str) -> float | int:
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{where}: {key}: {field} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return value
    try:
        return float(str(value))  # YAML reads 1e-4 (no dot) as a string
    except ValueError:
        raise ConfigError(f"{where}: {key}: {field} must be a number, got {value!r}") from None


def _parse_range(key: str, spec: dict, where: str) -> Param:
    for field in ("low", "high"):
        if field not in spec:
            raise ConfigError(f"{where}: {key}: missing {field} (a range needs low and high)")
    low, high = _number(key, "low", spec["low"], where), _number(key, "high", spec["high"], where)
    kind = spec.get("type", "int" if isinstance(low, int) and isinstance(high, int) else "float")
    log = spec.get("log", False)
    if kind not in ("int", "float"):
        raise ConfigError(f"{where}: {key}: type must be int or float, got {kind!r}")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: {key}: log must be true or false, got {log!r}")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{where}: {key}: type int needs whole-number low and high, got {low} and {high}")
    if not low < high:
        raise ConfigError(f"{where}: {key}: low must be below high, got low={low} and high={high}")
    if log and low <= 0:
        raise ConfigError(f"{where}: {key}: a log range needs low > 0, got {low}")
    return Param(key, float(low), float(high), log=log, kind=kind)


def check_space(base: dict[str, Any], space: dict[str, Param], where: str) -> None:
    """Build the config at every extreme of every parameter, so a bad value fails before any trial runs."""
    for param in space.values():
        for value in param.extremes():
            try:
                from_dict(trial_tree(base, {param.key: value}, "check"))
            except ConfigError as e:
                raise ConfigError(f"{where}: {param.key}={value!r} makes an invalid config: {e}") from None


def trial_tree(base: dict[str, Any], params: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """The config tree of one trial: the base config, the trial's values, its own run folder."""
    tree = copy.deepcopy(base)
    for key, value in params.items():
        node = tree
        *sections, name = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    tree.setdefault("run", {})["dir"] = str(run_dir)
    return tree


# ----------------------------------------------------------------------------------------------------------
# The study


def tune(cfg: Config, trials: int, study_dir: str | Path, space: dict[str, Param] | None = None,
         timeout: float | None = None, pruner=None, report: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the study in study_dir until it holds `trials` trials or `timeout` seconds pass;
    write results.json and best.yaml there and return the results. `pruner` replaces the MedianPruner."""
    optuna = require_optuna()
    if trials < 1:
        raise GptforgeError(f"--trials must be >= 1, got {trials}")
    if timeout is not None and timeout <= 0:
        raise GptforgeError(f"--timeout must be a positive number of seconds, got {timeout}")
    study_dir = Path(study_dir).resolve()
    base = cfg.to_dict()
    base["run"].pop("dir")
    space = space if space is not None else default_space(cfg)
    check_space(base, space, "search space")
    study_dir.mkdir(parents=True, exist_ok=True)
    study = _open_study(optuna, study_dir, cfg, base, space, pruner)
    start, first = time.monotonic(), len(study.trials)  # a resumed study counts its pace from here
    deadline = start + timeout if timeout is not None else None
    while len(study.trials) < trials:
        if deadline is not None and time.monotonic() >= deadline:
            report(f"--timeout of {timeout:g}s reached; {len(study.trials)} of {trials} trials in the study")
            break
        elapsed, done = time.monotonic() - start, len(study.trials)
        eta = clock_text(eta_s(elapsed, done / trials, first / trials))
        _run_trial(optuna, study, base, space, study_dir, cfg, report,
                   f"{done + 1} of {trials}; elapsed {clock_text(elapsed)}, eta {eta}")
    results = collect_results(study, study_dir, space)
    write_results(results, study_dir, base)
    return results


def _open_study(optuna, study_dir: Path, cfg: Config, base: dict[str, Any], space: dict[str, Param], pruner):
    """Create the study, or load it and check it was made with the same config and space."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    first_eval = cfg.eval.every or 1
    study = optuna.create_study(
        study_name=STUDY_NAME, storage=f"sqlite:///{study_dir / 'study.db'}", direction="minimize",
        pruner=pruner or optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=first_eval),
        load_if_exists=True,
    )
    # Seeded past the trials already run, so a resumed study does not repeat the random start-up trials.
    study.sampler = optuna.samplers.TPESampler(seed=cfg.run.seed + len(study.trials))
    settings = {"base_config": base, "space": {k: p.to_dict() for k, p in space.items()}}
    if not study.trials and not study.user_attrs:
        for name, value in settings.items():
            study.set_user_attr(name, value)
    else:
        _check_same_study(study, settings, study_dir)
    _fail_stale(optuna, study, study_dir)
    return study


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def _check_same_study(study, settings: dict[str, Any], study_dir: Path) -> None:
    """Trials of one study must share the config and the space, or their losses do not compare."""
    for name, label in (("base_config", "config"), ("space", "search space")):
        old = _flatten(json.loads(json.dumps(study.user_attrs.get(name, {}))))
        new = _flatten(json.loads(json.dumps(settings[name])))
        diffs = [f"{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in sorted(set(old) | set(new))
                 if old.get(k) != new.get(k)]
        if diffs:
            shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
            raise GptforgeError(f"the study in {study_dir} was made with another {label} ({shown}). "
                                "Run the same command as before to resume it, or choose another --study-dir")


def _fail_stale(optuna, study, study_dir: Path) -> None:
    """Trials still RUNNING belong to a tune process that was killed: mark them failed, remove their folders."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        shutil.rmtree(_trial_dir(study_dir, t.number), ignore_errors=True)


def _trial_dir(study_dir: Path, number: int) -> Path:
    return study_dir / "trials" / f"{number:04d}"


def _is_trial_failure(e: BaseException) -> bool:
    """Errors that end one trial (it diverged, ran out of memory) but not the study; user mistakes end both."""
    import torch

    if isinstance(e, (ConfigError, DataError, CheckpointError)):
        return False
    return isinstance(e, (GptforgeError, torch.OutOfMemoryError, FloatingPointError))


def _run_trial(optuna, study, base, space, study_dir: Path, cfg: Config, report, progress: str) -> None:
    """Ask for one trial, train it, tell the study how it ended (complete, pruned or failed)."""
    from gptforge.train.loop import StopTraining, train

    State = optuna.trial.TrialState
    trial = study.ask()
    params = {key: p.suggest(trial) for key, p in space.items()}
    run_dir = _trial_dir(study_dir, trial.number)
    shutil.rmtree(run_dir, ignore_errors=True)  # every trial starts fresh
    trial.set_user_attr("run_dir", str(run_dir))
    report(f"trial {trial.number} ({progress}): " + " ".join(f"{k}={_fmt(v)}" for k, v in params.items()))
    try:
        trial_cfg = from_dict(trial_tree(base, {**params, "train.samples": 0}, run_dir))
        result = train(trial_cfg, on_eval=_pruning_hook(trial, trial_cfg))
        loss = result.val["val_loss"] if result.val else math.nan
        if not math.isfinite(loss):
            raise FloatingPointError(f"final validation loss is {loss}")
    except StopTraining as e:
        study.tell(trial, state=State.PRUNED)
        report(f"trial {trial.number}: {e}")
        return
    except BaseException as e:
        trial.set_user_attr("error", str(e) or type(e).__name__)
        study.tell(trial, state=State.FAIL)
        shutil.rmtree(run_dir, ignore_errors=True)
        if not _is_trial_failure(e):
            raise
        report(f"trial {trial.number} failed: {e}")
        return
    study.tell(trial, loss)
    best = study.best_trial
    report(f"trial {trial.number}: val loss {loss:.4f} (best: trial {best.number}, {best.value:.4f})")


def _pruning_hook(trial, cfg: Config) -> Callable[[int, dict[str, Any]], None]:
    """on_eval for train(): report each validation loss to Optuna; stop the run when the pruner says so."""
    from gptforge.train.loop import StopTraining

    def on_eval(step: int, result: dict[str, Any]) -> None:
        loss = result["val_loss"]
        if not math.isfinite(loss):
            raise StopTraining(f"pruned at step {step}: validation loss is {loss}")
        trial.report(loss, step)
        final = cfg.train.max_steps is not None and step >= cfg.train.max_steps  # nothing left to save
        if step > 0 and not final and trial.should_prune():
            raise StopTraining(f"pruned at step {step} (val loss {loss:.4f})")

    return on_eval


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------------------------------
# Results


def collect_results(study, study_dir: Path, space: dict[str, Param]) -> dict[str, Any]:
    """Every trial, best first: completed by validation loss, then pruned (by their last loss), then failed."""
    rows = [_trial_row(t) for t in study.trials]
    order = {"COMPLETE": 0, "PRUNED": 1}
    rows.sort(key=lambda r: (order.get(r["state"], 2), r["val_loss"] is None, r["val_loss"] or 0.0, r["trial"]))
    best = rows[0] if rows and rows[0]["state"] == "COMPLETE" else None
    return {
        "study": STUDY_NAME, "storage": f"sqlite:///{study_dir / 'study.db'}", "direction": "minimize",
        "objective": "final validation loss", "sampler": "TPE", "pruner": type(study.pruner).__name__,
        "space": {k: p.to_dict() for k, p in space.items()},
        "best": best, "best_config": str(study_dir / "best.yaml") if best else None, "trials": rows,
    }


def _trial_row(t) -> dict[str, Any]:
    state = t.state.name
    value = t.value if state == "COMPLETE" else t.intermediate_values.get(t.last_step)  # pruned: the last loss
    return {
        "trial": t.number, "state": state, "val_loss": value, "step": t.last_step, "params": t.params,
        "run_dir": t.user_attrs.get("run_dir"), "duration_s": t.duration.total_seconds() if t.duration else None,
        "error": t.user_attrs.get("error") or ("interrupted" if state == "FAIL" else None),
    }


def write_results(results: dict[str, Any], study_dir: Path, base: dict[str, Any]) -> None:
    """results.json with the environment, and best.yaml: the whole config of the best trial."""
    import torch

    from gptforge.observe.environment import command_line, git_sha

    record = {**results, "gptforge_version": __version__, "git_sha": git_sha(), "torch": torch.__version__,
              "command": command_line()}
    (study_dir / "results.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    if results["best"] is not None:
        cfg = from_dict(trial_tree(base, results["best"]["params"], study_dir / "best"))
        save_config(cfg, study_dir / "best.yaml")


def results_table(results: dict[str, Any]) -> list[str]:
    """The trials as text lines, best first."""
    lines = [f"{'trial':>5}  {'state':<8}  {'val loss':>8}  {'step':>6}  params"]
    for r in results["trials"]:
        loss = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        step = str(r["step"]) if r["step"] is not None else "-"
        params = " ".join(f"{k}={_fmt(v)}" for k, v in r["params"].items())
        lines.append(f"{r['trial']:>5}  {r['state']:<8}  {loss:>8}  {step:>6}  {params}")
    return lines


# ----------------------------------------------------------------------------------------------------------
# Command line


def run_tune(args: argparse.Namespace) -> int:
    """`gptforge tune`: run the study, print the table and how to train the best config."""
    require_optuna()  # before any work, with the install hint
    cfg = load_config(args.config, args.overrides)
    space = load_space(args.space) if args.space else None
    try:
        results = tune(cfg, args.trials, args.study_dir, space, args.timeout, report=print)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume the study")
        return 130
    for line in results_table(results):
        print(line)
    study_dir = Path(args.study_dir)
    print(f"wrote {study_dir / 'results.json'}")
    if results["best"] is None:
        print("no trial completed, so there is no best.yaml; widen the space or raise the budget")
        return 0
    best = results["best"]
    print(f"best: trial {best['trial']}, val loss {best['val_loss']:.4f}; wrote {study_dir / 'best.yaml'}")
    print(f"train it: gptforge train --config {study_dir / 'best.yaml'}")
    return 0
