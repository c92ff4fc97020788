"""Loading a trained run for use: the model in eval mode, its tokenizer and its config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gptforge.config import Config, from_dict
from gptforge.data.tokenizer import Tokenizer
from gptforge.model import build_model
from gptforge.model.gpt import GPT
from gptforge.train import checkpoint


@dataclass
class LoadedRun:
    model: GPT
    tokenizer: Tokenizer | None
    config: Config
    checkpoint: Path
    state: dict


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", report=print) -> LoadedRun:
    ckpt = checkpoint.resolve(path, report=report)
    state = checkpoint.read_state(ckpt)
    cfg = from_dict(state["config"], source=str(ckpt / "state.json"))
    model = build_model(cfg.model)
    if "quantization" in state:
        from gptforge.adapt.quantize import build_quantized

        build_quantized(model, state["quantization"])
    if cfg.finetune.lora.rank:  # adapters are stored beside the base weights; fold them in for use
        from gptforge.adapt.lora import apply_lora, merge_lora

        apply_lora(model, cfg.finetune.lora)
        checkpoint.load_weights(model, ckpt)
        merge_lora(model)
    elif checkpoint.is_sharded(ckpt):  # verified against its manifest by resolve() above
        from gptforge.parallel.distribute import load_sharded

        load_sharded(model, None, ckpt / "dcp")
    else:
        checkpoint.load_weights(model, ckpt)
    model.to(device).eval()
    tok_file = ckpt / "tokenizer.json"
    tokenizer = Tokenizer.load(tok_file) if tok_file.is_file() else None
    return LoadedRun(model, tokenizer, cfg, ckpt, state)


def load_run(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer | None]:
    run = load_checkpoint(path, device)
    return run.model, run.tokenizer
