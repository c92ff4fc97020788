"""Fused kernels, applied to a built GPT from outside it (speed.fused_kernels, speed.fused_ce).

- FusedRMSNorm (rmsnorm.py) replaces every nn.RMSNorm, the per-head qk_norm ones included.
- fused_rotary (rope.py) becomes every attention layer's rotary, when the model uses rotary positions.
- chunked_head_loss (fused_ce.py) becomes the model's head_loss: linear + cross-entropy in chunks of tokens.

Each runs its Triton kernel where Triton runs on the tensors' device (triton_available: a CUDA GPU, or any
device under TRITON_INTERPRET=1) and its PyTorch reference elsewhere, decided per call, so a model may be
patched before or after it is moved. The chunked cross-entropy is chunked in PyTorch everywhere. A model
with layernorm or learned positions gets only what applies to it: nothing is swapped for those. Parameters
and state_dict keys are unchanged.
"""

from __future__ import annotations

import functools

from torch import nn

from gptforge.errors import ConfigError
from gptforge.kernels.backend import triton_available
from gptforge.kernels.fused_ce import chunked_head_loss, linear_cross_entropy
from gptforge.kernels.rmsnorm import FusedRMSNorm
from gptforge.kernels.rope import fused_rotary
from gptforge.model.gpt import GPT, CausalSelfAttention

__all__ = ["FusedRMSNorm", "apply_kernels", "chunked_head_loss", "fused_rotary", "linear_cross_entropy",
           "triton_available"]


def _swap_norms(model: nn.Module) -> None:
    """Every nn.RMSNorm with a weight over the last dimension becomes a FusedRMSNorm sharing that weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.RMSNorm) and module.weight is not None and len(module.normalized_shape) == 1:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, FusedRMSNorm(module))


def apply_kernels(model: GPT, fused: bool, fused_ce: bool, ce_chunk_tokens: int) -> None:
    """Patch a built model in place: fused RMSNorm and RoPE when `fused`, the chunked linear + cross-entropy
    (chunks of ce_chunk_tokens tokens) when `fused_ce`."""
    if fused:
        _swap_norms(model)
        if model.config.pos == "rope":
            for module in model.modules():
                if isinstance(module, CausalSelfAttention):
                    module.rotary = fused_rotary
    if fused_ce:
        head = model.lm_head
        if type(head) is not nn.Linear or head.bias is not None:
            raise ConfigError(f"speed.fused_ce computes the output head from its weight alone, but model.lm_head "
                              f"is {head}; set speed.fused_ce=false for this model")
        if ce_chunk_tokens < 1:
            raise ConfigError(f"speed.ce_chunk_tokens: expected a positive number of tokens, got {ce_chunk_tokens}")
        model.head_loss = functools.partial(chunked_head_loss, chunk_tokens=ce_chunk_tokens)
