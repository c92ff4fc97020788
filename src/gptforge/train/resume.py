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
from gptforge.errors import CheckpointError
from gptforge.parallel.distribute import (
    is_sharded_model,
    load_full_model_state,
    load_optimizer_state,
    load_sharded,
)
from gptforge.parallel.world import World
from gptforge.train import checkpoint
from gptforge.train.state import TrainState


@dataclass
class Resume:
    """The checkpoint a run continues from, and its state."""

    path: Path
    state: TrainState
    raw: dict  # state.json as read (the optimizer layout among it)


def find_resume(run_dir: Path, report: Callable[[str], None]) -> Resume | None:
    """The newest intact checkpoint of `run_dir` as a Resume, or None for a new run. Rejected newer
    checkpoints are reported; a weights-only folder (imported, quantized, pruned) is not a training run."""
    path = checkpoint.find_latest(run_dir, report=report)
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
    module or sharded) and its optimizer. `raw`: its state.json, when already read."""
    if checkpoint.is_sharded(path):
        load_sharded(model, optimizer, path / "dcp")
        return
    if is_sharded_model(model):
        load_full_model_state(model, checkpoint.read_weights(path))
    else:
        checkpoint.load_weights(model, path)
    raw = raw if raw is not None else checkpoint.read_state(path)
    if "optimizer" in raw:
        load_optimizer_state(model, optimizer, checkpoint.read_optimizer(path, raw), world)
