"""Compute and memory techniques applied to a built model from outside it (the model file knows nothing of them).

    compile                  torch.compile, with speed.compile_mode.
    activation checkpointing recompute transformer blocks in the backward pass instead of keeping their
                             activations (speed.activation_checkpointing).
    fp8                      torchao's float8 training linear layers (speed.fp8), on Hopper / Ada GPUs.
    flex document masking    on a GPU, a model with document masking attends through compiled flex attention
                             (block-sparse: blocks with no visible key are skipped) instead of an SDPA mask.

The builder (train/builder.py) applies them in torchtitan's order: fp8 -> activation checkpointing ->
(distribute: DDP / fully_shard) -> compile. None of them renames a parameter: checkpoints load into a model
with or without them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gptforge.errors import ConfigError
from gptforge.runtime import FP8_INSTALL, check_fp8


def apply_compile(model: nn.Module, enabled: bool, mode: str | None = None) -> nn.Module:
    """torch.compile the model; the raw module is kept by the caller for saving (no `_orig_mod.` keys).
    mode is speed.compile_mode ("default" and None are torch's default)."""
    if not enabled:
        return model
    return torch.compile(model, mode=None if mode in (None, "default") else mode)


def apply_flex_documents(model: nn.Module, device: torch.device) -> None:
    """On CUDA, route a document-masked GPT's attention through flex attention, compiled once per process
    (eager flex attention materializes the whole score matrix). Elsewhere the SDPA mask stays: CPUs have no
    fused flex kernel to gain from. A model with attention dropout keeps the SDPA mask too (flex attention
    has no dropout)."""
    config = getattr(model, "config", None)
    if device.type != "cuda" or getattr(config, "doc_token", -1) < 0 or getattr(config, "dropout", 0.0) > 0:
        return
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    model.flex_documents = True
    for module in model.modules():
        if hasattr(module, "flex"):
            module.flex = lambda q, k, v, block_mask: compiled(q, k, v, block_mask=block_mask)


# ----------------------------------------------------------------------------------------------------------
# Activation checkpointing


class _Checkpointed:
    """Mixin placed in front of a block's own class: forward runs under non-reentrant torch.utils.checkpoint,
    so only the block's input is kept and everything inside is recomputed during backward."""

    def forward(self, *args, **kwargs):
        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


_CHECKPOINTED_CLASSES: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    """`Checkpointed<cls>`, a subclass of cls with _Checkpointed's forward (one class per block class)."""
    if cls not in _CHECKPOINTED_CLASSES:
        _CHECKPOINTED_CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (_Checkpointed, cls), {})
    return _CHECKPOINTED_CLASSES[cls]


def checkpointed_blocks(n_blocks: int, mode: str) -> list[int]:
    """Indices of the blocks that `mode` recomputes.

    full: every block (activation memory of one block's inside plus each block's input; about one extra
    forward pass of compute). selective: every other block, starting at the first (0, 2, 4, ...): about
    half the activation memory saved for about half the recompute, the usual middle ground (torchtitan's
    "selective layer" checkpointing with frequency 2). none: no block.
    """
    if mode == "none":
        return []
    if mode == "full":
        return list(range(n_blocks))
    if mode == "selective":
        return list(range(0, n_blocks, 2))
    raise ConfigError(f"speed.activation_checkpointing: {mode!r} is not one of: none, selective, full")


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Recompute the chosen blocks of `model.transformer.h` in the backward pass (see checkpointed_blocks).

    Each chosen block's class is swapped for a subclass whose forward is checkpointed, as fully_shard itself
    does: the module tree, parameter names and state_dict keys are unchanged, so checkpoints load either
    way, and DDP / fully_shard / torch.compile wrap the block as before. Apply before distribute(). Idempotent.
    Returns the model (changed in place).
    """
    blocks = model.transformer.h
    for i in checkpointed_blocks(len(blocks), mode):
        block = blocks[i]
        if not isinstance(block, _Checkpointed):
            block.__class__ = _checkpointed_class(type(block))
    return model


def is_checkpointed(module: nn.Module) -> bool:
    return isinstance(module, _Checkpointed)


# ----------------------------------------------------------------------------------------------------------
# fp8


def fp8_eligible(module: nn.Module, fqn: str) -> bool:
    """Which linear layers become fp8: not the output head (its logits need the precision, and with tied
    embeddings it is the embedding matrix), and only those whose both dimensions are multiples of 16 (the
    fp8 matmul kernels' requirement)."""
    if fqn == "lm_head" or fqn.endswith(".lm_head"):
        return False
    if isinstance(module, nn.Linear):
        return module.in_features % 16 == 0 and module.out_features % 16 == 0
    return True


def apply_fp8(model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """Swap the eligible nn.Linear layers for torchao's Float8Linear (dynamic tensor-wise scaling).
    Checks the device first when given (check_fp8). Returns the model (changed in place)."""
    if device is not None:
        check_fp8(device)
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise ConfigError(f"speed.fp8=true needs torchao: {FP8_INSTALL}") from None
    return convert_to_float8_training(model, module_filter_fn=fp8_eligible)
