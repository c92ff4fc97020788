"""Rules between fields: switches that cannot be combined, sizes that must divide each other.

Each section checks its own fields (sections.py); what is left here are the rules that relate fields to
each other, mostly across sections. validate() runs both, and the choices on the fields, before any work
starts; world_size is re-checked once the number of processes is known.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gptforge.config.sections import Config, choice_message, choices_of, collecting, problem_key
from gptforge.errors import ConfigError


def validate(cfg: Config, world_size: int = 1, found: list[str] | None = None) -> None:
    """Reject impossible values before any work starts: every field's choices, every section's own
    check(), then the rules across fields. Every problem is reported at once, after those of `found`
    (the problems of reading the config); the rules across fields only where the fields are sound."""
    found = list(found or [])
    unread = {problem_key(p) for p in found} - {None}  # keys that kept their default: not checked again
    checked: list[str] = []
    with collecting() as noted:
        for f in dataclasses.fields(cfg):
            _noting(checked, check_choices, getattr(cfg, f.name), f"{f.name}.")
        for section in cfg.sections():
            _noting(checked, section.check)
    found += [p for p in checked + noted if not any(key in p for key in unread)]
    if not found:
        _noting(found, check_across, cfg, world_size)
    if found:
        raise ConfigError(*dict.fromkeys(found))


def _noting(found: list[str], check, *args) -> None:
    """Run one check; its problems, if it raises, join `found`."""
    try:
        check(*args)
    except ConfigError as e:
        found.extend(e.problems)


def check_choices(section: Any, prefix: str) -> None:
    """Every field of `section` (and of its subsections) that lists its values holds one of them."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{prefix}{f.name}.")
            continue
        allowed = choices_of(f)
        if allowed is not None and value is not None and value not in allowed:
            raise ConfigError(choice_message(f"{prefix}{f.name}", value, allowed))


def check_across(cfg: Config, world_size: int = 1) -> None:
    """The rules that relate fields to each other."""
    _check_batch(cfg, world_size)
    _check_linear_replacements(cfg)
    _check_dist(cfg)
    _check_family(cfg)
    if cfg.eval.tokens < cfg.model.block_size:
        raise ConfigError(f"eval.tokens={cfg.eval.tokens} is below one sequence "
                          f"(model.block_size={cfg.model.block_size})")


def _check_batch(cfg: Config, world_size: int) -> None:
    """train.batch_tokens must split into whole micro-steps of batch_size x block_size x processes, and
    batch-size warmup needs more than one micro-step to grow through."""
    t, block = cfg.train, cfg.model.block_size
    if t.batch_size == "auto":
        if t.batch_tokens is not None and t.batch_tokens % (block * world_size):
            raise ConfigError(
                f"train.batch_tokens={t.batch_tokens} is not a multiple of model.block_size x processes = "
                f"{block} x {world_size}, which train.batch_size=auto needs"
            )
        per_micro = None
    else:
        per_micro = t.batch_size * block * world_size
        if t.batch_tokens is not None and t.batch_tokens % per_micro:
            lower = max(per_micro, t.batch_tokens // per_micro * per_micro)
            raise ConfigError(
                f"train.batch_tokens={t.batch_tokens} is not a multiple of batch_size x block_size x processes "
                f"= {t.batch_size} x {block} x {world_size} = {per_micro}; "
                f"try train.batch_tokens={lower} or {lower + per_micro}"
            )
    warmup = cfg.schedule.batch_warmup_steps
    if warmup > 0 and (t.batch_tokens is None or (per_micro and t.batch_tokens // per_micro < 2)):
        raise ConfigError(
            f"schedule.batch_warmup_steps={warmup} grows the micro-steps per optimizer step up to the "
            f"gradient accumulation, but train.batch_tokens={t.batch_tokens} gives a single micro-step of "
            f"{per_micro or 'batch_size x block_size x processes'} tokens; set train.batch_tokens to at least "
            "twice that, or schedule.batch_warmup_steps=0"
        )


def _check_linear_replacements(cfg: Config) -> None:
    """LoRA, quantization-aware training and fp8 each replace the linear layers: one at a time. The fused
    cross-entropy reads the plain head weight, which int8 QAT of an untied head would fake-quantize."""
    lora, qat, speed = cfg.finetune.lora, cfg.finetune.qat, cfg.speed
    if lora.rank and qat:
        raise ConfigError("finetune.lora.rank and finetune.qat both replace the linear layers; "
                          "use one of them at a time")
    if speed.fp8 and (lora.rank or qat):
        raise ConfigError("speed.fp8 replaces the linear layers, as finetune.lora.rank and finetune.qat do; "
                          "use one at a time")
    if speed.fused_ce and qat == "int8" and not cfg.model.tie_embeddings:
        raise ConfigError("speed.fused_ce computes the output head from its plain weight, but finetune.qat=int8 with "
                          "model.tie_embeddings=false fake-quantizes that head; set speed.fused_ce=false")


def _check_dist(cfg: Config) -> None:
    """Gradient compression is a DDP communication hook; sharded checkpoints need sharded training."""
    d = cfg.dist
    if d.grad_compression != "none" and d.strategy != "ddp":
        raise ConfigError(
            f"dist.grad_compression={d.grad_compression} works through DDP communication hooks; "
            f"dist.strategy={d.strategy} reduces gradients itself (use dist.strategy=ddp)"
        )
    if d.checkpoint == "sharded" and d.strategy == "ddp":
        raise ConfigError("dist.checkpoint=sharded is for dist.strategy=fsdp2 or hsdp; "
                          "ddp keeps a full copy on every process")


# Techniques that act on a GPT's own layers (attention, its linear layers by name, its token head) or on text.
_GPT_ONLY = (("finetune.lora.rank", lambda c: c.finetune.lora.rank), ("finetune.qat", lambda c: c.finetune.qat),
             ("speed.fp8", lambda c: c.speed.fp8), ("speed.fused_ce", lambda c: c.speed.fused_ce),
             ("speed.fused_kernels", lambda c: c.speed.fused_kernels),
             ("speed.activation_checkpointing", lambda c: c.speed.activation_checkpointing != "none"),
             ("finetune.neftune_alpha", lambda c: c.finetune.neftune_alpha), ("model.share_layers", lambda c: c.model.share_layers),
             ("train.batch_size=auto", lambda c: c.train.batch_size == "auto"))


def _check_family(cfg: Config) -> None:
    """Switches that belong to one model family: GPT techniques, text or image augmentation, and the
    carried state of a recurrent model, which needs every step to read the same rows."""
    from gptforge.model import IMAGE_ARCHITECTURES

    arch, data = cfg.model.arch, cfg.data
    if arch != "gpt":
        for key, used in _GPT_ONLY:
            if used(cfg):
                raise ConfigError(f"{key} works on a GPT; model.arch={arch} does not take it")
    images = arch in IMAGE_ARCHITECTURES
    if images and (data.aug_span_delete or data.aug_token_noise):
        raise ConfigError(f"data.aug_span_delete and data.aug_token_noise augment text; model.arch={arch} reads "
                          "images (use data.aug_crop, data.aug_flip, data.aug_cutout)")
    if not images and (data.aug_crop or data.aug_flip or data.aug_cutout):
        raise ConfigError(f"data.aug_crop, data.aug_flip and data.aug_cutout augment images; model.arch={arch} "
                          "reads tokens")
    if arch in ("lstm", "gru") and data.loader == "sequential" and cfg.schedule.batch_warmup_steps:
        raise ConfigError("schedule.batch_warmup_steps changes the rows of a step, which a recurrent model on "
                          "data.loader=sequential carries its state along; use one or the other")
    if cfg.dist.sync_batchnorm and not images:
        raise ConfigError(f"dist.sync_batchnorm is for model.arch=cnn with model.norm=batchnorm; this is {arch}")
