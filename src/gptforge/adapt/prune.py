"""Magnitude pruning of the transformer blocks' linear weights, with an optional recovery fine-tune.

    unstructured  in each layer, the fraction `sparsity` of weights with the smallest |w| is set to zero.
                  Per layer rather than one global threshold, so no layer is emptied because its weights
                  happen to be small in scale (a global cut would strip the residual projections, which are
                  initialised smaller, first).
    2:4           in every group of 4 consecutive input weights of a row, the 2 smallest |w| are zeroed:
                  the pattern sparse tensor cores run. Sparsity is then 0.5 by definition.

Embeddings, norms and the head are not pruned. The output is a weights-only run of dense tensors holding
zeros: it loads, samples and evaluates like any run; the zeros save space once compressed (gzip, zstd), not
in safetensors itself. `to_semi_structured` turns 2:4 weights into torch's semi-structured sparse tensors,
which only CUDA GPUs with sparse tensor cores (compute capability 8.0 or newer) execute; everywhere else
the dense tensors are used as they are.

With --recover-steps N the pruned weights go to a temporary weights-only run, and the ordinary training
loop fine-tunes them for N steps with finetune.init_from pointing at it and finetune.keep_sparsity=true (the
pruned weights stay zero); the output is then a normal training run.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from gptforge.adapt.qlinear import block_linears
from gptforge.config import from_dict
from gptforge.errors import GptforgeError
from gptforge.runs import check_output, load_run, output_config, source_info
from gptforge.train.checkpoint import save_weights

PATTERNS = ("unstructured", "2:4")


def check_pruning(sparsity: float, pattern: str) -> None:
    if pattern not in PATTERNS:
        raise GptforgeError(f"pruning pattern {pattern!r} is not one of: {', '.join(PATTERNS)}")
    if not 0.0 <= sparsity < 1.0:
        raise GptforgeError(f"--sparsity must be a fraction in [0, 1), got {sparsity}")
    if pattern == "2:4" and sparsity != 0.5:
        raise GptforgeError(f"--pattern 2:4 keeps 2 of every 4 weights, so its sparsity is 0.5; got --sparsity {sparsity}")


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    """Boolean mask (True = keep) of an (out, in) weight: the smallest |w| dropped, per layer or per group of 4."""
    magnitude = weight.detach().abs()
    if pattern == "2:4":
        out_features, in_features = weight.shape
        if in_features % 4:
            raise GptforgeError(f"--pattern 2:4 needs in_features divisible by 4, got {in_features}")
        groups = magnitude.view(out_features, in_features // 4, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
        return keep.view_as(weight)
    keep = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    keep[magnitude.flatten().argsort()[:round(sparsity * weight.numel())]] = False
    return keep.view_as(weight)


@torch.no_grad()
def prune_model(model: nn.Module, sparsity: float, pattern: str) -> dict:
    """Zero the smallest weights of every block linear layer, in place; return the achieved sparsity."""
    check_pruning(sparsity, pattern)
    per_module, zeros, total = {}, 0, 0
    for name in block_linears(model):
        weight = model.get_submodule(name).weight
        weight.mul_(magnitude_mask(weight, sparsity, pattern))
        n = int((weight == 0).sum())
        per_module[name] = n / weight.numel()
        zeros, total = zeros + n, total + weight.numel()
    return {"pattern": pattern, "sparsity": sparsity, "overall": zeros / total, "modules": per_module}


def has_2_4_pattern(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive input weights of every row holds at least 2 zeros."""
    out_features, in_features = weight.shape
    return in_features % 4 == 0 and bool(((weight.view(out_features, -1, 4) == 0).sum(-1) >= 2).all())


def to_semi_structured(model: nn.Module) -> list[str]:
    """On a CUDA GPU with sparse tensor cores, replace 2:4 block weights by semi-structured sparse tensors.

    torch.sparse.to_sparse_semi_structured keeps only the nonzeros and their positions, and its matmuls
    run on sparse tensor cores: compute capability 8.0 or newer, weights in fp16 or bf16 on that GPU (move
    and cast the model first). Anywhere else, a CPU included, this converts nothing and returns []; the dense
    weights with zeros compute the same result. Returns the names of the converted layers.
    """
    from torch.sparse import to_sparse_semi_structured

    converted = []
    for name in block_linears(model):
        linear = model.get_submodule(name)
        weight = linear.weight
        if weight.device.type != "cuda" or torch.cuda.get_device_capability(weight.device) < (8, 0):
            continue
        if not has_2_4_pattern(weight):
            raise GptforgeError(f"{name}: the weight is not 2:4 sparse; prune it with --pattern 2:4 first")
        linear.weight = nn.Parameter(to_sparse_semi_structured(weight.detach()), requires_grad=False)
        converted.append(name)
    return converted


def prune_run(run: str | Path, out: str | Path, sparsity: float, pattern: str, recover_steps: int = 0,
              data: str | Path | None = None, force: bool = False, report: Callable[[str], None] = print) -> Path:
    """Prune the newest checkpoint of `run` into `out` (weights-only, or a training run after recovery)."""
    run, out = Path(run), Path(out)
    check_pruning(sparsity, pattern)
    if recover_steps < 0:
        raise GptforgeError(f"--recover-steps must be >= 0, got {recover_steps}")
    loaded = load_run(run, "cpu", report=report, gpt_only="gptforge prune")
    if "quantization" in loaded.state:
        raise GptforgeError(f"{loaded.checkpoint} is quantized; prune the full-precision run, then quantize")
    check_output(out, run, force)
    stats = prune_model(loaded.model, sparsity, pattern)
    report(f"pruned {len(stats['modules'])} linear layers of {run} ({pattern}): "
           f"{100 * stats['overall']:.2f}% of their weights are zero")
    tokenizer = loaded.checkpoint / "tokenizer.json"
    tokenizer = tokenizer if tokenizer.is_file() else None
    extra = {"pruning": stats, "source": source_info(run, loaded)}
    if not recover_steps:
        save_weights(out, loaded.model, output_config(loaded, out), step=loaded.state["step"],
                     tokenizer_file=tokenizer, extra=extra)
        report(f"wrote {out}")
        return out

    from gptforge.train.loop import train

    with tempfile.TemporaryDirectory(prefix="gptforge-pruned-") as tmp:
        save_weights(tmp, loaded.model, output_config(loaded, Path(tmp)), step=loaded.state["step"],
                     tokenizer_file=tokenizer, extra=extra)
        tree = output_config(loaded, out)  # lora.rank=0: merged adapters would fill the zeros
        tree["finetune"].update(init_from=tmp, keep_sparsity=True)
        tree["train"].update(max_steps=recover_steps, max_tokens=None, max_time=None)
        if data is not None:
            tree["data"]["dir"] = str(data)
        train(from_dict(tree, source=f"recovery of {run}"))
    report(f"wrote {out}: {pattern} pruned, recovered for {recover_steps} steps")
    return out


def run_prune(args: argparse.Namespace) -> int:
    prune_run(args.run_dir, args.out, args.sparsity, args.pattern, args.recover_steps, args.data, args.force)
    return 0
