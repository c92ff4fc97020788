"""One writer per run directory: RUN_DIR/run.lock, held with an exclusive flock while a run trains.

The operating system releases a flock when its process dies, however it dies (SIGKILL included), so a stale
lock never blocks: the file may stay behind, but nobody holds it. While held, the file says who holds it
(pid, host, start time, command), which the error names when a second writer is refused and `gptforge runs`
reads to tell a running run from an interrupted one. Under torchrun the main process holds it for all.
flock is advisory and local to a host's kernel: it does not guard a run directory shared over NFS by two
hosts, and it is not available on Windows.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from gptforge.errors import GptforgeError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILE = "run.lock"


class RunInUse(GptforgeError):
    """Another process holds the run directory's lock."""


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold RUN_DIR/run.lock for the block, or raise RunInUse naming the process that holds it."""
    path = Path(run_dir) / LOCK_FILE
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunInUse(f"{run_dir} is in use: {describe(_read(fd))}. One run directory takes one writer: "
                           "wait for that run to end or stop it, or give this run another run.dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_me()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def holder(run_dir: str | Path) -> dict[str, Any] | None:
    """Who holds the run directory's lock now (as written in the lock file), or None when nobody does."""
    path = Path(run_dir) / LOCK_FILE
    if fcntl is None or not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def describe(info: dict[str, Any]) -> str:
    if not info:
        return "held by another process (it has not yet said which)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"held by pid {info.get('pid')} on {info.get('host')} since {started} ({info.get('command')})"


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": " ".join(["gptforge", *sys.argv[1:]])[:500]}


def _read(fd: int) -> dict[str, Any]:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
    except (ValueError, UnicodeDecodeError, OSError):
        return {}
    return info if isinstance(info, dict) else {}
