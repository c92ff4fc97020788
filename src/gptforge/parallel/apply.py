"""Techniques applied to a built model from outside it (the model file knows nothing of them)."""

from __future__ import annotations

import torch
from torch import nn


def apply_compile(model: nn.Module, enabled: bool, mode: str | None = None) -> nn.Module:
    """torch.compile the model; the raw module is kept by the caller for saving (no `_orig_mod.` keys)."""
    if not enabled:
        return model
    return torch.compile(model, mode=mode)
