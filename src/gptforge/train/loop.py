"""The training loop: one loop for CPU, GPU, pre-training and fine-tuning.

Order of work: resolve data and vocabulary -> find a checkpoint to resume -> build the model (pure module),
move it, apply fp8 and activation checkpointing from outside -> resolve train.batch_size=auto -> distribute and
compile -> optimizer -> loader -> steps. Each step: one global batch split into
micro-steps (gradient accumulation; fewer during batch-size warmup), clip, skip if not finite, the optimizer
(AdamW or Muon), schedule. Evaluation, logging and checkpoints happen at step boundaries, so a checkpoint
captures everything a bit-identical resume needs: weights, optimizer, every RNG, the loader position and the
counters. With speed.sync_free, the loss and gradient norm stay on the device between log, eval and save
steps, and non-finite updates are skipped there (masked_step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from gptforge import __version__
from gptforge.config import Config, migrate, save_config, validate
from gptforge.data.augment import Augmenter
from gptforge.data.loader import Layout, TokenLoader, val_batches
from gptforge.data.prepare import DataDir, load_data_dir
from gptforge.errors import CheckpointError, GptforgeError
from gptforge.evaluate.loss import evaluate
from gptforge.fileio import atomic_write_text
from gptforge.model.flops import flops_per_token, num_params
from gptforge.model.gpt import GPT
from gptforge.observe import console
from gptforge.observe.environment import environment
from gptforge.observe.hardware import peak_flops
from gptforge.observe.energy import energy_meter, finish_meter
from gptforge.observe.metrics import MetricsLog, truncate_after
from gptforge.observe.phases import PhaseTimer
from gptforge.parallel.apply import apply_train_switches, check_fp8
from gptforge.parallel.distribute import (
    distribute,
    full_model_state,
    full_optimizer_state,
    grad_sync,
    is_sharded_model,
    load_full_model_state,
    load_optimizer_state,
    load_sharded,
    save_sharded,
)
from gptforge.parallel.world import World, running_world
from gptforge.train import checkpoint, rng
from gptforge.train.batch_finder import resolve_batch_size
from gptforge.train.fitwatch import EarlyStop, fit_watch
from gptforge.train.guard import Guard
from gptforge.train.optim import build_optimizer
from gptforge.train.precision import pick_device, resolve_precision
from gptforge.train.schedule import lr_multiplier, micro_steps, progress


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


def resolve_data(cfg: Config) -> DataDir:
    """The prepared data of a run: data.dir, or the built-in corpus prepared once into the cache."""
    if cfg.data.dir:
        return load_data_dir(cfg.data.dir, verify_sha256=cfg.data.verify)
    from gptforge.data.corpus import builtin_data_dir

    path = builtin_data_dir(cfg.data.tokenizer, cfg.data.vocab_size, progress=console.is_tty())
    return load_data_dir(path, verify_sha256=cfg.data.verify)


def _check_same_run(saved: dict[str, Any], cfg: Config, data: DataDir, run_dir: Path) -> None:
    """A run directory may only be resumed by the same model on the same tokenizer."""
    old, new = migrate(saved["config"])["model"], dataclasses.asdict(cfg.model)
    diffs = [f"model.{k}: {old.get(k)!r} there, {v!r} here" for k, v in new.items() if k != "preset" and old.get(k) != v]
    if diffs:
        raise CheckpointError(
            f"{run_dir} holds a run of a different model ({'; '.join(diffs)}). "
            "Choose another run.dir, or delete that one to start over."
        )
    saved_optimizer = migrate(saved["config"]).get("optim", {}).get("name", "adamw")
    if saved_optimizer != cfg.optim.name:
        raise CheckpointError(
            f"{run_dir} was trained with optim.name={saved_optimizer}, this run asks for "
            f"optim.name={cfg.optim.name}; use the same optimizer to resume, or another run.dir"
        )
    saved_tok = saved.get("tokenizer_sha256")
    if data.tokenizer is not None and saved_tok and saved_tok != data.tokenizer.sha256:
        raise CheckpointError(f"{run_dir} was trained with a different tokenizer than {data.path} has; choose another run.dir")


def _init_source(cfg: Config, data: DataDir):
    """The run that finetune.init_from names: its weights and model section start this one (fine-tuning)."""
    from gptforge.inference import load_checkpoint

    source = load_checkpoint(cfg.finetune.init_from, report=lambda msg: console.printer()(f"[yellow]{msg}[/]"))
    if "quantization" in source.state:
        raise CheckpointError(
            f"finetune.init_from={cfg.finetune.init_from} is quantized; fine-tune the full-precision run "
            "(and use finetune.qat for quantization-aware training)"
        )
    if source.tokenizer is not None and data.tokenizer is not None and source.tokenizer.sha256 != data.tokenizer.sha256:
        raise CheckpointError(
            f"{data.path} was tokenized with another tokenizer than finetune.init_from={cfg.finetune.init_from}; "
            f"prepare the data with --tokenizer {source.checkpoint / 'tokenizer.json'}"
        )
    if data.vocab_size > source.config.model.vocab_size:
        raise CheckpointError(
            f"{data.path} has {data.vocab_size} token ids but the model of finetune.init_from only "
            f"{source.config.model.vocab_size}"
        )
    return source


def _apply_adapters(model: GPT, cfg: Config) -> None:
    """LoRA and quantization-aware training, applied to the built model from outside it."""
    if cfg.finetune.lora.rank:
        from gptforge.adapt.lora import apply_lora

        apply_lora(model, cfg.finetune.lora)
    if cfg.finetune.qat:
        from gptforge.adapt.qat import apply_qat

        apply_qat(model, cfg.finetune.qat)


def apply_train_kernels(model: GPT, cfg: Config) -> None:
    """speed.fused_kernels and speed.fused_ce, applied to the built model from outside it; Triton or the
    PyTorch reference is chosen per call from the tensors' device, so this may run before the model moves."""
    if cfg.speed.fused_kernels or cfg.speed.fused_ce:
        from gptforge.kernels import apply_kernels

        apply_kernels(model, cfg.speed.fused_kernels, cfg.speed.fused_ce, cfg.speed.ce_chunk_tokens)


def _rollback(model: GPT, optimizer: torch.optim.Optimizer, ckpt: Path, world: World) -> None:
    """Weights and optimizer state of a checkpoint; the loader keeps its position, so the data moves on."""
    if checkpoint.is_sharded(ckpt):
        load_sharded(model, optimizer, ckpt / "dcp")
        return
    if is_sharded_model(model):
        load_full_model_state(model, checkpoint.read_weights(ckpt))
    else:
        checkpoint.load_weights(model, ckpt)
    load_optimizer_state(model, optimizer, checkpoint.read_optimizer(ckpt, checkpoint.read_state(ckpt)), world)


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def training_device(cfg: Config, world: World) -> torch.device:
    """train.device, with each process on its own GPU under torchrun."""
    device = pick_device(cfg.train.device)
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", world.local_rank)
    return device


def _sparsity_masks(model: GPT) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, mask) for every trainable linear weight holding zeros; re-applied after each update."""
    masks = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.requires_grad:
            mask = module.weight.detach() != 0
            if not mask.all():
                masks.append((module.weight, mask))
    return masks


def train(cfg: Config, on_eval: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Train (or resume) the run `cfg` describes; under torchrun, every process calls this.
    on_eval(step, result) runs after every evaluation; it may raise StopTraining to end the run."""
    with running_world(cfg.dist.backend) as world:
        return _train(cfg, world, on_eval)


def _train(cfg: Config, world: World, on_eval: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    validate(cfg, world.world_size)
    if cfg.speed.fp8:  # before any data work: torchao, a CUDA GPU, sm_89+
        check_fp8(training_device(cfg, world))
    if cfg.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    say = console.printer(world.is_main)

    data = resolve_data(cfg)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint.find_latest(run_dir, report=lambda msg: say(f"[yellow]{msg}[/]"))
    saved = checkpoint.read_state(ckpt) if ckpt else None
    if saved and saved.get("format") == checkpoint.WEIGHTS_FORMAT:
        raise CheckpointError(
            f"{run_dir} holds weights only (imported, quantized or pruned), not a training run; "
            f"fine-tune it with finetune.init_from={run_dir} and another run.dir"
        )
    source = _init_source(cfg, data) if cfg.finetune.init_from else None
    # The vocabulary comes from the data; when fine-tuning, the whole model section comes from the source run.
    model_cfg = dataclasses.replace(source.config.model, dropout=cfg.model.dropout) if source else \
        dataclasses.replace(cfg.model, vocab_size=data.vocab_size)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    if saved:
        _check_same_run(saved, cfg, data, run_dir)
    device = training_device(cfg, world)
    precision = resolve_precision(cfg.speed.precision, device)
    if world.is_main:
        save_config(cfg, run_dir / "config.yaml")
        if data.tokenizer is not None:
            data.tokenizer.save(run_dir / "tokenizer.json")
        atomic_write_text(run_dir / "environment.json",
                                     json.dumps(environment(device, precision.name, world.world_size), indent=1))
    world.barrier()

    rng.seed_everything(cfg.run.seed)  # the same initial weights on every process
    raw_model = GPT(cfg.model)
    if source and not saved:
        raw_model.load_state_dict(source.model.state_dict())
    _apply_adapters(raw_model, cfg)
    apply_train_kernels(raw_model, cfg)
    if cfg.finetune.neftune_alpha > 0:  # noise on the token embeddings while training, hooked on from outside
        from gptforge.adapt.neftune import apply_neftune

        apply_neftune(raw_model, cfg.finetune.neftune_alpha)
    raw_model.to(device)
    sharded_ckpt = ckpt is not None and checkpoint.is_sharded(ckpt)
    if ckpt and not sharded_ckpt:
        checkpoint.load_weights(raw_model, ckpt)
    sparsity_masks = _sparsity_masks(raw_model) if cfg.finetune.keep_sparsity else []
    apply_train_switches(raw_model, cfg.speed, device)  # fp8, activation checkpointing: before distribute
    if cfg.train.batch_size == "auto":  # resolved on the model as it will train; stored as a number
        cfg = resolve_batch_size(cfg, raw_model, precision, device, world, saved, report=say)
        if world.is_main:
            save_config(cfg, run_dir / "config.yaml")
    model, comm = distribute(raw_model, cfg.dist, world, device, compile=cfg.speed.compile,
                             compile_mode=cfg.speed.compile_mode)
    optimizer = build_optimizer(raw_model, cfg.optim, device.type)
    if sharded_ckpt:
        load_sharded(raw_model, optimizer, ckpt / "dcp")
    elif saved and "optimizer" in saved:
        load_optimizer_state(raw_model, optimizer, checkpoint.read_optimizer(ckpt, saved), world)
    scaler = precision.grad_scaler()
    if scaler is not None and saved and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])

    accum = cfg.grad_accum_steps(world.world_size)
    step_tokens = cfg.tokens_per_step(world.world_size)
    layout = Layout(cfg.model.block_size, cfg.train.batch_size, accum, world.rank, world.world_size)
    loader = TokenLoader(
        data.train, layout, mode=cfg.data.loader, seed=cfg.run.seed, device=device,
        prefetch=cfg.data.prefetch, state=saved["loader"] if saved else None,
    )
    val = val_batches(data.val, cfg.model.block_size, cfg.train.batch_size, cfg.eval.tokens, world.rank, world.world_size)
    token_bytes = torch.from_numpy(data.tokenizer.token_byte_lengths()) if data.tokenizer is not None else None

    step, tokens, time_s = 0, 0, 0.0
    if saved:
        step, tokens, time_s = saved["step"], saved["tokens"], saved["time_s"]
        dropped = truncate_after(run_dir, step) if world.is_main else 0
    metrics = MetricsLog(run_dir, enabled=world.is_main, tensorboard=cfg.run.tensorboard)
    if saved:
        metrics.event("resume", step, checkpoint=ckpt.name, dropped_lines=dropped,
                      world_size=world.world_size, saved_world_size=saved.get("world_size", 1))

    counts = num_params(cfg.model)
    fpt = flops_per_token(cfg.model)
    peak = peak_flops(device, precision.name)
    say(
        f"gptforge {__version__} | {counts['total'] / 1e6:.2f}M parameters ({counts['non_embedding'] / 1e6:.2f}M "
        f"non-embedding) | {device.type} {precision.name} | {step_tokens} tokens/step "
        f"({cfg.train.batch_size} x {cfg.model.block_size} x {accum} accum x {world.world_size} proc"
        f"{', ' + cfg.dist.strategy if world.distributed else ''}) | data {data.path}"
    )
    if saved:
        say(f"resumed from {ckpt} (step {step}, {tokens} tokens, {time_s:.1f}s)")

    def budget_left() -> bool:
        t = cfg.train
        return not (
            (t.max_steps is not None and step >= t.max_steps)
            or (t.max_tokens is not None and tokens >= t.max_tokens)
            or (t.max_time is not None and time_s >= t.max_time)
        )

    sharded = cfg.dist.checkpoint == "sharded" and world.distributed
    guard = Guard(cfg.guard, saved.get("guard") if saved else None)
    early = EarlyStop(cfg.eval.early_stop_patience, cfg.eval.early_stop_min_delta,
                      saved.get("early_stop") if saved else None)
    watch = fit_watch(cfg.guard, data.train, saved.get("fit_watch") if saved else None)
    augment = Augmenter.from_config(cfg.data, data.vocab_size)  # training batches only, never evaluation

    def save(best: bool = False) -> None:
        # Collective: every process takes part (gathering or writing its shard), rank 0 completes the folder.
        # best: write RUN_DIR/best instead of a step checkpoint (same files, never pruned, never resumed from).
        staged = weights = optim = None
        if sharded:
            staged = checkpoint.staging_dir(run_dir, step, tag="best-sharded" if best else "sharded")
            if world.is_main:
                shutil.rmtree(staged, ignore_errors=True)
                staged.mkdir(parents=True)
            world.barrier()
            save_sharded(raw_model, optimizer, staged / "dcp")
            world.barrier()
        else:
            weights = checkpoint.model_tensors(raw_model, full_model_state(raw_model))
            optim = full_optimizer_state(raw_model, optimizer)
        rngs = world.gather_json(rng.capture())
        state = {
            "format": "gptforge-train-state",
            "gptforge_version": __version__,
            "step": step,
            "tokens": tokens,
            "time_s": time_s,
            "config": cfg.to_dict(),
            "rng": {str(rank): r for rank, r in enumerate(rngs)},
            "loader": loader.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "tokenizer_sha256": data.tokenizer.sha256 if data.tokenizer is not None else None,
            "world_size": world.world_size,
            "last_val": last_val,
            "guard": guard.state_dict(),
            "early_stop": early.state_dict(),
            "fit_watch": watch.state_dict() if watch is not None else None,
        }
        files = {"tokenizer.json": run_dir / "tokenizer.json"} if data.tokenizer is not None else {}
        tensors = {}
        if cfg.finetune.lora.rank:
            from gptforge.adapt.lora import lora_state_dict

            tensors["adapter.safetensors"] = lora_state_dict(raw_model)  # the adapters alone, for sharing
        if world.is_main:
            checkpoint.save_checkpoint(
                run_dir, step, model=weights, optimizer=optim, state=state, files=files,
                tensors=tensors, keep=cfg.train.keep_checkpoints, staged=staged,
                dest=run_dir / "best" if best else None,
            )
        world.barrier()
        nonlocal last_saved
        last_saved = last_saved if best else step

    def judge(result: dict[str, Any]) -> None:
        """After each evaluation: the fit watch, the best checkpoint and early stopping (every process alike)."""
        for flag in watch.observe(step, result["val_loss"]) if watch is not None else []:
            metrics.event(flag.kind, step, **flag.fields)
            say(f"[yellow]step {step}: {flag.message}[/]")
        if step == 0:  # the untrained model: no best checkpoint (and no optimizer state to write), no count
            return
        if early.update(step, result["val_loss"]) and cfg.eval.keep_best:
            save(best=True)
        if early.stopped:
            metrics.event("early_stop", step, best_step=early.best_step, best_val_loss=early.best_loss,
                          evals_without_improvement=early.bad_evals, min_delta=early.min_delta)
            best = f"{early.best_loss:.4f} at step {early.best_step}" if early.best_step is not None else "none"
            kept = f" (in {run_dir / 'best'})" if cfg.eval.keep_best and early.best_step is not None else ""
            say(f"[yellow]step {step}: early stop: val loss has not improved by more than {early.min_delta} for "
                f"{early.bad_evals} evaluations; best {best}{kept}[/]")

    def run_eval() -> dict[str, Any]:
        result = evaluate(model, val, precision, token_bytes, device, world)
        metrics.write({"step": step, "tokens": tokens, "time_s": round(time_s, 3), **result})
        bpb = f", {result['val_bpb']:.3f} bits/byte" if result["val_bpb"] is not None else ""
        say(f"step {step}: val loss {result['val_loss']:.4f}{bpb}")
        judge(result)
        if on_eval is not None:
            on_eval(step, result)
        return result

    last_val: dict[str, Any] | None = saved.get("last_val") if saved else None
    last_saved = step if saved else -1
    train_loss = None
    if not budget_left():
        say(f"the run in {run_dir} has met its budget at step {step}; raise train.max_steps/max_tokens/max_time to go on")
    elif early.stopped:
        say(f"the run in {run_dir} stopped early at step {step} ({early.bad_evals} evaluations without improvement); "
            "raise eval.early_stop_patience, or set it to 0, to go on")
    elif step == 0:
        last_val = run_eval()

    # Last thing before the first step, so nothing in the set-up can consume random numbers.
    if saved and str(world.rank) in saved["rng"]:
        rng.restore(saved["rng"][str(world.rank)])
    else:  # a new run, or a process that did not exist when the checkpoint was written
        rng.seed_everything(cfg.run.seed + world.rank + step)
    stepper = Stepper(model, raw_model, optimizer, scaler, precision, world, cfg, sparsity_masks, guard)
    window_tokens, window_time = 0, 0.0
    bar = console.TrainProgress(enabled=world.is_main)
    model.train()
    meter, tokens_before = energy_meter(device), tokens  # None without nvidia-ml-py or a GPU
    try:
        while budget_left() and not early.stopped:
            t0 = time.perf_counter()
            lr_scale = lr_multiplier(cfg.schedule, step, progress(cfg.train, step, tokens, time_s))
            lr = cfg.optim.lr * lr_scale  # optim.lr's groups; each group scales its own base_lr
            n_micro = micro_steps(cfg.schedule, step, accum)  # < accum only during batch-size warmup
            loss, grad_norm, skipped = stepper.step(augment(loader.next_step(n_micro)), lr_scale, step + 1)
            if device.type == "cuda" and (step + 1) % cfg.train.log_every == 0:
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            step += 1
            tokens += step_tokens // accum * n_micro
            time_s += dt
            window_tokens += step_tokens // accum * n_micro
            window_time += dt
            if watch is not None and not skipped and not torch.is_tensor(loss):  # sync_free: read steps only
                watch.add_train_loss(loss)  # the fit watch compares the mean train loss between evaluations

            if skipped:
                metrics.event(f"skip_{skipped}", step, loss=loss, grad_norm=grad_norm, consecutive=guard.consecutive)
                say(f"[yellow]step {step}: {skipped.replace('_', ' ')} (loss {loss:.4g}, grad norm {grad_norm:.4g}); "
                    "update skipped[/]")
            if stepper.device_skips:  # speed.sync_free: non-finite steps skipped on the device since the last read
                metrics.event("skip_nonfinite", step, on_device=stepper.device_skips, consecutive=guard.consecutive)
                say(f"[yellow]step {step}: {stepper.device_skips} non-finite update(s) skipped on the device[/]")
            if guard.needs_rollback:
                rollback_to = checkpoint.find_latest(run_dir, report=say)
                if rollback_to is None:
                    raise GptforgeError(
                        f"{guard.consecutive} updates in a row were skipped (step {step}) and there is no checkpoint "
                        "to go back to; lower optim.lr or check the data (metrics.jsonl has every skip)"
                    )
                _rollback(raw_model, optimizer, rollback_to, world)
                metrics.event("rollback", step, checkpoint=rollback_to.name, skipped=guard.consecutive)
                say(f"[yellow]step {step}: {guard.consecutive} skipped updates in a row; weights and optimizer back to "
                    f"{rollback_to.name}, data moves on[/]")
                guard.consecutive = 0
            if step % cfg.train.log_every == 0 or not budget_left():
                train_loss = float(loss)  # sync_free keeps it on the device until here
                tps = window_tokens / window_time
                record = {
                    "step": step, "tokens": tokens, "time_s": round(time_s, 3), "lr": lr,
                    "train_loss": train_loss, "grad_norm": float(grad_norm), "tokens_per_sec": round(tps, 1),
                    "mfu": round(fpt * tps / (peak * world.world_size), 5), "peak_mem_gb": round(peak_memory_gb(device), 3),
                }
                if comm is not None:
                    record.update(comm_bytes_per_step=comm.bytes_per_step, compression_ratio=round(comm.ratio, 2))
                metrics.write(record)
                bar.update(record, progress(cfg.train, step, tokens, time_s))
                window_tokens, window_time = 0, 0.0
            if cfg.eval.every and step % cfg.eval.every == 0 and budget_left():
                last_val = run_eval()
            if cfg.train.save_every and step % cfg.train.save_every == 0 and budget_left():
                save()
    except StopTraining as e:
        bar.close()
        loader.close()
        metrics.event("stopped", step, reason=str(e))
        metrics.close()
        say(f"stopped at step {step}: {e}")
        raise
    except KeyboardInterrupt:
        bar.close()
        save()
        loader.close()
        metrics.event("interrupted", step)
        metrics.close()
        say(f"interrupted: saved step {step} to {run_dir}; run the same command again to resume")
        raise
    bar.close()
    loader.close()

    if step != last_saved:
        if early.last_step != step:  # an early stop has just evaluated this step
            last_val = run_eval()
        save()
    energy = finish_meter(meter, tokens - tokens_before, cfg.run.price_per_hour, world)  # collective
    if energy is not None:
        metrics.event("energy", step, **energy)
        cost = f", cost {energy['cost']:.4g}" if "cost" in energy else ""
        say(f"energy: {energy['energy_kwh']:.4g} kWh ({energy['energy_j']:.0f} J) for "
            f"{tokens - tokens_before:,} tokens{cost}")
    metrics.close()
    say(f"done: step {step}, {tokens:,} tokens in {time_s:.1f}s of training; run saved in {run_dir}")

    samples = []
    if data.tokenizer is not None and cfg.train.samples:
        sampler = raw_model
        if world.distributed and cfg.dist.strategy != "ddp":  # sharded: sample from gathered weights
            full = full_model_state(raw_model)  # collective
            sampler = GPT(cfg.model)
            _apply_adapters(sampler, cfg)
            sampler.load_state_dict(full)
            sampler.to(device)
        if world.is_main:
            samples = sample_texts(sampler, data.tokenizer, cfg.train.samples, cfg.train.sample_tokens, cfg.run.seed)
            with open(run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
                f.writelines(json.dumps({"step": step, "sample": text}) + "\n" for text in samples)
            for i, text in enumerate(samples):
                console.show_sample(i, text)
    return TrainResult(run_dir, step, tokens, time_s, train_loss, last_val, saved["step"] if saved else None, samples)


class Stepper:
    """One optimizer step: micro-steps with gradient accumulation, clipping, the guard's verdict, the update."""

    def __init__(self, model, raw_model, optimizer, scaler, precision, world: World, cfg: Config, sparsity_masks,
                 guard: Guard | None = None):
        self.model, self.optimizer, self.scaler, self.precision, self.world = model, optimizer, scaler, precision, world
        self.params = [p for p in raw_model.parameters() if p.requires_grad]
        self.clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        self.debug = cfg.debug
        self.warmup = cfg.schedule.warmup_steps
        self.sparsity_masks = sparsity_masks
        self.guard = guard
        # speed.sync_free: loss and gradient norm are read back on log, eval and save steps only.
        self.sync_free = cfg.speed.sync_free
        self.read_every = [n for n in (cfg.train.log_every, cfg.eval.every, cfg.train.save_every) if n]
        self.device_skips = 0  # set on read steps: steps skipped on the device since the previous read
        self._counters: torch.Tensor | None = None  # (3,) int32 on the device: skipped, run of skips, any applied
        self.phases: PhaseTimer | None = None  # set by `gptforge bench` to split each step's time

    def _injected(self, step: int, at: int | None) -> bool:
        return at is not None and at <= step < at + self.debug.inject_count

    def step(self, batches: list[tuple[torch.Tensor, torch.Tensor]], lr_scale: float, step: int) -> tuple[float, float, str | None]:
        """Optimizer step number `step` (from 1), every group at its base_lr x `lr_scale` (the schedule).
        Returns the mean loss over all processes, the gradient norm, and why the update was skipped (None
        when it was applied)."""
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_scale  # the schedule's multiplier of each group's own peak
        accum = len(batches)
        scale = 1.0
        if self._injected(step, self.debug.inject_nan_at_step):
            scale = math.nan
        elif self._injected(step, self.debug.inject_spike_at_step):
            scale = 100.0
        phases = self.phases
        if phases:
            phases.start()
        loss_sum = torch.zeros((), device=self.params[0].device)
        for i, (x, y) in enumerate(batches):
            with grad_sync(self.model, enabled=i == accum - 1), self.precision.autocast():
                loss = self.model(x, y) * (scale / accum)
                loss_sum += loss.detach()
                if phases:
                    phases.mark("forward")
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
                if phases:
                    phases.mark("backward")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor when parameters are sharded
            grad_norm = grad_norm.full_tensor()
        if self.sync_free:
            if not any(step % n == 0 for n in self.read_every):
                return self._device_step(loss_sum, grad_norm)
            self._read_counters()
        # One all-reduce: the mean loss, and whether any process saw a non-finite one, so all decide alike.
        stats = torch.stack([loss_sum.float(), (~torch.isfinite(loss_sum)).float()])
        self.world.all_reduce(stats)
        loss, any_nonfinite = (stats / self.world.world_size).tolist()
        loss = math.nan if any_nonfinite else loss
        grad_norm = float(grad_norm)
        reason = self.guard.check(loss, grad_norm, spikes=step > self.warmup) if self.guard is not None else None
        if self.scaler is not None:
            if reason is None or reason == "nonfinite":  # fp16 overflow is the scaler's to handle
                self.scaler.step(self.optimizer)
                reason = None
            self.scaler.update()
        elif reason is None:
            self.optimizer.step()
        with torch.no_grad():
            for weight, mask in self.sparsity_masks:
                weight.mul_(mask)
        self.optimizer.zero_grad(set_to_none=True)
        if phases:
            phases.mark("optimizer")  # clipping and the guard's decision included
        return loss, grad_norm, reason

    def _device_step(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        """speed.sync_free between read steps: the same update, every decision taken on the device, nothing
        read back. Non-finite steps are skipped by masked_step (the spike rule waits for a read step). Returns
        the loss and gradient norm as 0-dim device tensors."""
        stats = torch.stack([loss_sum.float(), (~torch.isfinite(loss_sum)).float()])
        self.world.all_reduce(stats)  # the mean loss, and whether any process saw a non-finite one
        loss = torch.where(stats[1] > 0, torch.full_like(stats[0], math.nan), stats[0] / self.world.world_size)
        grad_norm = grad_norm.float()
        self.device_skips = 0
        if self.scaler is not None:  # fp16: non-finite steps are the scaler's to skip, as in step()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.guard is not None and self.guard.cfg.enabled:
            finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
            masked_step(self.optimizer, finite)
            self._count(finite)
        else:
            self.optimizer.step()
        with torch.no_grad():
            for weight, mask in self.sparsity_masks:
                weight.mul_(mask)
        self.optimizer.zero_grad(set_to_none=True)
        if self.phases:
            self.phases.mark("optimizer")
        return loss, grad_norm, None

    def _count(self, finite: torch.Tensor) -> None:
        """Device-side skip counters: total skipped, the current run of skips, whether any step was applied."""
        if self._counters is None:
            self._counters = torch.zeros(3, dtype=torch.int32, device=finite.device)
        bad = (~finite).int()
        skipped, run, applied = self._counters.unbind()
        self._counters = torch.stack([skipped + bad, (run + 1) * bad, torch.maximum(applied, 1 - bad)])

    def _read_counters(self) -> None:
        """On a read step: the device's skip counters into device_skips and the guard's consecutive count."""
        self.device_skips = 0
        if self._counters is None:
            return
        skipped, run, applied = self._counters.tolist()
        self._counters = None
        self.device_skips = skipped
        if self.guard is not None:
            self.guard.consecutive = run if applied else self.guard.consecutive + run


def masked_step(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """optimizer.step() where the 0-dim bool tensor `ok` is True; where it is False, parameters and optimizer
    state stay exactly as they were. Decided on the device: no host sync.

    torch's fused Adam / AdamW take the flag themselves (`found_inf`, as GradScaler passes it): the kernel
    leaves parameters and moments alone and the step counter is put back, at no extra memory. Every other
    optimizer (Muon, foreach AdamW, sharded parameters) steps, then torch.where puts back copies taken
    before the step: a copy of parameters and state per step. State created by a skipped first step is set
    to zeros, as optimizers initialize it. State held on another device than `ok` (Muon's CPU step counters)
    needs `ok` copied there, a small device-to-host read.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    fused = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and optimizer.defaults.get("fused")
    if fused and not any(hasattr(p, "to_local") for p in params):
        optimizer.found_inf, optimizer.grad_scale = (~ok).float(), None
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
        return
    saved_params = [_local(p).detach().clone() for p in params]
    saved_state = [{k: _local(v).clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                   if p in optimizer.state else {} for p in params]
    optimizer.step()
    flags = {ok.device: ok}  # the flag on each device that holds state, copied there once
    with torch.no_grad():
        for p, before in zip(params, saved_params):
            _keep_where(flags, _local(p), before)
        for p, before in zip(params, saved_state):
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value):
                    _keep_where(flags, _local(value), before.get(key))
                elif key in before and value != before[key] and not bool(ok):  # a Python number: a host read
                    state[key] = before[key]


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a view, written through), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _keep_where(flags: dict[torch.device, torch.Tensor], now: torch.Tensor, before: torch.Tensor | None) -> None:
    """now = ok ? now : before (zeros when there was nothing before), in place; flags: ok by device."""
    if now.device not in flags:
        flags[now.device] = next(iter(flags.values())).to(now.device)
    now.copy_(torch.where(flags[now.device], now, before if before is not None else torch.zeros_like(now)))


def sample_texts(model: GPT, tokenizer, n: int, max_new_tokens: int, seed: int, prompt: str = "") -> list[str]:
    """Unconditional samples (each starts right after an end-of-text token) or continuations of `prompt`,
    through the default output safety filter (masking)."""
    from gptforge.evaluate.generate import generate
    from gptforge.evaluate.safety import SafetyFilter

    safety = SafetyFilter.from_file()
    was_training = model.training
    model.eval()
    ids = [tokenizer.eot_id] + tokenizer.encode(prompt)
    texts = []
    for i in range(n):
        new = generate(model, ids, max_new_tokens, temperature=0.8, top_k=200, seed=seed + i, eot_id=tokenizer.eot_id)
        texts.append(safety.apply(prompt + tokenizer.decode(new))[0])
    model.train(was_training)
    return texts
