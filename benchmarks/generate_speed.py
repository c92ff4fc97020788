"""Single-stream generation speed of the default model, where each token's time goes, and `compare`'s wall time.

    python benchmarks/generate_speed.py [--device cpu] [--tokens 200] [--json benchmarks/results/generate_speed_cpu.json]

The default model (`gptforge train`'s, random weights: speed does not depend on their values) decodes with
the KV cache exactly as `gptforge sample` does (temperature 0.8, top-k 200; the weights' own dtype), the best
of three runs after a warm-up:
- inside the window (--tokens new tokens after one end-of-text token, fewer than block_size);
- past the window, 4 x block_size tokens: exact (every token re-reads the full window) and with
  context_keep = block_size / 2 (`sample --context-keep`);
- under bf16 autocast as well where the device has native bf16, to show which is faster for decoding.
One decode step is split into the model's forward and the sampling, and the forward's costliest operators
are listed (torch.profiler). Last, three default-size runs are trained for two steps on the built-in corpus
and `gptforge compare` on them is timed in a fresh process (--no-compare skips it). Target: at least 200
tokens/s inside the window on a 2-core CPU, and `compare` of three runs in under a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptforge.config import load_config
from gptforge.evaluate.generate import generate, sample_token
from gptforge.model import build_model
from gptforge.model.gpt import KVCache
from gptforge.observe.environment import environment
from gptforge.runtime import capabilities, synchronize

TARGET_TOKENS_PER_S = 200
TARGET_COMPARE_S = 60
SAMPLING = dict(temperature=0.8, top_k=200)


def decode_speed(model, device, tokens: int, context_keep: int | None = None, repeats: int = 3) -> float:
    """Best-of-`repeats` tokens/s of `tokens` new tokens after one end-of-text token, after a warm-up."""
    generate(model, [0], 8, **SAMPLING, seed=0)
    best = float("inf")
    for i in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        generate(model, [0], tokens, **SAMPLING, seed=i, context_keep=context_keep)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return tokens / best


@torch.no_grad()
def step_split(model, device, steps: int = 100) -> dict:
    """Milliseconds per decode step in the forward and in the sampling, with the cache half full."""
    cache = KVCache(1, model.config)
    model(torch.zeros(1, model.config.block_size // 2, dtype=torch.long, device=device), cache=cache)
    token = torch.ones(1, 1, dtype=torch.long, device=device)
    forward = sampling = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        logits = model(token, cache=cache)[0, -1]
        synchronize(device)
        middle = time.perf_counter()
        sample_token(logits, **SAMPLING)
        forward, sampling = forward + middle - start, sampling + time.perf_counter() - middle
        cache.pos -= 1  # the same position again: every step costs the same
    return {"forward_ms": round(1000 * forward / steps, 3), "sampling_ms": round(1000 * sampling / steps, 3)}


@torch.no_grad()
def top_operators(model, device, steps: int = 50, n: int = 8) -> list[dict]:
    """The operators that take the most self time over `steps` decode steps."""
    from torch.profiler import profile

    cache = KVCache(1, model.config)
    model(torch.zeros(1, 8, dtype=torch.long, device=device), cache=cache)
    token = torch.ones(1, 1, dtype=torch.long, device=device)
    with profile() as prof:
        for _ in range(steps):
            sample_token(model(token, cache=cache)[0, -1], **SAMPLING)
            cache.pos -= 1
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 4),
             "share": round(e.self_cpu_time_total / total, 3)} for e in events[:n]]


def time_compare(work: Path) -> dict:
    """Train three default-size runs for two steps, then time `gptforge compare` on them in a new process."""
    runs = []
    for seed in (1, 2, 3):
        run = work / f"run{seed}"
        subprocess.run([sys.executable, "-m", "gptforge", "train", "train.max_steps=2", "train.samples=0",
                        f"run.seed={seed}", f"run.dir={run}"], check=True, capture_output=True)
        runs.append(str(run))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "gptforge", "compare", *runs, "--json"], capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"compare failed:\n{done.stderr[-2000:]}")
    rows = json.loads(done.stdout)
    return {"runs": 3, "wall_s": round(wall, 2), "tokens_per_s": [round(r["tokens_per_s"], 1) for r in rows],
            "meets_target": wall < TARGET_COMPARE_S}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=200, help="new tokens inside the window (default: 200)")
    parser.add_argument("--no-compare", action="store_true", help="skip timing `gptforge compare`")
    parser.add_argument("--json", default=None, help="where to write the record "
                        "(default: benchmarks/results/generate_speed_<device type>.json)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = load_config(None, [])
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).eval()
    block = cfg.model.block_size
    if args.tokens >= block:
        parser.error(f"--tokens must stay inside the window (below block_size {block})")

    precisions = {"fp32": contextlib.nullcontext}
    if capabilities(device).native_bf16:
        precisions["bf16_autocast"] = lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    results = {}
    for name, context in precisions.items():
        with context():
            results[name] = {
                "inside_window_tokens_per_s": round(decode_speed(model, device, args.tokens), 1),
                "past_window_exact_tokens_per_s": round(decode_speed(model, device, 4 * block, repeats=1), 1),
                "past_window_keep_half_tokens_per_s": round(
                    decode_speed(model, device, 4 * block, context_keep=block // 2, repeats=1), 1),
                "step": step_split(model, device),
            }
        print(f"{name:>14}: {results[name]['inside_window_tokens_per_s']:.0f} tokens/s inside the window "
              f"({args.tokens} tokens); past it {results[name]['past_window_exact_tokens_per_s']:.0f} exact, "
              f"{results[name]['past_window_keep_half_tokens_per_s']:.0f} with context_keep={block // 2}; "
              f"a step: forward {results[name]['step']['forward_ms']:.2f} ms, "
              f"sampling {results[name]['step']['sampling_ms']:.2f} ms")
    operators = top_operators(model, device)
    print("where a decode step's time goes (fp32): "
          + ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in operators[:5]))
    compare = None
    if not args.no_compare:
        with tempfile.TemporaryDirectory() as tmp:
            compare = time_compare(Path(tmp))
        print(f"gptforge compare of three default-size runs: {compare['wall_s']:.1f} s "
              f"({'meets' if compare['meets_target'] else 'MISSES'} the {TARGET_COMPARE_S} s target)")
    met = results["fp32"]["inside_window_tokens_per_s"] >= TARGET_TOKENS_PER_S
    print(f"{'meets' if met else 'MISSES'} the {TARGET_TOKENS_PER_S} tokens/s target")
    record = {
        "benchmark": "generate_speed",
        "command": " ".join(["python", "benchmarks/generate_speed.py", *sys.argv[1:]]),
        **environment(device, "fp32", 1),
        "threads": torch.get_num_threads(),
        "model": {"n_layer": cfg.model.n_layer, "n_embd": cfg.model.n_embd, "block_size": block,
                  "vocab_size": cfg.model.vocab_size},
        "sampling": SAMPLING,
        "tokens": args.tokens,
        "target_tokens_per_s": TARGET_TOKENS_PER_S,
        "results": results,
        "top_operators_fp32": operators,
        "compare": compare,
    }
    path = Path(args.json or f"benchmarks/results/generate_speed_{device.type}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0 if met and (compare is None or compare["meets_target"]) else 1


if __name__ == "__main__":
    sys.exit(main())
