"""The training loop: one loop for CPU, GPU, many processes, pre-training and fine-tuning.

train() reads top to bottom: find the checkpoint to resume (train/resume.py), build everything a step needs
(train/builder.py, in its documented order), then step until a budget is met or early stopping fires. Each
step is one global batch through the Stepper (train/step.py: accumulation, clipping, skipping non-finite
updates, the optimizer). Logging, evaluation and checkpoints happen at step boundaries, so a checkpoint
(train/state.py) captures everything a bit-identical resume needs: weights, optimizer, every RNG, the loader
position and the counters. Every exit (budget, early stop, error, Ctrl-C, a pruned tuning trial) goes
through one `finally` that closes the loader, the progress bar and the metrics log.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from gptforge import __version__
from gptforge.config import Config, TrainConfig, save_config, validate
from gptforge.errors import GptforgeError, UnloadableCheckpoint
from gptforge.evaluate.generate import sample_texts
from gptforge.fileio import atomic_write_text
from gptforge.model import build_model
from gptforge.model.flops import flops_per_token, num_params
from gptforge.observe import console
from gptforge.observe.energy import energy_meter, finish_meter
from gptforge.observe.environment import environment
from gptforge.observe.hardware import Peak
from gptforge.observe.metrics import MetricsLog, truncate_after
from gptforge.parallel.distribute import full_model_state, full_optimizer_state
from gptforge.parallel.shards import save_shards
from gptforge.parallel.world import World, running_world
from gptforge.runtime import peak_memory_gb, synchronize
from gptforge.train import checkpoint, rng
from gptforge.train.builder import Trainee, apply_adapters, build
from gptforge.train.fitwatch import EarlyStop, fit_watch
from gptforge.train.guard import Guard
from gptforge.train.interrupt import deferred_interrupt
from gptforge.train.resume import Resume, find_resume, restore
from gptforge.train.runlock import run_lock
from gptforge.train.schedule import lr_multiplier, micro_steps, progress
from gptforge.train.state import TrainState
from gptforge.train.task import CARRY_FILE


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    time_s: float
    train_loss: float | None
    val: dict[str, Any] | None
    resumed_from: int | None
    samples: list[str] = field(default_factory=list)


class StopTraining(Exception):
    """Raised by an on_eval hook to end training now (a pruned tuning trial): train() closes the loader and
    metrics, writes no checkpoint, and raises it on to its caller."""


def train(cfg: Config, on_eval: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Train (or resume) the run `cfg` describes; under torchrun, every process calls this.
    on_eval(step, result) runs after every evaluation; it may raise StopTraining to end the run."""
    with running_world(cfg.dist.backend) as world:
        run = Run(cfg, world, on_eval)
        try:
            with run.exclusive():
                run.start()
                run.loop()
                return run.finish()
        finally:
            run.close()


class Run:
    """One training run in one process: its state, and the bookkeeping around each step."""

    def __init__(self, cfg: Config, world: World, on_eval: Callable[[int, dict[str, Any]], None] | None):
        validate(cfg, world.world_size)
        self.cfg, self.world, self.on_eval = cfg, world, on_eval
        self.say = console.printer(world.is_main)
        self.run_dir = Path(cfg.run.dir)
        self.t: Trainee | None = None
        self.metrics: MetricsLog | None = None
        self.bar: console.TrainProgress | None = None

    # ------------------------------------------------------------------------------------------------------
    # Set-up, the loop, the end

    def exclusive(self) -> contextlib.AbstractContextManager:
        """One writer per run directory: the main process holds RUN_DIR/run.lock while the run trains."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return run_lock(self.run_dir) if self.world.is_main else contextlib.nullcontext()

    def start(self) -> None:
        """Resume or start: build the step, write the run's files, restore the counters, evaluate step 0."""
        resume = self._build()
        self.cfg = cfg = self.t.cfg  # resolved: vocabulary, init_from's model, batch size
        self._write_run_files()
        # metrics.jsonl holds exactly the steps the state has: lines past the checkpoint resumed from (or, for
        # a run starting at step 0, every line a killed earlier start left) are dropped, and counted.
        dropped = truncate_after(self.run_dir, self.state.step if resume else -1) if self.world.is_main else 0
        self.metrics = MetricsLog(self.run_dir, enabled=self.world.is_main, tensorboard=cfg.run.tensorboard)
        if resume:
            self.metrics.event("resume", self.state.step, checkpoint=resume.path.name, dropped_lines=dropped,
                               world_size=self.world.world_size, saved_world_size=self.state.world_size)
        elif dropped:
            self.metrics.event("restart", 0, dropped_lines=dropped)
            self.say(f"no checkpoint to resume from: {dropped} lines an earlier start wrote to metrics.jsonl dropped")
        self.early = EarlyStop(cfg.eval.early_stop_patience, cfg.eval.early_stop_min_delta, self.state.early_stop)
        self.watch = fit_watch(cfg.guard, self.t.data.train, self.state.fit_watch, baseline=self.t.task.baseline)
        self.last_saved = self.state.step if resume else -1
        self.train_loss: float | None = None
        self._banner(resume)
        if not self.budget_left():
            self.say(f"the run in {self.run_dir} has met its budget at step {self.state.step}; "
                     "raise train.max_steps/max_tokens/max_time to go on")
        elif self.early.stopped:
            self.say(f"the run in {self.run_dir} stopped early at step {self.state.step} ({self.early.bad_evals} "
                     "evaluations without improvement); raise eval.early_stop_patience, or set it to 0, to go on")
        elif self.state.step == 0:
            self.evaluate()
        # Last thing before the first step, so nothing in the set-up can consume random numbers.
        if resume and str(self.world.rank) in self.state.rng:
            rng.restore(self.state.rng[str(self.world.rank)])
        else:  # a new run, or a process that did not exist when the checkpoint was written
            rng.seed_everything(cfg.run.seed + self.world.rank + self.state.step)

    def _build(self) -> Resume | None:
        """Find the checkpoint to resume (None: a new run) and build the step on it. A checkpoint that passed
        its checks and still does not load is passed over like a damaged one, and the next older one tried."""
        unloadable: tuple[Path, ...] = ()
        while True:
            resume = find_resume(self.run_dir, report=lambda msg: self.say(f"[yellow]{msg}[/]"),
                                 start_over=self.cfg.run.start_over, set_aside=self.world.is_main, skip=unloadable)
            self.state = resume.state if resume else TrainState()
            self.resumed_from = resume.state.step if resume else None
            self.guard = Guard(self.cfg.guard, self.state.guard)
            try:
                self.t = build(self.cfg, self.world, resume=resume, guard=self.guard, validation=True,
                               report=self.say)
                return resume
            except UnloadableCheckpoint as e:
                self.say(f"[yellow]{e}[/]")
                unloadable += (e.path,)

    def loop(self) -> None:
        """Step until a budget is met or early stopping fires; log, evaluate and save at step boundaries."""
        cfg, s = self.cfg, self.state
        self.bar = console.TrainProgress(enabled=self.world.is_main,
                                         start_fraction=progress(cfg.train, s.step, s.tokens, s.time_s))
        self.meter, self.tokens_before = energy_meter(self.t.device), s.tokens  # None without NVML or a GPU
        self.window_tokens, self.window_time = 0, 0.0
        self.t.model.train()
        at_boundary = True  # the state is that of a completed step (and its log, evaluation and save)
        try:
            with deferred_interrupt(self.say) as interrupt:
                while self.budget_left() and not self.early.stopped:
                    at_boundary = False
                    self.t.stepper.stop_asked = interrupt.requested
                    loss, grad_norm, skipped = self.step()
                    self.report_skips(loss, grad_norm, skipped)
                    if self.guard.needs_rollback:
                        self.roll_back()
                    if s.step % cfg.train.log_every == 0 or not self.budget_left():
                        self.log(loss, grad_norm)
                    if cfg.eval.every and s.step % cfg.eval.every == 0 and self.budget_left():
                        self.evaluate()
                    if cfg.train.save_every and s.step % cfg.train.save_every == 0 and self.budget_left():
                        self.save()
                    at_boundary = True
                    if self.world.distributed and self.t.stepper.stop_agreed or \
                            not self.world.distributed and interrupt.requested:
                        raise KeyboardInterrupt
        except StopTraining as e:
            self.metrics.event("stopped", s.step, reason=str(e))
            self.say(f"stopped at step {s.step}: {e}")
            raise
        except KeyboardInterrupt:
            self.interrupted(at_boundary)
            raise

    def interrupted(self, at_boundary: bool) -> None:
        """Ctrl-C: save the completed step; a second Ctrl-C mid-step saves nothing (train/interrupt.py)."""
        s = self.state
        if at_boundary:
            if s.step != self.last_saved:
                self.save()
            self.metrics.event("interrupted", s.step, saved=True)
            self.say(f"interrupted: saved step {s.step} to {self.run_dir}; run the same command again to resume")
            return
        last = checkpoint.find_latest(self.run_dir)
        self.metrics.event("interrupted", s.step, saved=False)
        resume_from = f"its last checkpoint, {last.name}" if last is not None else "the start (no checkpoint yet)"
        self.say(f"interrupted mid-step: nothing saved; run the same command again to resume from {resume_from}")

    def finish(self) -> TrainResult:
        """After the last step: a final evaluation and checkpoint, energy, samples."""
        s, t = self.state, self.t
        self.bar.close()
        t.close()
        if s.step != self.last_saved:
            if self.early.last_step != s.step:  # an early stop has just evaluated this step
                self.evaluate()
            self.save()
        energy = finish_meter(self.meter, s.tokens - self.tokens_before, self.cfg.run.price_per_hour, self.world)
        if energy is not None:  # a collective
            self.metrics.event("energy", s.step, **energy)
            cost = f", cost {energy['cost']:.4g}" if "cost" in energy else ""
            self.say(f"energy: {energy['energy_kwh']:.4g} kWh ({energy['energy_j']:.0f} J) for "
                     f"{s.tokens - self.tokens_before:,} tokens{cost}")
        self.metrics.event("finished", s.step, reason="early_stop" if self.early.stopped else "budget",
                           tokens=s.tokens, time_s=round(s.time_s, 3))  # what `gptforge runs` reads
        self.metrics.close()
        self.say(f"done: step {s.step}, {s.tokens:,} tokens in {s.time_s:.1f}s of training; run saved in {self.run_dir}")
        return TrainResult(self.run_dir, s.step, s.tokens, s.time_s, self.train_loss, s.last_val,
                           self.resumed_from, self.samples())

    def close(self) -> None:
        """Close whatever was opened; safe on every exit and more than once. The model and its DDP wrapper
        are let go here, while the process group still exists: a wrapper freed after the group is destroyed
        frees the group's last reference under the GIL, and gloo's worker threads can then deadlock."""
        if self.bar is not None:
            self.bar.close()
        if self.t is not None:
            self.t.close()
            self.t = None
        if self.metrics is not None:
            self.metrics.close()

    # ------------------------------------------------------------------------------------------------------
    # One step and what follows it

    def budget_left(self) -> bool:
        t, s = self.cfg.train, self.state
        return not ((t.max_steps is not None and s.step >= t.max_steps)
                    or (t.max_tokens is not None and s.tokens >= t.max_tokens)
                    or (t.max_time is not None and s.time_s >= t.max_time))

    def step(self) -> tuple[Any, Any, str | None]:
        """One optimizer step at the schedule's rate; the counters move on."""
        cfg, s, t = self.cfg, self.state, self.t
        accum = cfg.grad_accum_steps(self.world.world_size)
        t0 = time.perf_counter()
        self.lr_scale = lr_multiplier(cfg.schedule, s.step, progress(cfg.train, s.step, s.tokens, s.time_s))
        n_micro = micro_steps(cfg.schedule, s.step, accum)  # < accum only during batch-size warmup
        loss, grad_norm, skipped = t.stepper.step(t.augment(t.loader.next_step(n_micro)), self.lr_scale, s.step + 1)
        if (s.step + 1) % cfg.train.log_every == 0:  # the log line's time is the device's
            synchronize(t.device)
        dt = time.perf_counter() - t0
        step_tokens = cfg.tokens_per_step(self.world.world_size) // accum * n_micro
        s.step, s.tokens, s.time_s = s.step + 1, s.tokens + step_tokens, s.time_s + dt
        self.window_tokens, self.window_time = self.window_tokens + step_tokens, self.window_time + dt
        if self.watch is not None and not skipped and not torch.is_tensor(loss):  # sync_free: read steps only
            self.watch.add_train_loss(loss)  # the fit watch compares the mean train loss between evaluations
        return loss, grad_norm, skipped

    def report_skips(self, loss: Any, grad_norm: Any, skipped: str | None) -> None:
        step, consecutive = self.state.step, self.guard.consecutive
        if skipped:
            self.metrics.event(f"skip_{skipped}", step, loss=loss, grad_norm=grad_norm, consecutive=consecutive)
            self.say(f"[yellow]step {step}: {skipped.replace('_', ' ')} (loss {loss:.4g}, grad norm {grad_norm:.4g}); "
                     "update skipped[/]")
        device_skips = self.t.stepper.device_skips  # speed.sync_free: skipped on the device since the last read
        if device_skips:
            self.metrics.event("skip_nonfinite", step, on_device=device_skips, consecutive=consecutive)
            self.say(f"[yellow]step {step}: {device_skips} non-finite update(s) skipped on the device[/]")

    def roll_back(self) -> None:
        """Too many skipped updates in a row: weights and optimizer back to the newest checkpoint; the loader
        keeps its position, so the data moves on."""
        step, skipped = self.state.step, self.guard.consecutive
        target = checkpoint.find_latest(self.run_dir, report=self.say)
        if target is None:
            raise GptforgeError(f"{skipped} updates in a row were skipped (step {step}) and there is no checkpoint "
                                "to go back to; lower optim.lr or check the data (metrics.jsonl has every skip)")
        restore(self.t.raw_model, self.t.optimizer, target, self.world)
        self.metrics.event("rollback", step, checkpoint=target.name, skipped=skipped)
        self.say(f"[yellow]step {step}: {skipped} skipped updates in a row; weights and optimizer back to "
                 f"{target.name}, data moves on[/]")
        self.guard.consecutive = 0

    def log(self, loss: Any, grad_norm: Any) -> None:
        s, t = self.state, self.t
        self.train_loss = float(loss)  # sync_free keeps it on the device until here
        tps = self.window_tokens / self.window_time
        record = {
            "step": s.step, "tokens": s.tokens, "time_s": round(s.time_s, 3), "lr": self.cfg.optim.lr * self.lr_scale,
            "train_loss": self.train_loss, "grad_norm": float(grad_norm), "tokens_per_sec": round(tps, 1),
            "mfu": _rounded(self.peak.mfu(self.flops_per_token * tps / self.world.world_size), 5),
            "peak_mem_gb": round(peak_memory_gb(t.device), 3),
        }
        if t.comm is not None:
            record.update(comm_bytes_per_step=t.comm.bytes_per_step, compression_ratio=round(t.comm.ratio, 2))
        self.metrics.write(record)
        self.bar.update(record, progress(self.cfg.train, s.step, s.tokens, s.time_s))
        self.window_tokens, self.window_time = 0, 0.0

    def evaluate(self) -> dict[str, Any]:
        """Validation on the fixed batches (the family's task says what: loss and bits per byte, or loss and
        accuracy); then the fit watch, the best checkpoint, early stopping and the caller's hook (which may
        stop the run)."""
        s, t = self.state, self.t
        result = t.task.evaluate(t.model, t.val, t.precision, t.device, self.world)
        self.metrics.write({"step": s.step, "tokens": s.tokens, "time_s": round(s.time_s, 3), **result})
        self.say(f"step {s.step}: {t.task.summary(result)}")
        s.last_val = result
        self._judge(result)
        if self.on_eval is not None:
            self.on_eval(s.step, result)
        return result

    def _judge(self, result: dict[str, Any]) -> None:
        """After each evaluation: the fit watch, the best checkpoint and early stopping (every process alike)."""
        step, early = self.state.step, self.early
        for flag in self.watch.observe(step, result["val_loss"]) if self.watch is not None else []:
            self.metrics.event(flag.kind, step, **flag.fields)
            self.say(f"[yellow]step {step}: {flag.message}[/]")
        if step == 0:  # the untrained model: no best checkpoint (and no optimizer state to write), no count
            return
        if early.update(step, result["val_loss"]) and self.cfg.eval.keep_best:
            self.save(best=True)
        if early.stopped:
            self.metrics.event("early_stop", step, best_step=early.best_step, best_val_loss=early.best_loss,
                               evals_without_improvement=early.bad_evals, min_delta=early.min_delta)
            best = f"{early.best_loss:.4f} at step {early.best_step}" if early.best_step is not None else "none"
            kept = f" (in {self.run_dir / 'best'})" if self.cfg.eval.keep_best and early.best_step is not None else ""
            self.say(f"[yellow]step {step}: early stop: val loss has not improved by more than {early.min_delta} "
                     f"for {early.bad_evals} evaluations; best {best}{kept}[/]")

    # ------------------------------------------------------------------------------------------------------
    # Checkpoints and the run's files

    def save(self, best: bool = False) -> None:
        """A checkpoint of this step boundary (collective: every process gathers or writes its shard; rank 0
        completes the folder). best: RUN_DIR/best instead (never pruned, never resumed from)."""
        cfg, s, t, world = self.cfg, self.state, self.t, self.world
        staged = weights = optim = None
        if cfg.dist.checkpoint == "sharded" and world.distributed:
            staged = checkpoint.staging_dir(self.run_dir, s.step, tag="best-sharded" if best else "sharded")
            if world.is_main:
                shutil.rmtree(staged, ignore_errors=True)
                staged.mkdir(parents=True)
            world.barrier()
            save_shards(t.raw_model, t.optimizer, staged / "shards", world)
            world.barrier()
        else:
            weights = checkpoint.model_tensors(t.raw_model, full_model_state(t.raw_model))
            optim = full_optimizer_state(t.raw_model, t.optimizer)
        rngs = world.gather_json(rng.capture())
        carry = t.task.carry_tensors(world)  # a recurrent model's hidden state, every process's rows
        s.config, s.rng, s.loader, s.world_size = cfg.to_dict(), {str(r): x for r, x in enumerate(rngs)}, \
            t.loader.state_dict(), world.world_size
        s.scaler = t.scaler.state_dict() if t.scaler is not None else None
        s.tokenizer_sha256 = t.data.tokenizer.sha256 if t.data.tokenizer is not None else None
        s.guard, s.early_stop = self.guard.state_dict(), self.early.state_dict()
        s.fit_watch = self.watch.state_dict() if self.watch is not None else None
        files = {"tokenizer.json": self.run_dir / "tokenizer.json"} if t.data.tokenizer is not None else {}
        if getattr(t.data, "classes", None):  # an image run's class names, for predict
            files["classes.json"] = self.run_dir / "classes.json"
        if world.is_main:
            checkpoint.save_checkpoint(self.run_dir, s.step, model=weights, optimizer=optim, state=s.to_dict(),
                                       files=files, keep=cfg.train.keep_checkpoints, staged=staged,
                                       tensors={CARRY_FILE: carry} if carry else None,
                                       dest=self.run_dir / "best" if best else None)
        world.barrier()
        if not best:
            self.last_saved = s.step

    def _write_run_files(self) -> None:
        """config.yaml (resolved), tokenizer.json and environment.json, by the main process."""
        t = self.t
        if self.world.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml")
            if t.data.tokenizer is not None:
                t.data.tokenizer.save(self.run_dir / "tokenizer.json")
            if getattr(t.data, "classes", None):
                atomic_write_text(self.run_dir / "classes.json", json.dumps(list(t.data.classes)))
            env = environment(t.device, t.precision.name, self.world.world_size)
            atomic_write_text(self.run_dir / "environment.json", json.dumps(env, indent=1))
        self.world.barrier()

    def _banner(self, resume) -> None:
        cfg, t, s, world = self.cfg, self.t, self.state, self.world
        counts = num_params(cfg.model)
        self.flops_per_token = flops_per_token(cfg.model)
        self.peak = Peak(t.device, t.precision.name)
        accum = cfg.grad_accum_steps(world.world_size)
        unit = "images" if cfg.model.block_size == 1 and cfg.model.arch != "gpt" else "tokens"  # a cnn counts images
        self.say(
            f"gptforge {__version__} | {cfg.model.arch} | {counts['total'] / 1e6:.2f}M parameters "
            f"({counts['non_embedding'] / 1e6:.2f}M non-embedding) | {t.device.type} {t.precision.name} | "
            f"{cfg.tokens_per_step(world.world_size)} {unit}/step "
            f"({cfg.train.batch_size} x {cfg.model.block_size} x {accum} accum x {world.world_size} proc"
            f"{', ' + cfg.dist.strategy if world.distributed else ''}) | data {t.data.path}"
        )
        self.say(f"budget: {budgets_text(cfg.train)}")
        if resume:
            self.say(f"resumed from {resume.path} (step {s.step}, {s.tokens} tokens, {s.time_s:.1f}s)")

    def samples(self) -> list[str]:
        """The samples printed at the end of training (train.samples), also appended to samples.jsonl."""
        cfg, t, world = self.cfg, self.t, self.world
        if t.data.tokenizer is None or not cfg.train.samples:
            return []
        sampler = t.raw_model
        if world.distributed and cfg.dist.strategy != "ddp":  # sharded: sample from gathered weights
            full = full_model_state(t.raw_model)  # collective
            sampler = build_model(cfg.model)
            apply_adapters(sampler, cfg)
            sampler.load_state_dict(full)
            sampler.to(t.device)
        if not world.is_main:
            return []
        if t.data.chat:  # a chat run answers validation questions instead of starting documents
            from gptforge.evaluate.chat import answer_samples

            texts = answer_samples(sampler, t.data, cfg.train.samples, cfg.train.sample_tokens)
        else:
            texts = sample_texts(sampler, t.data.tokenizer, cfg.train.samples, cfg.train.sample_tokens, cfg.run.seed)
        with open(self.run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
            f.writelines(json.dumps({"step": self.state.step, "sample": text}) + "\n" for text in texts)
        for i, text in enumerate(texts):
            console.show_sample(i, text)
        return texts


def budgets_text(t: TrainConfig) -> str:
    """The budgets in force; the first one reached stops the run."""
    parts = []
    if t.max_steps is not None:
        parts.append(f"{t.max_steps:,} steps (train.max_steps)")
    if t.max_tokens is not None:
        parts.append(f"{t.max_tokens:,} tokens (train.max_tokens)")
    if t.max_time is not None:
        parts.append(f"{t.max_time:g} s of training (train.max_time)")
    return "stops at " + " or ".join(parts) + (", whichever comes first" if len(parts) > 1 else "")


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
