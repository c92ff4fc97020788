"""Coming back to a run: which checkpoint to resume, whether it is the same run, and putting its state back.

The same restore serves a resume (weights, optimizer, scaler; the loop then takes the counters, RNGs and the
loader position from the TrainState) and the guard's rollback (weights and optimizer only: the loader keeps
its position, so the data moves on past what made the updates fail).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from gptforge.config import Config, migrate
from gptforge.data.datadir import DataDir
from gptforge.errors import CheckpointError, GptforgeError, UnloadableCheckpoint
from gptforge.parallel.distribute import (
    is_sharded_model,
    load_full_model_state,
    load_optimizer_state,
)
from gptforge.parallel.shards import load_shards
from gptforge.parallel.world import World
from gptforge.train import checkpoint
from gptforge.train.state import TrainState


@dataclass
class Resume:
    """The checkpoint a run continues from, and its state."""

    path: Path
    state: TrainState
    raw: dict  # state.json as read (the optimizer layout among it)


def find_resume(run_dir: Path, report: Callable[[str], None], *, start_over: bool = False,
                set_aside: bool = True, skip: tuple[Path, ...] = ()) -> Resume | None:
    """The newest intact checkpoint of `run_dir` as a Resume, or None for a new run.

    Every newer checkpoint that fails verify() is reported and (where `set_aside`: the one writer of the run)
    moved to checkpoints/rejected/, so it is never counted among the checkpoints kept and never deleted.
    A run directory whose checkpoints all fail is not started over unless `start_over` (run.start_over) says
    so: nothing is changed and the error says how. A weights-only folder (imported, quantized, pruned) is
    not a training run. `skip`: checkpoints found not to load, rejected like damaged ones."""
    found = checkpoint.list_checkpoints(checkpoint.checkpoint_root(run_dir))
    rejected, path = [], None
    for candidate in found:
        problems = ["it passed its checks but could not be loaded (above)"] if candidate in skip else \
            checkpoint.verify(candidate)
        if not problems:
            path = candidate
            break
        report(f"checkpoint {candidate.name} rejected: " + "; ".join(problems))
        rejected.append(candidate)
    if path is None and rejected and not start_over:
        raise CheckpointError(
            f"{run_dir} holds {len(rejected)} checkpoint(s) and none is intact (each reason above); nothing was "
            "changed. To start this run again from step 0, set run.start_over=true (the damaged checkpoints are "
            f"moved to {checkpoint.checkpoint_root(run_dir) / 'rejected'}, not deleted), or choose another run.dir"
        )
    if set_aside:
        for bad in rejected:
            report(f"checkpoint {bad.name} moved to {checkpoint.set_aside(bad)} (kept for inspection, never resumed)")
    if path is None:
        return None
    raw = checkpoint.read_state(path)
    if raw.get("format") == checkpoint.WEIGHTS_FORMAT:
        raise CheckpointError(
            f"{run_dir} holds weights only (imported, quantized or pruned), not a training run; "
            f"fine-tune it with finetune.init_from={run_dir} and another run.dir"
        )
    return Resume(path, TrainState.from_dict(raw), raw)


def check_same_run(saved: TrainState, cfg: Config, data: DataDir, run_dir: Path) -> None:
    """A run directory may only be resumed by the same model, optimizer and tokenizer."""
    saved_cfg = migrate(saved.config)  # a run saved by an earlier version: its keys where they live now
    old, new = saved_cfg["model"], dataclasses.asdict(cfg.model)
    diffs = [f"model.{k}: {old.get(k)!r} there, {v!r} here" for k, v in new.items() if k != "preset" and old.get(k) != v]
    if diffs:
        raise CheckpointError(
            f"{run_dir} holds a run of a different model ({'; '.join(diffs)}). "
            "Choose another run.dir, or delete that one to start over."
        )
    saved_optimizer = saved_cfg.get("optim", {}).get("name", "adamw")
    if saved_optimizer != cfg.optim.name:
        raise CheckpointError(
            f"{run_dir} was trained with optim.name={saved_optimizer}, this run asks for "
            f"optim.name={cfg.optim.name}; use the same optimizer to resume, or another run.dir"
        )
    if data.tokenizer is not None and saved.tokenizer_sha256 and saved.tokenizer_sha256 != data.tokenizer.sha256:
        raise CheckpointError(f"{run_dir} was trained with a different tokenizer than {data.path} has; choose another run.dir")


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, world: World,
            raw: dict | None = None) -> None:
    """Weights and optimizer state of the checkpoint at `path` into the model as it trains (plain, DDP's
    module or sharded) and its optimizer. `raw`: its state.json, when already read. Raises
    UnloadableCheckpoint when the checkpoint, verified as it was, still does not load."""
    try:
        if checkpoint.is_sharded(path):
            load_shards(model, optimizer, path / "shards")
            return
        if is_sharded_model(model):
            load_full_model_state(model, checkpoint.read_weights(path))
        else:
            checkpoint.load_weights(model, path)
        raw = raw if raw is not None else checkpoint.read_state(path)
        if "optimizer" in raw:
            load_optimizer_state(model, optimizer, checkpoint.read_optimizer(path, raw), world)
    except (GptforgeError, RuntimeError, KeyError, ValueError) as e:
        raise UnloadableCheckpoint(path, str(e)[:300]) from None
