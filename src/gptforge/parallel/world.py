"""The process group seen by the training loop. A single process is world size 1 on the same code path."""

from __future__ import annotations

import os
from dataclasses import dataclass

from gptforge.errors import GptforgeError


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_world() -> World:
    """Read torchrun's environment; one process when it is absent."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1:
        raise GptforgeError(
            f"WORLD_SIZE={size}: multi-process training (torchrun) is not available in this version; "
            "run a single process"
        )
    return World()
