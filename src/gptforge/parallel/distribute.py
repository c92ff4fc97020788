"""Data parallelism applied to a built model from outside it, with PyTorch's own engines.

    ddp    DistributedDataParallel: every process holds the model; gradients are all-reduced, optionally
           compressed by a communication hook (bf16, fp16, PowerSGD).
    fsdp2  fully_shard on every block and the root: parameters, gradients and optimizer state are sharded.
    hsdp   fully_shard over a 2-D mesh: sharded within a group (a node by default), replicated across groups.

Also here: the switch that skips gradient synchronization on all but the last micro-step of an
accumulation, and the full (gathered) state dicts that checkpoints are written from.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel as DDP

from gptforge.config import DistConfig
from gptforge.errors import ConfigError
from gptforge.parallel.world import World

try:  # torch >= 2.6
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch 2.5
    from torch.distributed._composable.fsdp import fully_shard

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class CommStats:
    """Gradient bytes each process sends per optimizer step, and the ratio to uncompressed fp32."""

    bytes_per_step: int = 0
    uncompressed_bytes: int = 0

    @property
    def ratio(self) -> float:
        return self.uncompressed_bytes / self.bytes_per_step if self.bytes_per_step else 1.0


def distribute(model: nn.Module, cfg: DistConfig, world: World, device: torch.device) -> tuple[nn.Module, CommStats | None]:
    """The module to call for training: `model` wrapped (DDP) or sharded (FSDP2) for `world`. A single
    process gets it back as it is. `model` itself stays the module to save. Compile after this (torch.compile
    of the DDP wrapper, or of the sharded module, as PyTorch recommends)."""
    if not world.distributed:
        return model, None
    if cfg.strategy == "ddp":
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        return wrapped, _register_compression(wrapped, cfg, world)
    mesh = _mesh(cfg, world, device)
    for block in model.transformer.h:  # one all-gather per block, overlapped with the previous block's compute
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, None


def _mesh(cfg: DistConfig, world: World, device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    if cfg.strategy == "fsdp2":
        return init_device_mesh(device.type, (world.world_size,))
    shard = cfg.hsdp_shard_size or world.local_world_size
    if world.world_size % shard:
        raise ConfigError(f"dist.hsdp_shard_size={shard} does not divide the {world.world_size} processes")
    return init_device_mesh(device.type, (world.world_size // shard, shard), mesh_dim_names=("replicate", "shard"))


def grad_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Synchronize gradients only on the last micro-step: no all-reduce per micro-batch."""
    if isinstance(model, DDP):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------
# Gradient compression (DDP communication hooks), counted


def _register_compression(model: DDP, cfg: DistConfig, world: World) -> CommStats:
    stats = CommStats()
    full = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    stats.uncompressed_bytes = stats.bytes_per_step = full
    if cfg.grad_compression in ("bf16", "fp16"):
        model.register_comm_hook(None, _cast_hook({"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.grad_compression], world, stats))
    elif cfg.grad_compression == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

        state = psgd.PowerSGDState(
            process_group=None, matrix_approximation_rank=cfg.powersgd_rank,
            start_powerSGD_iter=cfg.powersgd_start_step, random_seed=0,
        )
        model.register_comm_hook(state, _counted_powersgd(psgd, stats))
    return stats


def _cast_hook(dtype: torch.dtype, world: World, stats: CommStats):
    """All-reduce the bucket in a 16-bit type (works on gloo and NCCL alike), then cast back."""

    def hook(_state, bucket):
        buffer = bucket.buffer()
        if bucket.index() == 0:
            stats.bytes_per_step = 0
        stats.bytes_per_step += buffer.numel() * torch.finfo(dtype).bits // 8
        send = buffer.to(dtype).div_(world.world_size)
        future = dist.all_reduce(send, async_op=True).get_future()

        def unpack(fut):
            buffer.copy_(fut.value()[0])
            return buffer

        return future.then(unpack)

    return hook


def _counted_powersgd(psgd, stats: CommStats):
    """PowerSGD sends P (n x r) and Q (m x r) per compressed matrix; vectors and small matrices go whole."""

    def hook(state, bucket):
        if bucket.index() == 0:
            stats.bytes_per_step = 0
        sent = 0
        for grad in bucket.gradients():
            if state.iter < state.start_powerSGD_iter or grad.dim() <= 1:
                sent += grad.numel() * 4
                continue
            n, m = grad.shape[0], grad.numel() // grad.shape[0]
            r = min(n, m, state.matrix_approximation_rank)
            compressed = (n + m) * r
            sent += 4 * (compressed if n * m >= compressed * state.min_compression_rate else n * m)
        stats.bytes_per_step += sent
        return psgd.powerSGD_hook(state, bucket)

    return hook


# ----------------------------------------------------------------------------------------------------------
# Full state for checkpoints


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model on CPU, gathered from shards when sharded (a collective: every rank calls it)."""
    return get_model_state_dict(model, options=FULL)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter name, gathered when sharded (a collective)."""
    return get_optimizer_state_dict(model, optimizer, options=FULL)


def is_sharded_model(model: nn.Module) -> bool:
    """True once fully_shard has been applied (its parameters are DTensors)."""
    return any(hasattr(m, "set_requires_gradient_sync") for m in model.modules())


def load_full_model_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Full (unsharded) weights into a sharded model; each process keeps its own shard. A tied weight may
    appear under one of its names only, hence not strict."""
    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, world: World) -> None:
    """Load name-keyed optimizer state into a plain, DDP or sharded model's optimizer."""
    if world.distributed and is_sharded_model(model):
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
        return
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    by_name = {name: index[id(p)] for name, p in model.named_parameters() if id(p) in index}
    missing = [name for g in state["param_groups"] for name in g["params"] if name not in by_name]
    if missing:
        raise ConfigError(f"the checkpoint's optimizer has parameters this model lacks: {', '.join(missing[:5])}")
    optimizer.load_state_dict({
        "state": {by_name[name]: value for name, value in state["state"].items()},
        "param_groups": [{**g, "params": [by_name[n] for n in g["params"]]} for g in state["param_groups"]],
    })
