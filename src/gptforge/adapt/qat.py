"""Quantization-aware training (finetune.qat=int8|int4): train the weights that quantization will keep.

The layers `gptforge quantize` would quantize become FakeQuantLinear: the forward uses the weight
quantized and dequantized by the very functions of gptforge.adapt.qlinear, so after training,
`quantize_model` produces a model whose logits equal the QAT model's. The gradient passes straight through
the rounding (straight-through estimator) to the full-precision weight, which is what the optimizer
updates and the checkpoint stores, under nn.Linear's own names: a QAT checkpoint loads into a plain GPT.

torchao's QAT (torchao.quantization.qat) is not used: its fake quantizers mirror torchao's own int4 and
int8 layouts, and on a CPU with torch 2.13 torchao 0.18 cannot produce its real int4 model (that needs the
separate `mslk` kernel package), so its fake quantization would model a format gptforge does not run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.adapt.qlinear import check_method, fake_quantize, replace_module, target_names


class FakeQuantLinear(nn.Linear):
    """nn.Linear whose forward sees its weight as quantized by `method`; gradients reach the weight unchanged."""

    def __init__(self, base: nn.Linear, method: str, group_size: int):
        nn.Module.__init__(self)  # not nn.Linear.__init__: the base's tensors are reused, not reallocated
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.method, self.group_size = method, group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        # Straight-through: the value is the fake-quantized weight, the gradient that of the identity.
        w = w + (fake_quantize(w, self.method, self.group_size) - w).detach()
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.method == "int4" else ""
        return f"{super().extra_repr()}, qat={self.method}{group}"


def apply_qat(model: nn.Module, method: str, group_size: int = 64) -> list[str]:
    """Swap the layers `method` would quantize for FakeQuantLinear (same parameters); return their names."""
    names = target_names(model, method)
    check_method(model, names, method, group_size)
    for name in names:
        replace_module(model, name, FakeQuantLinear(model.get_submodule(name), method, group_size))
    return names


def remove_qat(model: nn.Module) -> list[str]:
    """Put plain nn.Linear layers back, holding the trained full-precision weights; return their names."""
    names = [name for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    for name in names:
        fake = model.get_submodule(name)
        plain = nn.Linear(fake.in_features, fake.out_features, bias=fake.bias is not None, device="meta")
        plain.weight, plain.bias = fake.weight, fake.bias
        replace_module(model, name, plain)
    return names
