"""Linear + cross-entropy in chunks of tokens, so the (tokens, vocab) logits tensor never exists whole.

For each chunk of rows of hidden (N, C): logits = hidden_chunk @ W^T (n, V_padded) in the matmul dtype (the
autocast dtype under autocast), then in float32 the loss over the first vocab_size columns (the padded
columns are excluded, as GPT.loss does), with the logit soft-cap cap * tanh(z / cap) when cap > 0. The same
pass overwrites the chunk's logits with d loss / d logits (softmax minus one-hot, zero on ignored rows), and
turns them into the chunk's gradient wrt hidden and its share of the gradient wrt W, so only one chunk's
logits are alive at a time (the Liger-kernel approach). The backward then only scales the stored gradients
by grad_output (divided by the number of counted tokens for the mean).

The softmax-minus-one-hot step is a Triton kernel where Triton runs on the logits' device (two passes over
each row: an online max and sum, then the gradient written in place), PyTorch elsewhere. reduction='mean'
(what training uses) and 'sum' keep the gradients from the forward; 'none' (per-token losses, what
evaluation uses under no_grad) computes no gradient in the forward and, if one is asked for, recomputes the
chunks in the backward with each row scaled by its grad_output. Targets equal to -1 are ignored.
"""

from __future__ import annotations

import torch

from gptforge.kernels.backend import cdiv, jit, next_power_of_2, tl, triton_available

IGNORE_INDEX = -1
REDUCTIONS = ("mean", "sum", "none")
MAX_BLOCK_V = 2048
"""Vocabulary columns one program loads at a time."""
TILE = 8192
"""Elements per program tile: rows per program = TILE // BLOCK_V (at least one)."""


@jit
def _ce_kernel(LOGITS, TARGETS, LOSS, n_rows, n_cols, stride, softcap, ignore_index,
               HAS_CAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_ok = rows < n_rows
    # Rows past the end re-read the last row (so every loaded row is finite) and store nothing.
    base = LOGITS + tl.minimum(rows, n_rows - 1).to(tl.int64)[:, None] * stride  # (BLOCK_M, 1)
    target = tl.load(TARGETS + rows, mask=row_ok, other=ignore_index)  # (BLOCK_M,)
    valid = row_ok & (target != ignore_index)

    # Pass 1: online max and sum of exp over the row, and the target's logit.
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    z_target = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)  # (BLOCK_V,)
        z = tl.load(base + cols[None, :], mask=cols[None, :] < n_cols, other=float("-inf")).to(tl.float32)
        if HAS_CAP:
            z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)  # cap * tanh(z / cap)
            z = tl.where(cols[None, :] < n_cols, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))  # (BLOCK_M,)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        z_target += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
    lse = m + tl.log(s)  # (BLOCK_M,)
    tl.store(LOSS + rows, tl.where(valid, lse - z_target, 0.0), mask=row_ok)

    # Pass 2: d loss / d logits = softmax - one-hot (times 1 - tanh^2 under the cap), in place.
    if WRITE_GRAD:
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)  # (BLOCK_V,)
            mask = row_ok[:, None] & (cols[None, :] < n_cols)  # (BLOCK_M, BLOCK_V)
            z = tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_CAP:
                t = 2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0
                z = softcap * t
            g = tl.exp(z - lse[:, None])
            g = tl.where(cols[None, :] == target[:, None], g - 1.0, g)
            if HAS_CAP:
                g = g * (1.0 - t * t)
            g = tl.where(valid[:, None], g, 0.0)
            tl.store(base + cols[None, :], g.to(LOGITS.dtype.element_ty), mask=mask)


def _ce_triton(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, softcap: float,
               write_grad: bool) -> torch.Tensor:
    n_rows = logits.shape[0]
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)  # (n,)
    block_v = min(next_power_of_2(vocab_size), MAX_BLOCK_V)
    block_m = max(1, TILE // block_v)
    _ce_kernel[(cdiv(n_rows, block_m),)](logits, targets, loss, n_rows, vocab_size, logits.stride(0), softcap,
                                         IGNORE_INDEX, HAS_CAP=softcap > 0, WRITE_GRAD=write_grad,
                                         BLOCK_M=block_m, BLOCK_V=block_v, num_warps=8)
    return loss


def _ce_torch(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, softcap: float,
              write_grad: bool) -> torch.Tensor:
    z = logits[:, :vocab_size].float()  # (n, V): a copy, or a view of logits already in float32
    if softcap > 0:
        t = torch.tanh(z / softcap)  # (n, V)
        z = t * softcap
    lse = torch.logsumexp(z, dim=1)  # (n,)
    valid = targets != IGNORE_INDEX  # (n,)
    safe = torch.where(valid, targets, 0)  # (n,)
    loss = torch.where(valid, lse - z.gather(1, safe[:, None]).squeeze(1), 0.0)  # (n,)
    if write_grad:
        g = z.sub_(lse[:, None]).exp_()  # (n, V) softmax
        g[torch.arange(len(safe), device=g.device), safe] -= 1.0
        g.mul_(valid[:, None])
        if softcap > 0:
            g.mul_(1.0 - t * t)
        logits[:, :vocab_size].copy_(g)
    return loss


def softmax_cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, softcap: float = 0.0,
                           write_grad: bool = True) -> torch.Tensor:
    """Per-row cross-entropy (n,) in float32 of logits (n, >= vocab_size) over their first vocab_size columns,
    soft-capped when softcap > 0; 0 where the target is -1. With write_grad, logits[:, :vocab_size] is
    overwritten in place with d loss_row / d logits (in logits' dtype). Triton where it runs, else PyTorch."""
    ce = _ce_triton if triton_available(logits.device) else _ce_torch
    return ce(logits, targets, vocab_size, softcap, write_grad)


def _run_chunks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, softcap: float,
                chunk_tokens: int, matmul_dtype: torch.dtype, need_hidden: bool, need_weight: bool,
                row_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-token losses (N,) and the gradients of sum(row_scale * losses) wrt hidden (N, C) and weight
    (V_padded, C, float32), each None unless asked for; row_scale None means all ones."""
    losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (N,)
    grad_h = torch.empty_like(hidden) if need_hidden else None  # (N, C)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    write_grad = need_hidden or need_weight
    with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit here, also in the backward
        w = weight.to(matmul_dtype)  # (V_padded, C)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            h = hidden[rows].to(matmul_dtype)  # (n, C)
            logits = h @ w.T  # (n, V_padded)
            losses[rows] = softmax_cross_entropy_(logits, targets[rows], vocab_size, softcap, write_grad)
            if not write_grad:
                continue
            g = logits[:, :vocab_size]  # (n, V): d loss_row / d logits now
            if row_scale is not None:
                g.mul_(row_scale[rows, None].to(g.dtype))
            if need_hidden:
                grad_h[rows] = g @ w[:vocab_size]  # (n, C)
            if need_weight:
                grad_w[:vocab_size] += g.T @ h  # (V, C)
    return losses, grad_h, grad_w


def _reduce(losses: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return losses
    total = losses.sum()
    return total / (targets != IGNORE_INDEX).sum() if reduction == "mean" else total


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, softcap, chunk_tokens, reduction, matmul_dtype):
        need_h, need_w = ctx.needs_input_grad[:2]
        ctx.reduction, ctx.weight_dtype = reduction, weight.dtype
        if reduction == "none":  # per-row grad_output scales each row's contribution: recompute in backward
            ctx.args = (vocab_size, softcap, chunk_tokens, matmul_dtype, need_h, need_w)
            ctx.save_for_backward(hidden, weight, targets)
            losses, _, _ = _run_chunks(hidden, weight, targets, vocab_size, softcap, chunk_tokens, matmul_dtype,
                                       False, False)
            return losses
        losses, grad_h, grad_w = _run_chunks(hidden, weight, targets, vocab_size, softcap, chunk_tokens,
                                             matmul_dtype, need_h, need_w)
        count = (targets != IGNORE_INDEX).sum() if reduction == "mean" else None
        ctx.save_for_backward(grad_h, grad_w, count)
        return _reduce(losses, targets, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            hidden, weight, targets = ctx.saved_tensors
            _, grad_h, grad_w = _run_chunks(hidden, weight, targets, *ctx.args, row_scale=grad_out)
        else:
            grad_h, grad_w, count = ctx.saved_tensors
            scale = grad_out / count if ctx.reduction == "mean" else grad_out  # () float32
            grad_h = grad_h * scale if grad_h is not None else None
            grad_w = grad_w * scale if grad_w is not None else None
        grad_w = grad_w.to(ctx.weight_dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         vocab_size: int | None = None, softcap: float = 0.0, chunk_tokens: int = 8192,
                         reduction: str = "mean") -> torch.Tensor:
    """F.cross_entropy(softcap(hidden @ weight.T)[:, :vocab_size].float(), targets, ignore_index=-1) without
    the full logits: hidden (N, C), weight (V_padded, C), targets (N,). The matmuls run in the autocast dtype
    when autocast is on for hidden's device, else in hidden's dtype; the softmax always in float32."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    device_type = hidden.device.type
    matmul_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, vocab_size, softcap, chunk_tokens, reduction,
                                         matmul_dtype)
    losses, _, _ = _run_chunks(hidden, weight, targets, vocab_size, softcap, chunk_tokens, matmul_dtype,
                               False, False)
    return _reduce(losses, targets, reduction)


def chunked_head_loss(model, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "mean", *,
                      chunk_tokens: int = 8192) -> torch.Tensor:
    """GPT.loss through linear_cross_entropy: the model's head weight, real vocabulary and soft-cap.
    hidden (B, T, C), targets (B, T) -> a scalar, or (B, T) losses for reduction='none'."""
    cfg = model.config
    loss = linear_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight, targets.flatten(), cfg.vocab_size,
                                cfg.logit_softcap, chunk_tokens, reduction)  # () or (B*T,)
    return loss.view_as(targets) if reduction == "none" else loss
