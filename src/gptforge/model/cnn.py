"""A small ResNet for image classification (model.arch=cnn): a pure nn.Module.

    stem      3x3 convolution to cnn_width channels, norm, ReLU
    stages    cnn_stages of them, widths cnn_width x 1, 2, 4, ...; every stage after the first halves the image
              (stride 2); each stage holds cnn_blocks residual blocks: conv-norm-ReLU-conv-norm + shortcut
    head      global average pool, linear to num_classes

Images arrive as the loader stores them, uint8 (B, H, W, C); the model scales them to [-1, 1] itself, so a
checkpoint needs no separate preprocessing to be used. The permute to (B, C, H, W) is a view whose memory is
already channels-last, the layout GPU convolutions are fastest in. model.norm: batchnorm (its running
statistics are buffers, saved with the weights) or groupnorm (no batch dependence: the choice for small
per-device batches). forward(x, targets) is the loss (label smoothing in training only), forward(x) logits.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.model.config import IMAGE_NORMS, GPTConfig


# model.norm of a cnn: channels -> the norm. GroupNorm takes 8 groups where the width allows (Wu & He 2018
# use 32 on wider networks). The names are model/config.py's IMAGE_NORMS (checked below).
NORMS: dict[str, Callable[[int], nn.Module]] = {
    "batchnorm": nn.BatchNorm2d,
    "groupnorm": lambda channels: nn.GroupNorm(math.gcd(channels, 8), channels),
}
if tuple(NORMS) != IMAGE_NORMS:
    raise ImportError(f"cnn.py implements {', '.join(NORMS)}; model/config.py names {', '.join(IMAGE_NORMS)}")


def _norm(kind: str, channels: int) -> nn.Module:
    return NORMS[kind](channels)


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = _norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _norm(norm, c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:  # a 1x1 projection where the shape changes
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(norm, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))  # (B, c_out, H/stride, W/stride)
        h = self.norm2(self.conv2(h))
        return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate_family("cnn")
        self.config = config
        w, norm = config.cnn_width, config.norm
        self.stem = nn.Sequential(nn.Conv2d(config.image_channels, w, 3, 1, 1, bias=False), _norm(norm, w), nn.ReLU())
        stages, c_in = [], w
        for s in range(config.cnn_stages):
            c_out = w * 2 ** s
            blocks = [ResidualBlock(c_in if b == 0 else c_out, c_out, 2 if s and b == 0 else 1, norm)
                      for b in range(config.cnn_blocks)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(c_in, config.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for block in self.stages.modules():  # each residual branch starts as zero (Goyal et al. 2017)
            if isinstance(block, ResidualBlock) and isinstance(block.norm2, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.zeros_(block.norm2.weight)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        return sum(p.numel() for p in self.parameters())

    def train_flops(self) -> float:
        """Training FLOPs per image: 3 x (2 x multiply-adds) of every convolution and the head, measured on
        an image of the configured size on the meta device (no memory, no compute)."""
        macs = []

        def count(module: nn.Module, inputs, output: torch.Tensor) -> None:
            weight = module.weight
            per_output = weight[0].numel()  # c_in / groups x kh x kw, or in_features
            macs.append(output[0].numel() * per_output)

        layers = [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        hooks = [m.register_forward_hook(count) for m in layers]
        try:
            c = self.config
            with torch.no_grad():
                self(torch.zeros(1, c.image_size, c.image_size, c.image_channels, dtype=torch.uint8,
                                 device=self.head.weight.device))
        finally:
            for h in hooks:
                h.remove()
        return float(6 * sum(macs))

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None, *,
                reduction: str = "mean") -> torch.Tensor:
        """Logits (B, num_classes) for uint8 images (B, H, W, C), or the cross entropy when targets (B,) are
        given (reduction mean, sum or none; label smoothing while training)."""
        x = images.permute(0, 3, 1, 2)  # (B, C, H, W), a view: channels-last in memory
        x = x.to(self.head.weight.dtype) * (2.0 / 255.0) - 1.0
        x = self.stages(self.stem(x))  # (B, C', H', W')
        logits = self.head(self.drop(x.mean(dim=(2, 3))))  # (B, num_classes)
        if targets is None:
            return logits
        smoothing = self.config.label_smoothing if self.training else 0.0
        return F.cross_entropy(logits.float(), targets, label_smoothing=smoothing, reduction=reduction)
