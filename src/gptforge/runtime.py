"""The device a run uses and what it can do: device choice, one capability probe, precision, synchronisation.

Capabilities are probed in one place (capabilities()) and read by precision, the fp8 check, `doctor` and
`bench --ablate`, so that they never disagree about a machine.

Precision: auto means what the device does well, not habit: bf16 autocast on GPUs with bf16, fp16 with a
gradient scaler on older GPUs, and on CPUs fp32 unless the CPU has native bf16 matrix instructions
(AVX512-BF16 or AMX). Without them, a bf16 matmul on a CPU is emulated and several times slower than fp32
(BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gptforge.errors import ConfigError

if TYPE_CHECKING:
    from gptforge.model.gpt import GPTConfig

FP8_INSTALL = "pip install 'gptforge[fp8]'"

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


CPU_BF16_ENV = "GPTFORGE_CPU_NATIVE_BF16"


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises bf16 matrix instructions (x86 AVX512-BF16 / AMX-BF16).

    `GPTFORGE_CPU_NATIVE_BF16=0` or `=1` overrides the probe: to reproduce on one CPU what `precision=auto`
    does on the other kind (the test suite pins it to 0, so its figures do not depend on the host)."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ConfigError(f"{CPU_BF16_ENV}={forced!r}: expected 0 or 1 (or unset, to ask the CPU)")
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


@dataclass(frozen=True)
class Capabilities:
    """What a device can do, as far as gptforge's switches care."""

    device_type: str  # cpu | cuda | mps
    cuda_capability: tuple[int, int] | None = None  # compute capability of a CUDA device
    native_bf16: bool = False  # bf16 matrix units: Ampere+ GPUs, CPUs with AVX512-BF16 or AMX
    tf32: bool = False  # TensorFloat-32 tensor cores (Ampere and newer)
    fp8_cores: bool = False  # fp8 tensor cores (sm_89+: Ada, Hopper and newer)
    torchao_float8: str | None = None  # torchao's version when its float8 training module imports
    triton: str | None = None  # triton's version, when installed

    @property
    def sm(self) -> str:
        return f"sm_{self.cuda_capability[0]}{self.cuda_capability[1]}" if self.cuda_capability else ""


def capabilities(device: torch.device) -> Capabilities:
    """The one capability probe: what `device` (and the software beside torch) can do."""
    software = dict(torchao_float8=torchao_float8(), triton=_version("triton"))
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        return Capabilities("cuda", cap, native_bf16=cap >= (8, 0), tf32=cap >= (8, 0), fp8_cores=cap >= (8, 9),
                            **software)
    return Capabilities(device.type, native_bf16=device.type == "cpu" and cpu_has_native_bf16(), **software)


def torchao_float8() -> str | None:
    """The torchao version when its float8 training module imports (what speed.fp8 uses), else None."""
    try:
        import torchao.float8  # noqa: F401
    except Exception:  # not installed, or an old or broken torchao that cannot run speed.fp8
        return None
    import torchao

    return _version("torchao") or getattr(torchao, "__version__", "unknown")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_fp8(device: torch.device) -> None:
    """Raise a ConfigError unless speed.fp8 can run here: torchao installed, a CUDA device of compute
    capability 8.9 or newer (Ada, Hopper, Blackwell: the GPUs with fp8 tensor cores)."""
    if torchao_float8() is None:
        raise ConfigError(f"speed.fp8=true needs torchao: {FP8_INSTALL}")
    if device.type != "cuda":
        raise ConfigError(f"speed.fp8=true needs a CUDA GPU; this device is {device.type} (fp8 needs Hopper/Ada (sm_89+))")
    caps = capabilities(device)
    if not caps.fp8_cores:
        raise ConfigError(f"speed.fp8=true: this GPU is {caps.sm}; fp8 needs Hopper/Ada (sm_89+). "
                          "Use speed.precision=bf16 instead")


def resolve_precision(name: str, device: torch.device) -> Precision:
    """Turn `speed.precision` into a concrete choice for this device, or explain why it cannot run here."""
    kind = device.type
    native_bf16 = capabilities(device).native_bf16 if kind in ("cuda", "cpu") else False
    if name == "auto":
        if kind == "cuda":
            name = "bf16" if native_bf16 else "fp16"
        elif kind == "cpu":
            name = "bf16" if native_bf16 else "fp32"
        else:
            name = "fp32"
    if name == "tf32" and kind != "cuda":
        raise ConfigError(f"speed.precision=tf32 needs a CUDA GPU (TensorFloat-32 tensor cores); this device is {kind}")
    if name == "fp16" and kind == "cpu":
        raise ConfigError("speed.precision=fp16 is for GPUs; on a CPU use fp32 (or bf16 where the CPU has native bf16)")
    if name == "bf16" and kind == "cuda" and not native_bf16:
        raise ConfigError("speed.precision=bf16: this GPU has no bf16 support; use fp16 or auto")
    if name == "bf16" and kind == "cpu" and not native_bf16:
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


def training_device(spec: str, world) -> torch.device:
    """train.device, with each process on its own GPU under torchrun."""
    device = pick_device(spec)
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", world.local_rank)
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, before reading a clock (a no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def memory_bytes(device: str | torch.device) -> int | None:
    """The total memory of a device: a GPU's own, the machine's physical memory for the CPU (None where the
    platform does not say)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(model: "GPTConfig", *, bytes_per_param: int, device: str | torch.device, what: str,
               shards: int = 1) -> None:
    """Fail before allocating a model that cannot fit: its parameter count, from its config with nothing built
    at size, times `bytes_per_param`, over `shards` processes that each hold a part (FSDP), against the total
    memory of `device`. A lower bound of what the work needs (activations come on top), so what passes may
    still not fit, and what fails never would."""
    from gptforge.model.flops import estimated_params

    params, limit = estimated_params(model), memory_bytes(device)
    need = params * bytes_per_param // shards
    if limit is not None and need > limit:
        raise ConfigError(
            f"model.n_layer={model.n_layer}, model.n_embd={model.n_embd}, model.vocab_size={model.vocab_size}: "
            f"{params:,} parameters, whose {what} alone ({bytes_per_param} bytes a parameter"
            f"{f', over {shards} shards' if shards > 1 else ''}) need "
            f"{need / 2**30:,.1f} GiB, more than the {limit / 2**30:,.1f} GiB of {torch.device(device)}; "
            "choose a smaller model"
        )


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
