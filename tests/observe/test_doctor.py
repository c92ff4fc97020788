"""`gptforge doctor`: the real quick check on this CPU, and recommendations that follow the facts, whatever
the machine (the probes are replaced to describe machines the tests do not run on)."""

import json
from pathlib import Path

import pytest
import torch

from gptforge.cli import main
from gptforge.config import load_config
from gptforge.observe import doctor
from gptforge.runtime import resolve_precision


def settings(report):
    return {r["key"]: r["value"] for r in report["recommendations"]}


def reasons(report):
    return {r["key"]: r["reason"] for r in report["recommendations"]}


def test_quick_doctor_on_this_machine(tmp_path, capsys):
    path = tmp_path / "doctor.json"
    assert main(["doctor", "--quick", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(path.read_text())
    facts = report["facts"]
    for part in ("environment", "cpu", "cuda", "mps", "distributed", "fused_adamw", "fp8", "triton", "compile", "bf16",
                 "rates"):
        assert part in facts, part
    assert facts["cpu"]["cores"] >= 1 and facts["compile"]["status"] == "skipped"
    rates = facts["rates"]
    assert rates["matmul_flops"]["fp32"] > 0 and rates["copy_gb_s"] > 0
    assert isinstance(facts["distributed"]["gloo"], bool) and isinstance(facts["distributed"]["nccl"], bool)
    keys = settings(report)
    for key in ("speed.precision", "speed.compile", "speed.fused_kernels", "speed.fused_ce", "speed.fp8",
                "speed.activation_checkpointing", "train.batch_size"):
        assert key in keys and reasons(report)[key], key
        assert f"{key}={keys[key]}" in printed
    # every recommendation is a valid setting, and the precision runs on this machine's device
    load_config(None, [f"{k}={v}" for k, v in keys.items()])
    device = torch.device(doctor.primary_device(facts))
    assert resolve_precision(keys["speed.precision"], device).name == keys["speed.precision"]
    assert {a["what"] for a in report["automatic"]} >= {"flash attention", "fused AdamW"}
    if device.type == "cpu":
        assert report["cpu_estimate"]["models"][0]["tokens_per_sec"] > 0
        assert "what trains here in 5 minutes" in printed
        assert ("bf16" in rates["matmul_flops"]) and keys["speed.precision"] == (
            "fp32" if not facts["cpu"]["native_bf16"] else keys["speed.precision"])


# ----------------------------------------------------------------------------------------------------------
# Machines described by replaced probes


def fake_cpu(native_bf16):
    def probe():
        return {"name": "Test CPU, 8 cores", "machine": "x86_64", "cores": 8, "threads": 8, "memory_gb": 32.0,
                "flags": {"avx2": True, "avx512f": native_bf16, "avx512_bf16": native_bf16, "amx_bf16": False,
                          "amx_tile": False}, "native_bf16": native_bf16}
    return probe


def fake_rates(**matmul):
    def measure(device, facts, quick):
        return {"device": device.type, "threads": 8, "matmul_n": 512, "matmul_flops": dict(matmul), "copy_gb_s": 10.0}
    return measure


def no_gpu(monkeypatch):
    monkeypatch.setattr(doctor, "probe_cuda", lambda: {"build": None, "available": False, "devices": []})
    monkeypatch.setattr(doctor, "probe_mps", lambda: {"available": False})


def fake_gpu(monkeypatch, name, cap, memory_gb=80.0):
    gpu = {"index": 0, "name": name, "capability": list(cap), "memory_gb": memory_gb, "sm_count": 132,
           "bf16": cap >= (8, 0), "tf32": cap >= (8, 0), "fp8": cap >= (8, 9)}
    monkeypatch.setattr(doctor, "probe_cuda", lambda: {"build": "12.8", "available": True, "devices": [gpu]})
    monkeypatch.setattr(doctor, "probe_mps", lambda: {"available": False})
    monkeypatch.setattr(doctor, "probe_distributed", lambda: {"available": True, "nccl": True, "gloo": True})


def test_cpu_without_native_bf16_gets_fp32_with_the_measured_ratio(monkeypatch):
    no_gpu(monkeypatch)
    monkeypatch.setattr(doctor, "probe_cpu", fake_cpu(native_bf16=False))
    monkeypatch.setattr(doctor, "measure_rates", fake_rates(fp32=150e9, bf16=1e9))
    report = doctor.doctor(quick=True)
    s, why = settings(report), reasons(report)
    assert s["speed.precision"] == "fp32"
    assert "150x slower" in why["speed.precision"] and "no native bf16" in why["speed.precision"]
    assert s["speed.compile"] == "false" and s["speed.fused_kernels"] == "false" and s["speed.fp8"] == "false"
    assert s["train.batch_size"] == "16" and s["speed.activation_checkpointing"] == "none"
    assert report["facts"]["bf16"]["cpu"] == "emulated"
    est = report["cpu_estimate"]
    assert [m["model"] for m in est["models"]] == ["tiny", "default", "small"]
    # at an assumed half of 150 GFLOP/s, a bigger model sees fewer tokens in the same five minutes
    tokens = [m["tokens_in_5_min"] for m in est["models"]]
    assert tokens == sorted(tokens, reverse=True) and "assumed" in est["basis"]


def test_cpu_with_native_bf16_gets_bf16_only_when_it_measured_faster(monkeypatch):
    no_gpu(monkeypatch)
    monkeypatch.setattr(doctor, "probe_cpu", fake_cpu(native_bf16=True))
    monkeypatch.setattr(doctor, "measure_rates", fake_rates(fp32=100e9, bf16=300e9))
    assert settings(doctor.doctor(quick=True))["speed.precision"] == "bf16"
    monkeypatch.setattr(doctor, "measure_rates", fake_rates(fp32=100e9, bf16=50e9))
    report = doctor.doctor(quick=True)
    assert settings(report)["speed.precision"] == "fp32"
    assert "auto would pick bf16" in reasons(report)["speed.precision"]


def test_hopper_gpu_gets_the_gpu_settings(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    monkeypatch.setattr(doctor, "measure_rates", fake_rates(fp32=50e12, tf32=400e12, bf16=700e12))
    monkeypatch.setattr(doctor, "probe_triton", lambda cuda, quick: {
        "importable": True, "version": "3.4.0", "can_run": True, "how": "gpu", "reason": "a CUDA GPU is present"})
    monkeypatch.setattr(doctor, "torchao_float8", lambda: None)  # no torchao
    report = doctor.doctor(quick=True)
    s = settings(report)
    assert s["speed.precision"] == "bf16" and "14.0x fp32" in reasons(report)["speed.precision"]
    assert s["speed.compile"] == "true" and s["speed.fused_kernels"] == "true" and s["speed.fused_ce"] == "true"
    assert s["train.batch_size"] == "auto" and s["speed.sync_free"] == "true"
    assert s["speed.fp8"] == "false" and "torchao" in reasons(report)["speed.fp8"]
    assert report["cpu_estimate"] is None
    load_config(None, [f"{k}={v}" for k, v in s.items()])

    monkeypatch.setattr(doctor, "torchao_float8", lambda: "0.9.0")  # torchao installed
    report = doctor.doctor(quick=True)
    assert settings(report)["speed.fp8"] == "true" and report["facts"]["fp8"]["available"]


def test_older_gpu_gets_fp16_and_no_fp8(monkeypatch):
    fake_gpu(monkeypatch, "Tesla T4", (7, 5), memory_gb=15.0)
    monkeypatch.setattr(doctor, "measure_rates", fake_rates(fp32=8e12, fp16=60e12))
    monkeypatch.setattr(doctor, "probe_triton", lambda cuda, quick: {
        "importable": False, "version": None, "can_run": False, "how": None, "reason": "not installed"})
    report = doctor.doctor(quick=True)
    s, why = settings(report), reasons(report)
    assert s["speed.precision"] == "fp16" and "no native bf16" in why["speed.precision"]
    assert s["speed.fp8"] == "false" and "sm_75" in why["speed.fp8"]
    assert s["speed.fused_kernels"] == "false" and "not installed" in why["speed.fused_kernels"]
    assert report["facts"]["bf16"]["gpu"] is False


def test_compile_without_a_compiler_is_reported_unavailable(monkeypatch):
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)
    result = doctor.probe_compile("cpu", quick=False)
    assert result["status"] == "unavailable" and "compiler" in result["reason"]
    facts = {"cuda": {"devices": []}, "mps": {"available": False}, "cpu": {"native_bf16": False},
             "compile": result, "triton": {"can_run": False, "how": None, "reason": "no GPU", "version": None},
             "fp8": {"available": False, "reason": "no GPU"}, "distributed": {"nccl": False, "gloo": True},
             "fused_adamw": {"cpu": True, "cuda": False}, "rates": {"matmul_flops": {"fp32": 1e11}}}
    recs, _ = doctor.recommend(facts)
    compile_rec = next(r for r in recs if r["key"] == "speed.compile")
    assert compile_rec["value"] == "false" and "unavailable" in compile_rec["reason"]


def test_fused_adamw_is_the_default_where_it_runs(monkeypatch):
    no_gpu(monkeypatch)
    monkeypatch.setattr(doctor, "probe_cpu", fake_cpu(native_bf16=False))
    monkeypatch.setattr(doctor, "measure_rates", fake_rates(fp32=100e9, bf16=1e9))

    def fused_text(report):
        return next(a["reason"] for a in report["automatic"] if a["what"] == "fused AdamW")

    monkeypatch.setattr(doctor, "probe_fused_adamw", lambda: {"cpu": True, "cuda": False})
    report = doctor.doctor(quick=True)
    assert "optim.fused" not in settings(report)  # the default runs here: nothing to set
    assert "optim.fused=true (the default)" in fused_text(report) and "this CPU" in fused_text(report)

    monkeypatch.setattr(doctor, "probe_fused_adamw", lambda: {"cpu": False, "cuda": False})
    report = doctor.doctor(quick=True)
    assert settings(report)["optim.fused"] == "false"
    assert "does not run on this CPU" in reasons(report)["optim.fused"]
    load_config(None, [f"{k}={v}" for k, v in settings(report).items()])

    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    monkeypatch.setattr(doctor, "measure_rates", fake_rates(fp32=50e12, bf16=700e12))
    monkeypatch.setattr(doctor, "probe_fused_adamw", lambda: {"cpu": True, "cuda": True})
    report = doctor.doctor(quick=True)
    assert "optim.fused" not in settings(report)
    assert "optim.fused=true (the default)" in fused_text(report) and "kernel launch" in fused_text(report)


def test_the_rate_loops_measure_something():
    cpu = torch.device("cpu")
    assert doctor.matmul_rate(cpu, torch.float32, 64, 0.01) > 0
    assert doctor.copy_bandwidth(cpu, 1 << 20, 0.01) > 0


TABLE = {"device": "a test CPU", "points": [{"tokens": 100_000, "val_loss": 6.0, "precision": "fp32"},
                                            {"tokens": 400_000, "val_loss": 5.0, "precision": "fp32"},
                                            {"tokens": 1_600_000, "val_loss": 4.0, "precision": "bf16"}]}


@pytest.mark.parametrize("tokens_per_sec, loss, bound", [
    (400_000 / 300, 5.0, None),  # on a measured budget: its loss
    (200_000 / 300, 5.5, None),  # halfway in log tokens between 100k and 400k
    (800_000 / 300, 4.5, None),
    (50_000 / 300, 6.0, "at least"),  # fewer tokens than any measured budget: no better than the smallest
    (9_000_000 / 300, 4.0, "at most"),
])
def test_main_job_forecast_interpolates_in_log_tokens(tokens_per_sec, loss, bound):
    forecast = doctor.main_job_forecast(tokens_per_sec, "fp32", TABLE)
    assert forecast["tokens"] == pytest.approx(tokens_per_sec * 300)
    assert forecast["val_loss"] == pytest.approx(loss) and forecast["bound"] == bound
    assert forecast["table_tokens"] == [100_000, 1_600_000] and forecast["table_precisions"] == ["bf16", "fp32"]


def test_the_packaged_curve_is_the_benchmark_record():
    """The table doctor reads is the one benchmarks/main_job_curve.py measured, falling with more tokens."""
    table = json.loads(doctor.MAIN_JOB_CURVE.read_text())
    record = json.loads((Path(__file__).parents[2] / "benchmarks/results/main_job_curve_cpu.json").read_text())
    assert [(p["tokens"], p["val_loss"]) for p in table["points"]] == [(r["tokens"], r["val_loss"]) for r in record["rows"]]
    losses = [p["val_loss"] for p in table["points"]]
    assert len(losses) >= 3 and losses == sorted(losses, reverse=True)


def test_doctor_prints_the_main_job_forecast(capsys):
    report = doctor.doctor(quick=True)
    job = report["main_job"]
    assert job["tokens"] == pytest.approx(job["tokens_per_sec"] * 300) and 0 < job["val_loss"] < 10
    text = doctor.format_report(report)
    assert "the main job" in text and f"{job['val_loss']:.2f}" in text
