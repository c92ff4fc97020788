"""Whether Triton can run on a device, and a `jit` that lets the kernel modules import without Triton.

Triton is the optional `kernels` extra. The kernel modules must import without it (their PyTorch reference
paths run everywhere), so they decorate kernels with `jit` from here: triton.jit when Triton is installed,
the plain function otherwise (never launched then). Kernel signatures annotate constexprs as strings
(`from __future__ import annotations`), which Triton reads the same way, so `tl` may be None when they are defined.

Triton runs on CUDA devices, and on CPU tensors through its interpreter when TRITON_INTERPRET=1 was set
before gptforge.kernels was imported (triton.jit reads it when decorating; slow, for tests). The choice is
made per call, from the tensors' device.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the optional `kernels` extra is not installed: only the PyTorch references run
    triton = tl = None


def jit(fn: Callable) -> Callable:
    """triton.jit(fn) when Triton is installed, else fn itself (and triton_available is False everywhere)."""
    return triton.jit(fn) if triton is not None else fn


def triton_available(device: torch.device | str) -> bool:
    """True when Triton is importable and can run on `device`: a CUDA GPU, or any device in interpreter mode."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    return triton is not None and (interpreting or torch.device(device).type == "cuda")


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
