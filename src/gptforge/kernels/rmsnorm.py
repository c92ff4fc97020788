"""Fused RMSNorm: one Triton kernel for the forward, one for the backward, in place of torch's several ops.

y = x * rsqrt(mean(x^2) + eps) * weight over the last dimension, computed in float32 and written once in
x's dtype. The forward keeps rstd = rsqrt(mean(x^2) + eps) per row for the backward, which computes dx per
row and dweight as per-program float32 partial sums (each program strides over many row blocks), summed in
torch. FusedRMSNorm replaces an nn.RMSNorm in a built model and holds the very same `weight` Parameter, so
state_dict keys, checkpoints and optimizer references are unchanged; where Triton cannot run on the input's
device it computes F.rms_norm exactly as nn.RMSNorm does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.kernels.backend import cdiv, jit, next_power_of_2, tl, triton_available
from gptforge.model.gpt import gain_like

MAX_WIDTH = 65536
"""Widest row one program normalizes; wider rows use the PyTorch path."""
TILE = 4096
"""Elements per program tile: rows per program = TILE // padded width (at least one)."""


@jit
def _rmsnorm_fwd(X, W, Y, RSTD, n_rows, n_cols, stride_x, eps,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)  # (BLOCK_M, BLOCK_N)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)  # (BLOCK_N,)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)  # (BLOCK_M,)
    y = x * rstd[:, None] * w[None, :]  # (BLOCK_M, BLOCK_N)
    tl.store(Y + rows[:, None] * n_cols + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@jit
def _rmsnorm_bwd(DY, X, W, RSTD, DX, DW, n_rows, n_cols, stride_dy, stride_x,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # dx = rstd * (w*dy - xhat * mean(w*dy * xhat)), xhat = x * rstd; dweight = sum over rows of dy * xhat.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)  # (BLOCK_N,)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(pid * BLOCK_M, n_rows, tl.num_programs(0) * BLOCK_M):
        rows = (start + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)  # (BLOCK_M, BLOCK_N)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)  # (BLOCK_M,)
        xhat = x * rstd[:, None]
        wdy = dy * w[None, :]
        c = tl.sum(wdy * xhat, axis=1) / n_cols  # (BLOCK_M,)
        dx = (wdy - xhat * c[:, None]) * rstd[:, None]  # (BLOCK_M, BLOCK_N)
        tl.store(DX + rows[:, None] * n_cols + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
    tl.store(DW + pid * n_cols + cols, dw, mask=cols < n_cols)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, width) with unit column stride: a view when the layout allows, else a copy."""
    t = t.reshape(-1, t.shape[-1])  # (R, N)
    return t if t.stride(-1) == 1 else t.contiguous()


def _blocks(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of n_cols elements."""
    block_n = next_power_of_2(n_cols)
    block_m = max(1, TILE // block_n)
    return block_m, block_n, min(16, max(4, block_m * block_n // 1024))


def _backward_programs(device: torch.device, row_blocks: int) -> int:
    """Programs of the backward: a few per SM on a GPU, few in the (sequential) interpreter."""
    per_device = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return min(row_blocks, per_device)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = _rows(x)  # (R, N)
        n_rows, n_cols = x2.shape
        y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)  # (R, N)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)  # (R,)
        block_m, block_n, warps = _blocks(n_cols)
        _rmsnorm_fwd[(cdiv(n_rows, block_m),)](x2, weight, y, rstd, n_rows, n_cols, x2.stride(0), eps,
                                               BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x2, weight, rstd = ctx.saved_tensors
        dy2 = _rows(dy)  # (R, N)
        n_rows, n_cols = x2.shape
        block_m, block_n, warps = _blocks(n_cols)
        programs = _backward_programs(x2.device, cdiv(n_rows, block_m))
        dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)  # (R, N)
        dw = torch.empty(programs, n_cols, dtype=torch.float32, device=x2.device)  # (programs, N) partial sums
        _rmsnorm_bwd[(programs,)](dy2, x2, weight, rstd, dx, dw, n_rows, n_cols, dy2.stride(0), x2.stride(0),
                                  BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
        return dx.view(dy.shape), dw.sum(0).to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x (..., N) with gain weight (N,) through the Triton kernels; output in x's dtype."""
    return _RMSNormFunction.apply(x, weight, eps)


class FusedRMSNorm(nn.Module):
    """nn.RMSNorm over the last dimension through the Triton kernels where they run on the input's device,
    F.rms_norm (what nn.RMSNorm computes) elsewhere. Built from the nn.RMSNorm it replaces, sharing its weight."""

    def __init__(self, norm: nn.RMSNorm):
        super().__init__()
        if norm.weight is None or len(norm.normalized_shape) != 1:
            raise ValueError("FusedRMSNorm replaces an nn.RMSNorm over the last dimension with a learnable weight")
        self.normalized_shape = tuple(norm.normalized_shape)
        self.eps = norm.eps
        self.weight = norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps  # nn.RMSNorm's default when None
        if triton_available(x.device) and x.shape[-1] <= MAX_WIDTH:
            return rms_norm(x, self.weight, eps)
        return F.rms_norm(x, self.normalized_shape, gain_like(self.weight, x), eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"
