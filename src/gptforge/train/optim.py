"""Optimizers, chosen by optim.name from the OPTIMIZERS registry, and their parameter groups.

    adamw  AdamW with decay / no-decay groups: weight decay on matrices, none on norms, biases, embeddings.
    muon   Muon (train/muon.py) for the 2-D matrices inside the transformer blocks, at optim.muon_lr; AdamW at
           optim.lr for the token (and position) embeddings, an untied head, norms, biases and scalars, with
           weight decay where the adamw choice has it (the untied head). A tied embedding/head matrix is AdamW's.

Every group carries its own peak rate, `base_lr`; the loop sets lr = base_lr x the schedule's multiplier.
The configured rates win over those saved in a checkpoint (as optim.lr always has), so a resumed run may
change them; see keep_base_lrs.

A new optimizer is one module and one OPTIMIZERS entry: how to build it, the config keys it owns (so they
can be told apart from keys that do nothing under another choice), the search space `gptforge tune` tries
for it, and the rates that follow an optim.lr suggested by `gptforge lr-find`. `cfg` below is the optim
section of the config (only its attributes are read, so this module imports no config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from gptforge.config.sections import OPTIMIZER_NAMES
from gptforge.train.muon import Muon


def _embedding_ids(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices of linear layers decay; embeddings, norm weights, biases and scalars do not."""
    embeddings = _embedding_ids(model)
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied weight once
        if not p.requires_grad:
            continue
        if p.dim() >= 2 and id(p) not in embeddings:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def muon_param_groups(model: nn.Module, cfg) -> list[dict]:
    """One Muon group (hidden matrices) and AdamW decay / no-decay groups (everything else).

    A hidden matrix is a 2-D parameter that is neither an embedding nor the output head (`lm_head`); with
    tied embeddings the head is the embedding, AdamW's either way.
    """
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    embeddings = _embedding_ids(model)
    not_hidden = embeddings | ({id(head)} if head is not None else set())
    hidden, decay, no_decay = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.dim() == 2 and id(p) not in not_hidden:
            hidden.append(p)
        elif p.dim() >= 2 and id(p) not in embeddings:
            decay.append(p)  # the untied head: decays as under adamw
        else:
            no_decay.append(p)
    muon = dict(use_muon=True, lr=cfg.muon_lr, base_lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                ns_steps=cfg.muon_ns_steps, weight_decay=cfg.weight_decay)
    adam = dict(use_muon=False, lr=cfg.lr, base_lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    groups = [{"params": hidden, **muon}, {"params": decay, **adam, "weight_decay": cfg.weight_decay},
              {"params": no_decay, **adam, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _adamw(model: nn.Module, cfg, device_type: str) -> torch.optim.Optimizer:
    """AdamW; with optim.fused torch's fused kernel on GPUs and CPUs (one pass over all parameters:
    on a 2-core CPU, 11 ms instead of 32 ms per step for 17M parameters)."""
    groups = [{**g, "base_lr": cfg.lr} for g in param_groups(model, cfg.weight_decay)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=cfg.fused and device_type in ("cuda", "cpu"))


def _muon(model: nn.Module, cfg, device_type: str) -> torch.optim.Optimizer:
    return Muon(muon_param_groups(model, cfg))


@dataclass(frozen=True)
class OptimizerEntry:
    """One choice of optim.name."""

    build: Callable[[nn.Module, Any, str], torch.optim.Optimizer]  # (model, optim section, device type)
    keys: tuple[str, ...] = ()  # optim.* keys that only this optimizer reads
    # `gptforge tune`'s default ranges for its own keys: (key, low / value, high / value), log-uniform.
    tune_ranges: tuple[tuple[str, float, float], ...] = ()
    # Rates that follow optim.lr when `gptforge lr-find` suggests one: key -> its value / optim.lr.
    follows_lr: Callable[[Any], dict[str, float]] = field(default=lambda cfg: {})


OPTIMIZERS: dict[str, OptimizerEntry] = {
    "adamw": OptimizerEntry(_adamw, keys=("optim.fused",)),
    "muon": OptimizerEntry(
        _muon,
        keys=("optim.muon_lr", "optim.muon_momentum", "optim.muon_ns_steps"),
        tune_ranges=(("optim.muon_lr", 1 / 5, 5.0),),
        follows_lr=lambda cfg: {"optim.muon_lr": cfg.muon_lr / cfg.lr},
    ),
}
if tuple(OPTIMIZERS) != OPTIMIZER_NAMES:
    raise ImportError(f"train/optim.py builds {tuple(OPTIMIZERS)} but config/sections.py names {OPTIMIZER_NAMES}")


def build_optimizer(model: nn.Module, cfg, device_type: str) -> torch.optim.Optimizer:
    """The optimizer optim.name names, over the model's trainable parameters."""
    optimizer = OPTIMIZERS[cfg.name].build(model, cfg, device_type)
    keep_base_lrs(optimizer)
    return optimizer


def keep_base_lrs(optimizer: torch.optim.Optimizer) -> None:
    """Loading a state dict restores every group's hyper-parameters from it; put the configured base_lr
    back afterwards (also for checkpoints written before groups had one)."""
    configured = [g["base_lr"] for g in optimizer.param_groups]

    def restore(opt: torch.optim.Optimizer) -> None:
        for group, base_lr in zip(opt.param_groups, configured):
            group["base_lr"] = base_lr

    optimizer.register_load_state_dict_post_hook(restore)
