"""train.batch_size=auto: the largest micro-batch that fits in memory, found by trying it.

A trial is one full training micro-step at n sequences: the optimizer's state allocated (AdamW: two
tensors per parameter), forward and backward under the run's autocast, on the model as it will train
(fp8 and activation checkpointing applied, since both change the memory a step needs). Trials run on the
model before DDP / fully_shard / compile wrap it: a process that runs out of memory must not leave the
others waiting in a collective. So FSDP's sharding is not counted and the answer is conservative there.

Search: sizes double from 1 until a trial runs out of memory (torch.OutOfMemoryError) or the upper limit
is reached, then a binary search between the last size that fit and the first that did not. After every
trial, out of memory or not: gradients dropped, garbage collected, the CUDA cache emptied.

Margin: a size found at the edge of memory leaves nothing for fragmentation, the optimizer's temporaries
or a longer evaluation batch, so when an out-of-memory error bounded the search, 90% of it is taken and
rounded down to a power-of-two-friendly size: a multiple of 8 from 8 up, a power of two below 8 (tensor
cores and allocators like such shapes). With train.batch_tokens set, the size must divide the sequences
each process gets per optimizer step (batch_tokens / (block_size x processes)), so the largest divisor
at or below the margin is taken instead; gradient accumulation makes up the rest. When nothing ran out of
memory up to the limit, the limit itself is the answer.

Limits: batch_tokens / (block_size x processes) when set, else 1024 sequences on a GPU. CPUs and MPS give
no out-of-memory signal to search by (the operating system swaps or kills instead), so there no trials
run: the size is the largest allowed one under a cap of 64 sequences (past a few dozen a bigger batch no
longer speeds a CPU up) and under half the available RAM by an activation-memory estimate.

Under torchrun every process searches on its own device and all take the smallest answer. A resumed run
reuses the number its saved config holds, so a bit-identical resume stays bit-identical.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
from typing import Any, Callable

import torch
from torch import nn

from gptforge.config import Config, validate
from gptforge.errors import ConfigError, GptforgeError
from gptforge.runtime import synchronize

MARGIN = 0.9
GPU_MAX_BATCH = 1024
CPU_MAX_BATCH = 64
OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError}
)
# Library allocations that fail for want of memory surface as plain RuntimeErrors with these words.
OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, OOM_ERRORS) or (
        isinstance(error, RuntimeError) and any(m in str(error) for m in OOM_MESSAGES)
    )


# ----------------------------------------------------------------------------------------------------------
# The search, independent of models


def largest_fitting(fits: Callable[[int], bool], limit: int) -> tuple[int, bool]:
    """The largest n in 1..limit for which fits(n) is True (fits: True up to some size, False above), and
    whether a False bounded the search. Doubling, then bisection: about 2 log2(answer) calls."""
    good, bad, n = 0, None, 1
    while bad is None:
        n = min(n, limit)
        if not fits(n):
            bad = n
        elif n == limit:
            return n, False
        else:
            good, n = n, 2 * n
    if good == 0:
        raise GptforgeError(
            "train.batch_size=auto: even one sequence per micro-step runs out of memory; use "
            "speed.activation_checkpointing=full, a lower speed.precision or a smaller model.block_size"
        )
    while bad - good > 1:  # good fits, bad does not
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good, True


def friendly(n: int) -> int:
    """n rounded down to a power-of-two-friendly size: a multiple of 8 from 8 up, a power of two below."""
    if n >= 8:
        return n // 8 * 8
    return 1 << (max(n, 1).bit_length() - 1)


def with_margin(found: int, bounded: bool, allowed: list[int] | None) -> int:
    """The size to train with: `found` itself when no out-of-memory bounded it, else 90% of it; then the
    largest allowed size at or below (allowed: the divisors batch_tokens needs; None: friendly sizes)."""
    target = max(1, math.floor(found * MARGIN)) if bounded else found
    if allowed is not None:
        return max(d for d in allowed if d <= target)
    return friendly(target) if bounded else target


def allowed_sizes(batch_tokens: int | None, block_size: int, world_size: int) -> list[int] | None:
    """Micro-batch sizes that keep batch_tokens whole: the divisors of the sequences per process per
    optimizer step, ascending. None when train.batch_tokens is not set (any size goes)."""
    if batch_tokens is None:
        return None
    per = block_size * world_size
    if batch_tokens % per:
        raise ConfigError(
            f"train.batch_tokens={batch_tokens} is not a multiple of model.block_size x processes = "
            f"{block_size} x {world_size} = {per}, which train.batch_size=auto needs"
        )
    seqs = batch_tokens // per
    small = [d for d in range(1, math.isqrt(seqs) + 1) if seqs % d == 0]
    return sorted(set(small + [seqs // d for d in small]))


# ----------------------------------------------------------------------------------------------------------
# Trials on a real model


def release_memory(model: nn.Module, device: torch.device, out_of_memory: bool = True) -> None:
    """What a trial leaves behind: gradients, the CUDA allocator's cached blocks and, after an out-of-memory
    error, tensors held only by reference cycles through its traceback (a garbage collection)."""
    model.zero_grad(set_to_none=True)
    if out_of_memory:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fits_in_memory(trial: Callable[[int], None], cleanup: Callable[[bool], None]) -> Callable[[int], bool]:
    """fits(n): run trial(n); False when it runs out of memory. cleanup(out_of_memory) runs after every
    trial, outside the except block, so the traceback (and the tensors its frames hold) is gone first."""

    def fits(n: int) -> bool:
        ok = False
        try:
            trial(n)
            ok = True
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(e):
                raise
        cleanup(not ok)
        return ok

    return fits


def micro_step_trial(model: nn.Module, precision, device: torch.device, block_size: int, vocab_size: int,
                     optimizer_states: int = 2) -> Callable[[int], None]:
    """trial(n): one training micro-step of n random sequences, with `optimizer_states` tensors per
    trainable parameter allocated as the optimizer would (AdamW: exp_avg, exp_avg_sq). Weights unchanged."""
    params = [p for p in model.parameters() if p.requires_grad]

    def trial(n: int) -> None:
        state = [torch.zeros_like(p) for p in params for _ in range(optimizer_states)]
        x = torch.randint(0, vocab_size, (n, block_size), device=device)  # (n, T)
        y = torch.randint(0, vocab_size, (n, block_size), device=device)  # (n, T)
        with precision.autocast():
            loss = model(x, y)
        loss.backward()
        synchronize(device)
        del state  # held through forward and backward, as the optimizer's would be

    return trial


def host_memory_cap(model_cfg) -> int:
    """Sequences whose activations fit in half the available RAM, by Korthikanti et al.'s per-layer estimate
    (T (34 C + 5 heads T) bytes at 16 bits, doubled for fp32) plus the logits; the fixed CPU cap where the
    operating system does not say."""
    T, C = model_cfg.block_size, model_cfg.n_embd
    per_seq = model_cfg.n_layer * T * (34 * C + 5 * model_cfg.n_head * T) * 2 + T * model_cfg.padded_vocab_size * 4 * 3
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return CPU_MAX_BATCH
    return max(1, min(CPU_MAX_BATCH, available // 2 // per_seq))


def find_batch_size(model: nn.Module, cfg: Config, precision, device: torch.device, world_size: int = 1,
                    search: bool | None = None) -> int:
    """The micro-batch size for this process (see the module docstring). The model's weights, gradients
    and the global RNG are as they were afterwards. search: run trials (default: on CUDA devices only)."""
    m = cfg.model
    allowed = allowed_sizes(cfg.train.batch_tokens, m.block_size, world_size)
    if allowed is not None and cfg.schedule.batch_warmup_steps > 0:
        allowed = allowed[:-1] or allowed  # batch-size warmup needs at least two micro-steps to grow over
    if not (device.type == "cuda" if search is None else search):
        cap = host_memory_cap(m)
        if allowed is not None:
            return max(d for d in allowed if d <= cap)
        return friendly(cap)
    limit = allowed[-1] if allowed is not None else GPU_MAX_BATCH
    trial = micro_step_trial(model, precision, device, m.block_size, m.vocab_size)
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        found, bounded = largest_fitting(fits_in_memory(trial, lambda oom: release_memory(model, device, oom)), limit)
    model.train(was_training)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return with_margin(found, bounded, allowed)


def resolve_batch_size(cfg: Config, model: nn.Module, precision, device: torch.device, world,
                       saved: dict[str, Any] | None = None, report: Callable[[str], None] = print) -> Config:
    """cfg with train.batch_size=auto replaced by a number: the saved run's when resuming one, else the
    smallest that the processes found. Configs without auto come back unchanged. Collective under torchrun."""
    if cfg.train.batch_size != "auto":
        return cfg
    prior = saved["config"]["train"].get("batch_size") if saved else None
    if isinstance(prior, int) and not isinstance(prior, bool):
        size, how = prior, "the number the resumed run was started with"
    else:
        size = min(world.gather_json(find_batch_size(model, cfg, precision, device, world.world_size)))
        how = "found by out-of-memory search" if device.type == "cuda" else f"{device.type}: no out-of-memory search"
    resolved = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=size))
    validate(resolved, world.world_size)
    report(f"train.batch_size=auto: {size} sequences per micro-step ({how})")
    return resolved
