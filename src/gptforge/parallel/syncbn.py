"""BatchNorm over the global batch under DDP (dist.sync_batchnorm), applied to a built model from outside.

On a GPU, torch's nn.SyncBatchNorm. torch's refuses CPU tensors, so on CPUs (gloo) each BatchNorm2d becomes
a GlobalBatchNorm2d: the per-channel sums and sums of squares of every process are all-reduced through
torch.distributed.nn's differentiable all_reduce, whose backward all-reduces the gradients of those sums,
which is what the global batch's normalization needs. Statistics are computed in float32 from one pass
(sum and sum of squares); evaluation uses the running statistics, as plain BatchNorm does.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class GlobalBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        C = x.size(1)
        xf = x.float()  # (B, C, H, W)
        count = torch.full((1,), xf.numel() // C, dtype=torch.float32, device=x.device)
        stats = all_reduce(torch.cat([xf.sum(dim=(0, 2, 3)), xf.square().sum(dim=(0, 2, 3)), count]))  # (2C + 1,)
        n = stats[2 * C]
        mean = stats[:C] / n
        var = (stats[C:2 * C] / n - mean.square()).clamp_min(0.0)  # biased: what normalizes the batch
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)  # unbiased, as torch keeps it
        scale = self.weight * torch.rsqrt(var + self.eps)  # (C,)
        y = xf * scale[None, :, None, None] + (self.bias - mean * scale)[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> None:
    """Every BatchNorm2d of `model` normalizing over all processes, in place; weights and buffers kept."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, (GlobalBatchNorm2d, nn.SyncBatchNorm)):
            cls = nn.SyncBatchNorm if device.type == "cuda" else GlobalBatchNorm2d
            new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.to(device=child.weight.device)
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(child, device)
