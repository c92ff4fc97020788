"""`gptforge doctor`: what this machine can do, measured, and the settings that follow from it.

Three parts, kept apart so each can be checked on its own:
- probes (`probe_*`, `measure_*`): facts about the devices and the software, and short timed loops
  (matmul FLOP/s per precision, device copy bandwidth, in full mode one real training step);
- `recommend(facts)`: config `key=value` lines with a one-line reason each, a pure function of the facts;
- `cpu_estimate(facts)`: without a GPU, what trains here in five minutes, so nobody expects a GPU's worth.

`--quick` skips the slow probes (the torch.compile trial, the Triton kernel trial, the training step) and
shortens the timed loops.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gptforge.runtime import capabilities, synchronize, torchao_float8

FIVE_MINUTES_S = 300.0
ASSUMED_MFU = 0.5  # fraction of the fp32 matmul rate a training step reaches, when no step was measured
CHINCHILLA_TOKENS_PER_PARAM = 20
COMPILE_TIMEOUT_S = 240


# ----------------------------------------------------------------------------------------------------------
# Probes: facts about the hardware and software


def probe_cpu() -> dict[str, Any]:
    from gptforge.observe.hardware import device_name

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    memory_gb = None
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "name": device_name(torch.device("cpu")),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "memory_gb": memory_gb,
        "flags": {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")},
        "native_bf16": capabilities(torch.device("cpu")).native_bf16,
    }


def probe_cuda() -> dict[str, Any]:
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            cap = (props.major, props.minor)
            caps = capabilities(torch.device("cuda", i))  # the probe precision and the fp8 check read
            devices.append({
                "index": i,
                "name": props.name,
                "capability": list(cap),
                "memory_gb": props.total_memory / 2**30,
                "sm_count": props.multi_processor_count,
                "bf16": caps.native_bf16,  # native bf16 tensor cores: Ampere and newer
                "tf32": caps.tf32,
                "fp8": caps.fp8_cores,  # fp8 tensor cores: Ada and Hopper and newer
            })
    return {"build": torch.version.cuda, "available": bool(devices), "devices": devices}


def probe_mps() -> dict[str, Any]:
    mps = getattr(torch.backends, "mps", None)
    return {"available": bool(mps is not None and mps.is_available())}


def probe_distributed() -> dict[str, Any]:
    import torch.distributed as dist

    available = dist.is_available()
    return {
        "available": available,
        "nccl": bool(available and dist.is_nccl_available()),
        "gloo": bool(available and dist.is_gloo_available()),
    }


def probe_fp8(cuda: dict[str, Any]) -> dict[str, Any]:
    torchao = torchao_float8()
    gpu = cuda["devices"][0] if cuda["devices"] else None
    if gpu is None:
        reason = "needs a CUDA GPU with compute capability 8.9+ (Ada, Hopper or newer)"
    elif not gpu["fp8"]:
        reason = f"{gpu['name']} is sm_{gpu['capability'][0]}{gpu['capability'][1]}; fp8 tensor cores need sm_89+"
    elif torchao is None:
        reason = "the GPU has fp8 tensor cores but torchao (with torchao.float8) is not installed (pip install 'gptforge[fp8]')"
    else:
        reason = f"sm_{gpu['capability'][0]}{gpu['capability'][1]} with torchao {torchao}"
    return {"available": gpu is not None and gpu["fp8"] and torchao is not None, "torchao": torchao, "reason": reason}


def probe_fused_adamw() -> dict[str, Any]:
    """Whether torch's fused AdamW kernel runs on the CPU (it always does on CUDA)."""
    try:
        p = torch.nn.Parameter(torch.zeros(4))
        p.grad = torch.ones(4)
        torch.optim.AdamW([p], fused=True).step()
        cpu = True
    except (RuntimeError, TypeError, ValueError):
        cpu = False
    return {"cpu": cpu, "cuda": torch.cuda.is_available(),
            "gptforge_uses": "on CUDA and CPU with optim.fused=true (the default)"}


_COMPILE_TRIAL = """
import sys, torch
device = sys.argv[1]
def f(x, w):
    return torch.nn.functional.gelu(x @ w).sum()
x = torch.randn(64, 64, device=device, requires_grad=True)
w = torch.randn(64, 64, device=device)
torch.compile(f)(x, w).backward()
print("ok")
"""


def probe_compile(device: str, quick: bool) -> dict[str, Any]:
    """Compile and run a tiny function (forward and backward) in a fresh process: the first compile on a
    machine also tells how long inductor takes here. A CPU needs a C++ compiler for it."""
    if quick:
        return {"status": "skipped", "reason": "not tried (--quick)", "seconds": None}
    if device == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++", "cc", "gcc", "clang")):
        return {"status": "unavailable", "reason": "no C/C++ compiler on PATH: inductor needs one on a CPU", "seconds": None}
    start = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-c", _COMPILE_TRIAL, device], capture_output=True, text=True,
                             timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"status": "unavailable", "reason": f"a tiny function did not compile within {COMPILE_TIMEOUT_S} s",
                "seconds": None}
    seconds = time.perf_counter() - start
    if out.returncode != 0 or "ok" not in out.stdout:
        return {"status": "unavailable", "reason": _last_line(out.stderr) or f"exit code {out.returncode}", "seconds": seconds}
    return {"status": "works", "reason": f"a tiny function compiled and ran in {seconds:.1f} s", "seconds": seconds}


def probe_triton(cuda: dict[str, Any], quick: bool) -> dict[str, Any]:
    version = _version_of("triton")
    if version is None:
        return {"importable": False, "version": None, "can_run": False, "how": None,
                "reason": "not installed (pip install 'gptforge[kernels]')"}
    info = {"importable": True, "version": version}
    if cuda["devices"]:
        if quick:
            return {**info, "can_run": True, "how": "gpu", "reason": "a CUDA GPU is present (kernel not tried: --quick)"}
        try:
            _triton_smoke()
        except Exception as exc:  # any failure to build or launch a kernel means: cannot run here
            return {**info, "can_run": False, "how": None, "reason": f"a test kernel failed: {_last_line(str(exc))}"}
        return {**info, "can_run": True, "how": "gpu", "reason": "a test kernel compiled and ran on the GPU"}
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {**info, "can_run": True, "how": "interpreter",
                "reason": "TRITON_INTERPRET=1: kernels run in the interpreter on the CPU, correct but slow (for tests)"}
    return {**info, "can_run": False, "how": None,
            "reason": "no GPU (TRITON_INTERPRET=1 runs kernels in a slow interpreter, for tests)"}


def _triton_smoke() -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)

    x = torch.zeros(1000, device="cuda")
    add_one[(triton.cdiv(1000, 256),)](x, 1000, BLOCK=256)
    torch.cuda.synchronize()
    if not bool((x == 1).all()):
        raise RuntimeError("the test kernel computed a wrong result")


# ----------------------------------------------------------------------------------------------------------
# Measurements: short timed loops


def measure_rates(device: torch.device, facts: dict[str, Any], quick: bool) -> dict[str, Any]:
    """Matmul FLOP/s in each precision the device has, and the copy bandwidth of its memory."""
    gpu = facts["cuda"]["devices"][0] if device.type == "cuda" else None
    n = (4096 if quick else 8192) if device.type != "cpu" else (512 if quick else 1024)
    budget = 0.3 if quick else 1.0
    rates: dict[str, float] = {"fp32": matmul_rate(device, torch.float32, n, budget)}
    if gpu is not None and gpu["tf32"]:
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            rates["tf32"] = matmul_rate(device, torch.float32, n, budget)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    half = []
    if device.type == "cpu" or gpu is None or gpu["bf16"]:
        half.append(("bf16", torch.bfloat16))
    if gpu is not None and not gpu["bf16"]:
        half.append(("fp16", torch.float16))
    for name, dtype in half:
        try:
            rates[name] = matmul_rate(device, dtype, n, budget)
        except (RuntimeError, TypeError):  # a device without kernels for this dtype: nothing to measure
            pass
    result: dict[str, Any] = {
        "device": device.type,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "matmul_n": n,
        "matmul_flops": rates,
        "copy_gb_s": copy_bandwidth(device, (256 if device.type != "cpu" else 64) * 2**20, budget),
    }
    if device.type == "cuda":
        result["host_to_device_gb_s"] = host_to_device_bandwidth(device, 64 * 2**20, budget)
    return result


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, budget_s: float) -> float:
    """FLOP/s of an n x n x n matmul: the best of as many trials as fit in budget_s (at least one) after
    an untimed one. The best, since other work on the machine can only slow a trial down."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    return _best_rate(lambda: torch.mm(a, b), 2 * n**3, device, budget_s)


def copy_bandwidth(device: torch.device, nbytes: int, budget_s: float) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return _best_rate(lambda: dst.copy_(src), 2 * nbytes, device, budget_s) / 1e9


def host_to_device_bandwidth(device: torch.device, nbytes: int, budget_s: float) -> float:
    """GB/s of a pinned host-to-GPU copy: what feeding batches to the GPU can reach."""
    src = torch.ones(nbytes // 4).pin_memory()
    dst = torch.empty(nbytes // 4, device=device)
    return _best_rate(lambda: dst.copy_(src, non_blocking=True), nbytes, device, budget_s) / 1e9


def _best_rate(fn, work: float, device: torch.device, budget_s: float) -> float:
    fn()
    synchronize(device)
    best, spent = 0.0, 0.0
    while spent < budget_s or best == 0.0:
        start = time.perf_counter()
        fn()
        synchronize(device)
        took = time.perf_counter() - start
        spent += took
        best = max(best, work / max(took, 1e-9))
    return best


def measure_train_step(device: torch.device, precision: str, quick: bool) -> dict[str, Any] | None:
    """Real training steps of the default model (what `gptforge train` builds, through the same builder:
    optimizer, gradient scaler, Stepper) on random tokens, timed after a warm-up step: the rate training
    reaches here, without needing any prepared data."""
    if quick:
        return None
    import tempfile

    import numpy as np

    from gptforge.config import load_config
    from gptforge.data.datadir import DataDir
    from gptforge.data.shards import read_header, write_shard
    from gptforge.model.flops import flops_per_token
    from gptforge.parallel.world import World
    from gptforge.observe.family_probe import time_steps
    from gptforge.train.builder import build

    cfg = load_config(None, [f"train.device={device}", f"speed.precision={precision}", "train.batch_size=16",
                             "data.prefetch=0"])
    vocab, tokens = cfg.data.vocab_size, 16 * (cfg.model.block_size + 1) * 4
    with tempfile.TemporaryDirectory() as folder:
        shard = Path(folder) / "train_000000.bin"
        write_shard(shard, np.random.default_rng(0).integers(0, vocab, tokens), vocab)
        data = DataDir(Path(folder), [read_header(shard)], [], None, vocab, None)
        t = build(cfg, World(), data=data, report=lambda msg: None)
        step_s = time_steps(t)
    m = t.cfg.model
    return {
        "model": f"{m.n_layer} x {m.n_embd}, {m.n_head} heads, context {m.block_size}, vocab {m.vocab_size}",
        "batch_size": t.cfg.train.batch_size,
        "precision": t.precision.name,
        "optimizer": t.cfg.optim.name,
        "step_s": step_s,
        "tokens_per_sec": t.cfg.tokens_per_step() / step_s,
        "flops_per_token": flops_per_token(m),
    }


# ----------------------------------------------------------------------------------------------------------
# Recommendations: a pure function of the facts


def primary_device(facts: dict[str, Any]) -> str:
    if facts["cuda"]["devices"]:
        return "cuda"
    if facts["mps"]["available"]:
        return "mps"
    return "cpu"


def recommend(facts: dict[str, Any]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(settings: key, value, reason) and (automatic: what, reason) for the machine the facts describe."""
    kind = primary_device(facts)
    gpu = facts["cuda"]["devices"][0] if kind == "cuda" else None
    rates = (facts.get("rates") or {}).get("matmul_flops", {})
    out: list[dict[str, str]] = []

    def add(key: str, value: str, reason: str) -> None:
        out.append({"key": key, "value": value, "reason": reason})

    # precision
    if gpu is not None:
        if gpu["bf16"]:
            add("speed.precision", "bf16", f"{gpu['name']} has bf16 tensor cores{_ratio_text(rates, 'bf16', 'fp32')}")
        else:
            add("speed.precision", "fp16", f"{gpu['name']} has no native bf16; fp16 autocast with a gradient scaler"
                f"{_ratio_text(rates, 'fp16', 'fp32')}")
    elif kind == "mps":
        add("speed.precision", "fp32", "what gptforge runs on MPS (auto picks it too)")
    else:
        fp32, bf16 = rates.get("fp32"), rates.get("bf16")
        measured = f" (bf16 matmul {_fmt_flops(bf16)} vs fp32 {_fmt_flops(fp32)}{_times(fp32, bf16)})" if fp32 and bf16 else ""
        if not facts["cpu"]["native_bf16"]:
            add("speed.precision", "fp32", f"this CPU has no native bf16 (no AVX512-BF16 or AMX), so bf16 is "
                f"emulated and slower{measured}; auto picks fp32 too")
        elif fp32 and bf16 and bf16 < fp32:
            add("speed.precision", "fp32", f"the CPU advertises native bf16 but bf16 measured slower{measured}; "
                "auto would pick bf16, so set fp32 explicitly")
        else:
            add("speed.precision", "bf16", f"this CPU has native bf16 (AVX512-BF16 or AMX){measured}; auto picks it too")

    # compile
    compile_ = facts["compile"]
    if compile_["status"] == "unavailable":
        add("speed.compile", "false", f"torch.compile is unavailable here: {compile_['reason']}")
    elif kind == "cuda":
        add("speed.compile", "true", "fuses elementwise work into fewer GPU kernels; costs a minute of compiling "
            "at the start, worth it for runs longer than a few minutes")
    else:
        add("speed.compile", "false", f"compile gains little on a {kind.upper() if kind == 'mps' else 'CPU'}, where "
            "the matmuls dominate, and costs compile time at every start; `gptforge bench --ablate` measures it")

    # fused kernels
    triton = facts["triton"]
    if kind == "cuda" and triton["can_run"] and triton["how"] == "gpu":
        add("speed.fused_kernels", "true", f"Triton {triton['version']} runs on the GPU: fused RMSNorm and RoPE")
        add("speed.fused_ce", "true", "the full logits tensor never exists: less memory, room for a larger batch")
    else:
        add("speed.fused_kernels", "false", f"Triton kernels cannot run here: {triton['reason']}; the PyTorch "
            "reference path gains nothing")
        add("speed.fused_ce", "false", "chunked cross-entropy saves memory but not time; use it when memory is the limit")

    # fp8
    fp8 = facts["fp8"]
    if fp8["available"]:
        add("speed.fp8", "true", f"{fp8['reason']}: pays off for wide models (n_embd >= 2048); small ones lose "
            "to the casts, so check with `gptforge bench --ablate`")
    else:
        add("speed.fp8", "false", fp8["reason"])

    # optimizer: fused by default; say so only where the default cannot run
    if kind == "cpu" and not facts["fused_adamw"]["cpu"]:
        add("optim.fused", "false", "torch's fused AdamW does not run on this CPU; the default (true) "
            "would fail")

    # memory and batch
    add("speed.activation_checkpointing", "none", "recomputing activations costs up to a third more compute; use "
        "selective or full only when a model does not fit in memory")
    if kind == "cuda":
        add("train.batch_size", "auto", f"the largest micro-batch that fits in {gpu['memory_gb']:.0f} GB, found once "
            "at the start")
        add("speed.sync_free", "true", "the GPU keeps working while the host runs ahead; losses are read on log "
            "steps only")
    else:
        add("train.batch_size", "16", "the default: on a CPU the step is compute bound and memory is rarely the limit")

    # multi-process
    dist = facts["distributed"]
    gpus = len(facts["cuda"]["devices"])
    if gpus > 1 and dist["nccl"]:
        add("dist.strategy", "ddp", f"{gpus} GPUs and NCCL: run under torchrun --nproc_per_node={gpus}; fsdp2 when the "
            "model and optimizer do not fit on one GPU")

    automatic = [
        {"what": "flash attention", "reason": (
            "scaled_dot_product_attention picks the flash kernel for bf16/fp16 on the GPU; nothing to set"
            if kind == "cuda" else "scaled_dot_product_attention already picks its best kernel on this device")},
        {"what": "fused AdamW", "reason": _fused_adamw_text(kind, facts["fused_adamw"]["cpu"])},
        {"what": "process-group backend", "reason": (
            "dist.backend=auto picks nccl on GPUs, gloo on CPUs" + ("" if dist["nccl"] or kind != "cuda" else
                                                                    "; NCCL is missing from this torch build"))},
    ]
    return out, automatic


def _fused_adamw_text(kind: str, runs_on_cpu: bool) -> str:
    if kind == "cuda":
        return "optim.fused=true (the default) runs torch's fused AdamW: one kernel launch updates every parameter"
    if kind == "cpu" and runs_on_cpu:
        return ("optim.fused=true (the default) runs torch's fused AdamW on this CPU: one pass over all "
                "parameters instead of a loop over them; `gptforge bench --ablate` measures the gain")
    if kind == "cpu":
        return "torch's fused AdamW does not run on this CPU: set optim.fused=false"
    return f"optim.fused applies on CUDA and CPU; on {kind.upper()} AdamW is torch's loop over the parameters"


def cpu_estimate(facts: dict[str, Any], precision: str = "fp32") -> dict[str, Any] | None:
    """Without a GPU: tokens each preset sees in five minutes here, from the measured matmul rate of the
    precision training uses here."""
    if facts["cuda"]["devices"]:
        return None
    from gptforge.config import PRESETS, ModelConfig
    from gptforge.model.flops import flops_per_token, num_params

    rates = (facts.get("rates") or {}).get("matmul_flops", {})
    step = facts.get("train_step")
    if not rates.get(precision):
        precision = "fp32"
    peak = rates.get(precision)
    if not peak:
        return None
    if step:
        mfu = step["tokens_per_sec"] * step["flops_per_token"] / peak
        basis = f"the measured training step of the default model ({mfu:.0%} of the {precision} matmul rate)"
    else:
        mfu = ASSUMED_MFU
        basis = (f"an assumed {ASSUMED_MFU:.0%} of the measured {precision} matmul rate (run without --quick to "
                 "measure a step)")
    models = {"tiny": PRESETS["tiny"], "default": {}, "small": PRESETS["small"]}
    rows = []
    for name, shape in models.items():
        cfg = ModelConfig(**{k: v for k, v in shape.items()})
        tps = peak * mfu / flops_per_token(cfg)
        params = num_params(cfg)["total"]
        tokens = tps * FIVE_MINUTES_S
        rows.append({
            "model": name,
            "shape": f"{cfg.n_layer} x {cfg.n_embd}, context {cfg.block_size}",
            "params": params,
            "tokens_per_sec": tps,
            "tokens_in_5_min": tokens,
            "tokens_per_param": tokens / params,
            "compute_optimal_minutes": CHINCHILLA_TOKENS_PER_PARAM * params / tps / 60,
        })
    return {"basis": basis, "mfu": mfu, "models": rows}


MAIN_JOB_CURVE = Path(__file__).with_name("main_job_curve.json")


def main_job_forecast(tokens_per_sec: float, precision: str, table: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where `gptforge train` with no arguments should end here: the tokens 300 s of training reach at
    `tokens_per_sec`, and the final validation loss the default recipe reached on that many tokens.

    The end depends on the tokens alone (the schedule decays to its end on any budget), so the machine
    enters only through its rate. The loss comes from full default runs with token budgets
    (benchmarks/main_job_curve.py), interpolated linearly in log tokens; outside their range it is the
    nearest end's, marked as a bound."""
    import math

    table = table if table is not None else json.loads(MAIN_JOB_CURVE.read_text())
    points = sorted((p["tokens"], p["val_loss"]) for p in table["points"])
    tokens = tokens_per_sec * FIVE_MINUTES_S
    if tokens <= points[0][0]:
        loss, bound = points[0][1], "at least"  # fewer tokens than the smallest budget: a higher loss
    elif tokens >= points[-1][0]:
        loss, bound = points[-1][1], "at most"
    else:
        (t0, l0), (t1, l1) = next((a, b) for a, b in zip(points, points[1:]) if a[0] <= tokens <= b[0])
        loss, bound = l0 + (l1 - l0) * math.log(tokens / t0) / math.log(t1 / t0), None
    precisions = sorted({p["precision"] for p in table["points"]})
    return {"tokens_per_sec": tokens_per_sec, "precision": precision, "tokens": tokens, "val_loss": loss,
            "bound": bound, "table_tokens": [points[0][0], points[-1][0]], "table_device": table["device"],
            "table_precisions": precisions}


def _forecast(facts: dict[str, Any], estimate: dict[str, Any] | None, precision: str) -> dict[str, Any] | None:
    """The main job's forecast from the measured step, or on a CPU without one from the estimate."""
    step = facts.get("train_step")
    if step:
        forecast = main_job_forecast(step["tokens_per_sec"], step["precision"])
        forecast["rate_from"] = "a measured training step of the default model"
    elif estimate:
        default = next(m for m in estimate["models"] if m["model"] == "default")
        forecast = main_job_forecast(default["tokens_per_sec"], precision)
        forecast["rate_from"] = "estimated from the matmul rate; run without --quick to measure a step"
    else:
        return None
    return forecast


# ----------------------------------------------------------------------------------------------------------
# The whole check


def doctor(quick: bool = False) -> dict[str, Any]:
    from gptforge.observe.environment import command_line, git_sha
    from gptforge import __version__

    facts: dict[str, Any] = {
        "environment": {
            "gptforge_version": __version__, "git_sha": git_sha(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda_build": torch.version.cuda, "command": command_line(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "quick": quick,
        "cpu": probe_cpu(),
        "cuda": probe_cuda(),
        "mps": probe_mps(),
        "distributed": probe_distributed(),
        "fused_adamw": probe_fused_adamw(),
    }
    facts["fp8"] = probe_fp8(facts["cuda"])
    facts["triton"] = probe_triton(facts["cuda"], quick)
    kind = primary_device(facts)
    facts["compile"] = probe_compile(kind, quick)
    facts["bf16"] = {
        "cpu": "native" if facts["cpu"]["native_bf16"] else "emulated",
        "gpu": facts["cuda"]["devices"][0]["bf16"] if facts["cuda"]["devices"] else None,
    }
    facts["rates"] = measure_rates(torch.device(kind), facts, quick)
    settings, automatic = recommend(facts)
    precision = next(r["value"] for r in settings if r["key"] == "speed.precision")
    facts["train_step"] = measure_train_step(torch.device(kind), precision, quick)
    from gptforge.observe.family_probe import measure_family_steps

    facts["family_steps"] = measure_family_steps(torch.device(kind), precision, quick)  # lstm and cnn
    estimate = cpu_estimate(facts, precision)
    return {"facts": facts, "recommendations": settings, "automatic": automatic, "cpu_estimate": estimate,
            "main_job": _forecast(facts, estimate, precision)}


def format_report(report: dict[str, Any]) -> str:
    f = report["facts"]
    cpu, lines = f["cpu"], []
    add = lines.append
    add(f"gptforge doctor{' (--quick)' if f['quick'] else ''}: torch {f['environment']['torch']}, "
        f"python {f['environment']['python']}")
    add("")
    add("devices")
    mem = f", {cpu['memory_gb']:.0f} GB RAM" if cpu["memory_gb"] else ""
    isa = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["flags"].items())
    add(f"  cpu      {cpu['name']} ({cpu['threads']} torch threads){mem}")
    add(f"           {isa}")
    if f["cuda"]["devices"]:
        for d in f["cuda"]["devices"]:
            add(f"  cuda:{d['index']}   {d['name']}, sm_{d['capability'][0]}{d['capability'][1]}, {d['memory_gb']:.1f} GB, "
                f"{d['sm_count']} SMs")
    else:
        build = f"CUDA {f['cuda']['build']} build" if f["cuda"]["build"] else "a CPU-only build of torch"
        add(f"  cuda     none visible ({build})")
    add(f"  mps      {'available' if f['mps']['available'] else 'no'}")
    add("")
    add("capabilities")
    gpu_bf16 = {None: "no GPU", True: "native", False: "not native"}[f["bf16"]["gpu"]]
    add(f"  bf16     cpu: {f['bf16']['cpu']}; gpu: {gpu_bf16}")
    add(f"  fp8      {'yes' if f['fp8']['available'] else 'no'}: {f['fp8']['reason']}")
    add(f"  compile  {f['compile']['status']}: {f['compile']['reason']}")
    t = f["triton"]
    add(f"  triton   {t['version'] + ' importable' if t['importable'] else 'not importable'}; "
        f"{'runs' if t['can_run'] else 'cannot run'}: {t['reason']}")
    d = f["distributed"]
    add(f"  nccl     {'yes' if d['nccl'] else 'no'}; gloo {'yes' if d['gloo'] else 'no'}")
    fa = f["fused_adamw"]
    add(f"  fused AdamW  cuda: {'yes' if fa['cuda'] else 'no GPU'}; cpu: {'runs' if fa['cpu'] else 'no'}")
    add("")
    r = f["rates"]
    threads = f", {r['threads']} threads" if r.get("threads") else ""
    add(f"measured ({r['device']}{threads})")
    mm = r["matmul_flops"]
    parts = [f"{k} {_fmt_flops(v)}" for k, v in mm.items()]
    add(f"  matmul {r['matmul_n']}^3   " + " | ".join(parts))
    if "fp32" in mm and "bf16" in mm and f["rates"]["device"] == "cpu":
        add(f"  bf16 vs fp32     {_times(mm['fp32'], mm['bf16']).lstrip('; ')}")
    add(f"  copy             {r['copy_gb_s']:.1f} GB/s (read + write)")
    if r.get("host_to_device_gb_s"):
        add(f"  host to device   {r['host_to_device_gb_s']:.1f} GB/s (pinned)")
    s = f["train_step"]
    if s:
        add(f"  train step       {s['tokens_per_sec']:,.0f} tokens/s, default model ({s['model']}), batch {s['batch_size']}, "
            f"{s['precision']}")
    from gptforge.observe.family_probe import family_lines

    for line in family_lines(f.get("family_steps")):
        add(line)
    add("")
    add("recommended settings")
    width = max(len(f"{x['key']}={x['value']}") for x in report["recommendations"])
    for x in report["recommendations"]:
        add(f"  {x['key'] + '=' + x['value']:<{width}}  # {x['reason']}")
    add("")
    add("automatic (nothing to set)")
    for x in report["automatic"]:
        add(f"  {x['what']}: {x['reason']}")
    job = report.get("main_job")
    if job:
        add("")
        add("the main job (`gptforge train`: 5 minutes of training, the built-in corpus)")
        low, high = job["table_tokens"]
        add(f"  at {job['tokens_per_sec']:,.0f} tokens/s ({job['rate_from']}, {job['precision']}) it trains on about "
            f"{job['tokens'] / 1e6:.2f}M tokens")
        bound = f"{job['bound']} " if job["bound"] else "about "
        add(f"  and should end at a validation loss of {bound}{job['val_loss']:.2f}: the default recipe's final loss "
            f"for that many tokens, from runs of {low / 1e6:.2f}M-{high / 1e6:.2f}M tokens "
            f"({job['table_device']}, {'/'.join(job['table_precisions'])}; benchmarks/main_job_curve.py)")
        add("  Other work on the machine lowers the rate, and so the tokens; each budget is one run of one seed.")
    est = report.get("cpu_estimate")
    if est:
        add("")
        add("no CUDA GPU: what trains here in 5 minutes")
        add(f"  (from {est['basis']})")
        for m in est["models"]:
            add(f"  {m['model']:<8} {m['shape']:<22} {m['params'] / 1e6:5.2f}M params  {m['tokens_per_sec']:>9,.0f} tokens/s  "
                f"{m['tokens_in_5_min'] / 1e6:6.2f}M tokens in 5 min ({m['tokens_per_param']:.2f} per parameter; "
                f"~{CHINCHILLA_TOKENS_PER_PARAM} is compute-optimal: {_minutes(m['compute_optimal_minutes'])})")
        default = next(m for m in est["models"] if m["model"] == "default")
        if default["tokens_per_param"] < 1:
            add("  Five minutes here trains the default model on less than one token per parameter: expect samples "
                "with the look of the data, not a converged model.")
    return "\n".join(lines)


def run_doctor(args: argparse.Namespace) -> int:
    report = doctor(quick=args.quick)
    print(format_report(report))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {path}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _version_of(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        mod = __import__(module)
    except Exception:  # an installed but broken package is as good as none
        return None
    return getattr(mod, "__version__", "unknown")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _fmt_flops(value: float | None) -> str:
    if not value:
        return "n/a"
    return f"{value / 1e12:.1f} TFLOP/s" if value >= 1e12 else f"{value / 1e9:.1f} GFLOP/s"


def _times(fp32: float | None, other: float | None) -> str:
    if not fp32 or not other:
        return ""
    ratio = fp32 / other
    if ratio >= 1:
        return f"; {ratio:.0f}x slower" if ratio >= 10 else f"; {ratio:.1f}x slower"
    return f"; {1 / ratio:.1f}x faster"


def _ratio_text(rates: dict[str, float], fast: str, base: str) -> str:
    if rates.get(fast) and rates.get(base):
        return f": {_fmt_flops(rates[fast])} matmul, {rates[fast] / rates[base]:.1f}x fp32"
    return ""


def _minutes(minutes: float) -> str:
    if minutes < 120:
        return f"{minutes:,.0f} min"
    if minutes < 48 * 60:
        return f"{minutes / 60:,.0f} h"
    return f"{minutes / 60 / 24:,.0f} days"
