"""`gptforge bench`: the real training step (data, forward, backward, optimizer), timed after a warm-up.

Built by the one builder `gptforge train` uses (train/builder.py: the model with every technique,
distribute, compile, optimizer, loader, Stepper), so the number is the step users get, not a kernel in
isolation. Reports the median of the timed steps.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from gptforge.config import Config
from gptforge.model.flops import flops_per_token, num_params
from gptforge.observe.console import percent
from gptforge.observe.energy import energy_meter, finish_meter
from gptforge.observe.environment import environment
from gptforge.observe.hardware import datasheet_peak, measured_peak
from gptforge.observe.phases import PHASES, PhaseTimer
from gptforge.progress import Progress
from gptforge.parallel.world import World, running_world
from gptforge.runtime import peak_memory_gb, synchronize
from gptforge.train.builder import build


def bench(cfg: Config, steps: int = 10, warmup: int = 3) -> dict[str, Any]:
    """Time `steps` optimizer steps after `warmup` untimed ones; every process returns the same record."""
    with running_world(cfg.dist.backend) as world:
        rig = StepRig(cfg, world)
        bar = Progress("bench", warmup + steps, "steps", enabled=world.is_main)
        try:
            meter = None
            for i in range(warmup + steps):
                if i == warmup:  # energy of the timed steps only
                    synchronize(rig.device)
                    meter = energy_meter(rig.device)
                seconds = rig.step(timed=i >= warmup)
                bar.update(i + 1, info=f"{'warm-up ' if i < warmup else ''}step {1000 * seconds:.0f} ms")
        finally:
            bar.close()
            rig.close()
        return rig.record(meter)


class StepRig:
    """The training step `gptforge bench` times, built once (model, distribute, optimizer, loader, Stepper,
    as `gptforge train` builds them) and run one step at a time, so that a caller can also interleave the
    steps of several configurations in one process."""

    def __init__(self, cfg: Config, world: World):
        t = build(cfg, world)  # a fresh model: never a run directory's checkpoint
        self.trainee, self.stepper, self.loader, self.comm = t, t.stepper, t.loader, t.comm
        self.stepper.phases = PhaseTimer(t.device)
        if t.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(t.device)
        self.cfg, self.world, self.device, self.precision = t.cfg, world, t.device, t.precision
        self.steps_run = 0
        self.step_s: list[float] = []
        self.split_s: dict[str, list[float]] = {"data": [], **{phase: [] for phase in PHASES}}
        t.model.train()

    def step(self, timed: bool = True) -> float:
        """One optimizer step; its wall seconds, kept (with its split) when `timed`."""
        self.world.barrier()  # every process starts the step together: the slowest one sets the pace
        t0 = time.perf_counter()
        batches = self.loader.next_step()
        t1 = time.perf_counter()
        self.steps_run += 1
        self.stepper.step(batches, 1.0, self.steps_run)  # lr_scale 1: every group at its peak (base_lr)
        synchronize(self.device)
        seconds = time.perf_counter() - t0
        if timed:
            self.step_s.append(seconds)
            self.split_s["data"].append(t1 - t0)
            for phase, phase_s in self.stepper.phases.split().items():
                self.split_s[phase].append(phase_s)
        return seconds

    def close(self) -> None:
        """Stop the loader and let the model go while the process group exists (see train.loop.Run.close)."""
        self.trainee.close()
        self.trainee = self.stepper = self.loader = None

    def record(self, meter=None) -> dict[str, Any]:
        """The bench record of the timed steps so far (energy from `meter`, when one was started)."""
        cfg, world, device = self.cfg, self.world, self.device
        tokens = cfg.tokens_per_step(world.world_size)
        energy = finish_meter(meter, tokens * len(self.step_s), cfg.run.price_per_hour, world)  # None without NVML
        median = statistics.median(self.step_s)
        tps = tokens / median
        model_flops = flops_per_token(cfg.model) * tps / world.world_size  # per process
        measured = measured_peak(device, self.precision.name)  # in the same run as the step
        if model_flops > measured:  # a peak measured too low (a busy moment): once more, then no figure
            measured = max(measured, measured_peak(device, self.precision.name))
        datasheet = datasheet_peak(device, self.precision.name)
        return {
            **environment(device, self.precision.name, world.world_size),
            "config": cfg.to_dict(),
            "model": {**num_params(cfg.model), "flops_per_token": flops_per_token(cfg.model)},
            "tokens_per_step": tokens,
            "tokens_per_sec": tps,
            "tokens_per_sec_per_process": tps / world.world_size,
            "mfu": model_flops / measured if model_flops <= measured else None,
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
        f"step {1000 * record['median_step_s']:.1f} ms, MFU {percent(record['mfu'])} of a measured "
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
