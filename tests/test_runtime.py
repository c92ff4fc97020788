"""precision=auto on both kinds of CPU, whatever this host is, and the RMSNorm fast path under bf16."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from gptforge.errors import ConfigError
from gptforge.model.gpt import RMSNorm
from gptforge.runtime import CPU_BF16_ENV, cpu_has_native_bf16, resolve_precision

CPU = torch.device("cpu")


def test_auto_is_fp32_on_a_cpu_without_native_bf16():
    assert not cpu_has_native_bf16()  # the suite pins this kind (tests/conftest.py)
    assert resolve_precision("auto", CPU).name == "fp32"


def test_auto_is_bf16_on_a_cpu_with_native_bf16(native_bf16_cpu):
    assert cpu_has_native_bf16()
    precision = resolve_precision("auto", CPU)
    assert precision.name == "bf16" and precision.grad_scaler() is None


def test_without_the_override_the_cpu_flags_decide(monkeypatch):
    monkeypatch.delenv(CPU_BF16_ENV)
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & set(flags))


def test_a_bad_override_is_a_config_error(monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(ConfigError, match=f"{CPU_BF16_ENV}='yes': expected 0 or 1"):
        resolve_precision("auto", CPU)


def test_rmsnorm_under_bf16_autocast_takes_the_fused_path_and_its_fp32_gain_learns():
    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-6)
    x = torch.randn(4, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns "Mismatch dtype between input and weight" on the slow path
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and norm.weight.dtype == torch.float32
    y.float().sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.dtype == torch.float32
    # the same values as nn.RMSNorm in fp32, to bf16's precision
    ref = torch.nn.RMSNorm(64, eps=1e-6)(x)
    torch.testing.assert_close(y.float(), ref.detach(), atol=3e-2, rtol=1e-2)
