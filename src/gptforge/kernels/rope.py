"""Fused rotary position embedding: one Triton kernel rotates q or k, instead of chunk, four products and cat.

Matches gptforge.model.gpt.apply_rotary: the half-split (GPT-NeoX / Llama) layout, x (B, nh, T, hd) of any
strides with a unit last-dimension stride (q and k straight from the fused qkv projection qualify), cos and
sin (T, hd/2). The rotation is computed in float32 and written once in x's dtype. The backward of a rotation
is the rotation by the opposite angle, so the same kernel serves both with sin negated.
"""

from __future__ import annotations

import torch

from gptforge.kernels.backend import cdiv, jit, next_power_of_2, tl, triton_available
from gptforge.model.gpt import apply_rotary

TILE = 2048
"""Elements of one half per program tile: rows per program = TILE // padded half width (at least one)."""


@jit
def _rope_kernel(X, COS, SIN, Y, n_rows, n_heads, T, half, stride_b, stride_h, stride_t,
                 BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, INVERSE: tl.constexpr):
    # One row is one (batch, head, position); rows run in the order of the contiguous output.
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # (BLOCK_R,) = (b * nh + h) * T + t
    t, bh = r % T, r // T
    d = tl.arange(0, BLOCK_H)  # (BLOCK_H,)
    mask = (r[:, None] < n_rows) & (d[None, :] < half)  # (BLOCK_R, BLOCK_H)
    x_ptr = X + ((bh // n_heads) * stride_b + (bh % n_heads) * stride_h + t * stride_t)[:, None] + d[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_H)
    x2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
    table = t[:, None] * half + d[None, :]  # (BLOCK_R, BLOCK_H)
    cos = tl.load(COS + table, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(SIN + table, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin
    y_ptr = Y + r[:, None] * (2 * half) + d[None, :]  # Y is contiguous (B, nh, T, hd)
    tl.store(y_ptr, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + half, (x1 * sin + x2 * cos).to(Y.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """x (B, nh, T, hd) rotated by +angle (or -angle when inverse) into a new contiguous tensor."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, nh, T, hd = x.shape
    half = hd // 2
    cos, sin = cos.contiguous(), sin.contiguous()  # (T, hd/2) each
    y = torch.empty(B, nh, T, hd, dtype=x.dtype, device=x.device)  # (B, nh, T, hd)
    n_rows = B * nh * T
    block_h = next_power_of_2(half)
    block_r = max(1, min(next_power_of_2(n_rows), TILE // block_h))
    _rope_kernel[(cdiv(n_rows, block_r),)](x, cos, sin, y, n_rows, nh, T, half, x.stride(0), x.stride(1),
                                           x.stride(2), BLOCK_R=block_r, BLOCK_H=block_h, INVERSE=inverse)
    return y


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, inverse=True), None, None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary through the Triton kernel; x (B, nh, T, hd), cos and sin (T, hd/2)."""
    return _RotaryFunction.apply(x, cos, sin)


def fused_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The attention's rotary: the Triton kernel where it runs on x's device, apply_rotary itself elsewhere."""
    return rotary(x, cos, sin) if triton_available(x.device) else apply_rotary(x, cos, sin)
