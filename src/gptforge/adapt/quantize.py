"""`gptforge quantize`: a run's newest checkpoint, quantized (weight-only int8 or int4) into a new run.

The layers, their arithmetic and what gets quantized are in qlinear.py. A quantized run is a weights-only
run whose state.json carries the spec {"method", "group_size", "modules"}; `gptforge.runs.load_run` calls
`qlinear.build_quantized` with it before loading the weights, so `gptforge.load`, `sample` and `eval` work
on it as on any run. torchao is not used: on a CPU with torch 2.13, torchao 0.18's int4 weight-only path
needs the separate `mslk` kernel package, and plain PyTorch covers int8.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from gptforge.adapt.qlinear import linear_bytes, quantize_model
from gptforge.errors import GptforgeError
from gptforge.runs import check_output, load_run, output_config, source_info
from gptforge.train.checkpoint import save_weights


def quantize_run(run: str | Path, out: str | Path, method: str, group_size: int = 64, force: bool = False,
                 report: Callable[[str], None] = print) -> Path:
    """Quantize the newest checkpoint of `run` into a weights-only run at `out`; returns `out`."""
    run, out = Path(run), Path(out)
    loaded = load_run(run, "cpu", report=report, gpt_only="gptforge quantize")
    if "quantization" in loaded.state:
        raise GptforgeError(f"{loaded.checkpoint} is already quantized ({loaded.state['quantization']['method']}); "
                            "quantize the full-precision run instead")
    model = loaded.model
    before = linear_bytes(model)
    spec = quantize_model(model, method, group_size)  # in memory: bad arguments fail before --out is touched
    check_output(out, run, force)
    tokenizer = loaded.checkpoint / "tokenizer.json"
    save_weights(out, model, output_config(loaded, out), step=loaded.state["step"],
                 tokenizer_file=tokenizer if tokenizer.is_file() else None,
                 extra={"quantization": spec, "source": source_info(run, loaded)})
    after = linear_bytes(model)
    report(f"wrote {out}: {method} on {len(spec['modules'])} linear layers; linear weights "
           f"{before / 1e6:.2f} MB -> {after / 1e6:.2f} MB ({before / after:.2f}x smaller)")
    return out


def run_quantize(args: argparse.Namespace) -> int:
    quantize_run(args.run_dir, args.out, args.method, args.group_size, args.force)
    return 0
