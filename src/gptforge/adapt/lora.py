"""LoRA: train low-rank adapters beside frozen linear weights, then fold them back in.

A LoRALinear is an nn.Linear holding the original weight and bias tensors (not copies) under their
original names, so the base model's checkpoint keys still apply and merging needs no bookkeeping. Only
lora_A and lora_B train; checkpoints hold them beside the frozen weights in model.safetensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.config import LoraConfig
from gptforge.errors import ConfigError


class LoRALinear(nn.Linear):
    """y = x W^T + b + scale * dropout(x) A^T B^T with W, b frozen and A (rank, in), B (out, rank) trained.

    B starts at zero, so a fresh adapter leaves the layer's output exactly unchanged; A starts random
    (nn.Linear's own init), so B's first gradient is not zero.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear.__init__: the base's tensors are reused, not reallocated
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapter = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., out) via (..., rank)
        return F.linear(x, self.weight, self.bias) + adapter * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.shape[0]}, scale={self.scale:g}"


def _short_name(name: str) -> str:
    """'transformer.h.3.attn.c_proj' -> 'attn.c_proj': the part after the layer index, as targets name it."""
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[digits[-1] + 1:]) if digits else name


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wrap every linear layer whose name ends with one of cfg.targets in a LoRALinear; freeze all else.

    A target matches whole name components from the end: "c_proj" matches attn.c_proj and mlp.c_proj,
    "mlp.c_proj" only the latter. lm_head is never wrapped: it is the (tied) embedding matrix, the size
    of the vocabulary, which LoRA leaves alone. Returns the names of the wrapped layers.
    """
    if cfg.rank < 1:
        raise ConfigError(f"finetune.lora.rank: LoRA needs a rank of at least 1, got {cfg.rank}")
    targets = [t.strip() for t in cfg.targets.split(",") if t.strip()]
    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear) and name != "lm_head"}
    chosen = [name for name in linears if any(name == t or name.endswith(f".{t}") for t in targets)]
    if not chosen:
        available = sorted({_short_name(name) for name in linears})
        raise ConfigError(f"finetune.lora.targets={cfg.targets!r} matches no linear layer; "
                          f"available: {', '.join(available)}")
    for name in chosen:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(linears[name], cfg.rank, cfg.alpha, cfg.dropout))
    model.requires_grad_(False)
    for m in _lora_modules(model).values():
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)
    return chosen


def _lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> None:
    """Fold each adapter into its weight (W += scale * B A) and put the plain nn.Linear back.

    Afterwards the model is a plain GPT, with every parameter trainable as after construction, that
    computes what the LoRA model computed in eval mode. B A is formed in float64 so the merged weight
    rounds once, like any weight.
    """
    for name, m in _lora_modules(model).items():
        with torch.no_grad():
            delta = m.lora_B.double() @ m.lora_A.double() * m.scale  # (out, in)
            m.weight.add_(delta.to(m.weight.dtype))
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)
    model.requires_grad_(True)
