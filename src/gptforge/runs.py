"""Loading a trained run for use: the model in eval mode, its tokenizer, its config and its saved state;
and what a run made from a loaded one (quantized, pruned) takes from it."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from gptforge.config import Config, from_dict
from gptforge.data.tokenizer import Tokenizer
from gptforge.errors import CheckpointError, GptforgeError
from gptforge.model.gpt import GPT
from gptforge.train import checkpoint
from gptforge.train.contents import model_for


@dataclass
class LoadedRun:
    model: GPT
    tokenizer: Tokenizer | None
    config: Config
    checkpoint: Path  # the checkpoint folder the weights came from
    state: dict  # its state.json


def load_run(path: str | Path, device: str | torch.device = "cpu",
             report: Callable[[str], None] = print, gpt_only: str | None = None) -> LoadedRun:
    """The newest intact checkpoint of a run directory, or a checkpoint folder, ready for use: quantized
    layers rebuilt, LoRA adapters merged, sharded weights gathered. Every checkpoint is verified first
    (files, schema, shapes, values); one of a run that passes and still will not load is skipped like a
    damaged one. `report` hears of the checkpoints skipped on the way. `gpt_only`: the command that works on a
    GPT's layers only, named in the error for a run of another model.arch."""
    for ckpt in checkpoint.candidates(path, report=report):
        try:
            loaded = _load(ckpt, device)
            if gpt_only and loaded.config.model.arch != "gpt":
                raise GptforgeError(f"{gpt_only} works on a GPT's layers; {path} is a model.arch="
                                    f"{loaded.config.model.arch} run")
            return loaded
        except CheckpointError as e:
            if checkpoint.is_checkpoint_folder(path):
                raise
            report(f"checkpoint {ckpt.name} rejected: {e}")
    raise CheckpointError(f"{path}: no checkpoint under {checkpoint.checkpoint_root(path)} could be loaded")


def _load(ckpt: Path, device: str | torch.device) -> LoadedRun:
    state = checkpoint.read_state(ckpt)
    cfg = from_dict(state["config"], source=str(ckpt / "state.json"))
    model = model_for(cfg, state)
    if checkpoint.is_sharded(ckpt):
        from gptforge.parallel.shards import load_shards

        load_shards(model, None, ckpt / "shards")
    else:
        checkpoint.load_weights(model, ckpt)
    if cfg.finetune.lora.rank:  # adapters are stored beside the base weights; fold them in for use
        from gptforge.adapt.lora import merge_lora

        merge_lora(model)
    model.to(device).eval()
    tok_file = ckpt / "tokenizer.json"
    tokenizer = Tokenizer.load(tok_file) if tok_file.is_file() else None
    return LoadedRun(model, tokenizer, cfg, ckpt, state)


# ---------------------------------------------------------------- a run made from a loaded one


def check_output(out: Path, source: Path, force: bool) -> None:
    """Refuse a non-empty `out` unless forced (then empty it), and never write over the source run."""
    out, src = out.resolve(), source.resolve()
    if out == src or out in src.parents:
        raise GptforgeError(f"--out {out} would overwrite the source {source}; choose another folder")
    if out.exists() and not out.is_dir():
        raise GptforgeError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise GptforgeError(f"--out {out}: already exists and is not empty; pass --force to replace it")
        shutil.rmtree(out)


def output_config(loaded: LoadedRun, out: Path) -> dict:
    """The source run's config for a run at `out` of its loaded weights, in which LoRA adapters are merged."""
    cfg = loaded.config
    finetune = dataclasses.replace(cfg.finetune, lora=dataclasses.replace(cfg.finetune.lora, rank=0))
    return dataclasses.replace(cfg, finetune=finetune, run=dataclasses.replace(cfg.run, dir=str(out))).to_dict()


def source_info(run: Path, loaded: LoadedRun) -> dict:
    """Where the new run's weights came from, for its state.json."""
    return {"run": str(run), "checkpoint": str(loaded.checkpoint), "step": loaded.state["step"]}
