import pytest
import torch

from gptforge.observe import hardware


def test_peak_is_the_best_rate_ever_seen(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path))  # a machine that has measured nothing yet
    rates = iter([50e9, 170e9, 40e9, 1e9])
    monkeypatch.setattr(hardware, "measured_peak", lambda device, precision: next(rates))
    cpu = torch.device("cpu")
    assert hardware.peak_flops(cpu, "fp32") == 50e9
    assert hardware.peak_flops(cpu, "fp32") == 170e9
    assert hardware.peak_flops(cpu, "fp32") == 170e9  # a run on a busy machine does not lower it
    assert hardware.peak_flops(cpu, "bf16") == 1e9  # remembered per dtype


@pytest.mark.parametrize("rate, size", [(300e9, 1024), (100e9, 1024), (2e9, 256)])
def test_the_peak_matrix_grows_until_a_matmul_takes_10_ms(rate, size):
    """Native bf16 (AMX: hundreds of GFLOP/s) is measured on a large matrix, emulated bf16 (a few GFLOP/s)
    on a small one: the 256 x 256 bf16 matrix every CPU used to get measured 2 GFLOP/s where the hardware
    does hundreds, and MFU came out above 1000%."""
    assert hardware.matmul_size(lambda n: rate) == size


def test_cpu_peaks_are_measured_on_a_matrix_sized_for_the_dtype(monkeypatch):
    calls = []

    def measured(device, dtype, n, trials):  # native bf16: as fast as fp32, per FLOP
        calls.append((dtype, n, trials))
        return 100e9

    monkeypatch.setattr(hardware, "measured_matmul_flops", measured)
    assert hardware.measured_peak(torch.device("cpu"), "bf16") == 100e9
    assert calls[-1] == (torch.bfloat16, 1024, 8) and [n for _, n, _ in calls[:-1]] == [256, 512]


def test_an_mfu_above_100_percent_is_remeasured_once_then_unknown(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path))
    rates = iter([2e9, 400e9])  # measured on a busy moment, then again
    monkeypatch.setattr(hardware, "measured_peak", lambda device, precision: next(rates))
    peak = hardware.Peak(torch.device("cpu"), "bf16")
    assert peak.mfu(1e9) == 0.5
    assert peak.mfu(20e9) == pytest.approx(0.05)  # 1000% against the first figure: measured again
    assert peak.flops == 400e9
    assert peak.mfu(800e9) is None  # still above 100%: no figure rather than a false one


def test_measured_matmul_rate_is_positive():
    assert hardware.measured_matmul_flops(torch.device("cpu"), n=128, trials=2) > 0
