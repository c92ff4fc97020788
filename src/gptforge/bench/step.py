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
from gptforge.observe.hardware import datasheet_peak, measured_peak
from gptforge.observe.phases import PHASES, PhaseTimer
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
        rig = StepRig(cfg, world)
        try:
            meter = None
            for i in range(warmup + steps):
                if i == warmup:  # energy of the timed steps only
                    _sync(rig.device)
                    meter = energy_meter(rig.device)
                rig.step(timed=i >= warmup)
        finally:
            rig.close()
        return rig.record(meter)


class StepRig:
    """The training step `gptforge bench` times, built once (model, distribute, optimizer, loader, Stepper,
    as `gptforge train` builds them) and run one step at a time, so that a caller can also interleave the
    steps of several configurations in one process."""

    def __init__(self, cfg: Config, world: World):
        validate(cfg, world.world_size)
        if cfg.speed.fp8:  # before any data work
            check_fp8(training_device(cfg, world))
        data = resolve_data(cfg)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=data.vocab_size))
        device = training_device(cfg, world)
        precision = resolve_precision(cfg.speed.precision, device)
        rng.seed_everything(cfg.run.seed)
        raw_model = GPT(cfg.model)
        apply_train_kernels(raw_model, cfg)
        raw_model.to(device)
        apply_train_switches(raw_model, cfg.speed, device)  # fp8, activation checkpointing: before distribute
        cfg = resolve_batch_size(cfg, raw_model, precision, device, world, report=console.printer(world.is_main))
        model, self.comm = distribute(raw_model, cfg.dist, world, device, compile=cfg.speed.compile,
                                      compile_mode=cfg.speed.compile_mode)
        optimizer = build_optimizer(raw_model, cfg.optim, device.type)
        self.stepper = Stepper(model, raw_model, optimizer, precision.grad_scaler(), precision, world, cfg, [])
        self.stepper.phases = PhaseTimer(device)
        accum = cfg.grad_accum_steps(world.world_size)
        layout = Layout(cfg.model.block_size, cfg.train.batch_size, accum, world.rank, world.world_size)
        self.loader = TokenLoader(data.train, layout, mode=cfg.data.loader, seed=cfg.run.seed, device=device,
                                  prefetch=cfg.data.prefetch)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.cfg, self.world, self.device, self.precision = cfg, world, device, precision
        self.steps_run = 0
        self.step_s: list[float] = []
        self.split_s: dict[str, list[float]] = {"data": [], **{phase: [] for phase in PHASES}}
        model.train()

    def step(self, timed: bool = True) -> float:
        """One optimizer step; its wall seconds, kept (with its split) when `timed`."""
        self.world.barrier()  # every process starts the step together: the slowest one sets the pace
        t0 = time.perf_counter()
        batches = self.loader.next_step()
        t1 = time.perf_counter()
        self.steps_run += 1
        self.stepper.step(batches, 1.0, self.steps_run)  # lr_scale 1: every group at its peak (base_lr)
        _sync(self.device)
        seconds = time.perf_counter() - t0
        if timed:
            self.step_s.append(seconds)
            self.split_s["data"].append(t1 - t0)
            for phase, phase_s in self.stepper.phases.split().items():
                self.split_s[phase].append(phase_s)
        return seconds

    def close(self) -> None:
        self.loader.close()

    def record(self, meter=None) -> dict[str, Any]:
        """The bench record of the timed steps so far (energy from `meter`, when one was started)."""
        cfg, world, device = self.cfg, self.world, self.device
        tokens = cfg.tokens_per_step(world.world_size)
        energy = finish_meter(meter, tokens * len(self.step_s), cfg.run.price_per_hour, world)  # None without NVML
        median = statistics.median(self.step_s)
        tps = tokens / median
        model_flops = flops_per_token(cfg.model) * tps / world.world_size  # per process
        measured = measured_peak(device, self.precision.name)  # in the same run as the step
        datasheet = datasheet_peak(device, self.precision.name)
        return {
            **environment(device, self.precision.name, world.world_size),
            "config": cfg.to_dict(),
            "model": {**num_params(cfg.model), "flops_per_token": flops_per_token(cfg.model)},
            "tokens_per_step": tokens,
            "tokens_per_sec": tps,
            "tokens_per_sec_per_process": tps / world.world_size,
            "mfu": model_flops / measured,
            "mfu_datasheet": model_flops / datasheet if datasheet else None,
            "peak_flops_measured": measured,
            "peak_flops_datasheet": datasheet,
            "peak_mem_gb": peak_memory_gb(device),
            "median_step_s": median,
            "median_data_wait_s": statistics.median(self.split_s["data"]),
            "median_split_s": {name: statistics.median(times) for name, times in self.split_s.items()},
            "step_times_s": self.step_s,
            "split_times_s": self.split_s,
            "comm_bytes_per_step": self.comm.bytes_per_step if self.comm else 0,
            "energy": energy,
        }


def print_record(record: dict[str, Any]) -> None:
    datasheet = record.get("mfu_datasheet")
    split = record["median_split_s"]
    print(
        f"{record['device']} ({record['device_type']}, {record['precision']}), {record['world_size']} process(es): "
        f"{record['tokens_per_sec']:,.0f} tokens/s ({record['tokens_per_sec_per_process']:,.0f} per process), "
        f"step {1000 * record['median_step_s']:.1f} ms, MFU {100 * record['mfu']:.1f}% of a measured "
        f"{record['peak_flops_measured'] / 1e12:.3g} TFLOP/s matmul"
        + (f" ({100 * datasheet:.1f}% of the datasheet peak)" if datasheet else "")
        + f", peak memory {record['peak_mem_gb']:.2f} GB"
    )
    print("median split: " + ", ".join(f"{name} {1000 * seconds:.1f} ms" for name, seconds in split.items()))
    energy = record.get("energy")
    if energy:
        cost = f", {energy['cost']:.4g} at the price given" if "cost" in energy else ""
        print(f"energy: {energy['joules_per_token']:.4g} J/token, {energy['mean_power_w']} W mean{cost}")


def write_json(record: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=1) + "\n")
