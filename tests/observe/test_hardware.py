import torch

from gptforge.observe import hardware


def test_peak_is_the_best_rate_ever_seen(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path))  # a machine that has measured nothing yet
    rates, calls = iter([50e9, 170e9, 40e9, 1e9]), []

    def measured(device, dtype, n, trials):
        calls.append((dtype, n, trials))
        return next(rates)

    monkeypatch.setattr(hardware, "measured_matmul_flops", measured)
    cpu = torch.device("cpu")
    assert hardware.peak_flops(cpu, "fp32") == 50e9
    assert hardware.peak_flops(cpu, "fp32") == 170e9
    assert hardware.peak_flops(cpu, "fp32") == 170e9  # a run on a busy machine does not lower it
    assert hardware.peak_flops(cpu, "bf16") == 1e9  # remembered per dtype
    # emulated half precision on a CPU is measured on a smaller matrix, in fewer trials
    assert calls == [(torch.float32, 1024, 8)] * 3 + [(torch.bfloat16, 256, 3)]


def test_measured_matmul_rate_is_positive():
    assert hardware.measured_matmul_flops(torch.device("cpu"), n=128, trials=2) > 0
