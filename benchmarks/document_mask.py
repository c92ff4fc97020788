"""What document masking costs: the default model's training step with and without data.document_mask.

    python benchmarks/document_mask.py [--steps 10] [--repeats 3] [--precision auto]

`gptforge bench` on the built-in corpus (windows of 256 tokens of the standard library's source, with
end-of-text tokens between files) with data.document_mask=false and =true, alternating, best of
--repeats each. On a CPU the mask is an SDPA boolean mask (B x T x T); on a GPU flex attention. Writes
benchmarks/results/document_mask_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def bench(masked: bool, steps: int, precision: str, work: Path) -> dict:
    out = work / f"bench_{masked}.json"
    subprocess.run([sys.executable, "-m", "gptforge", "bench", f"data.document_mask={str(masked).lower()}",
                    f"speed.precision={precision}", f"--steps={steps}", f"--json={out}"], check=True,
                   capture_output=True)
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    runs = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for masked in (False, True):
                runs[masked].append(bench(masked, args.steps, args.precision, Path(tmp)))
    best = {m: max(runs[m], key=lambda r: r["tokens_per_sec"]) for m in runs}
    device = best[False].get("device", "cpu")
    result = {
        "command": " ".join(["python", "benchmarks/document_mask.py", *sys.argv[1:]]),
        "tokens_per_s": {"plain": round(best[False]["tokens_per_sec"]), "document_mask": round(best[True]["tokens_per_sec"])},
        "all_tokens_per_s": {"plain": [round(r["tokens_per_sec"]) for r in runs[False]],
                             "document_mask": [round(r["tokens_per_sec"]) for r in runs[True]]},
        "cost": round(1 - best[True]["tokens_per_sec"] / best[False]["tokens_per_sec"], 4),
        "precision": best[False].get("precision"), "device": device,
        "record": best[True],
    }
    path = Path(args.json or f"benchmarks/results/document_mask_{'cuda' if 'cuda' in str(device) else 'cpu'}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"tokens/s: {result['tokens_per_s']['plain']:,} without, {result['tokens_per_s']['document_mask']:,} with "
          f"document masking ({result['cost']:+.1%} cost), {result['precision']} on {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
