"""Where a training step's time goes, by kind of operation, and the most any implementation could gain.

Profiles forward, backward and optimizer step of gptforge's model (by default like for like with nanoGPT:
its architecture and AdamW, see nanogpt_speed.py) with torch.profiler, and of nanoGPT's own model when a
checkout is given with --nanogpt (imported from it at run time, never part of this repository). Self time is
grouped into matmuls (mm, addmm, bmm), attention (the SDPA kernels), and everything else (norms,
activations, softmax and loss, optimizer arithmetic, copies).

The bound: a step whose every non-matmul operation took no time at all would still take its matmul time, at
the rate this machine's matmul library reaches on these shapes. So "step / matmul time" is the most that
fusing, compiling or rewriting anything but the matmuls can buy; against a peer that runs the same matmuls,
"peer step / own matmul time" is the highest ratio any implementation of the same model could reach.

    python benchmarks/step_profile.py [--nanogpt PATH/TO/nanoGPT] [--steps 3] [key=value overrides]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from gptforge.bench.step import write_json
from gptforge.config import load_config
from gptforge.model.flops import flops_per_token
from gptforge.model import build_model
from gptforge.observe.environment import environment
from gptforge.train.optim import build_optimizer

sys.path.insert(0, str(Path(__file__).parent))
from nanogpt_speed import NANOGPT_ARCH, build_peer  # noqa: E402

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def kind(op: str) -> str:
    if op in MATMUL:
        return "matmul"
    if "scaled_dot_product" in op:
        return "attention"
    return "other"


def profile_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn, steps: int) -> dict:
    """Self CPU seconds per step (their sum, "step_s", and by kind) and the costliest ops, as means over
    `steps` profiled steps; profiler overhead included, so compare the two models' figures with each other."""
    def step():
        loss_fn(model).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state, allocator
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    by_kind = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    top = []
    for event in prof.key_averages():
        by_kind[kind(event.key)] += event.self_cpu_time_total / 1e6 / steps
        top.append((event.self_cpu_time_total / 1e6 / steps, event.key))
    total = sum(by_kind.values())
    return {"step_s": total, "by_kind_s": by_kind,
            "top_ops": [{"op": name, "s": s} for s, name in sorted(top, reverse=True)[:12]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", type=Path, default=None, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--default-recipe", action="store_true", help="gptforge's defaults instead of nanoGPT's")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_profile_cpu.json"))
    parser.add_argument("overrides", nargs="*", help="key=value, after the shape below")
    args = parser.parse_args()
    shape = ["model.n_layer=6", "model.n_head=6", "model.n_embd=384", "model.block_size=256",
             "model.vocab_size=8192", "train.batch_size=16", "speed.precision=fp32"]
    cfg = load_config(None, [*shape, *([] if args.default_recipe else NANOGPT_ARCH), *args.overrides])
    m, B = cfg.model, cfg.train.batch_size
    torch.manual_seed(0)
    x = torch.randint(0, m.padded_vocab_size, (B, m.block_size))
    y = torch.randint(0, m.padded_vocab_size, (B, m.block_size))
    model = build_model(m)
    results = {"gptforge": profile_steps(model, build_optimizer(model, cfg.optim, "cpu"), lambda g: g(x, y), args.steps)}
    if args.nanogpt:
        peer, opt = build_peer(args.nanogpt.resolve(), m.n_layer, m.n_head, m.n_embd, m.block_size,
                               m.padded_vocab_size, torch.device("cpu"))
        results["nanogpt"] = profile_steps(peer, opt, lambda g: g(x, y)[1], args.steps)

    tokens = B * m.block_size
    own = results["gptforge"]
    record = {
        **environment(torch.device("cpu"), "fp32", 1),
        "command": " ".join(["python", "benchmarks/step_profile.py",
                             *("NANOGPT" if a == str(args.nanogpt) else a for a in sys.argv[1:])]),
        "threads": torch.get_num_threads(),
        "config": cfg.to_dict(), "tokens_per_step": tokens, "model_flops_per_step": flops_per_token(m) * tokens,
        **results,
        "bound_own": own["step_s"] / own["by_kind_s"]["matmul"],
    }
    if "nanogpt" in results:
        record["ratio_profiled"] = results["nanogpt"]["step_s"] / own["step_s"]
        record["bound_vs_nanogpt"] = results["nanogpt"]["step_s"] / own["by_kind_s"]["matmul"]
    write_json(record, args.out)

    print(f"{record['device']}, {record['threads']} threads; {m.n_layer} x {m.n_embd}, context {m.block_size}, "
          f"batch {B}; self time per step, mean of {args.steps} profiled steps")
    print(f"{'':<10} {'step s':>7} {'matmul':>8} {'attention':>10} {'other':>7}  matmul GFLOP/s*")
    for name, r in results.items():
        k = r["by_kind_s"]
        print(f"{name:<10} {r['step_s']:>7.2f} {k['matmul']:>8.2f} {k['attention']:>10.2f} {k['other']:>7.2f}  "
              f"{record['model_flops_per_step'] / k['matmul'] / 1e9:>8.0f}")
    print("* model FLOPs (attention included) over matmul time: roughly the matmul rate reached")
    print(f"gptforge: at most {record['bound_own']:.2f}x faster if everything but its matmuls took no time")
    if "nanogpt" in results:
        print(f"vs nanoGPT: {record['ratio_profiled']:.2f}x now; at most {record['bound_vs_nanogpt']:.2f}x for any "
              f"implementation that runs these matmuls at this rate")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
