"""What a run ran on: versions, git sha, device. Written to RUN_DIR/environment.json and benchmark records."""

from __future__ import annotations

import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gptforge import __version__
from gptforge.observe.hardware import device_name


def git_sha() -> str | None:
    """The commit of the gptforge source in use, when it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def command_line() -> str:
    """The command as the user typed it: `gptforge ...`, however Python was started."""
    program = Path(sys.argv[0]).name
    if program in ("gptforge", "__main__.py", "-m"):
        program = "gptforge"
    return " ".join([program, *sys.argv[1:]])


def environment(device: torch.device, precision: str, world_size: int) -> dict[str, Any]:
    return {
        "gptforge_version": __version__,
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device_name(device),
        "device_type": device.type,
        "precision": precision,
        "world_size": world_size,
        "hostname": socket.gethostname(),
        "command": command_line(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
