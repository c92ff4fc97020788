"""Do the built-in multiple-choice tasks separate models? An untrained model, one trained for a minute and the
default model (plain `gptforge train`, 300 s), all on the built-in corpus, scored by `gptforge eval --tasks
builtin`. Then the default run leaves gptforge: export-hf, greedy generation through transformers' pipeline
against `gptforge sample --temperature 0`, and export-gguf.

Writes benchmarks/results/builtin_tasks_<device>.json. Run it on a quiet machine:

    flock -x /tmp/cpu.lock python benchmarks/builtin_tasks.py [--root /tmp/gf_tasks] [--main /tmp/a_main]

--main names the default run's directory (trained there with plain `gptforge train run.dir=...` unless it
already holds a finished run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "def parse(self, text):\n"


def gptforge(*args: str, timeout: float = 1800) -> str:
    proc = subprocess.run([sys.executable, "-m", "gptforge", *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))
    if proc.returncode != 0:
        sys.exit(f"gptforge {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def untrained(root: Path) -> Path:
    """The default model at its initial weights (run.seed), with the built-in corpus's tokenizer."""
    import dataclasses

    import torch

    from gptforge.config import load_config
    from gptforge.model.gpt import GPT
    from gptforge.train.builder import resolve_data
    from gptforge.train.checkpoint import save_weights

    path = root / "untrained"
    cfg = load_config(None, [f"run.dir={path}"])
    data = resolve_data(cfg)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=data.vocab_size))
    torch.manual_seed(cfg.run.seed)
    save_weights(path, GPT(cfg.model), cfg.to_dict(), step=0, tokenizer_file=data.path / "tokenizer.json")
    return path


def trained(path: Path, *overrides: str) -> tuple[Path, float]:
    if not (path / "checkpoints").is_dir():
        start = time.perf_counter()
        gptforge("train", f"run.dir={path}", *overrides)
        return path, time.perf_counter() - start
    return path, 0.0


def scores(run: Path) -> dict:
    start = time.perf_counter()
    result = json.loads(gptforge("eval", str(run), "--tasks", "builtin", "--json"))
    result["eval_s"] = time.perf_counter() - start
    val = json.loads(gptforge("eval", str(run), "--json"))
    result.update(val_loss=val["val_loss"], val_bpb=val["val_bpb"])
    return result


def leaves_gptforge(run: Path, root: Path) -> dict:
    """export-hf, then transformers' greedy text against gptforge sample's; export-gguf's size."""
    import transformers

    hf = root / "main-hf"
    gptforge("export-hf", str(run), "--out", str(hf), "--force")
    ours = gptforge("sample", str(run), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "48",
                    "--no-stop", "--safety", "off", "--no-eot-prefix", "--device", "cpu")
    generate = transformers.pipeline("text-generation", model=str(hf), device="cpu")
    generate.model.generation_config.eos_token_id = None
    theirs = generate(PROMPT, max_new_tokens=48, do_sample=False)[0]["generated_text"]
    gguf = root / "main.gguf"
    gptforge("export-gguf", str(run), "--out", str(gguf), "--dtype", "q8_0", "--force")
    return {"architecture": json.loads((hf / "config.json").read_text())["architectures"][0],
            "greedy_48_tokens_equal": ours.removesuffix("\n") == theirs, "gptforge_sample": ours.removesuffix("\n"),
            "transformers_pipeline": theirs, "gguf_q8_0_mib": gguf.stat().st_size / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/gf_tasks"))
    parser.add_argument("--main", type=Path, default=None, help="the default run's directory (default: ROOT/main)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    main_run, main_s = trained(args.main or args.root / "main")  # plain `gptforge train`: 300 s
    short_run, short_s = trained(args.root / "short", "train.max_time=60")
    runs = {"untrained": untrained(args.root), "trained_60s": short_run, "trained_300s_default": main_run}
    results = {name: scores(path) for name, path in runs.items()}
    results["trained_60s"]["train_wall_s"] = short_s
    results["trained_300s_default"]["train_wall_s"] = main_s

    import torch

    from gptforge.observe.environment import environment

    record = {**environment(torch.device("cpu"), "auto", 1),
              "command": "flock -x /tmp/cpu.lock python benchmarks/builtin_tasks.py",
              "runs": {k: str(v) for k, v in runs.items()}, "results": results,
              "default_run_leaves_gptforge": leaves_gptforge(main_run, args.root)}
    for name, r in results.items():
        line = "  ".join(f"{t['task']} {t['acc_norm']:.3f} [{t['acc_norm_ci95'][0]:.3f}, {t['acc_norm_ci95'][1]:.3f}]"
                         for t in r["tasks"])
        print(f"{name:<22} step {r['step']:>5}  val_loss {r['val_loss']:.3f}  CORE {r['core']:.3f}  {line}")
    print(json.dumps(record["default_run_leaves_gptforge"], indent=1))
    out = Path(args.out or Path(__file__).parent / "results" / "builtin_tasks_cpu.json")
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
