"""`gptforge compare`: a run and its variants (quantized, pruned, fine-tuned) measured alike, in one table.

Every variant is evaluated on the same validation tokens (the first run's data unless --data) and decodes
the same prompt greedily with a KV cache, after a warm-up, as `gptforge sample` does (in the weights' own
dtype, no autocast: on a CPU single-stream decoding is fastest in fp32 even where bf16 is native, see
benchmarks/generate_speed.py); the speed is the best of three runs. Memory is
what the device can report: on a CUDA GPU the peak allocated while loading, evaluating and generating;
elsewhere the bytes of the model's tensors, since a CPU process's peak also holds the allocator's and
Python's memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from gptforge.adapt.qlinear import QuantLinear, linear_bytes
from gptforge.data.datadir import DataDir, load_data_dir
from gptforge.data.loader import val_batches
from gptforge.errors import GptforgeError
from gptforge.evaluate.generate import generate, prompt_ids
from gptforge.evaluate.loss import evaluate
from gptforge.progress import Progress
from gptforge.runs import LoadedRun, load_run
from gptforge.train import checkpoint
from gptforge.runtime import pick_device, resolve_precision, synchronize
from gptforge.train.builder import data_eot, resolve_data

PROMPT = "import os\n\n\ndef main("
FIELDS = ("name", "checkpoint", "step", "device", "disk_bytes", "params", "linear_bytes", "val_loss", "val_bpb",
          "tokens_per_s", "memory_bytes", "memory_kind")


def compare(paths: list[str | Path], data: str | Path | None = None, tokens: int = 128,
            device: str | torch.device = "cpu", eval_tokens: int | None = None, report=print) -> list[dict]:
    """One row per run or checkpoint in `paths` (keys: FIELDS), measured one model at a time."""
    if not paths:
        raise GptforgeError("compare needs at least one run directory")
    if tokens < 1:
        raise GptforgeError(f"--tokens must be at least 1, got {tokens}")
    device = torch.device(device)
    precision = resolve_precision("auto", device)
    checkpoints = [checkpoint.resolve(path, report=report) for path in paths]  # every path checked before any work
    rows, batches, dataset = [], {}, None
    bar = Progress("compare", len(paths), "runs")
    for path, ckpt in zip(paths, checkpoints):
        _reset_memory(device)
        run = load_run(ckpt, device, report=report, gpt_only="gptforge compare")
        if dataset is None:
            dataset = load_data_dir(data) if data else resolve_data(run.config)
            eval_tokens = eval_tokens or run.config.eval.tokens
        _check_data(run, dataset, path)
        block = run.config.model.block_size
        if block not in batches:
            batches[block] = val_batches(dataset.val, block, run.config.train.batch_size, eval_tokens,
                                         eot_id=data_eot(dataset))
        tokenizer = dataset.tokenizer or run.tokenizer
        token_bytes = torch.from_numpy(tokenizer.token_byte_lengths()) if tokenizer is not None else None
        val = evaluate(run.model, batches[block], precision, token_bytes, device)
        speed = _tokens_per_s(run, tokens, device)  # as `gptforge sample` decodes: the weights' own dtype
        cuda = device.type == "cuda"
        rows.append({
            "name": str(path),
            "checkpoint": str(run.checkpoint),
            "step": run.state["step"],
            "device": str(device),
            "disk_bytes": (run.checkpoint / "model.safetensors").stat().st_size,
            "params": _num_params(run.model),
            "linear_bytes": linear_bytes(run.model),
            "val_loss": val["val_loss"],
            "val_bpb": val["val_bpb"],
            "tokens_per_s": speed,
            "memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else _tensor_bytes(run.model),
            "memory_kind": "cuda_max_allocated" if cuda else "model_tensors",
        })
        del run
        bar.update(advance=1, info=f"{path}: val loss {val['val_loss']:.4f}, {speed:.0f} tokens/s")
    bar.close()
    return rows


def _check_data(run: LoadedRun, data: DataDir, path) -> None:
    if run.tokenizer is not None and data.tokenizer is not None and run.tokenizer.sha256 != data.tokenizer.sha256:
        raise GptforgeError(f"{path} uses another tokenizer than {data.path}; compare variants of one run, or pass --data")
    if data.vocab_size > run.config.model.vocab_size:
        raise GptforgeError(f"{data.path} has {data.vocab_size} token ids, "
                            f"the model in {path} only {run.config.model.vocab_size}")


def _tokens_per_s(run: LoadedRun, tokens: int, device: torch.device, repeats: int = 3) -> float:
    """Greedy decoding speed with a KV cache on a fixed prompt, after a warm-up of 8 tokens: the best of
    `repeats` runs, so that other work on a shared machine disturbs the figure less."""
    ids = prompt_ids(run.tokenizer, PROMPT) if run.tokenizer is not None else [0]
    generate(run.model, ids, 8, temperature=0)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        generate(run.model, ids, tokens, temperature=0)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return tokens / best


def _num_params(model: nn.Module) -> int:
    """Weights the model represents, quantized ones counted as the full-precision values they stand for."""
    quantized = sum(m.in_features * m.out_features + (m.bias.numel() if m.bias is not None else 0)
                    for m in model.modules() if isinstance(m, QuantLinear))
    return sum(p.numel() for p in model.parameters()) + quantized


def _tensor_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------------------------------------
# Output


def print_table(rows: list[dict]) -> None:
    """A rich table; loss changes are relative to the first row."""
    from rich.console import Console
    from rich.table import Table

    memory = _memory_label(rows)
    table = Table(title=f"variants on {rows[0]['device']}")
    for header in ("run", "disk MB", "params M", "linear MB", "val loss", "vs first", "bits/byte", "tokens/s", memory):
        table.add_column(header, justify="left" if header == "run" else "right")
    base = rows[0]["val_loss"]
    for r in rows:
        bpb = f"{r['val_bpb']:.4f}" if r["val_bpb"] is not None else "n/a"
        table.add_row(r["name"], f"{r['disk_bytes'] / 1e6:.2f}", f"{r['params'] / 1e6:.2f}",
                      f"{r['linear_bytes'] / 1e6:.2f}", f"{r['val_loss']:.4f}", f"{100 * (r['val_loss'] / base - 1):+.2f}%", bpb,
                      f"{r['tokens_per_s']:.1f}", f"{r['memory_bytes'] / 1e6:.1f}")
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # logs and pipes get every column unwrapped


def write_png(rows: list[dict], path: str | Path) -> None:
    """Bar charts of size, loss, speed and memory; needs matplotlib (the `plot` extra)."""
    plt = _pyplot()
    panels = (("disk MB", [r["disk_bytes"] / 1e6 for r in rows]), ("val loss", [r["val_loss"] for r in rows]),
              ("tokens/s", [r["tokens_per_s"] for r in rows]), (_memory_label(rows), [r["memory_bytes"] / 1e6 for r in rows]))
    names = [Path(r["name"]).name or r["name"] for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), constrained_layout=True)
    for ax, (title, values) in zip(axes, panels):
        ax.bar(names, values)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _memory_label(rows: list[dict]) -> str:
    return "CUDA peak MB" if rows[0]["memory_kind"] == "cuda_max_allocated" else "model MB in RAM"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GptforgeError("--png needs matplotlib, which is not installed: pip install 'gptforge[plot]'") from None
    return plt


def run_compare(args: argparse.Namespace) -> int:
    if args.png:
        _pyplot()  # fail before the measurements, not after
    rows = compare(args.runs, args.data, args.tokens, pick_device(args.device), args.eval_tokens,
                   report=lambda msg: print(msg, file=sys.stderr))
    if args.json:
        print(json.dumps(rows))
    else:
        print_table(rows)
    if args.png:
        write_png(rows, args.png)
    return 0
