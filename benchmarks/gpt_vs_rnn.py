"""GPT against an LSTM at equal parameter count and equal training time, on the built-in corpus.

1. Both train for --seconds on the same token shards: the default GPT (4 x 256, context 256, random windows)
   and a 2-layer LSTM whose width is chosen to match the GPT's parameter count (tied embeddings both), on the
   sequential loader with its hidden state carried from window to window. Throughput, and validation loss
   against training time (the same val windows for both).
2. The time of one training step against the sequence length at a fixed batch of sequences, through
   `gptforge bench`'s step: a GPT processes the T positions of a window in parallel, an LSTM one after another
   (each position waits for the hidden state of the one before), which is where the recurrence stops the
   hardware from working in parallel.

Writes benchmarks/results/gpt_vs_rnn_<device>.json.

    python benchmarks/gpt_vs_rnn.py [--seconds 60] [--lengths 64 128 256 512]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gptforge.bench.step import bench
from gptforge.config import load_config
from gptforge.model.flops import num_params
from train_runs import train_run

GPT = ["model.arch=gpt"]
EVAL = ["eval.every=10", "eval.tokens=16384", "train.save_every=0"]


def lstm_keys(target: int, layers: int = 2) -> list[str]:
    """The LSTM width (a multiple of 32) whose parameter count is closest to `target`."""
    def count(width: int) -> int:
        keys = ["model.arch=lstm", f"model.n_layer={layers}", f"model.n_embd={width}", "model.vocab_size=8192"]
        return num_params(load_config(None, [*keys, "train.max_steps=1"]).model)["total"]

    width = min(range(64, 2049, 32), key=lambda w: abs(count(w) - target))
    return ["model.arch=lstm", f"model.n_layer={layers}", f"model.n_embd={width}", "data.loader=sequential"]


def step_time(keys: list[str], length: int, batch: int) -> dict:
    cfg = load_config(None, [*keys, f"model.block_size={length}", f"train.batch_size={batch}", "train.max_steps=1",
                             "data.prefetch=0"])
    record = bench(cfg, steps=4, warmup=2)
    return {"block_size": length, "batch_size": batch, "median_step_s": record["median_step_s"],
            "tokens_per_sec": record["tokens_per_sec"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="training seconds per model")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--batch", type=int, default=8, help="sequences per step in the length sweep")
    parser.add_argument("--lstm-lr", type=float, default=None, help="the LSTM's optim.lr (default: the config's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    gpt_params = num_params(load_config(None, [*GPT, "model.vocab_size=8192", "train.max_steps=1"]).model)["total"]
    lr = [f"optim.lr={args.lstm_lr}"] if args.lstm_lr else []
    models = {"gpt": GPT, "lstm": lstm_keys(gpt_params) + lr}
    result = {"seconds": args.seconds, "models": {}}
    for name, keys in models.items():
        run = train_run([*keys, f"train.max_time={args.seconds}", *EVAL])
        params = num_params(load_config(None, [*keys, "model.vocab_size=8192", "train.max_steps=1"]).model)["total"]
        result.update(run["environment"])
        result["models"][name] = {"keys": keys, "params": params, **{k: run[k] for k in (
            "final_val_loss", "final_val_bpb", "steps", "tokens", "train_time_s", "tokens_per_sec_median", "evals")}}
        r = result["models"][name]
        print(f"{name}: {params / 1e6:.2f}M parameters, {r['tokens_per_sec_median']:,.0f} tok/s, val loss "
              f"{r['final_val_loss']:.4f} ({r['final_val_bpb']:.3f} bits/byte) after {r['train_time_s']:.0f} s", flush=True)
    for name, keys in models.items():
        sweep = [step_time(keys, length, args.batch) for length in args.lengths]
        result["models"][name]["step_time_by_length"] = sweep
        print(f"{name} step time: " + ", ".join(f"T={s['block_size']} {1000 * s['median_step_s']:.0f} ms"
                                               for s in sweep), flush=True)
    out = Path(args.out or Path(__file__).parent / "results" / f"gpt_vs_rnn_{result.get('device_type', 'cpu')}.json")
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
