"""NEFTune (Jain et al., 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): during training,
add uniform noise to the token embeddings, scaled to the sequence length and width.

    noise = U(-1, 1) * alpha / sqrt(T * C)        for an embedding output of shape (B, T, C)

It is applied from outside the model, as a forward hook on model.transformer.wte, so the model code stays
pure: the hook adds noise only while the embedding module is in training mode (model.train()), never in
evaluation or generation, and is not part of the weights. Random numbers come from torch's global generator
of the device (saved in every checkpoint), so a resumed run draws the same noise. Enabled by
finetune.neftune_alpha > 0 (typical values 5 to 15 when fine-tuning).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gptforge.errors import ConfigError

_HANDLE = "_neftune_handle"


def neftune_scale(alpha: float, seq_len: int, width: int) -> float:
    """Half-width of the uniform noise: alpha / sqrt(T * C)."""
    return alpha / math.sqrt(seq_len * width)


def _hook(alpha: float):
    def add_noise(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training:
            return None
        scale = neftune_scale(alpha, output.shape[-2], output.shape[-1])
        return output + torch.empty_like(output).uniform_(-scale, scale)

    return add_noise


def apply_neftune(model: nn.Module, alpha: float) -> RemovableHandle:
    """Hook NEFTune noise of strength `alpha` onto the token embedding of `model` (a GPT); returns the handle
    (remove_neftune(model) removes it too)."""
    if not alpha > 0:
        raise ConfigError(f"finetune.neftune_alpha: expected a positive noise strength, got {alpha}")
    wte = _token_embedding(model)
    remove_neftune(model)  # never two hooks at once
    handle = wte.register_forward_hook(_hook(alpha))
    setattr(wte, _HANDLE, handle)
    return handle


def remove_neftune(model: nn.Module) -> bool:
    """Remove the NEFTune hook from `model`; True when there was one."""
    wte = _token_embedding(model)
    handle = wte.__dict__.pop(_HANDLE, None)
    if handle is None:
        return False
    handle.remove()
    return True


def _token_embedding(model: nn.Module) -> nn.Module:
    transformer = getattr(model, "transformer", None)
    wte = transformer["wte"] if isinstance(transformer, nn.ModuleDict) and "wte" in transformer else None
    if wte is None:
        raise ConfigError(f"NEFTune needs a model with a token embedding at transformer.wte; {type(model).__name__} has none")
    return wte
