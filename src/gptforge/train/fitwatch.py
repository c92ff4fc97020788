"""What the evaluations say while a run trains: the best validation loss so far (for RUN_DIR/best and early
stopping) and the fit watch, which flags overfitting and underfitting.

EarlyStop counts the evaluations since the validation loss last improved by more than
eval.early_stop_min_delta on the best so far; after eval.early_stop_patience of them the run stops.

FitWatch is fed one (step, train loss, val loss) per evaluation; the train loss is the mean of the training
steps since the evaluation before (a single step is too noisy to show a trend). With p = guard.fit_patience:

    overfitting   the val loss rose at each of the last p evaluations while the train loss ended those p
                  evaluations lower than it began. The episode ends at a new lowest val loss; only then
                  can the flag fire again.
    underfitting  over the last p evaluations neither the train nor the val loss moved by more than PLATEAU
                  (1%, relative), while the val loss is still above HIGH_FRACTION (80%) of the unigram
                  entropy of the training tokens. The episode ends when the val loss moves by more than
                  2 x PLATEAU over the last p evaluations (a plateau flag cannot flicker on noise), or falls
                  under that line.

The unigram entropy is the loss of a model that knows only how often each token occurs; it is cheap to
compute from a sample of the shards. A model that also looks at the previous token (a bigram table fitted
on the training split, scored on the validation split) reaches about 73% of it on the built-in corpus and
on a 512-token BPE of Python source, so a model stuck above 80% has not learned even one token of context:
it is too small, or its learning rate too low, to fit the data.

Both keep their whole state in state_dict() (JSON), saved in every checkpoint, so a resumed run decides
exactly as the uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PLATEAU = 0.01  # relative change over the last p evaluations below which a loss counts as flat
HIGH_FRACTION = 0.8  # val loss above this fraction of the unigram entropy is "still high"
ENTROPY_SAMPLE_TOKENS = 1 << 21  # tokens read (in evenly spaced chunks) to estimate the unigram entropy
_CHUNKS = 64


class EarlyStop:
    """The best validation loss so far, its step, and the evaluations since it last improved."""

    def __init__(self, patience: int = 0, min_delta: float = 0.0, state: dict | None = None):
        self.patience, self.min_delta = patience, min_delta
        self.best_loss: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.last_step: int | None = None  # step of the latest evaluation
        if state:
            self.best_loss, self.best_step = state["best_loss"], state["best_step"]
            self.bad_evals, self.last_step = state["bad_evals"], state["last_step"]

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_step": self.best_step, "bad_evals": self.bad_evals,
                "last_step": self.last_step}

    def update(self, step: int, val_loss: float) -> bool:
        """Count one evaluation; True when it is the new best (better by more than min_delta)."""
        self.last_step = step
        if math.isfinite(val_loss) and (self.best_loss is None or val_loss < self.best_loss - self.min_delta):
            self.best_loss, self.best_step, self.bad_evals = val_loss, step, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def stopped(self) -> bool:
        """Patience has run out (never with patience 0)."""
        return self.patience > 0 and self.bad_evals >= self.patience


@dataclass
class Flag:
    """One fit-watch finding: the metrics event name, its numbers, and a line for the console."""

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)
    message: str = ""


def _relative_change(before: float, after: float) -> float:
    return abs(before - after) / abs(before) if before else math.inf


class FitWatch:
    """Flags overfitting and underfitting from the evaluation curve (see the module docstring)."""

    def __init__(self, patience: int = 3, baseline: float | None = None, state: dict | None = None,
                 plateau: float = PLATEAU, high_fraction: float = HIGH_FRACTION):
        self.patience, self.baseline = patience, baseline
        self.plateau, self.high_fraction = plateau, high_fraction
        self.history: list[list[float]] = []  # [step, train loss, val loss] of the last patience + 1 evaluations
        self.train_sum, self.train_count = 0.0, 0
        self.lowest_val: float | None = None
        self.overfitting: bool = False  # an episode is going on (already flagged)
        self.underfitting_at: float | None = None  # val loss when underfitting was flagged, while the episode lasts
        if state:
            self._load(state)

    def _load(self, state: dict) -> None:
        self.baseline = state["baseline"] if state.get("baseline") is not None else self.baseline
        self.history = [list(h) for h in state["history"]][-(self.patience + 1):]
        self.train_sum, self.train_count = state["train_sum"], state["train_count"]
        self.lowest_val, self.overfitting = state["lowest_val"], state["overfitting"]
        self.underfitting_at = state["underfitting_at"]

    def state_dict(self) -> dict:
        return {"baseline": self.baseline, "history": self.history, "train_sum": self.train_sum,
                "train_count": self.train_count, "lowest_val": self.lowest_val, "overfitting": self.overfitting,
                "underfitting_at": self.underfitting_at}

    @property
    def high_line(self) -> float | None:
        """The val loss above which a plateau counts as underfitting (None without a baseline)."""
        return None if self.baseline is None else self.high_fraction * self.baseline

    def add_train_loss(self, loss: float) -> None:
        """One training step's loss; non-finite ones (skipped steps) are left out."""
        if math.isfinite(loss):
            self.train_sum += loss
            self.train_count += 1

    def observe(self, step: int, val_loss: float, train_loss: float | None = None) -> list[Flag]:
        """One evaluation. train_loss defaults to the mean of the losses added since the last one; an
        evaluation without any (step 0) only updates the lowest val loss. Returns the new flags."""
        if train_loss is None and self.train_count:
            train_loss = self.train_sum / self.train_count
        self.train_sum, self.train_count = 0.0, 0
        if not math.isfinite(val_loss):
            return []
        new_low = self.lowest_val is None or val_loss < self.lowest_val
        self.lowest_val = val_loss if new_low else self.lowest_val
        if new_low:
            self.overfitting = False
        if train_loss is None:
            return []
        self.history = (self.history + [[step, train_loss, val_loss]])[-(self.patience + 1):]
        self._end_underfitting()
        return [f for f in (self._check_overfitting(), self._check_underfitting()) if f is not None]

    def _window(self) -> list[list[float]] | None:
        return self.history if len(self.history) == self.patience + 1 else None

    def _check_overfitting(self) -> Flag | None:
        h = self._window()
        if self.overfitting or h is None:
            return None
        rising = all(b[2] > a[2] for a, b in zip(h, h[1:]))
        if not (rising and h[-1][1] < h[0][1]):
            return None
        self.overfitting = True
        fields = {"since_step": h[0][0], "evals": self.patience, "val_loss_from": h[0][2], "val_loss_to": h[-1][2],
                  "train_loss_from": h[0][1], "train_loss_to": h[-1][1], "lowest_val_loss": self.lowest_val}
        message = (
            f"overfitting: val loss rose {self.patience} evaluations in a row ({h[0][2]:.4f} -> {h[-1][2]:.4f} since "
            f"step {h[0][0]}) while train loss fell ({h[0][1]:.4f} -> {h[-1][1]:.4f}). Try more data, "
            "model.dropout, optim.weight_decay, data.aug_span_delete or data.aug_token_noise, or stop early with "
            "eval.early_stop_patience (eval.keep_best keeps the best weights in RUN_DIR/best)"
        )
        return Flag("overfitting", fields, message)

    def _check_underfitting(self) -> Flag | None:
        h, line = self._window(), self.high_line
        if self.underfitting_at is not None or h is None or line is None:
            return None
        train_change, val_change = _relative_change(h[0][1], h[-1][1]), _relative_change(h[0][2], h[-1][2])
        if not (train_change < self.plateau and val_change < self.plateau and h[-1][2] > line):
            return None
        self.underfitting_at = h[-1][2]
        fields = {"since_step": h[0][0], "evals": self.patience, "val_loss_from": h[0][2], "val_loss_to": h[-1][2],
                  "train_loss_from": h[0][1], "train_loss_to": h[-1][1], "val_change": val_change,
                  "train_change": train_change, "unigram_entropy": self.baseline, "high_line": line}
        message = (
            f"underfitting: train and val loss flat for {self.patience} evaluations (val {h[-1][2]:.4f}, train "
            f"{h[-1][1]:.4f}, each within {100 * self.plateau:.0f}% since step {h[0][0]}) and still above "
            f"{line:.4f} ({100 * self.high_fraction:.0f}% of the {self.baseline:.4f} nats a token-frequency model "
            "gets). Try a larger model (model.depth, or model.n_layer and model.n_embd) or a higher optim.lr"
        )
        return Flag("underfitting", fields, message)

    def _end_underfitting(self) -> None:
        h, line = self.history, self.high_line
        if self.underfitting_at is None:
            return
        moving = len(h) > 1 and _relative_change(h[0][2], h[-1][2]) > 2 * self.plateau
        if moving or (line is not None and h[-1][2] <= line):
            self.underfitting_at = None


def unigram_entropy(shards, max_tokens: int = ENTROPY_SAMPLE_TOKENS) -> float:
    """Entropy (nats per token) of the token frequencies of `shards`: all of them when they hold at most
    `max_tokens`, else evenly spaced chunks adding up to that many."""
    from gptforge.data.loader import TokenStream

    stream = TokenStream(shards)
    if stream.total <= max_tokens:
        tokens = stream.read(0, stream.total)
    else:
        size = max_tokens // _CHUNKS
        starts = np.linspace(0, stream.total - size, _CHUNKS).astype(np.int64)
        tokens = np.concatenate([stream.read(int(s), size) for s in starts])
    counts = np.bincount(tokens)
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log(p)).sum())


def fit_watch(cfg, shards, state: dict | None = None, baseline: float | None = None) -> FitWatch | None:
    """The fit watch of a run (guard.fit_watch), None when it is off. The baseline comes from the saved
    state when there is one, else `baseline` (an image task's label entropy), else the training shards."""
    if not cfg.fit_watch:
        return None
    baseline = state.get("baseline") if state and state.get("baseline") is not None else baseline
    return FitWatch(cfg.fit_patience, baseline if baseline is not None else unigram_entropy(shards), state=state)
