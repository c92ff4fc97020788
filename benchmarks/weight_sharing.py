"""Weight sharing (model.share_layers=K, ALBERT-style) against the unshared GPT, at equal training time on
the built-in corpus: parameters, checkpoint weight size, throughput and validation loss.

Every model has the same depth (every layer still runs, so the FLOPs per token are alike); sharing cuts
the parameters of the blocks by n_layer / K. Writes benchmarks/results/weight_sharing_<device>.json.

    python benchmarks/weight_sharing.py [--seconds 60] [--layers 6] [--shares 0 2 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gptforge.config import load_config
from gptforge.model.flops import num_params
from train_runs import train_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="training seconds per model")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--shares", type=int, nargs="+", default=[0, 2, 1], help="model.share_layers values (0: none)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    rows = []
    for k in args.shares:
        keys = [f"model.n_layer={args.layers}", f"model.share_layers={k}", f"train.max_time={args.seconds}",
                "eval.every=10", "eval.tokens=16384", "train.save_every=0"]
        run = train_run(keys)
        model = load_config(None, [*keys, "model.vocab_size=8192"]).model
        counts = num_params(model)
        rows.append({"share_layers": k, "params": counts["total"], "non_embedding_params": counts["non_embedding"],
                     **{key: run[key] for key in ("final_val_loss", "final_val_bpb", "steps", "tokens", "train_time_s",
                                                  "tokens_per_sec_median", "weights_bytes", "evals")}})
        r = rows[-1]
        print(f"share_layers={k}: {r['params'] / 1e6:.2f}M parameters ({r['non_embedding_params'] / 1e6:.2f}M "
              f"non-embedding), weights {r['weights_bytes'] / 1e6:.1f} MB, {r['tokens_per_sec_median']:,.0f} tok/s, "
              f"val loss {r['final_val_loss']:.4f} after {r['train_time_s']:.0f} s ({r['steps']} steps)", flush=True)
    out = Path(args.out or Path(__file__).parent / "results" / f"weight_sharing_{run['environment']['device_type']}.json")
    out.write_text(json.dumps({**run["environment"], "seconds": args.seconds, "layers": args.layers, "rows": rows},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
