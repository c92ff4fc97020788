"""GPU energy through a fake NVML module: the energy counter, the power-sampling fallback, the report's
arithmetic, quiet None without pynvml or a GPU, and the records a run and a benchmark write."""

import sys
import types

import pytest
import torch

from gptforge.observe import energy
from gptforge.observe.energy import energy_meter, energy_report, finish_meter

CUDA = torch.device("cuda", 0)


class NVMLError(Exception):
    pass


def fake_nvml(monkeypatch, counter_mj=None, power_mw=250_000, fail_init=False):
    """A stand-in for pynvml. counter_mj: successive readings of the energy counter (None: unsupported)."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = NVMLError
    calls = {"init": 0, "shutdown": 0}

    def init():
        calls["init"] += 1
        if fail_init:
            raise NVMLError("driver not loaded")

    def shutdown():
        calls["shutdown"] += 1

    def by_uuid(uuid):
        raise NVMLError("not found")

    def energy_counter(handle):
        if counter_mj is None:
            raise NVMLError("not supported")
        return counter_mj.pop(0)

    nvml.nvmlInit, nvml.nvmlShutdown = init, shutdown
    nvml.nvmlDeviceGetHandleByUUID = by_uuid
    nvml.nvmlDeviceGetHandleByIndex = lambda index: f"gpu{index}"
    nvml.nvmlDeviceGetTotalEnergyConsumption = energy_counter
    nvml.nvmlDeviceGetPowerUsage = lambda handle: power_mw
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    return calls


def test_no_pynvml_or_no_gpu_is_quietly_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert energy_meter(CUDA) is None
    fake_nvml(monkeypatch)
    assert energy_meter(torch.device("cpu")) is None
    fake_nvml(monkeypatch, fail_init=True)
    assert energy_meter(CUDA) is None
    assert finish_meter(None, 1000, 2.0) is None


def test_the_energy_counter_is_preferred(monkeypatch):
    calls = fake_nvml(monkeypatch, counter_mj=[1_000_000, 1_051_000])
    meter = energy_meter(CUDA)
    assert meter.handle == "gpu0" and meter._power is None  # no sampling thread
    result = finish_meter(meter, tokens=1000, price_per_hour=3.6)
    assert result["energy_j"] == 51.0 and result["joules_per_token"] == pytest.approx(0.051)
    assert result["energy_kwh"] == pytest.approx(51 / 3.6e6)
    assert result["cost"] == pytest.approx(3.6 * result["hours"]) and result["gpus"] == 1
    assert calls == {"init": 1, "shutdown": 1}


def test_power_is_sampled_where_the_counter_is_unsupported(monkeypatch):
    fake_nvml(monkeypatch, counter_mj=None, power_mw=200_000)
    meter = energy_meter(CUDA, interval_s=0.001)
    assert meter._power is not None and meter._power.thread.is_alive()
    measured = meter.stop()
    assert not meter._power.thread.is_alive() and meter._power.samples >= 1
    assert 0 < measured["joules"] <= 200 * measured["seconds"] + 1e-9


def test_a_dropped_meter_stops_its_thread(monkeypatch):
    fake_nvml(monkeypatch, counter_mj=None)
    meter = energy_meter(CUDA, interval_s=0.001)
    thread = meter._power.thread
    del meter
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_report_arithmetic():
    report = energy_report(joules=7.2e6, seconds=7200, tokens=1_000_000, price_per_hour=2.5)
    assert report["energy_kwh"] == 2.0 and report["hours"] == 2.0 and report["cost"] == 5.0
    assert report["joules_per_token"] == 7.2 and report["mean_power_w"] == 1000.0
    assert "cost" not in energy_report(1.0, 1.0, 0) and energy_report(1.0, 1.0, 0)["joules_per_token"] is None


def started_fake_meter(monkeypatch):
    fake_nvml(monkeypatch, counter_mj=[0, 36_000_000])
    return energy.EnergyMeter(sys.modules["pynvml"], "gpu0").start()


def test_a_run_ends_with_an_energy_event(small_data, tmp_path, monkeypatch):
    from gptforge.config import load_config
    from gptforge.observe.metrics import read_metrics
    from gptforge.train import loop

    monkeypatch.setattr(loop, "energy_meter", lambda device: started_fake_meter(monkeypatch))
    loop.train(load_config(None, [
        "model.preset=tiny", "train.batch_size=4", "train.max_steps=2", "train.max_time=null", "train.samples=0",
        "eval.tokens=512", "run.tensorboard=false", "run.price_per_hour=1.5", f"data.dir={small_data}",
        f"run.dir={tmp_path / 'r'}",
    ]))
    events = [r for r in read_metrics(tmp_path / "r") if r.get("event") == "energy"]
    assert len(events) == 1
    assert events[0]["step"] == 2 and events[0]["energy_j"] == 36_000.0
    assert events[0]["joules_per_token"] == 36_000.0 / (2 * 4 * 64) and events[0]["price_per_hour"] == 1.5


def test_bench_record_has_energy(small_data, monkeypatch):
    from gptforge.bench import step
    from gptforge.config import load_config

    cfg = load_config(None, [f"data.dir={small_data}", "model.preset=tiny", "train.batch_size=4"])
    assert step.bench(cfg, steps=1, warmup=1)["energy"] is None  # a CPU
    monkeypatch.setattr(step, "energy_meter", lambda device: started_fake_meter(monkeypatch))
    record = step.bench(cfg, steps=2, warmup=1)
    assert record["energy"]["energy_j"] == 36_000.0 and record["energy"]["joules_per_token"] == 36_000.0 / (2 * 4 * 64)
