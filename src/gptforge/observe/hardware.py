"""Peak FLOP/s for MFU: datasheet figures for known GPUs, a short measured matmul elsewhere."""

from __future__ import annotations

import json
import time
from typing import Callable

import torch

from gptforge.runtime import synchronize

# Dense (no sparsity) datasheet peaks in FLOP/s, by the precision the matmuls run in.
DATASHEET: dict[str, dict[str, float]] = {
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12},
    "RTX 4090": {"bf16": 165e12, "fp16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12},
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        import os
        import platform

        model = platform.processor() or platform.machine() or "cpu"
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return f"{model}, {os.cpu_count()} cores"
    return device.type


def datasheet_peak(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in DATASHEET.items():
        if key in name:
            return peaks.get(precision)
    return None


def measured_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, trials: int = 8) -> float:
    """FLOP/s of a square matmul of random data on this device: the best of several short trials, since
    another process sharing the cores can only slow a trial down, never speed it up."""
    gen = torch.Generator(device=device).manual_seed(0)  # leaves the global generators untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    torch.mm(a, b)
    synchronize(device)
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        torch.mm(a, b)
        torch.mm(a, b)
        synchronize(device)
        best = max(best, 4 * n**3 / (time.perf_counter() - start))
    return best


def _dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def matmul_size(rate: Callable[[int], float], start: int = 256, cap: int = 1024, min_s: float = 0.01) -> int:
    """The matrix size to measure a peak on: doubled from `start` while one matmul at the size `rate(n)`
    (FLOP/s) gives would take under `min_s`, up to `cap`. A dtype the hardware runs natively (bf16 with
    AMX or AVX512-BF16) is fast, and a small matrix then measures call overhead, not the peak; one it
    emulates is slow, and a large matrix would take seconds."""
    n = start
    while n < cap and 2 * n**3 / rate(n) < min_s:
        n *= 2
    return n


def measured_peak(device: torch.device, precision: str) -> float:
    """FLOP/s of a large matmul in `precision`, measured now: 8192 x 8192 on a GPU; elsewhere a size grown
    until one matmul takes at least 10 ms, up to 1024 (matmul_size), so native and emulated half precision are both
    measured on a matrix that suits them."""
    dtype = _dtype(precision)
    if device.type == "cuda":
        return measured_matmul_flops(device, dtype, n=8192, trials=10)
    n = matmul_size(lambda n: measured_matmul_flops(device, dtype, n=n, trials=1))
    return measured_matmul_flops(device, dtype, n=n, trials=8)


class Peak:
    """The peak a run's MFU is taken against, and the check that keeps MFU honest: a figure above 100% means
    the peak was measured too low (a busy moment, a matrix too small), so it is measured again once, and
    an MFU still above 100% is reported as unknown (None), never as a number."""

    def __init__(self, device: torch.device, precision: str):
        self.device, self.precision = device, precision
        self.flops = peak_flops(device, precision)
        self.rechecked = False

    def mfu(self, model_flops_per_s: float) -> float | None:
        if model_flops_per_s > self.flops and not self.rechecked and datasheet_peak(self.device, self.precision) is None:
            self.rechecked = True
            self.flops = max(self.flops, peak_flops(self.device, self.precision))
        mfu = model_flops_per_s / self.flops
        return mfu if mfu <= 1.0 else None


def peak_flops(device: torch.device, precision: str) -> float:
    """The peak MFU is measured against: the datasheet where known; elsewhere the best matmul rate this
    machine has shown (remembered in the cache folder, so one measurement on a busy machine does not stick)."""
    peak = datasheet_peak(device, precision)
    if peak is not None:
        return peak
    measured = measured_peak(device, precision)
    key = (f"{device_name(device)}|{device.type}|{_dtype(precision)}|threads={torch.get_num_threads()}"
           f"|torch={torch.__version__}")
    return _remember_best(key, measured)


def _remember_best(key: str, value: float) -> float:
    from gptforge.data.corpus import cache_root
    from gptforge.fileio import atomic_write_text

    path = cache_root() / "hardware.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    best = max(value, float(known.get(key, 0.0)))
    if best > known.get(key, 0.0):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({**known, key: best}, indent=1))
        except OSError:  # a read-only cache is no reason to fail a run
            pass
    return best

