"""What a checkpoint's state.json holds: everything beyond the tensors that a bit-identical resume needs.

One typed object, written at step boundaries only (weights and optimizer state go to safetensors beside it):
the counters, every process's RNG states, the loader position, the gradient scaler, the guard's window, early
stopping, the fit watch, the last evaluation, the resolved config and the tokenizer's hash. The JSON keys are
those of every earlier version, so old run directories keep resuming.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from gptforge import __version__

FORMAT = "gptforge-train-state"


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    time_s: float = 0.0  # seconds of training, evaluation excluded
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config (Config.to_dict())
    rng: dict[str, Any] = field(default_factory=dict)  # every process's generators, by rank
    loader: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    tokenizer_sha256: str | None = None
    world_size: int = 1
    last_val: dict[str, Any] | None = None
    guard: dict[str, Any] | None = None
    early_stop: dict[str, Any] | None = None
    fit_watch: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None  # hyper-parameters and the layout of optimizer.safetensors
    format: str = FORMAT
    gptforge_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        """The JSON of state.json (without `optimizer`, which the checkpoint writer adds with its tensors)."""
        out = dataclasses.asdict(self)
        out.pop("optimizer")
        return out

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "TrainState":
        """A state.json as read; keys of other versions that are not fields here are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})
