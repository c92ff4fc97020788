"""Numeric precision: what `speed.precision=auto` picks on each device, and the autocast / scaler it needs.

auto means what the device does well, not habit: bf16 autocast on GPUs with bf16, fp16 with a gradient
scaler on older GPUs, and on CPUs fp32 unless the CPU has native bf16 matrix instructions (AVX512-BF16 or
AMX). Without them, a bf16 matmul on a CPU is emulated and several times slower than fp32 (BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from gptforge.errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    name: str  # fp32 | tf32 | bf16 | fp16
    device_type: str  # cpu | cuda | mps

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.name)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 needs loss scaling to keep small gradients from underflowing; bf16 and fp32 do not."""
        if self.name != "fp16":
            return None
        return torch.amp.GradScaler(self.device_type)


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises bf16 matrix instructions (x86 AVX512-BF16 / AMX-BF16)."""
    if platform.system() != "Linux":
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def resolve_precision(name: str, device: torch.device) -> Precision:
    """Turn `speed.precision` into a concrete choice for this device, or explain why it cannot run here."""
    kind = device.type
    if name == "auto":
        if kind == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif kind == "cpu":
            name = "bf16" if cpu_has_native_bf16() else "fp32"
        else:
            name = "fp32"
    if name == "tf32" and kind != "cuda":
        raise ConfigError(f"speed.precision=tf32 needs a CUDA GPU (TensorFloat-32 tensor cores); this device is {kind}")
    if name == "fp16" and kind == "cpu":
        raise ConfigError("speed.precision=fp16 is for GPUs; on a CPU use fp32 (or bf16 where the CPU has native bf16)")
    if name == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("speed.precision=bf16: this GPU has no bf16 support; use fp16 or auto")
    if name == "bf16" and kind == "cpu" and not cpu_has_native_bf16():
        warnings.warn("speed.precision=bf16 on a CPU without native bf16: expect it to be several times slower than fp32")
    if kind == "cuda":
        # TF32 for the fp32 matmuls that remain (and all of them under tf32); bf16/fp16 autocast covers the rest.
        allow = name in ("tf32", "bf16", "fp16")
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow
    return Precision(name=name, device_type=kind)


def pick_device(spec: str) -> torch.device:
    """`train.device=auto` picks cuda, then mps, then cpu; anything else is a torch device string."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"train.device: {spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={spec}: no CUDA GPU is visible to torch here; use auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={spec}: MPS is not available here; use auto or cpu")
    return device
