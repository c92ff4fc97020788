"""Muon: momentum orthogonalized by Newton-Schulz, for the 2-D hidden matrices; AdamW for everything else.

After Keller Jordan's Muon (github.com/KellerJordan/Muon, "Muon: An optimizer for hidden layers in neural
networks", 2024) as used in modded-nanogpt's speedrun records. For a weight matrix, the update is the
Nesterov momentum of its gradient with every singular value pushed towards one (U S V^T -> U V^T, computed
by a quintic Newton-Schulz iteration, no SVD), so every direction of the matrix moves by a similar amount.
That suits the hidden matrices of the transformer blocks; embeddings, the output head, norms, biases and
scalars are not matrices of that kind and are trained by AdamW, as in the reference's MuonWithAuxAdam.

One optimizer holds both kinds of groups (`use_muon` True or False), so one state_dict holds all of the
state (momentum_buffer; exp_avg, exp_avg_sq, step) and checkpoints save it by parameter name like AdamW's.
Each group keeps its own `base_lr`; the training loop multiplies it by the schedule.

Sharded parameters (FSDP2 DTensors): each matrix's update is gathered whole (`full_tensor()`, a collective),
orthogonalized on every process, and each process keeps its own shard of the result.
"""

from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximation of U V^T for G = U S V^T (G is 2-D), by `steps` quintic Newton-Schulz iterations.

    The coefficients maximize the slope at zero rather than converge: the singular values of the result
    are not exactly one (which costs nothing in training, per the reference). With 5 steps in float32, every
    singular value of G that is at least 1% of G's Frobenius norm comes out in [0.68, 1.14]; smaller ones
    are still on their way up, and none comes out above 1.21.
    Runs in bfloat16 on CUDA, where tensor cores make it cheap, and in float32 elsewhere (CPUs have no fast
    bfloat16 matmul). Returns a tensor of G's shape in that working dtype.
    """
    assert G.ndim == 2, f"expected a matrix, got shape {tuple(G.shape)}"
    X = G.to(torch.bfloat16 if G.device.type == "cuda" else torch.float32)
    tall = G.size(0) > G.size(1)
    if tall:  # iterate on the wide orientation: X @ X^T is then the smaller Gram matrix
        X = X.T  # (cols, rows)
    X = X / (X.norm() + eps)  # Frobenius norm >= spectral norm: every singular value now <= 1
    m, n = X.shape
    if X.dtype == torch.float32 and n >= GRAM_MIN_ASPECT * m:
        X = _newtonschulz_gram(X, steps)
    else:
        a, b, c = NS_COEFFICIENTS
        for _ in range(steps):
            A = X @ X.T  # (m, m), m = min(rows, cols)
            B = b * A + c * A @ A  # (m, m)
            X = a * X + B @ X  # (m, n)
    return X.T if tall else X


# The Gram form costs 2 (m, m, n) products and 17 (m, m, m) ones for 5 steps, against 10 and 5 for the plain
# one: it is the cheaper one from n = 1.5 m. In float32 only: in bfloat16 its rounding errors build up.
GRAM_MIN_ASPECT = 1.5


def _newtonschulz_gram(X: torch.Tensor, steps: int) -> torch.Tensor:
    """The same iteration as zeropower_via_newtonschulz5's, for a wide (m, n) X, carried out on m x m matrices.

    Each step is X <- Q X with Q = a I + b A + c A^2 a polynomial of A = X X^T. So after k steps
    X_k = P_k X_0 with P_k = Q_{k-1} ... Q_0, and A_{k+1} = Q_k A_k Q_k^T = Q_k^2 A_k since Q_k commutes with
    A_k. Only the first Gram matrix and the final P X_0 touch the long side n, which saves almost half the
    work for an MLP matrix (n = 4 m). Equal to the plain iteration within float32 rounding (tested).
    """
    a, b, c = NS_COEFFICIENTS
    A = X @ X.T  # (m, m)
    P = None
    for k in range(steps):
        Q = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        Q.diagonal().add_(a)
        P = Q if P is None else Q @ P
        if k < steps - 1:
            A = Q @ (Q @ A)
    return P @ X


def muon_update(grad: torch.Tensor, buf: torch.Tensor, momentum: float, ns_steps: int) -> torch.Tensor:
    """Nesterov momentum (updates `buf` in place), orthogonalized, and scaled by max(1, rows/cols)^0.5 as in
    the reference, so that tall matrices (an MLP's up-projection) are not under-updated. Sharded tensors
    (DTensors) are fine: see _orthogonalize."""
    buf.lerp_(grad, 1 - momentum)
    update = grad.lerp(buf, momentum)  # Nesterov: look ahead along the momentum
    scale = max(1.0, grad.size(-2) / grad.size(-1)) ** 0.5
    return _orthogonalize(update, ns_steps) * scale


def _orthogonalize(update: torch.Tensor, ns_steps: int) -> torch.Tensor:
    """Newton-Schulz on the whole matrix, in the update's dtype; a sharded DTensor is gathered first and
    each process keeps its own shard of the result (every process computes the same full matrix)."""
    if not hasattr(update, "full_tensor"):
        return zeropower_via_newtonschulz5(update, ns_steps).to(update.dtype)
    from torch.distributed.tensor import DTensor, Replicate

    mesh, placements = update.device_mesh, update.placements
    full = zeropower_via_newtonschulz5(update.full_tensor(), ns_steps).to(update.dtype)  # (rows, cols)
    replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, placements)  # Replicate -> Shard is a local slice, no communication


class Muon(torch.optim.Optimizer):
    """Muon for groups with use_muon=True, AdamW (decoupled weight decay, bias correction) for the others.

    Muon groups: lr, momentum, ns_steps, weight_decay (decoupled: p *= 1 - lr * weight_decay).
    AdamW groups: lr, betas, eps, weight_decay, computed as torch.optim.AdamW's single-tensor path does.
    """

    def __init__(self, param_groups: list[dict], *, lr: float = 0.02, momentum: float = 0.95, ns_steps: int = 5,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        for group in param_groups:
            if "use_muon" not in group:
                raise ValueError("every Muon parameter group needs use_muon=True or False")
            if group["use_muon"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("use_muon groups hold 2-D matrices only")
        defaults = dict(lr=lr, momentum=momentum, ns_steps=ns_steps, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            update = muon_update(p.grad, state["momentum_buffer"], group["momentum"], group["ns_steps"])
            p.mul_(1 - lr * wd)
            p.add_(update, alpha=-lr)

    def _adamw_group(self, group: dict) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            grad, state = p.grad, self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            step = state["step"].item()
            p.mul_(1 - lr * wd)
            state["exp_avg"].lerp_(grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step_size = lr / (1 - beta1**step)
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
            p.addcdiv_(state["exp_avg"], denom, value=-step_size)
