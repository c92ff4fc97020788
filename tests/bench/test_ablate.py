"""`gptforge bench --ablate`: the ladder's keep / drop rule (with made-up speeds) and the real ladder on this CPU."""

import json

import pytest
import torch

from gptforge.bench import ablate as ab
from gptforge.cli import main
from gptforge.errors import GptforgeError
from gptforge.runtime import cpu_has_native_bf16

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=32", "train.batch_size=4"]
# the fused AdamW rung applies to optim.name=adamw only (the default, Muon, runs its AdamW part as its own loop)
ADAMW = [*TINY, "optim.name=adamw"]
CPU = ab.DeviceInfo("cpu", "Test CPU", None, native_bf16=False, fused_adamw_cpu=True, compiler=True)
H100 = ab.DeviceInfo("cuda", "NVIDIA H100", (9, 0), native_bf16=True, torchao=False, triton_runs=True)


def values(spec):
    """The spec's key=value overrides, later values winning, as load_config reads them."""
    return dict(item.split("=", 1) for item in spec["overrides"])


def fake_runner(speeds, failing=()):
    """A rung runner that reads the switches in the spec and returns made-up speeds: the product of the
    factors of every switch on, so a switch only counts while it is in the configuration."""
    seen = []

    def run(spec):
        seen.append(spec)
        v = values(spec)
        on = {
            "tf32": v["speed.precision"] == "tf32",
            "bf16": v["speed.precision"] == "bf16",
            "flash": not spec["math_attention"],
            "fused_adamw": v["optim.fused"] == "true",
            "compile": v["speed.compile"] == "true",
            "fused_kernels": v["speed.fused_kernels"] == "true",
        }
        for name in failing:
            if on.get(name):
                raise GptforgeError(f"{name} broke")
        tps = 1000.0
        mem = 1.0
        for name, factor in speeds.items():
            if on[name]:
                tps *= factor
                mem *= 0.9
        return {"tokens_per_sec": tps, "median_step_s": 128 / tps, "peak_mem_gb": mem, "warnings": []}

    return run, seen


def test_each_rung_is_kept_only_if_it_beats_the_best_so_far(monkeypatch, small_data):
    monkeypatch.setattr(ab, "device_info", lambda device: CPU)
    run, seen = fake_runner({"bf16": 0.1, "fused_adamw": 1.2, "compile": 1.5, "fused_kernels": 0.9})
    report = ab.ablate([f"data.dir={small_data}", *ADAMW], steps=1, warmup=1, run_rung=run, log=lambda m: None)
    by = {r["rung"]: r for r in report["rungs"]}
    assert [r["rung"] for r in report["rungs"]] == list(ab.RUNG_NAMES)
    assert report["summary"]["kept"] == ["fp32", "fused_adamw", "compile"]
    assert report["summary"]["not_kept"] == ["bf16", "fused_kernels"]
    assert report["summary"]["skipped"] == ["tf32", "fp8"] and report["summary"]["automatic"] == ["flash"]
    # bf16 was a loss: measured and shown, then left out of every later rung
    assert by["bf16"]["vs_first"]["speed"] == pytest.approx(0.1) and not by["bf16"]["kept"]
    assert "no native bf16" in by["bf16"]["note"]
    assert all("speed.precision=bf16" not in s["overrides"] for s in seen[2:])
    # fused AdamW is a config switch: off in the base and the rung before it, on from its rung on once kept
    assert [values(s)["optim.fused"] for s in seen] == ["false", "false", "true", "true", "true"]
    assert by["fused_adamw"]["switch"] == ["optim.fused=true"] and "fused_adamw" not in seen[2]
    # gains relative to the last kept rung and to the first
    assert by["compile"]["against"] == "fused_adamw"
    assert by["compile"]["vs_kept"]["speed"] == pytest.approx(1.5)
    assert by["compile"]["vs_first"]["speed"] == pytest.approx(1.8)
    assert by["compile"]["vs_kept"]["memory"] == pytest.approx(0.9)
    assert by["fused_kernels"]["vs_kept"]["speed"] == pytest.approx(0.9)
    assert report["summary"]["best"]["rung"] == "compile"
    assert report["summary"]["speedup"] == pytest.approx(1.8)
    assert "speed.compile=true" in report["summary"]["best"]["switches"]
    assert "speed.fused_kernels=false" in report["summary"]["best"]["switches"]
    assert "optim.fused=true" in report["summary"]["best"]["switches"]
    assert "optim.fused=false" not in report["summary"]["best"]["switches"]
    assert report["rule"].startswith("cumulative")
    for r in report["rungs"]:
        assert r["status"] == "ran" or r["reason"]


def test_with_the_default_muon_the_fused_adamw_rung_is_skipped(monkeypatch, small_data):
    """The ladder climbs with the user's optimizer: under Muon (the default) fused AdamW is reported, not run."""
    monkeypatch.setattr(ab, "device_info", lambda device: CPU)
    run, seen = fake_runner({"bf16": 0.1, "fused_adamw": 1.2, "compile": 1.5, "fused_kernels": 0.9})
    report = ab.ablate([f"data.dir={small_data}", *TINY], steps=1, warmup=1, run_rung=run, log=lambda m: None)
    by = {r["rung"]: r for r in report["rungs"]}
    assert by["fused_adamw"]["status"] == "skipped" and "muon" in by["fused_adamw"]["reason"]
    assert report["summary"]["skipped"] == ["tf32", "fused_adamw", "fp8"]
    assert report["summary"]["kept"] == ["fp32", "compile"]
    assert all(values(s)["optim.fused"] == "false" for s in seen)
    assert all("optim.name" not in values(s) or values(s)["optim.name"] == "muon" for s in seen)


def test_a_failing_rung_is_reported_and_the_ladder_goes_on(monkeypatch, small_data):
    monkeypatch.setattr(ab, "device_info", lambda device: CPU)
    run, _ = fake_runner({"bf16": 0.5, "fused_adamw": 1.1, "compile": 2.0, "fused_kernels": 1.1}, failing=("compile",))
    report = ab.ablate([f"data.dir={small_data}", *TINY], steps=1, warmup=1, run_rung=run, log=lambda m: None)
    by = {r["rung"]: r for r in report["rungs"]}
    assert by["compile"]["status"] == "failed" and "compile broke" in by["compile"]["reason"]
    assert by["fused_kernels"]["kept"] and report["summary"]["failed"] == ["compile"]

    run, _ = fake_runner({"bf16": 1, "fused_adamw": 1, "compile": 1, "fused_kernels": 1})
    with pytest.raises(GptforgeError, match="base rung failed"):
        ab.ablate([f"data.dir={small_data}", *TINY], run_rung=lambda spec: (_ for _ in ()).throw(GptforgeError("no")),
                  log=lambda m: None)
    with pytest.raises(GptforgeError, match="not a rung"):
        ab.ablate(TINY, skip=("warp_drive",), run_rung=run)


def test_what_a_device_can_and_cannot_run():
    h100 = H100
    t4 = ab.DeviceInfo("cuda", "Tesla T4", (7, 5), native_bf16=False, torchao=True, triton_runs=True)
    rung = {r.name: r for r in ab.LADDER}
    assert ab.availability(rung["tf32"], h100, "adamw")[0] == "run"
    assert ab.availability(rung["flash"], h100, "adamw")[0] == "run"
    status, reason, _ = ab.availability(rung["fp8"], h100, "adamw")
    assert status == "skipped" and "torchao" in reason
    assert ab.availability(rung["tf32"], t4, "adamw")[0] == "skipped"
    assert ab.availability(rung["bf16"], t4, "adamw")[0] == "skipped"
    assert "sm_75" in ab.availability(rung["fp8"], t4, "adamw")[1]
    # fused AdamW: a measured rung on CUDA and on a CPU whose torch has the kernel; not for Muon, MPS, or a CPU
    # where torch's fused kernel does not run
    assert ab.availability(rung["fused_adamw"], h100, "adamw")[0] == "run"
    assert ab.availability(rung["fused_adamw"], CPU, "adamw")[0] == "run"
    status, reason, _ = ab.availability(rung["fused_adamw"], CPU, "muon")
    assert status == "skipped" and "muon" in reason
    no_fused = ab.DeviceInfo("cpu", "Old CPU", None, fused_adamw_cpu=False)
    assert ab.availability(rung["fused_adamw"], no_fused, "adamw")[0] == "skipped"
    mps = ab.DeviceInfo("mps", "Apple M2", None)
    assert ab.availability(rung["fused_adamw"], mps, "adamw")[0] == "skipped"


def test_on_cuda_fused_adamw_is_measured_like_any_other_rung(monkeypatch, small_data):
    """On a GPU the fused AdamW rung is a plain switch too: if it does not pay, the later rungs go without it."""
    monkeypatch.setattr(ab, "device_info", lambda device: H100)
    run, seen = fake_runner({"tf32": 1.5, "bf16": 2.0, "flash": 1.4, "fused_adamw": 0.95, "compile": 1.2,
                             "fused_kernels": 1.1})
    report = ab.ablate([f"data.dir={small_data}", *ADAMW], steps=1, warmup=1, run_rung=run, log=lambda m: None)
    by = {r["rung"]: r for r in report["rungs"]}
    s = report["summary"]
    assert s["kept"] == ["fp32", "tf32", "bf16", "flash", "compile", "fused_kernels"]
    assert s["not_kept"] == ["fused_adamw"] and s["automatic"] == [] and s["skipped"] == ["fp8"]
    assert by["fused_adamw"]["against"] == "flash" and by["fused_adamw"]["vs_kept"]["speed"] == pytest.approx(0.95)
    ran = [r["rung"] for r in report["rungs"] if r["status"] == "ran"]
    fused = {name: values(spec)["optim.fused"] for name, spec in zip(ran, seen)}
    assert fused == {"fp32": "false", "tf32": "false", "bf16": "false", "flash": "false", "fused_adamw": "true",
                     "compile": "false", "fused_kernels": "false"}
    # SDPA's math backend until the flash rung, its own choice from there on
    assert [spec["math_attention"] for spec in seen] == [True, True, True, False, False, False, False]
    assert "optim.fused=false" in s["best"]["switches"] and s["best"]["flash_attention"] is True
    assert s["speedup"] == pytest.approx(2.0 * 1.4 * 1.2 * 1.1)  # bf16 replaced tf32: their gains do not stack


def test_the_ladder_runs_on_this_cpu(small_data, tmp_path, capsys):
    """Every rung a CPU can run trains the tiny model in its own process. torch.compile takes minutes to
    build the tiny model's kernels on a small CPU, so it is skipped here by request, and says so."""
    if torch.cuda.is_available():
        pytest.skip("the CPU ladder")
    out = tmp_path / "ablate.json"
    code = main(["bench", "--ablate", f"data.dir={small_data}", *ADAMW, "--steps=1", "--warmup=1", "--skip=compile",
                 f"--json={out}"])
    assert code == 0
    report = json.loads(out.read_text())
    assert (tmp_path / "ablate.png").stat().st_size > 1000
    by = {r["rung"]: r for r in report["rungs"]}
    assert list(by) == list(ab.RUNG_NAMES)
    for name in ("fp32", "bf16", "fused_adamw", "fused_kernels"):
        assert by[name]["status"] == "ran", (name, by[name]["reason"])
        assert by[name]["tokens_per_sec"] > 0 and by[name]["peak_mem_gb"] > 0
        assert len(by[name]["record"]["step_times_s"]) == 1
    assert by["compile"]["status"] == "skipped" and "--skip compile" in by["compile"]["reason"]
    assert by["tf32"]["status"] == "skipped" and "CUDA" in by["tf32"]["reason"]
    assert by["fp8"]["status"] == "skipped" and by["flash"]["status"] == "automatic"
    assert not report["summary"]["failed"]
    # the keep rule, on whatever this machine measured
    best = by["fp32"]
    for r in report["rungs"][1:]:
        if r["status"] != "ran":
            continue
        assert r["against"] == best["rung"]
        assert r["kept"] == (r["tokens_per_sec"] > best["tokens_per_sec"])
        if r["kept"]:
            best = r
    assert report["summary"]["best"]["rung"] == best["rung"]
    assert by["bf16"]["spec"]["overrides"][-1] == "speed.precision=bf16"
    assert "optim.fused=false" in by["fp32"]["spec"]["overrides"]
    assert values(by["fused_adamw"]["spec"])["optim.fused"] == "true"
    if not cpu_has_native_bf16():
        assert any("without native bf16" in w for w in by["bf16"]["warnings"])
    printed = capsys.readouterr().out
    assert "fused AdamW" in printed and "best:" in printed
