"""`gptforge bench --ablate`: the speed ladder, one switch at a time, each measured on the real step.

The rungs, in order:

    fp32 -> tf32 -> bf16 -> flash attention -> fused AdamW -> compile -> fused kernels -> fp8

The rule: every rung adds its switch to the best configuration so far (the last kept rung) and is kept only
if its tokens/s beat that configuration's. A rung that does not help is still measured and shown, with its
gain against the last kept rung and against the first, and the ladder goes on without it. So on a CPU
without native bf16, bf16 runs, shows as a loss, and the later rungs build on fp32. Memory is reported, not
ranked: a rung that saves memory but costs speed is not kept.

A rung the device cannot run is skipped, with the reason (tf32 and fp8 off CUDA, for instance). A rung that
is already on at every rung is marked automatic: on a CPU, scaled_dot_product_attention picks its best
kernel by itself. On CUDA the rungs before flash attention run with SDPA restricted to its math backend
(attention as a plain PyTorch module would compute it); the flash rung lifts that restriction, which is how
its gain is measured. Every other rung is a config switch: the fp32 rung turns them all off (AdamW included:
optim.fused=false, torch's loop over the parameters) and each later rung turns its own on.

Every rung runs in a fresh process (`python -m gptforge.bench.ablate`) that calls the same
gptforge.bench.step.bench() as `gptforge bench`: data, forward, backward, optimizer, timed after a warm-up.
A fresh process gives each rung its own peak memory (a process's peak resident memory on a CPU never goes
down) and keeps one rung's compile caches and backend flags from reaching the next.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from gptforge.errors import GptforgeError
from gptforge.progress import clock_text, eta_s

RULE = ("cumulative: each rung adds its switch to the best configuration so far and is kept only if its tokens/s "
        "beat that configuration's; memory is reported, not ranked")


@dataclasses.dataclass(frozen=True)
class Rung:
    name: str
    label: str
    overrides: tuple[str, ...] = ()
    flash: bool = False  # lift the math-only attention restriction (CUDA)


LADDER: tuple[Rung, ...] = (
    Rung("fp32", "fp32", ("speed.precision=fp32", "optim.fused=false", "speed.compile=false",
                          "speed.fused_kernels=false", "speed.fused_ce=false", "speed.fp8=false")),
    Rung("tf32", "tf32 matmuls", ("speed.precision=tf32",)),
    Rung("bf16", "bf16 autocast", ("speed.precision=bf16",)),
    Rung("flash", "flash attention", flash=True),
    Rung("fused_adamw", "fused AdamW", ("optim.fused=true",)),
    Rung("compile", "torch.compile", ("speed.compile=true",)),
    Rung("fused_kernels", "fused kernels + CE", ("speed.fused_kernels=true", "speed.fused_ce=true")),
    Rung("fp8", "fp8 linears", ("speed.fp8=true",)),
)
RUNG_NAMES = tuple(r.name for r in LADDER)


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    type: str  # cpu | cuda | mps
    name: str
    capability: tuple[int, int] | None = None
    native_bf16: bool = False
    fused_adamw_cpu: bool = False
    torchao: bool = False
    triton_runs: bool = False
    compiler: bool = True


def device_info(device: torch.device) -> DeviceInfo:
    from gptforge.observe.doctor import probe_fused_adamw
    from gptforge.observe.hardware import device_name
    from gptforge.runtime import capabilities

    caps = capabilities(device)  # the probe precision and the fp8 check read too
    if device.type == "cuda":
        return DeviceInfo("cuda", device_name(device), caps.cuda_capability, native_bf16=caps.native_bf16,
                          torchao=caps.torchao_float8 is not None, triton_runs=caps.triton is not None)
    compiler = any(shutil.which(c) for c in ("c++", "g++", "clang++", "cc", "gcc", "clang"))
    return DeviceInfo(device.type, device_name(device), None, native_bf16=caps.native_bf16,
                      fused_adamw_cpu=probe_fused_adamw()["cpu"], compiler=compiler)


def availability(rung: Rung, dev: DeviceInfo, optimizer: str) -> tuple[str, str, str]:
    """(status, reason, note) before running: status is run, skipped or automatic; note explains a run."""
    cuda, cap = dev.type == "cuda", dev.capability
    sm = f"sm_{cap[0]}{cap[1]}" if cap else ""
    if rung.name == "tf32":
        if not cuda:
            return "skipped", f"TF32 needs a CUDA GPU with tensor cores; this device is {dev.type}", ""
        if cap < (8, 0):
            return "skipped", f"{dev.name} ({sm}) has no TF32 tensor cores (Ampere and newer)", ""
    if rung.name == "bf16":
        if cuda and not dev.native_bf16:
            return "skipped", f"{dev.name} ({sm}) has no native bf16 (Ampere and newer)", ""
        if dev.type == "cpu" and not dev.native_bf16:
            return "run", "", "this CPU has no native bf16 (no AVX512-BF16 or AMX): emulated, expect a loss"
    if rung.name == "flash":
        if not cuda:
            return "automatic", f"scaled_dot_product_attention already picks its best kernel on {dev.type}", ""
        return "run", "", "the rungs before ran SDPA's math backend; this one lets SDPA pick flash"
    if rung.name == "fused_adamw":
        if optimizer != "adamw":
            return "skipped", f"optim.name={optimizer}: its AdamW part is not the fused kernel", ""
        if dev.type not in ("cuda", "cpu"):
            return "skipped", f"optim.fused applies on CUDA and CPU only; this device is {dev.type}", ""
        if dev.type == "cpu" and not dev.fused_adamw_cpu:
            return "skipped", "torch's fused AdamW does not run on this CPU", ""
        return "run", "", "the rungs before ran AdamW as torch's loop over the parameters (optim.fused=false)"
    if rung.name == "compile":
        if dev.type == "cpu" and not dev.compiler:
            return "skipped", "no C/C++ compiler on PATH: torch.compile (inductor) needs one on a CPU", ""
    if rung.name == "fused_kernels":
        if not (cuda and dev.triton_runs):
            return "run", "", "Triton cannot run here: the PyTorch reference path of the fused kernels and chunked CE"
    if rung.name == "fp8":
        if not cuda:
            return "skipped", f"fp8 needs a CUDA GPU with fp8 tensor cores (sm_89+); this device is {dev.type}", ""
        if cap < (8, 9):
            return "skipped", f"{dev.name} ({sm}) has no fp8 tensor cores (sm_89+)", ""
        if not dev.torchao:
            return "skipped", "torchao is not installed (pip install 'gptforge[fp8]')", ""
    return "run", "", ""


# ----------------------------------------------------------------------------------------------------------
# The ladder


@dataclasses.dataclass
class _State:
    overrides: list[str]
    flash: bool


RunRung = Callable[[dict[str, Any]], dict[str, Any]]


def ablate(overrides: list[str], steps: int = 5, warmup: int = 2, skip: tuple[str, ...] = (),
           config: str | None = None, run_rung: RunRung | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Climb the ladder on the device train.device picks; return every rung's record and the summary."""
    from gptforge.config import load_config
    from gptforge.observe.environment import environment
    from gptforge.runtime import pick_device

    unknown = [s for s in skip if s not in RUNG_NAMES]
    if unknown:
        raise GptforgeError(f"--skip {','.join(unknown)}: not a rung; the rungs are {', '.join(RUNG_NAMES)}")
    if "fp32" in skip:
        raise GptforgeError("--skip fp32: the fp32 rung is the base every other rung is measured against")
    base = load_config(config, overrides)  # a bad key fails here, before any process starts
    device = pick_device(base.train.device)
    dev = device_info(device)
    run_rung = run_rung or _run_in_fresh_process
    rungs: list[dict[str, Any]] = []
    state = _State(overrides=[], flash=dev.type != "cuda")
    first: dict[str, Any] | None = None
    kept_rec: dict[str, Any] | None = None

    started = time.perf_counter()
    for number, rung in enumerate(LADDER):
        status, reason, note = availability(rung, dev, base.optim.name)
        if rung.name in skip:
            status, reason = "skipped", f"skipped on request (--skip {rung.name})"
        entry: dict[str, Any] = {"rung": rung.name, "label": rung.label, "switch": list(rung.overrides),
                                 "status": status, "reason": reason, "note": note, "kept": False}
        if status != "run":
            log(f"{rung.label}: {status} ({reason})")
            rungs.append(entry)
            continue
        trial = _State(overrides=state.overrides + list(rung.overrides), flash=state.flash or rung.flash)
        spec = {"config": config, "overrides": list(overrides) + trial.overrides, "steps": steps, "warmup": warmup,
                "math_attention": not trial.flash}
        elapsed = time.perf_counter() - started
        log(f"{rung.label}: running {steps} steps after {warmup} warm-up (rung {number + 1} of {len(LADDER)}; "
            f"elapsed {clock_text(elapsed)}, eta {clock_text(eta_s(elapsed, number / len(LADDER)))}) ...")
        start = time.perf_counter()
        try:
            record = run_rung(spec)
        except GptforgeError as exc:
            if first is None:
                raise GptforgeError(f"the {rung.label} base rung failed: {exc}") from None
            entry.update(status="failed", reason=str(exc))
            log(f"{rung.label}: failed ({exc})")
            rungs.append(entry)
            continue
        entry.update(
            spec=spec,
            wall_s=time.perf_counter() - start,
            tokens_per_sec=record["tokens_per_sec"],
            step_ms=1000 * record["median_step_s"],
            peak_mem_gb=record["peak_mem_gb"],
            warnings=record.get("warnings", []),
            record=record,
        )
        status = entry["status"] = "ran"
        if first is None:
            first = kept_rec = entry
            entry["kept"] = True
        else:
            entry["vs_kept"] = _ratios(entry, kept_rec)
            entry["vs_first"] = _ratios(entry, first)
            entry["against"] = kept_rec["rung"]
            entry["kept"] = entry["tokens_per_sec"] > kept_rec["tokens_per_sec"]
        if entry["kept"]:
            state, kept_rec = trial, entry
        log(f"{rung.label}: {entry['tokens_per_sec']:,.0f} tokens/s, {entry['step_ms']:.1f} ms/step"
            f"{'' if entry['kept'] else ' (not kept)'}")
        rungs.append(entry)

    assert first is not None and kept_rec is not None
    best_switches = _collapse(state.overrides)
    summary = {
        "first": {k: first[k] for k in ("rung", "tokens_per_sec", "peak_mem_gb")},
        "best": {**{k: kept_rec[k] for k in ("rung", "tokens_per_sec", "peak_mem_gb")}, "switches": best_switches,
                 "flash_attention": "automatic" if dev.type != "cuda" else state.flash},
        "speedup": kept_rec["tokens_per_sec"] / first["tokens_per_sec"],
        "memory_ratio": kept_rec["peak_mem_gb"] / first["peak_mem_gb"] if first["peak_mem_gb"] else None,
        **{group: [r["rung"] for r in rungs if _group(r) == group]
           for group in ("kept", "not_kept", "failed", "skipped", "automatic")},
    }
    return {
        **environment(device, "ladder", 1),
        "device_info": dataclasses.asdict(dev),
        "overrides": list(overrides),
        "config_file": config,
        "steps": steps,
        "warmup": warmup,
        "rule": RULE,
        "rungs": rungs,
        "summary": summary,
    }


def _group(entry: dict[str, Any]) -> str:
    if entry["status"] == "ran":
        return "kept" if entry["kept"] else "not_kept"
    return entry["status"]


def _ratios(entry: dict[str, Any], other: dict[str, Any]) -> dict[str, float | None]:
    mem = entry["peak_mem_gb"] / other["peak_mem_gb"] if other["peak_mem_gb"] else None
    return {"speed": entry["tokens_per_sec"] / other["tokens_per_sec"], "memory": mem}


def _collapse(overrides: list[str]) -> list[str]:
    """key=value switches with later values winning, in first-set order."""
    values: dict[str, str] = {}
    for item in overrides:
        key, value = item.split("=", 1)
        values[key] = value
    return [f"{k}={v}" for k, v in values.items()]


# ----------------------------------------------------------------------------------------------------------
# One rung in a fresh process


def _run_in_fresh_process(spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "record.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-m", "gptforge.bench.ablate", str(spec_path), str(out_path)],
                              capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode != 0 or not out_path.is_file():
            raise GptforgeError(_failure(proc.stderr) or f"exit code {proc.returncode}")
        return json.loads(out_path.read_text())


def _failure(stderr: str) -> str:
    """The line that says what went wrong: the exception at the end of a traceback, or the last line."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line.split(":", 1)[0] or "Exception" in line.split(":", 1)[0]:
            return line[:500]
    return lines[-1][:500] if lines else ""


def run_rung_here(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one rung in this process: bench() with the rung's config, under its attention backend."""
    from gptforge.bench import step
    from gptforge.config import load_config

    cfg = load_config(spec["config"], spec["overrides"])
    with contextlib.ExitStack() as stack:
        if spec["math_attention"]:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        record = step.bench(cfg, steps=spec["steps"], warmup=spec["warmup"])
    record["warnings"] = sorted({str(w.message) for w in caught
                                 if "gptforge" in w.filename and not issubclass(w.category, ResourceWarning)})
    return record


def _child(argv: list[str]) -> int:
    spec_path, out_path = argv
    try:
        record = run_rung_here(json.loads(Path(spec_path).read_text()))
    except GptforgeError as exc:
        print(f"GptforgeError: {exc}", file=sys.stderr)
        return 2
    from gptforge.bench.step import write_json

    write_json(record, out_path)
    return 0


# ----------------------------------------------------------------------------------------------------------
# Output


def print_ablation(report: dict[str, Any], out: Callable[[str], None] = print) -> None:
    s = report["summary"]
    out(f"\n{report['device']} ({report['device_type']}), {report['steps']} timed steps after {report['warmup']} "
        "warm-up per rung")
    out(f"rule: {report['rule']}")
    out(f"{'rung':<20} {'status':<10} {'tokens/s':>10} {'step ms':>9} {'peak GB':>8}  {'vs kept (speed, mem)':<30} "
        f"{'vs first (speed, mem)':<22} kept")
    for r in report["rungs"]:
        if r["status"] != "ran":
            out(f"{r['label']:<20} {r['status']:<10} {r['reason']}")
            continue
        vk = _pair(r.get("vs_kept")) + (f" vs {r['against']}" if r.get("against") else "")
        vf = _pair(r.get("vs_first"))
        kept = "base" if r.get("vs_first") is None else ("yes" if r["kept"] else "no")
        out(f"{r['label']:<20} {'ran':<10} {r['tokens_per_sec']:>10,.0f} {r['step_ms']:>9.1f} {r['peak_mem_gb']:>8.2f}  "
            f"{vk:<30} {vf:<22} {kept}")
        if r.get("note"):
            out(f"{'':<20} {'':<10} note: {r['note']}")
    out(f"best: {s['best']['rung']} at {s['best']['tokens_per_sec']:,.0f} tokens/s, {s['speedup']:.2f}x the "
        f"{s['first']['rung']} rung; switches: {' '.join(s['best']['switches'])}")


def _pair(ratios: dict[str, float | None] | None) -> str:
    if not ratios:
        return "-"
    mem = f"{ratios['memory']:.2f}x" if ratios.get("memory") else "n/a"
    return f"{ratios['speed']:.2f}x, {mem}"


def write_chart(report: dict[str, Any], path: str | Path) -> str | None:
    """Bar charts of tokens/s and peak memory per rung; returns a message instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart (pip install 'gptforge[plot]')"
    rungs = report["rungs"]
    labels = [r["label"] for r in rungs]
    ys = range(len(rungs))[::-1]
    colors = ["tab:green" if r["kept"] else ("tab:gray" if r["status"] == "ran" else "white") for r in rungs]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rungs) + 1.6), sharey=True)
    for ax, key, title in ((axes[0], "tokens_per_sec", "tokens/s (higher is better)"),
                           (axes[1], "peak_mem_gb", "peak memory, GB")):
        values = [r.get(key) or 0.0 for r in rungs]
        ax.barh(list(ys), values, color=colors, edgecolor="black", linewidth=0.5)
        top = max(values) or 1.0
        for y, r, v in zip(ys, rungs, values):
            text = f"{v:,.0f}" if key == "tokens_per_sec" else f"{v:.2f}"
            if r["status"] != "ran":
                text = r["status"]
            elif key == "tokens_per_sec" and r.get("vs_first"):
                text += f"  ({r['vs_first']['speed']:.2f}x)"
            ax.text(v + 0.01 * top, y, text, va="center", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, top * 1.35)
    axes[0].set_yticks(list(ys))
    axes[0].set_yticklabels(labels)
    fig.suptitle(f"gptforge bench --ablate: {report['device']} ({report['device_type']}); green: kept, gray: not kept",
                 fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
