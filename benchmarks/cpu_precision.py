"""fp32 against bf16 on this machine: a square matmul and the full training step (gptforge bench).

Why `speed.precision=auto` picks fp32 on CPUs without native bf16: the numbers, measured here.
Writes benchmarks/results/cpu_precision.json.

    python benchmarks/cpu_precision.py [--preset small] [--steps 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from gptforge.bench.step import bench, write_json
from gptforge.config import load_config
from gptforge.observe.environment import environment
from gptforge.runtime import cpu_has_native_bf16


def matmul_gflops(dtype: torch.dtype, n: int = 1024, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--data", default=None, help="prepared data dir (default: the built-in corpus)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_precision.json"))
    args = parser.parse_args()

    result = {
        **environment(torch.device("cpu"), "fp32 vs bf16", 1),
        "command": " ".join(["python", *sys.argv]),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "threads": torch.get_num_threads(),
        "matmul_1024_gflops": {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)},
        "train_step": {},
    }
    for precision in ("fp32", "bf16"):
        overrides = [f"model.preset={args.preset}", f"speed.precision={precision}", "train.batch_size=16"]
        if args.data:
            overrides.append(f"data.dir={args.data}")
        record = bench(load_config(None, overrides), steps=args.steps, warmup=1)
        result["train_step"][precision] = {k: record[k] for k in ("tokens_per_sec", "median_step_s", "step_times_s", "mfu")}
    fp32, bf16 = result["train_step"]["fp32"]["tokens_per_sec"], result["train_step"]["bf16"]["tokens_per_sec"]
    result["fp32_over_bf16_train_step"] = fp32 / bf16
    write_json(result, args.out)
    mm = result["matmul_1024_gflops"]
    print(f"matmul 1024^3: fp32 {mm['fp32']:.1f} GFLOP/s, bf16 {mm['bf16']:.1f} GFLOP/s (native bf16: {result['cpu_native_bf16']})")
    print(f"training step ({args.preset}, batch 16): fp32 {fp32:,.0f} tokens/s, bf16 {bf16:,.0f} tokens/s "
          f"-> fp32 is {fp32 / bf16:.1f}x faster")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
