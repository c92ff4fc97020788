"""GPU energy of a run: joules per token, kWh and, with run.price_per_hour, the cost.

Read through NVML (the nvidia-ml-py package, imported as `pynvml`; `pip install 'gptforge[energy]'`). The
GPU's total-energy counter (nvmlDeviceGetTotalEnergyConsumption, millijoules since the driver loaded;
Volta and newer) is read at start and stop: exact, and nothing runs in between. Where the counter is not
supported, a background thread samples the power draw (nvmlDeviceGetPowerUsage, milliwatts) every
`interval_s` and integrates it (trapezoids). Without pynvml, without a CUDA device, or when NVML fails,
the meter is off and reports None: energy is a report, never a reason for a run to fail.
"""

from __future__ import annotations

import functools
import threading
import time
import weakref
from typing import Any, Callable

import torch

JOULES_PER_KWH = 3.6e6


def _nvml():
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _handle(nvml, device: torch.device):
    """The NVML handle of a CUDA device: by UUID (NVML numbers every GPU of the machine, CUDA only the
    visible ones), by index where torch does not report the UUID."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception:  # an older torch without .uuid, or an NVML that wants another spelling
        return nvml.nvmlDeviceGetHandleByIndex(index)


def _power_w(nvml, handle) -> float | None:
    """The power draw in watts, None when NVML cannot say."""
    try:
        return nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
    except Exception:
        return None


class _PowerIntegral:
    """The power draw, sampled every interval_s by a daemon thread and integrated (trapezoids), until
    `stopping` is set; then one last reading, so even a short interval has one."""

    def __init__(self, read_w: Callable[[], float | None], interval_s: float):
        self.read_w, self.interval_s = read_w, interval_s
        self.joules, self.samples = 0.0, 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="gptforge-energy", daemon=True)

    def _run(self) -> None:
        last_t, last_w = time.monotonic(), self.read_w()
        stopped = False
        while not stopped:
            stopped = self.stopping.wait(self.interval_s)
            t, w = time.monotonic(), self.read_w()
            if w is not None and last_w is not None:
                self.joules += (w + last_w) / 2 * (t - last_t)
                self.samples += 1
            last_t, last_w = t, w if w is not None else last_w


class EnergyMeter:
    """Energy used by one GPU between start() and stop(). Build it with `energy_meter(device)`. A meter
    dropped without stop() (a run ended by an exception) stops its sampling thread when collected."""

    def __init__(self, nvml, handle, interval_s: float = 0.1):
        self.nvml, self.handle, self.interval_s = nvml, handle, interval_s
        self.counter_mj: int | None = None  # the energy counter at start; None: sampling power instead
        self._power: _PowerIntegral | None = None
        self._t0 = 0.0

    def start(self) -> EnergyMeter:
        self._t0 = time.monotonic()
        try:
            self.counter_mj = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception:  # not supported on this GPU: sample the power draw
            self.counter_mj = None
            self._power = _PowerIntegral(functools.partial(_power_w, self.nvml, self.handle), self.interval_s)
            weakref.finalize(self, self._power.stopping.set)  # the thread holds no reference to the meter
            self._power.thread.start()
        return self

    def stop(self) -> dict[str, float] | None:
        """{"joules", "seconds"} since start(), or None when NVML could not measure."""
        try:
            if self._power is None:
                joules = (self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self.counter_mj) / 1000.0
            else:
                self._power.stopping.set()
                self._power.thread.join()
                if not self._power.samples:
                    return None
                joules = self._power.joules
            seconds = time.monotonic() - self._t0  # after the last reading: it covers no more than this
        except Exception:
            return None
        finally:
            _shutdown(self.nvml)
        return {"joules": joules, "seconds": seconds}


def _shutdown(nvml) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception:
        pass


def energy_meter(device: torch.device, interval_s: float = 0.1) -> EnergyMeter | None:
    """A started meter for `device`, or None (quietly) without pynvml, on a non-CUDA device, or when NVML
    cannot be initialized."""
    if device.type != "cuda":
        return None
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        nvml.nvmlInit()
    except Exception:
        return None
    try:
        handle = _handle(nvml, device)
    except Exception:
        _shutdown(nvml)
        return None
    return EnergyMeter(nvml, handle, interval_s).start()


def energy_report(joules: float, seconds: float, tokens: int, price_per_hour: float | None = None) -> dict[str, Any]:
    """The numbers written at the end of a run: joules (all GPUs), kWh, joules per token, mean power,
    hours and, with a price per hour, the cost (price_per_hour x hours; hours of wall time measured)."""
    hours = seconds / 3600
    report = {
        "energy_j": round(joules, 3),
        "energy_kwh": joules / JOULES_PER_KWH,
        "joules_per_token": joules / tokens if tokens else None,
        "mean_power_w": round(joules / seconds, 2) if seconds > 0 else None,
        "hours": hours,
    }
    if price_per_hour is not None:
        report["price_per_hour"] = price_per_hour
        report["cost"] = price_per_hour * hours
    return report


def finish_meter(meter: EnergyMeter | None, tokens: int, price_per_hour: float | None, world=None) -> dict[str, Any] | None:
    """Stop `meter` and report for `tokens`, summing the joules of every process's GPU when `world` (a
    collective then: every rank calls it, with or without a meter). None when no process measured."""
    measured = meter.stop() if meter is not None else None
    parts = world.gather_json(measured) if world is not None else [measured]
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    joules = sum(p["joules"] for p in parts)
    seconds = max(p["seconds"] for p in parts)
    return {**energy_report(joules, seconds, tokens, price_per_hour), "gpus": len(parts)}
