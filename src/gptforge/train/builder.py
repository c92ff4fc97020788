"""The one builder: a config and a world in, everything a training step needs out.

`gptforge train`, `lr-find`, `bench` (and `bench --ablate`), `doctor` and `tune` all get their model,
optimizer and step from build(); nothing else assembles them. The order is fixed, each stage acting on what
the ones before it built:

     1. data            the prepared shards (data.dir, or the built-in corpus); the vocabulary comes from them
     2. weights         a fresh model of model.arch at run.seed, or the weights of finetune.init_from; a resumed
                        run must be the same model, optimizer and tokenizer (train/resume.py)
     3. adapters        LoRA and quantization-aware training (adapt/lora.py, adapt/qat.py)
        kernels         fused RMSNorm / RoPE and the chunked cross-entropy (kernels/)
        noise           NEFTune on the input embeddings (adapt/neftune.py)
     4. device          the model moves to train.device (its own GPU per process under torchrun); on a GPU,
                        document masking attends through compiled flex attention (train/techniques.py)
     5. fp8, activation checkpointing                (train/techniques.py)
     6. batch size      train.batch_size=auto, found on the model as it will train (train/batch_finder.py)
     7. distribute      DDP or fully_shard under torchrun (parallel/distribute.py)
     8. compile         torch.compile of what distribute returned (train/techniques.py)
     9. optimizer       optim.name's registry entry (train/optim.py), and the fp16 gradient scaler
    10. restored state  a resumed checkpoint's weights, optimizer and scaler (train/resume.py)

then the loader (at the resumed position), the validation batches and the Stepper. The model module itself
(model/gpt.py) knows nothing of any of this.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from gptforge.config import Config, validate
from gptforge.data.augment import Augmenter
from gptforge.data.loader import Layout, TokenLoader, val_batches
from gptforge.data.datadir import DataDir, load_data_dir
from gptforge.errors import CheckpointError, ConfigError
from gptforge.model import build_model
from gptforge.observe import console
from gptforge.parallel.distribute import CommStats, distribute
from gptforge.parallel.world import World
from gptforge.runtime import Precision, check_fits, check_fp8, resolve_precision, training_device
from gptforge.train import rng
from gptforge.train.batch_finder import resolve_batch_size
from gptforge.train.guard import Guard
from gptforge.train.optim import build_optimizer
from gptforge.train.resume import Resume, check_same_run, restore
from gptforge.train.step import Stepper, sparsity_masks
from gptforge.train.techniques import (apply_activation_checkpointing, apply_compile, apply_flex_documents,
                                       apply_fp8)


@dataclass
class Trainee:
    """Everything a training step needs, built in the order above."""

    cfg: Config  # resolved: the data's vocabulary, init_from's model section, batch_size as a number
    world: World
    data: DataDir
    device: torch.device
    precision: Precision
    raw_model: nn.Module  # the module to save: no wrapper, no `_orig_mod.` names
    model: nn.Module  # the module to call: distributed and compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    comm: CommStats | None  # gradient bytes per step under DDP
    loader: TokenLoader
    val: list | None  # the fixed validation batches, when asked for
    stepper: Stepper
    augment: Augmenter  # training batches only, never evaluation

    def close(self) -> None:
        self.loader.close()


def build(cfg: Config, world: World, *, resume: Resume | None = None, data: DataDir | None = None,
          guard: Guard | None = None, validation: bool = False,
          report: Callable[[str], None] | None = None) -> Trainee:
    """Build the training step `cfg` describes. `resume`: the checkpoint to continue from. `data`: prepared
    data to use instead of data.dir (doctor's random tokens). `guard`: the numerical guard the Stepper asks.
    `validation`: also fix the validation batches."""
    report = report or console.printer(world.is_main)
    validate(cfg, world.world_size)
    device = training_device(cfg.train.device, world)
    shards = world.world_size if cfg.dist.strategy in ("fsdp2", "hsdp") else 1
    check_fits(cfg.model, bytes_per_param=12, device=device, shards=shards,
               what="fp32 weights, gradients and one optimizer moment")  # before any work at that size
    if cfg.speed.fp8:  # before any data work
        check_fp8(device)
    if cfg.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    precision = resolve_precision(cfg.speed.precision, device)
    data = data or resolve_data(cfg)                                                   # 1. data
    cfg, raw_model = _initial_model(cfg, data, fine_tune=resume is None)               # 2. weights
    if resume is not None:
        check_same_run(resume.state, cfg, data, Path(cfg.run.dir))
    apply_adapters(raw_model, cfg)                                                     # 3. adapters, kernels, noise
    _apply_kernels_and_noise(raw_model, cfg)
    raw_model.to(device)                                                               # 4. device
    apply_flex_documents(raw_model, device)
    if cfg.speed.fp8:                                                                  # 5. fp8, checkpointing
        apply_fp8(raw_model, device)
    apply_activation_checkpointing(raw_model, cfg.speed.activation_checkpointing)
    if cfg.train.batch_size == "auto":                                                 # 6. batch size
        saved = {"config": resume.state.config} if resume else None
        cfg = resolve_batch_size(cfg, raw_model, precision, device, world, saved, report=report)
    model, comm = distribute(raw_model, cfg.dist, world, device)                      # 7. distribute
    model = apply_compile(model, cfg.speed.compile, cfg.speed.compile_mode)            # 8. compile
    optimizer = build_optimizer(raw_model, cfg.optim, device.type)                     # 9. optimizer
    scaler = precision.grad_scaler()
    if resume is not None:                                                             # 10. restored state
        restore(raw_model, optimizer, resume.path, world, resume.raw)
        if scaler is not None and resume.state.scaler:
            scaler.load_state_dict(resume.state.scaler)
    masks = sparsity_masks(raw_model) if cfg.finetune.keep_sparsity else []
    stepper = Stepper(model, raw_model, optimizer, scaler, precision, world, cfg, masks, guard)
    return Trainee(cfg, world, data, device, precision, raw_model, model, optimizer, scaler, comm,
                   loader=_loader(cfg, data, world, device, resume), stepper=stepper,
                   val=_validation(cfg, data, world, report) if validation else None,
                   augment=Augmenter.from_config(cfg.data, data.vocab_size))


def resolve_data(cfg: Config) -> DataDir:
    """The prepared data of a run: data.dir, or the built-in corpus prepared once into the cache."""
    if cfg.data.dir:
        return load_data_dir(cfg.data.dir, verify_sha256=cfg.data.verify)
    from gptforge.data.prepare import builtin_data_dir

    first = os.environ.get("RANK", "0") == "0"  # under torchrun, one process shows the preparation
    path = builtin_data_dir(cfg.data.tokenizer, cfg.data.vocab_size, progress=first)
    return load_data_dir(path, verify_sha256=cfg.data.verify)


def _initial_model(cfg: Config, data: DataDir, fine_tune: bool) -> tuple[Config, nn.Module]:
    """The model before any technique: its section resolved (the vocabulary from the data; the whole section
    from finetune.init_from when fine-tuning), built at run.seed, with init_from's weights when `fine_tune`
    (a resumed fine-tune gets its weights from its own checkpoint instead)."""
    source = init_source(cfg, data) if cfg.finetune.init_from else None
    model_cfg = dataclasses.replace(source.config.model, dropout=cfg.model.dropout) if source else cfg.model
    vocab_size = max(model_cfg.vocab_size, data.vocab_size) if source else data.vocab_size  # chat tokens grow it
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(model_cfg, vocab_size=vocab_size,
                                                             doc_token=document_token(cfg, data)))
    rng.seed_everything(cfg.run.seed)  # the same initial weights on every process
    model = build_model(cfg.model)
    if source is not None and fine_tune:
        model.load_state_dict(grown_state(source.model.state_dict(), model.state_dict()))
    return cfg, model


def document_token(cfg: Config, data: DataDir) -> int:
    """model.doc_token for this data: its end-of-text id when documents must not see each other (chat data
    always; text with data.document_mask), else -1."""
    if not (data.chat or cfg.data.document_mask):
        return -1
    eot = data.tokenizer.eot_id if data.tokenizer else (data.manifest or {}).get("tokenizer", {}).get("eot_id")
    if eot is None:
        raise ConfigError(f"data.document_mask: {data.path} has no tokenizer.json to tell the end-of-text id "
                          "that separates its documents; put the tokenizer it was made with into the folder")
    return int(eot)


def grown_state(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`source` weights for a model whose vocabulary grew (chat tokens added after the base vocabulary): the
    embedding and head keep their rows, and each new row starts at the mean of the old ones plus noise of
    the initial scale (so new tokens start as an average token, not at random far from the rest, and differ
    from each other). Tensors of unchanged shape pass through."""
    out = dict(source)
    for name, old in source.items():
        new = target[name]
        if old.shape == new.shape or old.dim() != 2 or old.shape[1:] != new.shape[1:] or old.shape[0] > new.shape[0]:
            continue
        grown = old.new_empty(new.shape)
        grown[:old.shape[0]] = old
        grown[old.shape[0]:] = old.mean(0) + 0.02 * torch.randn(new.shape[0] - old.shape[0], old.shape[1],
                                                                dtype=old.dtype)
        out[name] = grown
    return out


def init_source(cfg: Config, data: DataDir) -> Any:
    """The run that finetune.init_from names (a LoadedRun), checked against the data it is to be tuned on."""
    from gptforge.runs import load_run

    source = load_run(cfg.finetune.init_from, report=lambda msg: console.printer()(f"[yellow]{msg}[/]"))
    where = f"finetune.init_from={cfg.finetune.init_from}"
    if "quantization" in source.state:
        raise CheckpointError(f"{where} is quantized; fine-tune the full-precision run "
                              "(and use finetune.qat for quantization-aware training)")
    if source.tokenizer is not None and data.tokenizer is not None and not _same_vocabulary(source.tokenizer, data):
        raise CheckpointError(f"{data.path} was tokenized with another tokenizer than {where}; "
                              f"prepare the data with --tokenizer {source.checkpoint / 'tokenizer.json'}")
    if data.vocab_size > source.config.model.vocab_size and not data.chat:
        raise CheckpointError(f"{data.path} has {data.vocab_size} token ids but the model of {where} only "
                              f"{source.config.model.vocab_size}")
    return source


def _same_vocabulary(base: Any, data: DataDir) -> bool:
    """Whether data was tokenized with `base`, or (chat data) with `base` plus the chat tokens."""
    if base.sha256 == data.tokenizer.sha256:
        return True
    from gptforge.data.chat import with_chat_tokens

    return bool(data.chat) and with_chat_tokens(base).sha256 == data.tokenizer.sha256


def apply_adapters(model: nn.Module, cfg: Config) -> None:
    """LoRA or quantization-aware training, from outside the model: what the saved weights need to load."""
    if cfg.finetune.lora.rank:
        from gptforge.adapt.lora import apply_lora

        apply_lora(model, cfg.finetune.lora)
    if cfg.finetune.qat:
        from gptforge.adapt.qat import apply_qat

        apply_qat(model, cfg.finetune.qat)


def _apply_kernels_and_noise(model: nn.Module, cfg: Config) -> None:
    """The fused kernels and NEFTune, from outside the model: training-time only."""
    if cfg.speed.fused_kernels or cfg.speed.fused_ce:  # Triton or the reference, chosen per call by device
        from gptforge.kernels import apply_kernels

        apply_kernels(model, cfg.speed.fused_kernels, cfg.speed.fused_ce, cfg.speed.ce_chunk_tokens)
    if cfg.finetune.neftune_alpha > 0:
        from gptforge.adapt.neftune import apply_neftune

        apply_neftune(model, cfg.finetune.neftune_alpha)


def _loader(cfg: Config, data: DataDir, world: World, device: torch.device, resume: Resume | None) -> TokenLoader:
    layout = Layout(cfg.model.block_size, cfg.train.batch_size, cfg.grad_accum_steps(world.world_size),
                    world.rank, world.world_size)
    return TokenLoader(data.train, layout, mode=cfg.data.loader, seed=cfg.run.seed, device=device,
                       prefetch=cfg.data.prefetch, state=resume.state.loader if resume else None,
                       eot_id=data_eot(data))


def data_eot(data: DataDir) -> int | None:
    """The end-of-text id of the data, which chat data is packed by (None when nothing records it)."""
    if data.tokenizer is not None:
        return data.tokenizer.eot_id
    return (data.manifest or {}).get("tokenizer", {}).get("eot_id")


def _validation(cfg: Config, data: DataDir, world: World, report: Callable[[str], None]) -> list:
    """The fixed validation batches; a warning when the val split holds fewer windows than eval.tokens asks."""
    batches = val_batches(data.val, cfg.model.block_size, cfg.train.batch_size, cfg.eval.tokens,
                          world.rank, world.world_size, eot_id=data_eot(data))
    asked = cfg.eval.tokens // cfg.model.block_size
    windows = sum(len(x) for x, _ in batches) * world.world_size
    if windows < asked:
        held = sum(shard.num_tokens for shard in data.val)
        report(f"[yellow]validation: {data.path} holds {held:,} val tokens, {windows} windows of model.block_size "
               f"{cfg.model.block_size}, fewer than the {asked} that eval.tokens={cfg.eval.tokens:,} asks for; "
               "every val loss rests on those. Prepare the data again with a larger --val-fraction (the default "
               "gives val at least 200 windows of 1024 tokens where the corpus allows), or lower eval.tokens.[/]")
    return batches
