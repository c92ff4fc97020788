"""Model architectures, chosen by model.arch. Each is a pure nn.Module built from the model section alone."""

from __future__ import annotations

from torch import nn

from gptforge.model.gpt import GPT

ARCHITECTURES: dict[str, type[nn.Module]] = {"gpt": GPT}


def build_model(cfg) -> nn.Module:
    """The model that cfg.arch names (gpt when the section has no arch), with fresh weights."""
    return ARCHITECTURES[getattr(cfg, "arch", "gpt")](cfg)
