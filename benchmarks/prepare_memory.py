"""Peak memory and time of `gptforge prepare` on one very long line.

    python benchmarks/prepare_memory.py [--mb 50] [--json benchmarks/results/prepare_memory.json]

Writes two single-line files of --mb MB each: random words separated by spaces, and random letters with
no whitespace at all (one "word" to a BPE trainer). Each is prepared by a fresh `gptforge prepare`
process with the default tokenizer (BPE, vocab 8192); its peak resident memory is read from the
operating system (`wait4` rusage of that process alone). Target: under 1 GB for a 50 MB line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptforge.observe.hardware import device_name

TARGET_MB = 1000


def write_line(path: Path, size: int, spaces: bool, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="ascii") as f:
        written = 0
        while written < size:
            if spaces:
                block = " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10))) for _ in range(8192))
                block += " "
            else:
                block = "".join(rng.choices(string.ascii_letters, k=1 << 16))
            block = block[: size - written]
            f.write(block)
            written += len(block)


def measure(folder: Path, out: Path) -> dict:
    """Run one prepare in a child process; its wall time, exit code and peak RSS."""
    command = [sys.executable, "-m", "gptforge", "prepare", str(folder), "--out", str(out), "--force", "--quiet"]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    stdout, stderr = child.stdout.read().decode(), child.stderr.read().decode()
    peak_kb = usage.ru_maxrss  # kilobytes on Linux
    return {
        "exit_code": os.waitstatus_to_exitcode(status),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "wall_s": round(wall, 2),
        "output": (stdout + stderr).strip()[-400:],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=50, help="size of each single-line file in MB (default: 50)")
    parser.add_argument("--json", default="benchmarks/results/prepare_memory.json", help="where to write the record")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, spaces in (("words", True), ("no_whitespace", False)):
            folder = Path(tmp, kind)
            folder.mkdir()
            write_line(folder / "line.txt", args.mb * 1_000_000, spaces)
            result = measure(folder, Path(tmp, f"out_{kind}"))
            result["meets_target"] = result["exit_code"] == 0 and result["peak_rss_mb"] < TARGET_MB
            results[kind] = result
            print(f"{kind:>14}: {args.mb} MB on one line -> peak {result['peak_rss_mb']:.0f} MB, "
                  f"{result['wall_s']:.1f} s, exit {result['exit_code']} "
                  f"({'meets' if result['meets_target'] else 'MISSES'} the {TARGET_MB} MB target)")
    record = {
        "benchmark": "prepare_memory",
        "command": " ".join(["python", "benchmarks/prepare_memory.py", *sys.argv[1:]]),
        "line_mb": args.mb,
        "target_peak_rss_mb": TARGET_MB,
        "device": device_name(torch.device("cpu")),
        "python": platform.python_version(),
        "results": results,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0 if all(r["meets_target"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
