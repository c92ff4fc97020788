"""The GPU proof: every GPU claim of gptforge checked by one prepared command, in parts, in order.

    1. environment    GPU, driver, CUDA, torch, triton, torchao; a measured bf16 matmul peak and copy bandwidth
    2. gpu_tests      `pytest -m gpu`, the outcome of every test
    3. bench          `gptforge bench` at GPT-2 124M (sequence 1024, bf16, the fastest switches) and nanoGPT's
                      step on the same model, batch and device: tokens/s, MFU (measured and datasheet peak),
                      peak memory
    4. batch_size     the largest micro-batch that fits, for both (train.batch_size=auto's search and margin)
    5. ablate         `bench --ablate` at 124M, a few steps per rung, fp8 included
    6. kernels        the Triton kernels against their references (values, speed), the chunked
                      cross-entropy's memory against the full logits
    7. distributed    one DDP and one FSDP2 step over a process group of one (NCCL; gloo on a CPU), and
                      energy per token through NVML
    8. time_to_loss   gptforge's default recipe against nanoGPT's GPT-2 124M recipe, same data and
                      shape, up to two minutes each

Every part runs in its own process, under its own time limit, within the run's time limit; a part that
fails records its error and the run goes on; each writes one JSON record into --out (N_name.json), rewritten
after each of its sub-parts, so a part stopped at its limit keeps what it finished. A summary table comes
last, and summary.json. --parts reruns some parts; --limit PART=SECONDS changes a limit.

nanoGPT (karpathy/nanoGPT) is never part of this repository: place a checkout at .peers/nanoGPT (ignored
by git) or pass --nanogpt PATH; without one, its sub-parts record that they were skipped and why. The data
is .peers/gpt2-vocab when present (the built-in corpus prepared with GPT-2's vocabulary size, so that the
model has exactly GPT-2 124M's shape; docs/gpu.md says how to make it), else the built-in corpus.

--dry-run runs every part on the CPU at the tiny preset in well under three minutes (the suite runs it),
so the kit is known to work before a GPU is lent. docs/gpu.md explains each record and figure.

    python benchmarks/gpu_proof.py [--out DIR] [--parts 3,bench,...] [--nanogpt PATH] [--data DIR]
                                   [--time-limit SECONDS] [--limit PART=SECONDS ...] [--dry-run]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "src" / "gptforge").is_dir():  # this checkout's gptforge, installed or not, is the one proven
    sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benchmark scripts, reused below

DEFAULT_NANOGPT = ROOT / ".peers" / "nanoGPT"
DEFAULT_DATA = ROOT / ".peers" / "gpt2-vocab"
PLACE_NANOGPT = ("place a checkout of karpathy/nanoGPT there (git clone https://github.com/karpathy/nanoGPT "
                 ".peers/nanoGPT; .peers/ is ignored by git) or pass --nanogpt PATH")


def preset_shape(name: str) -> dict[str, int]:
    """A model preset's shape, as both gptforge and nanoGPT take it."""
    from gptforge.config.sections import PRESETS

    return {key: PRESETS[name][key] for key in ("n_layer", "n_head", "n_embd", "block_size")}


GPT2_124M = preset_shape("gpt2-124m")
TINY = preset_shape("tiny")
# gptforge's fastest switches on a GPU; fused_kernels is a no-op for GPT-2's LayerNorm and learned positions
# and still costs nothing to ask for
FASTEST = ["speed.precision=bf16", "speed.compile=true", "speed.fused_kernels=true", "speed.fused_ce=true",
           "optim.fused=true"]


@dataclasses.dataclass(frozen=True)
class Setting:
    """What the parts run: GPT-2 124M on a GPU, or the tiny preset on the CPU for the dry run."""

    name: str
    device: str
    shape: dict[str, int]
    batch: int  # micro-batch of the bench, nanoGPT's step and time to loss
    steps: int
    warmup: int
    ablate_batch: int
    ablate_steps: int
    ablate_warmup: int
    ablate_skip: tuple[str, ...]
    compile: bool
    ttl_seconds: float  # time to loss: training seconds per side, at most (neither side compiled; see part 8)
    ttl_reserve_s: float  # time to loss: the part's time that is not training (compile, evaluation, data)
    eval_tokens: int
    limits: dict[str, float]  # seconds per part, at most
    time_limit: float  # seconds for the whole run
    min_start_s: float  # a part with less time than this left is not started

    @property
    def precision(self) -> str:
        return "bf16" if self.device == "cuda" else "fp32"

    def switches(self) -> list[str]:
        """The fastest switches this device takes (the dry run: fp32, not compiled, the fused paths)."""
        if self.device == "cuda":
            return list(FASTEST)
        return ["speed.precision=fp32", "speed.compile=false", "speed.fused_kernels=true", "speed.fused_ce=true",
                "optim.fused=true"]


GPU = Setting("gpu", "cuda", GPT2_124M, batch=64, steps=10, warmup=3, ablate_batch=16, ablate_steps=3,
              ablate_warmup=2, ablate_skip=(), compile=True, ttl_seconds=120.0, ttl_reserve_s=60.0,
              eval_tokens=131072,
              limits=dict(environment=60, gpu_tests=90, bench=210, batch_size=60, ablate=180, kernels=60,
                          distributed=60, time_to_loss=330),
              time_limit=480.0, min_start_s=20.0)
DRY_RUN = Setting("dry-run", "cpu", TINY, batch=4, steps=2, warmup=1, ablate_batch=4, ablate_steps=1,
                  ablate_warmup=1, ablate_skip=("bf16", "compile"), compile=False, ttl_seconds=3.0, ttl_reserve_s=15.0,
                  eval_tokens=512,
                  limits={name: 120 for name in GPU.limits},  # a busy CPU: the run's limit is what binds
                  time_limit=170.0, min_start_s=3.0)


class Skip(Exception):
    """A sub-part that cannot run here: recorded as skipped, with the reason."""


def skipped(reason: str) -> Callable[[], None]:
    """A sub-part that only records why it cannot run."""

    def fn() -> None:
        raise Skip(reason)

    return fn


# ----------------------------------------------------------------------------------------------------------
# What every part gets


class Context:
    """A part's view of the run: the setting, the data, nanoGPT, and its record, written after each sub-part."""

    def __init__(self, setting: Setting, options: dict[str, Any], record: dict[str, Any], path: Path):
        self.setting, self.options, self.record, self.path = setting, options, record, path
        self.out = path.parent
        self.record.setdefault("subparts", {})

    @property
    def device(self):
        """The setting's device, with its index on a GPU (torch.cuda.set_device wants one)."""
        import torch

        from gptforge.runtime import pick_device

        if self.setting.device != "cuda":
            return torch.device("cpu")
        pick_device("cuda")  # a clear error where no GPU is visible
        return torch.device("cuda", torch.cuda.current_device())

    @property
    def nanogpt(self) -> Path:
        """The nanoGPT checkout, or Skip with where it was looked for and how to place it."""
        path = Path(self.options["nanogpt"])
        if not ((path / "train.py").is_file() and (path / "model.py").is_file()):
            raise Skip(f"nanoGPT not found at {shown(path)} ({PLACE_NANOGPT})")
        return path.resolve()

    def data(self):
        from gptforge.config import load_config
        from gptforge.train.builder import resolve_data

        return resolve_data(load_config(None, self.data_overrides()))

    def data_overrides(self) -> list[str]:
        return [f"data.dir={self.options['data']}"] if self.options.get("data") else []

    def overrides(self, batch: int | None = None, switches: bool = True) -> list[str]:
        """gptforge at the setting's shape with nanoGPT's architecture and optimizer (like for like), on the
        proof's data and device, with the fastest switches."""
        from nanogpt_speed import NANOGPT_ARCH

        shape = [f"model.{k}={v}" for k, v in self.setting.shape.items()]
        return [*shape, *NANOGPT_ARCH, *self.data_overrides(), f"train.device={self.setting.device}",
                f"train.batch_size={batch or self.setting.batch}", *(self.setting.switches() if switches else [])]

    def sub(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
        """Run one sub-part: its result, or skipped with the reason, or failed with the error; then save."""
        start = time.perf_counter()
        print(f"-- {name}", flush=True)
        try:
            result = {"status": "ok", **(fn() or {})}
        except Skip as exc:
            result = {"status": "skipped", "reason": str(exc)}
            print(f"   skipped: {exc}", flush=True)
        except (Exception, SystemExit) as exc:  # a benchmark script's sys.exit(message) is a failure too
            result = {"status": "failed", "error": error_text(exc), "traceback": traceback.format_exc()[-4000:]}
            print(f"   failed: {result['error']}", flush=True)
        result["seconds"] = round(time.perf_counter() - start, 2)
        self.record["subparts"][name] = result
        self.save()
        return result

    def save(self) -> None:
        write_record(self.path, self.record)


def error_text(exc: BaseException) -> str:
    text = str(exc) if not isinstance(exc, SystemExit) else str(exc.code)
    return f"{type(exc).__name__}: {text}"[:2000]


def shown(path: Path | str) -> str:
    """A path as records show it: relative to the repository when inside it, else as given."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def write_record(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    tmp.replace(path)


def free_memory() -> None:
    """Drop what one sub-part left on the GPU before the next measures its own peak."""
    import gc

    import torch

    gc.collect()
    try:
        torch._dynamo.reset()
    except Exception:
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------------------------------------
# 1. environment


def part_environment(ctx: Context) -> None:
    import torch

    from gptforge.observe.doctor import copy_bandwidth, probe_cuda, probe_distributed
    from gptforge.observe.environment import environment
    from gptforge.observe.hardware import datasheet_peak, measured_peak
    from gptforge.runtime import capabilities, torchao_float8

    device = ctx.device
    ctx.record.update(environment(device, ctx.setting.precision, 1))

    def versions() -> dict[str, Any]:
        import importlib.metadata as md

        def version(name: str) -> str | None:
            try:
                return md.version(name)
            except md.PackageNotFoundError:
                return None

        import gptforge

        return {"gptforge_source": shown(Path(gptforge.__file__).parent),
                "torch": torch.__version__, "cuda": torch.version.cuda, "triton": version("triton"),
                "torchao": torchao_float8() or "not installed (the fp8 rung is skipped)",
                "nvidia-ml-py": version("nvidia-ml-py"), "python": sys.version.split()[0],
                "driver": driver_version(), "gpus": probe_cuda()["devices"], "distributed": probe_distributed(),
                "capabilities": dataclasses.asdict(capabilities(device))}

    def peaks() -> dict[str, Any]:
        # bf16 on a GPU; on a CPU without native bf16 that would be emulated, so the dry run measures fp32
        precision = ctx.setting.precision
        measured = measured_peak(device, precision)
        nbytes = (2 << 30) if device.type == "cuda" else (64 << 20)  # several times the L2 on a GPU
        copy = copy_bandwidth(device, nbytes, budget_s=1.0 if device.type == "cuda" else 0.2)
        return {"matmul_precision": precision, "matmul_flops_measured": measured,
                "matmul_flops_datasheet": datasheet_peak(device, precision), "copy_gb_s": copy,
                "copy_bytes": nbytes,
                "how": "matmul: 8192^3 (GPU) or 1024^3 (CPU) of random data, best of several; copy: a "
                       "device-to-device copy, bytes read plus written, best of the trials in the budget"}

    def data() -> dict[str, Any]:
        data = ctx.data()
        return {"path": shown(data.path), "vocab_size": data.vocab_size,
                "train_tokens": sum(s.num_tokens for s in data.train), "val_tokens": sum(s.num_tokens for s in data.val)}

    ctx.sub("versions", versions)
    ctx.sub("peaks", peaks)
    ctx.sub("data", data)


def driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
            return version.decode() if isinstance(version, bytes) else version
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def torchao_found(text: str) -> bool:
    return not text.startswith("not installed")


def headline_environment(r: dict[str, Any]) -> str:
    v, p = r["subparts"].get("versions", {}), r["subparts"].get("peaks", {})
    parts = [r.get("device", "?")]
    if v.get("status") == "ok":
        parts.append(f"torch {v['torch']}, CUDA {v['cuda']}, driver {v['driver']}, triton {v['triton']}, "
                     f"torchao {v['torchao'] if torchao_found(v['torchao']) else 'none'}")
    if p.get("status") == "ok":
        sheet = p["matmul_flops_datasheet"]
        parts.append(f"{p['matmul_precision']} matmul {p['matmul_flops_measured'] / 1e12:.3g} TFLOP/s"
                     + (f" (datasheet {sheet / 1e12:.0f})" if sheet else "") + f", copy {p['copy_gb_s']:.0f} GB/s")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------------------
# 2. the GPU tests


def part_gpu_tests(ctx: Context) -> None:
    def run() -> dict[str, Any]:
        files = sorted(shown(p) for p in (ROOT / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text())
        with tempfile.TemporaryDirectory(prefix="gpu-proof-") as tmp:
            junit = Path(tmp) / "junit.xml"
            flags = ["-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
            cmd = [sys.executable, "-m", "pytest", *flags, f"--junitxml={junit}", *files]
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=child_env())
            # Interrupted before the part's limit, pytest still writes its report of the tests that ran
            budget = max(5.0, ctx.options["limit_s"] - 15)
            try:
                output, _ = proc.communicate(timeout=budget)
                interrupted = False
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
                output, _ = proc.communicate()
                interrupted = True
            print(output[-3000:], flush=True)
            tests = read_junit(junit) if junit.is_file() else []
        counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
        result = {"command": " ".join(["python", "-m", "pytest", *flags, *files]), "files": files,
                  "returncode": proc.returncode, "counts": counts, "tests": tests}
        if counts["failed"] or counts["error"] or interrupted or proc.returncode not in (0, 5):  # 5: none collected
            stopped = f", interrupted after {budget:.0f} s" if interrupted else ""
            result.update(status="failed", error=f"{counts['failed']} failed, {counts['error']} errors "
                                                 f"(pytest exit code {proc.returncode}{stopped})",
                          output_tail=output[-3000:])
        return result

    ctx.sub("pytest", run)


def read_junit(path: Path) -> list[dict[str, Any]]:
    """Every test case of a JUnit XML report: its id, outcome (passed, failed, error, skipped) and message."""
    import xml.etree.ElementTree as ET

    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if not case.get("name"):  # the test running when pytest was interrupted
            continue
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or child.text or "")[:500]
                break
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        tests.append({"test": name, "outcome": outcome, "message": message, "seconds": float(case.get("time", 0))})
    return tests


def headline_gpu_tests(r: dict[str, Any]) -> str:
    c = r["subparts"].get("pytest", {}).get("counts")
    return ", ".join(f"{v} {k}" for k, v in c.items() if v) or "no tests" if c else ""


# ----------------------------------------------------------------------------------------------------------
# 3. bench: gptforge and nanoGPT, the same model, batch and device


def nanogpt_shape(ctx: Context, data) -> tuple[argparse.Namespace, int]:
    """nanogpt_speed's arguments for the setting, and the (padded) vocabulary both sides use."""
    from gptforge.config import load_config

    vocab = load_config(None, [*ctx.overrides(), f"model.vocab_size={data.vocab_size}"]).model.padded_vocab_size
    s = ctx.setting
    args = argparse.Namespace(device=s.device, compile=str(s.compile), batch_size=s.batch, warmup=s.warmup,
                              iters=s.steps, **s.shape)
    return args, vocab


def part_bench(ctx: Context) -> None:
    from gptforge.config import load_config

    def gptforge_step(extra: tuple[str, ...] = ()) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            from gptforge.bench.step import bench, print_record

            if extra and ctx.setting.device != "cuda":
                raise Skip("CUDA graphs (speed.compile_mode=reduce-overhead) need a CUDA GPU")
            overrides = [*ctx.overrides(), *extra]
            record = bench(load_config(None, overrides), steps=ctx.setting.steps, warmup=ctx.setting.warmup)
            print_record(record)
            free_memory()
            return {"command": "gptforge bench " + " ".join(shown_overrides(overrides))
                               + f" --steps {ctx.setting.steps} --warmup {ctx.setting.warmup}",
                    **{k: record[k] for k in ("tokens_per_sec", "median_step_s", "mfu", "mfu_datasheet",
                                              "peak_flops_measured", "peak_flops_datasheet", "peak_mem_gb",
                                              "median_split_s", "step_times_s", "tokens_per_step", "model",
                                              "energy")}}

        return run

    def nanogpt_step() -> dict[str, Any]:
        import statistics

        from nanogpt_speed import checkout_commit, run_interleaved, write_peer_data

        from gptforge.model.flops import flops_per_token
        from gptforge.observe.hardware import datasheet_peak, measured_peak
        from gptforge.runtime import peak_memory_gb

        nanogpt, data = ctx.nanogpt, ctx.data()
        args, vocab = nanogpt_shape(ctx, data)
        free_memory()
        with tempfile.TemporaryDirectory(prefix="gpu-proof-") as tmp:
            write_peer_data(data.train, Path(tmp) / "train.bin")
            peer, _ = run_interleaved(nanogpt, Path(tmp) / "train.bin", args, vocab, {})  # nanoGPT's steps alone
        device = ctx.device
        peak_mem = peak_memory_gb(device)
        free_memory()
        median = statistics.median(peer["step_times_s"])
        tps = ctx.setting.batch * ctx.setting.shape["block_size"] / median
        model_cfg = load_config(None, [*ctx.overrides(), f"model.vocab_size={data.vocab_size}"]).model
        flops = flops_per_token(model_cfg) * tps
        gptforge = ctx.record["subparts"].get("gptforge", {})
        measured = gptforge.get("peak_flops_measured") or measured_peak(device, ctx.setting.precision)
        sheet = datasheet_peak(device, ctx.setting.precision)
        print(f"nanoGPT: {tps:,.0f} tokens/s, step {1000 * median:.1f} ms, peak memory {peak_mem:.2f} GB", flush=True)
        return {"commit": checkout_commit(nanogpt), "mode": "in-process: nanoGPT's model.py and "
                "configure_optimizers, its train.py loop body (nanogpt_speed.run_interleaved)",
                "compile": ctx.setting.compile, "tokens_per_sec": tps, "median_step_s": median,
                "mfu": flops / measured, "mfu_datasheet": flops / sheet if sheet else None,
                "peak_flops_measured": measured, "peak_mem_gb": peak_mem,
                "peak_mem_note": "torch.cuda.max_memory_allocated" if device.type == "cuda" else
                "the process's peak resident memory (a CPU has no allocator peak)",
                "step_times_s": peer["step_times_s"], "params_printed": peer["params_printed"]}

    ctx.record["shape"] = {**ctx.setting.shape, "batch_size": ctx.setting.batch}
    ours = ctx.sub("gptforge", gptforge_step())
    peer = ctx.sub("nanogpt", nanogpt_step)
    if ours["status"] == peer["status"] == "ok":
        ctx.record["ratio"] = ours["tokens_per_sec"] / peer["tokens_per_sec"]
        ctx.save()
    # last, so that a slow capture cannot cost the figures above: the same step with CUDA graphs
    ctx.sub("gptforge_cuda_graphs", gptforge_step(("speed.compile_mode=reduce-overhead", "speed.sync_free=true")))


def shown_overrides(overrides: list[str]) -> list[str]:
    return [f"data.dir={shown(o.split('=', 1)[1])}" if o.startswith("data.dir=") else o for o in overrides]


def headline_bench(r: dict[str, Any]) -> str:
    ours, peer = r["subparts"].get("gptforge", {}), r["subparts"].get("nanogpt", {})
    parts = []
    for label, s in (("gptforge", ours), ("nanoGPT", peer)):
        if s.get("status") == "ok":
            sheet = f", {100 * s['mfu_datasheet']:.1f}% datasheet" if s.get("mfu_datasheet") else ""
            mfu = "n/a" if s.get("mfu") is None else f"{100 * s['mfu']:.1f}%"
            parts.append(f"{label} {s['tokens_per_sec']:,.0f} tok/s (MFU {mfu} measured{sheet}, "
                         f"{s['peak_mem_gb']:.1f} GB)")
        elif s.get("status") == "skipped":
            parts.append(f"{label} skipped")
    if r.get("ratio"):
        parts.append(f"{r['ratio']:.2f}x")
    graphs = r["subparts"].get("gptforge_cuda_graphs", {})
    if graphs.get("status") == "ok":
        parts.append(f"CUDA graphs {graphs['tokens_per_sec']:,.0f} tok/s")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------------------
# 4. the largest micro-batch


def part_batch_size(ctx: Context) -> None:
    from gptforge.config import load_config

    how = ("out-of-memory search: sizes double, then bisect, on one full micro-step with the optimizer state "
           "allocated; then 90% of it, rounded to a multiple of 8 (train/batch_finder.py)")
    if ctx.setting.device != "cuda":
        how = "cpu: no out-of-memory search; the cap from the host memory estimate (train/batch_finder.py)"
    ctx.record["rule"] = how

    def gptforge_size() -> dict[str, Any]:
        from gptforge.parallel.world import World
        from gptforge.train.builder import build

        cfg = load_config(None, [*ctx.overrides(), "train.batch_size=auto"])
        trainee = build(cfg, World())  # the model as it will train: fused cross-entropy included
        size = trainee.cfg.train.batch_size
        trainee.close()
        del trainee
        free_memory()
        return {"batch_size": size, "overrides": shown_overrides([*ctx.overrides(), "train.batch_size=auto"])}

    def nanogpt_size() -> dict[str, Any]:
        import torch

        from nanogpt_speed import build_peer

        from gptforge.runtime import resolve_precision
        from gptforge.train.batch_finder import find_batch_size

        nanogpt, data = ctx.nanogpt, ctx.data()
        args, vocab = nanogpt_shape(ctx, data)
        device = ctx.device
        peer, _ = build_peer(nanogpt, args.n_layer, args.n_head, args.n_embd, args.block_size, vocab, device)
        cfg = load_config(None, [*ctx.overrides(), "train.batch_size=auto", f"model.vocab_size={data.vocab_size}"])
        size = find_batch_size(loss_only(peer), cfg, resolve_precision(ctx.setting.precision, device), device)
        del peer
        free_memory()
        return {"batch_size": size, "torch": torch.__version__}

    ours = ctx.sub("gptforge", gptforge_size)
    peer = ctx.sub("nanogpt", nanogpt_size)
    if ours["status"] == peer["status"] == "ok":
        ctx.record["ratio"] = ours["batch_size"] / peer["batch_size"]
        ctx.save()


def loss_only(peer):
    """nanoGPT's model as the batch finder calls a model: model(x, y) -> the loss (nanoGPT returns logits, loss)."""
    from torch import nn

    class LossOnly(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x, y):
            return self.inner(x, y)[1]

    return LossOnly(peer)


def headline_batch_size(r: dict[str, Any]) -> str:
    ours, peer = r["subparts"].get("gptforge", {}), r["subparts"].get("nanogpt", {})
    text = [f"{label} {s['batch_size']}" if s.get("status") == "ok" else f"{label} {s.get('status')}"
            for label, s in (("gptforge", ours), ("nanoGPT", peer)) if s]
    if r.get("ratio"):
        text.append(f"{r['ratio']:.2f}x")
    return "; ".join(text)


# ----------------------------------------------------------------------------------------------------------
# 5. the speed ladder


def part_ablate(ctx: Context) -> None:
    def ladder() -> dict[str, Any]:
        from gptforge.bench.ablate import ablate, print_ablation

        s = ctx.setting
        overrides = ctx.overrides(batch=s.ablate_batch, switches=False)
        report = ablate(overrides, steps=s.ablate_steps, warmup=s.ablate_warmup, skip=s.ablate_skip)
        print_ablation(report)
        for rung in report["rungs"]:  # each rung's full bench record stays in the rung's own process
            rung.pop("record", None)
        return {"command": f"gptforge bench --ablate {' '.join(shown_overrides(overrides))} --steps {s.ablate_steps}"
                           f" --warmup {s.ablate_warmup}" + (f" --skip {','.join(s.ablate_skip)}" if s.ablate_skip else ""),
                "summary": report["summary"], "rungs": report["rungs"], "device_info": report["device_info"]}

    ctx.sub("ladder", ladder)


def headline_ablate(r: dict[str, Any]) -> str:
    lad = r["subparts"].get("ladder", {})
    if lad.get("status") != "ok":
        return ""
    s = lad["summary"]
    text = f"best {s['best']['rung']} {s['best']['tokens_per_sec']:,.0f} tok/s, {s['speedup']:.2f}x fp32"
    fp8 = next((x for x in lad["rungs"] if x["rung"] == "fp8"), None)
    if fp8:
        text += f"; fp8 {fp8['status']}" + (f" ({fp8['reason']})" if fp8.get("reason") else "")
    failed = [x["rung"] for x in lad["rungs"] if x["status"] == "failed"]
    return text + (f"; failed: {', '.join(failed)}" if failed else "")


# ----------------------------------------------------------------------------------------------------------
# 6. kernels


def part_kernels(ctx: Context) -> None:
    import torch

    from gptforge.kernels import triton_available

    device = ctx.device
    gpu = device.type == "cuda"
    dtype = torch.bfloat16  # as training runs them; the interpreter runs bf16 too (the dry run's sizes are tiny)
    tolerance = 1e-2
    ctx.record.update(device=str(device), dtype=str(dtype), triton_runs=triton_available(device),
                      triton_mode="compiled" if gpu else "interpreter (TRITON_INTERPRET=1)",
                      tolerance=tolerance, error="||out - ref|| / ||ref|| against float64")
    if not triton_available(device):
        ctx.sub("triton", skipped("Triton cannot run on this device (not installed, or no CUDA and "
                                  "TRITON_INTERPRET unset)"))
        return
    rows, width = (64 * 1024, 768) if gpu else (256, 64)
    rope_shape = (16, 12, 1024, 64) if gpu else (2, 2, 16, 32)
    ce_tokens, ce_width, ce_vocab = (16 * 1024, 768, 50257) if gpu else (128, 64, 500)

    def rmsnorm() -> dict[str, Any]:
        import torch.nn.functional as F

        from gptforge.kernels.rmsnorm import rms_norm
        from gptforge.model.gpt import RMS_NORM_EPS

        x = torch.randn(rows, width, device=device).to(dtype).requires_grad_()
        w = (1 + 0.3 * torch.randn(width, device=device)).requires_grad_()
        dy = torch.randn(rows, width, device=device).to(dtype)
        return compare_kernel(
            lambda a, b: rms_norm(a, b, RMS_NORM_EPS), lambda a, b: F.rms_norm(a, (width,), b, RMS_NORM_EPS),
            (x, w), dy, tolerance, device, "F.rms_norm (what nn.RMSNorm runs)")

    def rope() -> dict[str, Any]:
        from gptforge.kernels.rope import rotary
        from gptforge.model.gpt import apply_rotary, rope_tables

        B, nh, T, hd = rope_shape
        cos, sin = (t.to(device) for t in rope_tables(T, hd, 10000.0))
        x = torch.randn(rope_shape, device=device).to(dtype).requires_grad_()
        dy = torch.randn(rope_shape, device=device).to(dtype)
        return compare_kernel(lambda a: rotary(a, cos, sin), lambda a: apply_rotary(a, cos.to(a.dtype), sin.to(a.dtype)),
                              (x,), dy, tolerance, device, "apply_rotary (model/gpt.py)")

    def cross_entropy() -> dict[str, Any]:
        import torch.nn.functional as F

        from gptforge.kernels import linear_cross_entropy

        padded = (ce_vocab + 63) // 64 * 64
        h = torch.randn(ce_tokens, ce_width, device=device).to(dtype).requires_grad_()
        w = (0.02 * torch.randn(padded, ce_width, device=device)).to(dtype).requires_grad_()
        targets = torch.randint(0, ce_vocab, (ce_tokens,), device=device)
        chunk = 8192 if gpu else 32

        def chunked(a, b):
            return linear_cross_entropy(a, b, targets, ce_vocab, chunk_tokens=chunk)

        def full(a, b):
            return F.cross_entropy((a @ b.T)[:, :ce_vocab].float(), targets)

        result = compare_kernel(chunked, full, (h, w), None, tolerance, device,
                                "(hidden @ W.T).float() then F.cross_entropy: the full logits")
        result["memory"] = peak_memory_of(device, {"chunked": chunked, "full": full}, (h, w))
        result.update(tokens=ce_tokens, vocab=ce_vocab, chunk_tokens=chunk)
        return result

    ctx.sub("rmsnorm", rmsnorm)
    ctx.sub("rope", rope)
    ctx.sub("chunked_cross_entropy", cross_entropy)


def compare_kernel(kernel: Callable, reference: Callable, inputs: tuple, dy, tolerance: float, device,
                   reference_name: str) -> dict[str, Any]:
    """Values: the kernel's output and input gradients against the reference run in float64 on fresh
    inputs; speed: forward + backward of the kernel against the reference in the kernel's dtype."""
    import torch

    leaves = [a.detach().clone().requires_grad_() for a in inputs]

    def forward_backward(fn):
        for leaf in leaves:
            leaf.grad = None
        out = fn(*leaves)
        out.backward(dy if out.dim() else None)
        return out, [leaf.grad for leaf in leaves]

    out, grads = forward_backward(kernel)
    dy64 = dy.double() if dy is not None else None
    ref_args = [a.detach().double().requires_grad_() for a in inputs]
    ref = reference(*ref_args)
    ref.backward(dy64 if dy64 is not None and ref.dim() else None)
    errors = {"output": rel_error(out, ref), **{f"grad_{i}": rel_error(g, a.grad) for i, (g, a) in
                                                enumerate(zip(grads, ref_args))}}
    finite = all(torch.isfinite(t).all().item() for t in [out, *grads])
    kernel_ms = time_ms(lambda: forward_backward(kernel), device)
    reference_ms = time_ms(lambda: forward_backward(reference), device)
    worst = max(errors.values())
    result = {"errors": errors, "finite": finite, "values_ok": finite and worst <= tolerance,
              "kernel_ms": kernel_ms, "reference_ms": reference_ms, "speedup": reference_ms / kernel_ms,
              "reference": reference_name, "timing": "forward + backward, median"}
    if not result["values_ok"]:
        result.update(status="failed", error=f"largest relative error {worst:.3g} over the tolerance {tolerance:g}"
                                             + ("" if finite else ", or a value not finite"))
    print(f"   errors {', '.join(f'{k} {v:.2e}' for k, v in errors.items())}; kernel {kernel_ms:.3f} ms, "
          f"reference {reference_ms:.3f} ms", flush=True)
    return result


def rel_error(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def time_ms(fn: Callable, device) -> float:
    import statistics

    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def peak_memory_of(device, fns: dict[str, Callable], inputs: tuple) -> dict[str, Any]:
    """Peak GPU memory above what was allocated before, of forward + backward of each function."""
    import torch

    if device.type != "cuda":
        return {"note": "no allocator peak on a CPU: measured on a GPU only"}
    result = {}
    for name, fn in fns.items():
        args = [a.detach().clone().requires_grad_() for a in inputs]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(*args).backward()
        torch.cuda.synchronize()
        result[f"{name}_gb"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        del args
    result["saving"] = 1 - result["chunked_gb"] / result["full_gb"]
    return result


def headline_kernels(r: dict[str, Any]) -> str:
    text = []
    for name in ("rmsnorm", "rope", "chunked_cross_entropy"):
        s = r["subparts"].get(name, {})
        if "speedup" in s:
            text.append(f"{name} {'ok' if s['values_ok'] else 'WRONG'} {s['speedup']:.2f}x")
    mem = r["subparts"].get("chunked_cross_entropy", {}).get("memory", {})
    if "saving" in mem:
        text.append(f"CE memory {mem['chunked_gb']:.2f} vs {mem['full_gb']:.2f} GB (-{100 * mem['saving']:.0f}%)")
    if r["subparts"].get("triton", {}).get("status") == "skipped":
        text.append("Triton cannot run here")
    return "; ".join(text)


# ----------------------------------------------------------------------------------------------------------
# 7. DDP and FSDP2 over a process group of one, energy


def part_distributed(ctx: Context) -> None:
    import torch.distributed as dist

    from gptforge.config import load_config
    from gptforge.parallel.world import World

    device = ctx.device
    backend = "nccl" if device.type == "cuda" else "gloo"
    ctx.record.update(backend=backend, world_size=1)

    class OneProcessGroup(World):
        """World size 1 that still goes through DDP / fully_shard and the collectives: a real process
        group of one process, so the distributed code path runs without a second GPU."""

        @property
        def distributed(self) -> bool:
            return True

    world = OneProcessGroup()

    def step(strategy: str) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            from torch.nn.parallel import DistributedDataParallel

            from gptforge.bench.step import StepRig
            from gptforge.parallel.distribute import is_sharded_model

            overrides = [*ctx.overrides(batch=8 if device.type == "cuda" else None), "speed.compile=false",
                         f"dist.strategy={strategy}", f"dist.backend={backend}"]
            rig = StepRig(load_config(None, overrides), world)
            try:
                wrapped = (isinstance(rig.trainee.model, DistributedDataParallel) if strategy == "ddp"
                           else is_sharded_model(rig.trainee.raw_model))
                for i in range(3):
                    rig.step(timed=i > 0)
            finally:
                rig.close()
            record = rig.record()
            free_memory()
            if not wrapped:
                raise RuntimeError(f"the model was not wrapped by {strategy}: the distributed path did not run")
            print(f"   {strategy}: {record['tokens_per_sec']:,.0f} tokens/s, step {1000 * record['median_step_s']:.1f} ms",
                  flush=True)
            return {"wrapped": True, "overrides": shown_overrides(overrides), "tokens_per_sec": record["tokens_per_sec"],
                    "median_step_s": record["median_step_s"], "peak_mem_gb": record["peak_mem_gb"],
                    "comm_bytes_per_step": record["comm_bytes_per_step"]}

        return run

    def energy() -> dict[str, Any]:
        from gptforge.bench.step import bench

        if device.type != "cuda":
            raise Skip("energy is read through NVML, on a CUDA GPU")
        try:
            import pynvml  # noqa: F401
        except ImportError:
            raise Skip("nvidia-ml-py is not installed (pip install 'gptforge[energy]')") from None
        record = bench(load_config(None, [*ctx.overrides(), "speed.compile=false"]), steps=20, warmup=3)
        if record["energy"] is None:
            raise RuntimeError("NVML is installed but read no energy for this GPU")
        print(f"   energy: {record['energy']['joules_per_token']:.4g} J/token, {record['energy']['mean_power_w']} W",
              flush=True)
        return {**record["energy"], "tokens_per_sec": record["tokens_per_sec"], "steps": 20,
                "note": "the timed steps of gptforge bench, not compiled"}

    if backend == "nccl":
        import torch

        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        ctx.sub("ddp", step("ddp"))
        ctx.sub("fsdp2", step("fsdp2"))
    finally:
        dist.destroy_process_group()
    ctx.sub("energy", energy)


def headline_distributed(r: dict[str, Any]) -> str:
    text = []
    for name in ("ddp", "fsdp2"):
        s = r["subparts"].get(name, {})
        text.append(f"{name} {s['tokens_per_sec']:,.0f} tok/s" if s.get("status") == "ok" else f"{name} {s.get('status')}")
    e = r["subparts"].get("energy", {})
    text.append(f"{e['joules_per_token']:.3g} J/token" if e.get("status") == "ok" else f"energy {e.get('status')}")
    return f"{r.get('backend', '')}: " + "; ".join(text)


# ----------------------------------------------------------------------------------------------------------
# 8. time to loss


def part_time_to_loss(ctx: Context) -> None:
    import time_to_loss as ttl

    s = ctx.setting
    seconds = min(ctx.options.get("ttl_seconds") or s.ttl_seconds, (ctx.options["limit_s"] - s.ttl_reserve_s) / 2)
    ctx.record.update(seconds_per_side=seconds, shape={**s.shape, "batch_size": s.batch},
                      recipe=dataclasses.asdict(ttl.RECIPES["gpt2-124m"]))
    if seconds < 1:
        ctx.sub("compare", skipped(f"{ctx.options['limit_s']:.0f} s left: too little for two training runs"))
        return
    # Neither side compiles: gptforge counts its first step's compile as training time, while nanoGPT's
    # iteration 0 is replaced by its median iteration (time_to_loss.nanogpt_curve)
    overrides = [f"train.device={s.device}", "speed.compile=false",
                 *[o for o in s.switches() if not o.startswith(("optim.", "speed.compile"))]]
    ctx.record["gptforge_overrides"] = overrides

    def iter_s() -> float | None:
        """nanoGPT's step time from this run's bench record, when it measured the same shape and batch."""
        try:
            bench = json.loads((ctx.out / record_name("bench")).read_text())
        except (OSError, ValueError):
            return None
        peer = bench.get("subparts", {}).get("nanogpt", {})
        same = bench.get("shape") == {**s.shape, "batch_size": s.batch} and peer.get("compile") is False
        return peer.get("median_step_s") if same and peer.get("status") == "ok" else None

    def compare() -> dict[str, Any]:
        nanogpt = ctx.nanogpt
        result = ttl.compare(nanogpt, ctx.data(), seconds, overrides, shape=s.shape, batch=s.batch, device=s.device,
                             compile=False, recipe=ttl.RECIPES["gpt2-124m"], eval_tokens=s.eval_tokens,
                             iter_s=iter_s())
        ttl.print_comparison(result)
        return {k: result[k] for k in ("nanogpt", "gptforge", "gptforge_time_to_nanogpt_final_s", "time_ratio")}

    def gptforge_alone() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="gpu-proof-") as tmp:
            curve = ttl.run_gptforge(Path(ctx.data().path), Path(tmp) / "run", seconds, overrides, s.shape, s.batch,
                                     s.eval_tokens, eval_every=5)
        return {"final_val_loss": curve[-1]["val_loss"], "train_time_s": curve[-1]["time_s"], "evals": curve}

    try:
        ctx.nanogpt
    except Skip as exc:
        ctx.sub("nanogpt", skipped(str(exc)))
        ctx.sub("gptforge", gptforge_alone)
        return
    ctx.sub("compare", compare)


def headline_time_to_loss(r: dict[str, Any]) -> str:
    c = r["subparts"].get("compare", {})
    if c.get("status") == "ok":
        reached = c["gptforge_time_to_nanogpt_final_s"]
        return (f"{r['seconds_per_side']:.0f} s each: nanoGPT {c['nanogpt']['final_val_loss']:.3f}, gptforge "
                f"{c['gptforge']['final_val_loss']:.3f}; " + (f"reached nanoGPT's in {c['time_ratio']:.2f} of its time"
                                                             if reached is not None else "did not reach nanoGPT's"))
    g = r["subparts"].get("gptforge", {})
    if g.get("status") == "ok":
        return f"gptforge alone {g['final_val_loss']:.3f} after {g['train_time_s']:.0f} s; nanoGPT skipped"
    return ""


# ----------------------------------------------------------------------------------------------------------
# The run: parts in order, each in its own process, under its own limit


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    title: str
    run: Callable[[Context], None]
    headline: Callable[[dict[str, Any]], str]


PARTS = (
    Part("environment", "GPU, versions, measured peaks", part_environment, headline_environment),
    Part("gpu_tests", "pytest -m gpu", part_gpu_tests, headline_gpu_tests),
    Part("bench", "gptforge bench and nanoGPT's step", part_bench, headline_bench),
    Part("batch_size", "largest micro-batch", part_batch_size, headline_batch_size),
    Part("ablate", "bench --ablate", part_ablate, headline_ablate),
    Part("kernels", "Triton kernels, chunked CE memory", part_kernels, headline_kernels),
    Part("distributed", "DDP, FSDP2, energy", part_distributed, headline_distributed),
    Part("time_to_loss", "time to loss against nanoGPT", part_time_to_loss, headline_time_to_loss),
)
BY_NAME = {p.name: p for p in PARTS}


def record_name(name: str) -> str:
    return f"{[p.name for p in PARTS].index(name) + 1}_{name}.json"


def select_parts(spec: str | None) -> list[str]:
    """--parts: names or numbers, comma-separated, run in the proof's order whatever order they are given in."""
    if not spec:
        return [p.name for p in PARTS]
    chosen = set()
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        if item.isdigit() and 1 <= int(item) <= len(PARTS):
            chosen.add(PARTS[int(item) - 1].name)
        elif item in BY_NAME:
            chosen.add(item)
        else:
            raise ValueError(f"--parts: {item!r} is not a part; the parts are "
                             + ", ".join(f"{i} {p.name}" for i, p in enumerate(PARTS, 1)))
    return [p.name for p in PARTS if p.name in chosen]


def parse_limits(items: list[str]) -> dict[str, float]:
    limits = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in BY_NAME:
            raise ValueError(f"--limit {item}: {name!r} is not a part ({', '.join(BY_NAME)})")
        try:
            limits[name] = float(value)
        except ValueError:
            raise ValueError(f"--limit {item}: expected PART=SECONDS, e.g. bench=120") from None
        if limits[name] <= 0:
            raise ValueError(f"--limit {item}: the limit must be positive")
    return limits


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a part's process (and of what it starts): this checkout's src/ first."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}
    src = str(ROOT / "src")
    if src not in env.get("PYTHONPATH", "").split(os.pathsep):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def run_part(name: str, options: dict[str, Any], limit: float, out: Path) -> dict[str, Any]:
    """The part in a fresh process (its own session, so a limit stops its whole tree); its record."""
    path = out / record_name(name)
    path.unlink(missing_ok=True)
    extra = {"TRITON_INTERPRET": "1"} if name == "kernels" and options["setting"] != "gpu" else {}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--options",
           json.dumps({**options, "limit_s": limit})]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=child_env(extra), start_new_session=True, bufsize=1)
    tail: deque[str] = deque(maxlen=60)

    def relay() -> None:
        for line in proc.stdout:
            tail.append(line)
            print(f"  {name} | {line}", end="", flush=True)

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
        stop_tree(proc)
    reader.join(timeout=10)
    seconds = time.perf_counter() - start
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = {"part": name, "subparts": {}}
    if timed_out:
        record.update(status="timed out", error=f"stopped at its limit of {limit:g} s")
    elif record.get("status") in (None, "running"):
        record.update(status="crashed", error=f"the part's process ended with exit code {proc.returncode} "
                                               "before writing its record")
    if record["status"] in ("timed out", "crashed"):
        record["output_tail"] = "".join(tail)[-4000:]
        try:  # what its finished sub-parts measured
            record["headline"] = BY_NAME[name].headline(record)
        except Exception:
            record["headline"] = ""
    record.update(wall_s=round(seconds, 1), limit_s=round(limit, 1))
    write_record(path, record)
    return record


def stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM to the part's process group, SIGKILL after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_child(name: str, options: dict[str, Any]) -> int:
    setting = SETTINGS[options["setting"]]
    out = Path(options["out"])
    record = {"part": name, "title": BY_NAME[name].title, "setting": setting.name, "status": "running",
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    ctx = Context(setting, options, record, out / record_name(name))
    ctx.save()
    try:
        BY_NAME[name].run(ctx)
        statuses = [s["status"] for s in record["subparts"].values()]
        record["status"] = "failed" if "failed" in statuses else "ok"
        if record["status"] == "failed":
            record["error"] = "; ".join(f"{k}: {v['error']}" for k, v in record["subparts"].items()
                                        if v["status"] == "failed")[:2000]
    except (Exception, SystemExit) as exc:
        record.update(status="failed", error=error_text(exc), traceback=traceback.format_exc()[-4000:])
        print(f"failed: {record['error']}", flush=True)
    try:
        record["headline"] = BY_NAME[name].headline(record)
    except Exception as exc:  # a summary line must never lose the record
        record["headline"] = f"(no summary: {error_text(exc)})"
    ctx.save()
    return 0 if record["status"] == "ok" else 1


SETTINGS = {s.name: s for s in (GPU, DRY_RUN)}


def summary_table(records: list[dict[str, Any]], total_s: float, setting: Setting) -> str:
    lines = [f"\nGPU proof ({setting.name}), {total_s:.0f} s of a {setting.time_limit:.0f} s limit",
             f"{'#':>2} {'part':<13} {'status':<10} {'s':>6}  figures"]
    for r in records:
        note = r.get("headline") or ""
        if r["status"] not in ("ok",):
            note = (note + "; " if note else "") + str(r.get("error", ""))[:200]
        skipped = [k for k, v in r.get("subparts", {}).items() if v.get("status") == "skipped"]
        if skipped and "skipped" not in note:
            note += f" (skipped: {', '.join(skipped)})"
        lines.append(f"{r['number']:>2} {r['part']:<13} {r['status']:<10} {r.get('wall_s', 0):>6.1f}  {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU at the tiny preset")
    parser.add_argument("--parts", help="only these parts, by name or number, e.g. 3,ablate (default: all)")
    parser.add_argument("--out", type=Path, help="folder of the JSON records (default: benchmarks/results/gpu_proof; "
                                                 "a temporary folder for --dry-run)")
    parser.add_argument("--nanogpt", type=Path, default=DEFAULT_NANOGPT, help="a checkout of karpathy/nanoGPT "
                                                                            "(default: .peers/nanoGPT)")
    parser.add_argument("--data", type=Path, help="prepared data (default: .peers/gpt2-vocab when present, else the "
                                                  "built-in corpus)")
    parser.add_argument("--time-limit", type=float, help="seconds for the whole run (default: 480; 170 dry)")
    parser.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS", help="one part's limit")
    parser.add_argument("--ttl-seconds", type=float, help="time to loss: training seconds per side, at most "
                                                          "(default: 120; 3 dry)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--options", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args.child, json.loads(args.options))

    setting = DRY_RUN if args.dry_run else GPU
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA GPU is visible to torch here: the proof needs one; --dry-run runs it on the CPU")
    try:
        parts = select_parts(args.parts)
        limits = {**setting.limits, **parse_limits(args.limit)}
    except ValueError as exc:
        parser.error(str(exc))
    if args.data is not None and not args.data.is_dir():
        parser.error(f"--data {args.data}: not a folder; prepare one with gptforge prepare (docs/gpu.md)")
    data = args.data or (DEFAULT_DATA if DEFAULT_DATA.is_dir() and not args.dry_run else None)
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu-proof-dry-")) if args.dry_run
                       else ROOT / "benchmarks" / "results" / "gpu_proof")
    out.mkdir(parents=True, exist_ok=True)
    time_limit = args.time_limit or setting.time_limit
    options = {"setting": setting.name, "out": str(out), "nanogpt": str(args.nanogpt),
               "data": str(data.resolve()) if data else None, "ttl_seconds": args.ttl_seconds}
    print(f"GPU proof ({setting.name}): parts {', '.join(parts)}; records in {out}; run limit {time_limit:.0f} s; "
          f"data {shown(data) if data else 'the built-in corpus'}; nanoGPT {shown(args.nanogpt)}", flush=True)

    start = time.perf_counter()
    records = []
    for name in parts:
        left = time_limit - (time.perf_counter() - start)
        number = [p.name for p in PARTS].index(name) + 1
        print(f"\n== {number} {name}: {BY_NAME[name].title} (limit {min(limits[name], left):.0f} s)", flush=True)
        if left < setting.min_start_s:
            record = {"part": name, "status": "not run", "subparts": {},
                      "error": f"{left:.0f} s left of the run's {time_limit:.0f} s limit"}
            write_record(out / record_name(name), record)
        else:
            record = run_part(name, options, min(limits[name], left), out)
        record["number"] = number
        records.append(record)
    total = time.perf_counter() - start
    table = summary_table(records, total, setting)
    from nanogpt_speed import placeholders

    command = " ".join(["python", "benchmarks/gpu_proof.py", *placeholders(sys.argv[1:] if argv is None else argv)])
    summary = {"setting": setting.name, "command": command,
               "wall_s": round(total, 1), "time_limit_s": time_limit,
               "parts": [{k: r.get(k) for k in ("number", "part", "status", "wall_s", "limit_s", "headline", "error")}
                         for r in records], "table": table}
    write_record(out / "summary.json", summary)
    print(table)
    print(f"records in {out}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
