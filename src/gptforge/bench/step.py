"""`gptforge bench`: the real training step (data, forward, backward, optimizer), timed after a warm-up.

Built from the same pieces as `gptforge train` (model, distribute, optimizer, loader, Stepper), so the
number is the step users get, not a kernel in isolation. Reports the median of the timed steps.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from gptforge.config import Config, validate
from gptforge.data.loader import Layout, TokenLoader
from gptforge.model.flops import flops_per_token, num_params
from gptforge.model.gpt import GPT
from gptforge.observe import console
from gptforge.observe.energy import energy_meter, finish_meter
from gptforge.observe.environment import environment
from gptforge.observe.hardware import peak_flops
from gptforge.parallel.apply import apply_train_switches, check_fp8
from gptforge.parallel.distribute import distribute
from gptforge.parallel.world import World, running_world
from gptforge.train import rng
from gptforge.train.batch_finder import resolve_batch_size
from gptforge.train.loop import Stepper, apply_train_kernels, peak_memory_gb, resolve_data, training_device
from gptforge.train.optim import build_optimizer
from gptforge.train.precision import resolve_precision


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(cfg: Config, steps: int = 10, warmup: int = 3) -> dict[str, Any]:
    """Time `steps` optimizer steps after `warmup` untimed ones; every process returns the same record."""
    with running_world(cfg.dist.backend) as world:
        return _bench(cfg, world, steps, warmup)


def _bench(cfg: Config, world: World, steps: int, warmup: int) -> dict[str, Any]:
    validate(cfg, world.world_size)
    if cfg.train.fp8:  # before any data work
        check_fp8(training_device(cfg, world))
    data = resolve_data(cfg)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=data.vocab_size))
    device = training_device(cfg, world)
    precision = resolve_precision(cfg.train.precision, device)
    rng.seed_everything(cfg.run.seed)
    raw_model = GPT(cfg.model)
    apply_train_kernels(raw_model, cfg)
    raw_model.to(device)
    apply_train_switches(raw_model, cfg.train, device)  # fp8, activation checkpointing: before distribute
    cfg = resolve_batch_size(cfg, raw_model, precision, device, world, report=console.printer(world.is_main))
    model, comm = distribute(raw_model, cfg.dist, world, device, compile=cfg.train.compile,
                             compile_mode=cfg.train.compile_mode)
    optimizer = build_optimizer(raw_model, cfg.train, device.type)
    stepper = Stepper(model, raw_model, optimizer, precision.grad_scaler(), precision, world, cfg, [])
    accum = cfg.grad_accum_steps(world.world_size)
    layout = Layout(cfg.model.block_size, cfg.train.batch_size, accum, world.rank, world.world_size)
    loader = TokenLoader(data.train, layout, mode=cfg.data.loader, seed=cfg.run.seed, device=device, prefetch=cfg.data.prefetch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    step_s, data_s = [], []
    meter = None
    model.train()
    for i in range(warmup + steps):
        if i == warmup:  # energy of the timed steps only
            _sync(device)
            meter = energy_meter(device)
        world.barrier()  # every process starts the step together: the slowest one sets the pace
        t0 = time.perf_counter()
        batches = loader.next_step()
        t1 = time.perf_counter()
        stepper.step(batches, 1.0, i + 1)  # lr_scale 1: every group at its peak (base_lr)
        _sync(device)
        t2 = time.perf_counter()
        if i >= warmup:
            data_s.append(t1 - t0)
            step_s.append(t2 - t0)
    loader.close()

    tokens = cfg.tokens_per_step(world.world_size)
    energy = finish_meter(meter, tokens * steps, cfg.run.price_per_hour, world)  # None without NVML or a GPU
    median = statistics.median(step_s)
    tps = tokens / median
    peak = peak_flops(device, precision.name)
    mfu = flops_per_token(cfg.model) * tps / (peak * world.world_size)
    return {
        **environment(device, precision.name, world.world_size),
        "config": cfg.to_dict(),
        "model": {**num_params(cfg.model), "flops_per_token": flops_per_token(cfg.model)},
        "tokens_per_step": tokens,
        "tokens_per_sec": tps,
        "tokens_per_sec_per_process": tps / world.world_size,
        "mfu": mfu,
        "peak_flops_per_process": peak,
        "peak_mem_gb": peak_memory_gb(device),
        "median_step_s": median,
        "median_data_wait_s": statistics.median(data_s),
        "step_times_s": step_s,
        "comm_bytes_per_step": comm.bytes_per_step if comm else 0,
        "energy": energy,
    }


def print_record(record: dict[str, Any]) -> None:
    print(
        f"{record['device']} ({record['device_type']}, {record['precision']}), {record['world_size']} process(es): "
        f"{record['tokens_per_sec']:,.0f} tokens/s ({record['tokens_per_sec_per_process']:,.0f} per process), "
        f"step {1000 * record['median_step_s']:.1f} ms (data wait {1000 * record['median_data_wait_s']:.1f} ms), "
        f"MFU {100 * record['mfu']:.1f}%, peak memory {record['peak_mem_gb']:.2f} GB"
    )
    energy = record.get("energy")
    if energy:
        cost = f", {energy['cost']:.4g} at the price given" if "cost" in energy else ""
        print(f"energy: {energy['joules_per_token']:.4g} J/token, {energy['mean_power_w']} W mean{cost}")


def write_json(record: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=1) + "\n")
