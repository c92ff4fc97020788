"""The process group seen by the training loop. One process is world size 1, on the same code path.

Under torchrun (RANK, LOCAL_RANK, WORLD_SIZE in the environment) the default process group is created with
NCCL on GPUs and gloo on CPUs. Everything the loop needs from the group goes through `World`, so a single
process needs no process group at all.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gptforge.errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes, in place, and returned; a no-op for one process."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather_json(self, obj: Any) -> list[Any]:
        """Every rank's JSON-able object, on every rank (bytes over the wire; no pickle)."""
        if not self.distributed:
            return [obj]
        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        device = _comm_device()
        size = torch.tensor([data.numel()], device=device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8, device=device)
        padded[: data.numel()] = data.to(device)
        chunks = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(chunks, padded)
        return [json.loads(bytes(c[: int(s.item())].cpu().tolist()).decode()) for c, s in zip(chunks, sizes)]


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_world(backend: str = "auto") -> World:
    """Join torchrun's process group when there is one; otherwise a world of one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise ConfigError(f"WORLD_SIZE={size} but {key} is not set: launch multi-process runs with torchrun")
    world = World(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ["LOCAL_RANK"]),
        world_size=size,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", size)),
    )
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        # torchrun's store outlives a restart: keys of the workers that died would be read as live peers'.
        # A prefix per restart attempt keeps each attempt's rendezvous to itself.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world.world_size, is_master=False,
            timeout=timedelta(minutes=10),
        ) if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else None
        if store is not None:
            store = dist.PrefixStore(f"gptforge/attempt{attempt}", store)
        dist.init_process_group(backend=backend, store=store, rank=world.rank, world_size=world.world_size)
    return world


def close_world(world: World, finished: bool = True) -> None:
    """Tear the process group down. After a clean finish every process first waits for the others, so none
    destroys its group while another still talks to it; after an error it leaves at once (the others are
    stopped by torchrun), since waiting for processes stuck in a collective would hang."""
    if world.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def running_world(backend: str = "auto") -> Iterator[World]:
    """init_world, then close_world: waiting for the others after a clean finish, at once after an error."""
    world = init_world(backend)
    try:
        yield world
    except BaseException:
        close_world(world, finished=False)
        raise
    close_world(world)
