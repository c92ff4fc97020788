"""Typed configuration: dataclass sections, YAML files, dotted `key=value` overrides, presets, validation.

Every field is a config key `<section>.<field>`; its docstring (the string literal under it) is its help
text, shown by `gptforge train --help`. Everything is checked before any work starts: unknown keys, wrong
types and impossible values fail with a ConfigError naming the key and what it accepts.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from gptforge.errors import ConfigError
from gptforge.model.gpt import GPTConfig


@dataclass
class DataConfig:
    dir: str | None = None
    """Prepared data directory (gptforge, llm.c or modded-nanogpt shards); empty: the built-in corpus."""
    tokenizer: str = "bpe"
    """Tokenizer for the built-in corpus: bpe (trained on it) or bytes."""
    vocab_size: int = 8192
    """BPE vocabulary size for the built-in corpus."""
    loader: str = "random"
    """How training batches are drawn: random windows, or a sequential sweep over the shards."""
    aug_span_delete: float = 0.0
    """Text augmentation for small data sets: the probability that a training sequence has one random span of
    its input deleted (the rest shifts left); 0 disables it."""
    aug_token_noise: float = 0.0
    """Text augmentation for small data sets: the fraction of input tokens replaced by random tokens (targets
    stay the real text); 0 disables it."""
    verify: bool = True
    """Check every shard's sha256 against manifest.json before training."""
    prefetch: int = 2
    """Optimizer steps of batches built ahead of time in a background thread (0: build them inline)."""


@dataclass
class ModelConfig(GPTConfig):
    preset: str | None = None
    """Named shape applied before any explicit model key: tiny, small, gpt2-124m, gpt2-350m."""
    depth: int | None = None
    """The depth dial: N layers sets width, heads, learning rates and a compute-optimal token budget at once;
    any explicit key still wins."""


@dataclass
class LoraConfig:
    rank: int = 0
    """LoRA rank; 0 trains every weight (full fine-tune), > 0 freezes the model and trains low-rank adapters."""
    alpha: float = 16.0
    """LoRA scale numerator: adapters add (alpha / rank) * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    targets: str = "c_attn,c_proj,c_fc"
    """Comma-separated names of the linear layers that get adapters (matched against the end of module names)."""


@dataclass
class TrainConfig:
    batch_size: int | str = 16
    """Sequences per device per micro-step, or auto: the largest that fits in memory (found with
    out-of-memory recovery, less a safety margin); train.batch_tokens is kept through gradient accumulation."""
    batch_tokens: int | None = None
    """Tokens per optimizer step across all devices; gradient accumulation is derived from it. Empty: one micro-step."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (empty: no step limit)."""
    max_tokens: int | None = None
    """Stop after this many training tokens (empty: no token limit)."""
    max_time: float | None = 300.0
    """Stop after this many seconds of training, evaluation excluded (empty: no time limit)."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    schedule: str = "wsd"
    """Learning-rate schedule after warmup: cosine, wsd (warmup-stable-decay) or constant."""
    cooldown_frac: float = 0.4
    """wsd only: fraction of the run spent decaying at the end."""
    cooldown: str = "linear"
    """wsd only: shape of the decay at the end, linear or cosine."""
    batch_warmup_steps: int = 0
    """Batch-size warmup: over this many first steps the micro-steps per optimizer step grow linearly from 1
    to the full accumulation (0: full batch from the start)."""
    optimizer: str = "muon"
    """adamw, or muon: Newton-Schulz-orthogonalized momentum for the 2-D hidden matrices, AdamW (train.lr) for
    embeddings, head, norms and scalars."""
    muon_lr: float = 0.02
    """muon only: learning rate of the hidden matrices (the schedule scales it like train.lr)."""
    muon_momentum: float = 0.95
    """muon only: Nesterov momentum of the hidden matrices."""
    muon_ns_steps: int = 5
    """muon only: Newton-Schulz iterations per update."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not to norms, biases or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    precision: str = "auto"
    """auto (what the device does well), fp32, tf32, bf16 (autocast) or fp16 (autocast with a gradient scaler)."""
    fused_optimizer: bool = True
    """AdamW through torch's fused kernel where the device has one (CUDA, CPU): one pass over all parameters
    instead of a loop over them."""
    compile: bool = False
    """Compile the model with torch.compile."""
    compile_mode: str = "default"
    """torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune or max-autotune-no-cudagraphs."""
    sync_free: bool = False
    """Read the loss and gradient norm back to the host only on log steps (no per-step sync, CUDA-graph
    friendly); non-finite updates are still skipped, on the device; the spike rule looks at log steps only."""
    fused_kernels: bool = False
    """Fused RMSNorm and RoPE kernels: Triton where it runs, the PyTorch reference elsewhere."""
    fused_ce: bool = False
    """Linear + cross-entropy in chunks of train.ce_chunk_tokens, so the full logits tensor never exists."""
    ce_chunk_tokens: int = 8192
    """fused_ce only: tokens per chunk."""
    activation_checkpointing: str = "none"
    """Recompute activations in the backward pass to save memory: none, selective (every other transformer
    block: about half the saving for half the recompute) or full (every block)."""
    fp8: bool = False
    """fp8 linear layers through torchao (Ada / Hopper GPUs and newer, sm_89+; needs the fp8 extra); the
    output head and layers with a dimension not a multiple of 16 stay as they are."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu), or a torch device string such as cpu or cuda:1."""
    eval_every: int = 100
    """Evaluate on the validation subset every this many steps (0: only at the end)."""
    eval_tokens: int = 65536
    """Size of the fixed validation subset, in tokens."""
    save_every: int = 200
    """Write a checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep."""
    log_every: int = 10
    """Write a metrics line every this many steps."""
    samples: int = 2
    """Samples printed at the end of training."""
    early_stop_patience: int = 0
    """Stop when validation loss has not improved by train.early_stop_min_delta for this many evaluations
    (0: never stop early)."""
    early_stop_min_delta: float = 0.0
    """The improvement in validation loss that counts as one."""
    keep_best: bool = True
    """Keep the checkpoint of the best validation loss apart, in RUN_DIR/best."""
    neftune_alpha: float = 0.0
    """NEFTune: uniform noise of scale alpha / sqrt(tokens x width) on the input embeddings during training
    (for fine-tuning; 0 disables it)."""
    init_from: str | None = None
    """Start from the weights of this run directory or checkpoint (fine-tuning); the model section is taken from it."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Low-rank adapters for fine-tuning."""
    qat: str | None = None
    """Quantization-aware training: int8 or int4 fake-quantized linear weights (empty: off)."""
    keep_sparsity: bool = False
    """Keep the zeros of the initial weights zero (recovery fine-tune after pruning)."""
    sample_tokens: int = 200
    """Length of each printed sample, in tokens."""


@dataclass
class RunConfig:
    dir: str = "runs/gpt"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/. A run there with checkpoints is resumed."""
    seed: int = 1337
    """Seed of every random generator (Python, NumPy, torch, the data loader)."""
    deterministic: bool = False
    """Deterministic algorithms only: with the same seed on the same CPU, bit-identical runs and resumes."""
    tensorboard: bool = True
    """Write TensorBoard events when the tensorboard package is installed."""
    price_per_hour: float | None = None
    """Price of the machine per hour; with nvidia-ml-py on a GPU, energy and cost are reported at the end."""


@dataclass
class DistConfig:
    strategy: str = "ddp"
    """Data parallelism under torchrun: ddp (replicate), fsdp2 (shard parameters, gradients, optimizer) or hsdp (shard within a node, replicate across nodes)."""
    backend: str = "auto"
    """Process-group backend: auto (nccl on GPUs, gloo on CPUs), nccl or gloo."""
    grad_compression: str = "none"
    """ddp only: compress gradients before the all-reduce: none, bf16, fp16 or powersgd."""
    powersgd_rank: int = 4
    """Rank of PowerSGD's low-rank gradient approximation."""
    powersgd_start_step: int = 10
    """Optimizer steps of plain all-reduce before PowerSGD starts (it needs a warm start)."""
    hsdp_shard_size: int = 0
    """hsdp only: processes per shard group (0: the processes of one node)."""
    checkpoint: str = "full"
    """full: gather the whole state into safetensors on rank 0; sharded: each process writes its shard (torch.distributed.checkpoint), for models that do not fit on one host."""


@dataclass
class GuardConfig:
    enabled: bool = True
    """Skip updates whose loss or gradient norm is not finite or spikes (see below); roll back after too many."""
    window: int = 128
    """Recent accepted steps the spike rule looks at."""
    spike_sigmas: float = 6.0
    """A loss or gradient norm above mean + this many standard deviations of the window is a spike."""
    min_history: int = 128
    """Accepted steps in the window before spikes are looked for (and never during warmup): an early window
    is too short and too steady, and healthy warmup steps would look like spikes."""
    max_consecutive_skips: int = 5
    """After this many skipped steps in a row, go back to the last checkpoint's weights and move on past that data."""
    fit_watch: bool = True
    """Watch the evaluations for overfitting (val loss rising while train loss falls) and underfitting (both
    flat and high); flags go to metrics.jsonl as events and to the console."""
    fit_patience: int = 3
    """Evaluations in a row a trend must last before the fit watch flags it."""


@dataclass
class DebugConfig:
    inject_nan_at_step: int | None = None
    """Make the loss of this optimizer step (counted from 1) non-finite, to watch the guard work."""
    inject_spike_at_step: int | None = None
    """Multiply the loss of this optimizer step by 100, to watch the spike rule work."""
    inject_count: int = 1
    """How many consecutive steps the injection above lasts (enough of them trigger a rollback)."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def grad_accum_steps(self, world_size: int = 1) -> int:
        """Micro-steps per optimizer step, derived from batch_tokens (validated to divide exactly).
        train.batch_size=auto must have been resolved to a number first (train.batch_finder)."""
        per_micro = self.train.batch_size * self.model.block_size * world_size
        if self.train.batch_tokens is None:
            return 1
        return self.train.batch_tokens // per_micro

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.grad_accum_steps(world_size) * self.train.batch_size * self.model.block_size * world_size


# Values a string field may take. Checked in validate(); listed in errors and --help.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.tokenizer": ("bpe", "bytes"),
    "data.loader": ("random", "sequential"),
    "model.mlp": ("gelu", "gelu_exact", "relu2", "swiglu"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.pos": ("learned", "rope"),
    "train.schedule": ("cosine", "wsd", "constant"),
    "train.cooldown": ("linear", "cosine"),
    "train.optimizer": ("adamw", "muon"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "train.activation_checkpointing": ("none", "selective", "full"),
    "train.precision": ("auto", "fp32", "tf32", "bf16", "fp16"),
    "train.qat": ("int8", "int4"),
    "dist.strategy": ("ddp", "fsdp2", "hsdp"),
    "dist.backend": ("auto", "nccl", "gloo"),
    "dist.grad_compression": ("none", "bf16", "fp16", "powersgd"),
    "dist.checkpoint": ("full", "sharded"),
}

# Presets set the shape and architecture; any explicit model key still wins.
_GPT2 = dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True, block_size=1024,
             qk_norm=False, zero_init_proj=False)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "gpt2-124m": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-350m": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
}
CHOICES["model.preset"] = tuple(PRESETS)


# Keys of earlier versions and where their value lives now (None: dropped). Saved runs keep loading.
MIGRATIONS: dict[str, str | None] = {
    "train.skip_nonfinite": "guard.enabled",
}


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then `key=value` overrides; presets first; then validation."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = _read_yaml(Path(path))
    for item in overrides:
        key, value = _split_override(item)
        _set_dotted(tree, key, value)
    return from_dict(tree)


def from_dict(tree: dict[str, Any], source: str = "config") -> Config:
    """Build a validated Config from a nested dict (YAML, overrides, or a checkpoint's saved config)."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(tree).__name__}")
    tree = _migrate(tree)
    model = tree.get("model")
    if isinstance(model, dict) and model.get("preset") is not None:
        name = str(model["preset"])
        if name not in PRESETS:
            raise ConfigError(_choice_message("model.preset", name, tuple(PRESETS)))
        tree["model"] = {**PRESETS[name], **model}
    if isinstance(model, dict) and model.get("depth") is not None:
        tree = _apply_depth(tree)
    cfg = _build(Config, tree, prefix="")
    validate(cfg)
    return cfg


def depth_settings(depth: int, vocab_size: int = 8192) -> dict[str, dict[str, Any]]:
    """What `model.depth=N` sets (nanochat's single dial): N layers of width 64 N with heads of 64 (so
    depth 6 is the `small` shape and depth 12 GPT-2 small's), AdamW rates scaled by 1/sqrt(width) from 3e-3
    at width 384, and a compute-optimal budget of 20 training tokens per parameter (Chinchilla)."""
    from gptforge.model.flops import num_params

    n_embd = 64 * depth
    model = dict(n_layer=depth, n_head=depth, n_embd=n_embd)
    params = num_params(GPTConfig(vocab_size=vocab_size, **model))["total"]
    train = dict(lr=round(3e-3 * (384 / n_embd) ** 0.5, 6), max_tokens=20 * params, max_time=None)
    return {"model": model, "train": train}


def _apply_depth(tree: dict[str, Any]) -> dict[str, Any]:
    """Fill the keys model.depth decides, under every key the user gave explicitly (preset included)."""
    depth = _coerce("model.depth", tree["model"]["depth"], int)
    if depth < 1:
        raise ConfigError(f"model.depth: expected a positive number of layers, got {depth}")
    data = tree.get("data") if isinstance(tree.get("data"), dict) else {}
    vocab = _coerce("data.vocab_size", data.get("vocab_size", DataConfig.vocab_size), int)
    settings = depth_settings(depth, vocab)
    tree = dict(tree)
    for section, values in settings.items():
        given = tree.get(section) or {}
        if not isinstance(given, dict):
            continue  # _build reports the bad section
        budget_given = section == "train" and any(k in given for k in ("max_steps", "max_tokens", "max_time"))
        fill = {k: v for k, v in values.items() if not (budget_given and k in ("max_tokens", "max_time"))}
        tree[section] = {**fill, **given}
    return tree


def _migrate(tree: dict[str, Any]) -> dict[str, Any]:
    """A copy of `tree` with keys of earlier versions moved to their current place (see MIGRATIONS)."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for old, new in MIGRATIONS.items():
        section, name = old.split(".")
        if not isinstance(tree.get(section), dict) or name not in tree[section]:
            continue
        value = tree[section].pop(name)
        if new is not None:
            new_section, new_name = new.split(".")
            target = tree.setdefault(new_section, {})
            if isinstance(target, dict):
                target.setdefault(new_name, value)
    return tree


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, train, run), got {type(tree).__name__}")
    return tree


def _split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, for example train.max_steps=200")
    key, value = item.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    return key, value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, tree: Any, prefix: str) -> Any:
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a section (mapping), got {tree!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, raw in tree.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(_unknown_key_message(full, [f"{prefix}{n}" for n in names]))
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, raw, prefix=f"{full}.")
        else:
            kwargs[key] = _coerce(full, raw, kind)
    return cls(**kwargs)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, raw: Any, kind: Any) -> Any:
    """Turn a YAML value or a command-line string into the field's type, or say what was expected."""
    optional = False
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        optional = len(args) < len(typing.get_args(kind))
        if args == [int, str]:  # a number or a word (train.batch_size=auto); validate() checks the word
            if isinstance(raw, str) and not raw.strip().replace("_", "").lstrip("-").isdigit():
                return raw.strip()
        kind = args[0]
    if raw is None:
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required (expected {kind.__name__})")
    if optional and isinstance(raw, str) and raw.strip().lower() in ("", "none", "null"):
        return None
    text = raw.strip() if isinstance(raw, str) else None
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            if text is not None and text.lower() in ("true", "yes", "on", "1"):
                return True
            if text is not None and text.lower() in ("false", "no", "off", "0"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(raw, bool):
                raise ValueError
            if isinstance(raw, int):
                return raw
            value = float(text.replace("_", "")) if text is not None else float(raw)
            if not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(text.replace("_", "")) if text is not None else float(raw)
        if kind is str:
            if isinstance(raw, (dict, list)):
                raise ValueError
            return str(raw)
    except (TypeError, ValueError):
        pass
    else:
        raise ConfigError(f"{key}: unsupported field type {kind}")  # a programming error, not a user one
    raise ConfigError(f"{key}: expected {'an integer' if kind is int else kind.__name__}, got {raw!r}")


def _unknown_key_message(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {key!r}.{hint} Valid keys here: {', '.join(valid)}"


def _choice_message(key: str, value: Any, choices: tuple[str, ...]) -> str:
    return f"{key}: {value!r} is not one of: {', '.join(choices)}"


# ----------------------------------------------------------------------------------------------------------
# Validation


def validate(cfg: Config, world_size: int = 1) -> None:
    """Reject impossible values before any work starts. world_size is re-checked once it is known."""
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and value not in choices:
            raise ConfigError(_choice_message(key, value, choices))

    m, t, d = cfg.model, cfg.train, cfg.data
    _positive("model.n_layer", m.n_layer)
    _positive("model.n_head", m.n_head)
    _positive("model.n_embd", m.n_embd)
    _positive("model.block_size", m.block_size)
    _positive("model.vocab_multiple", m.vocab_multiple)
    _positive("model.mlp_ratio", m.mlp_ratio)
    if m.n_embd % m.n_head:
        divisors = [h for h in range(1, min(m.n_embd, 64) + 1) if m.n_embd % h == 0]
        raise ConfigError(
            f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}; "
            f"n_head values that divide it: {', '.join(map(str, divisors))}"
        )
    if m.pos == "rope" and m.head_dim % 2:
        raise ConfigError(f"model.pos=rope needs an even head size; n_embd/n_head = {m.head_dim}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout: expected a probability in [0, 1), got {m.dropout}")
    if m.logit_softcap < 0:
        raise ConfigError(f"model.logit_softcap: expected >= 0 (0 disables it), got {m.logit_softcap}")

    _positive("data.vocab_size", d.vocab_size)
    if d.vocab_size < 257 and d.tokenizer == "bpe":
        raise ConfigError(f"data.vocab_size: a byte-level BPE needs at least 257 tokens, got {d.vocab_size}")
    if d.prefetch < 0:
        raise ConfigError(f"data.prefetch: expected >= 0, got {d.prefetch}")

    if isinstance(t.batch_size, str):
        if t.batch_size != "auto":
            raise ConfigError(f"train.batch_size: expected a positive integer or auto, got {t.batch_size!r}")
        if t.batch_tokens is not None:
            _positive("train.batch_tokens", t.batch_tokens)
            if t.batch_tokens % (m.block_size * world_size):
                raise ConfigError(
                    f"train.batch_tokens={t.batch_tokens} is not a multiple of model.block_size x processes = "
                    f"{m.block_size} x {world_size}, which train.batch_size=auto needs"
                )
    else:
        _positive("train.batch_size", t.batch_size)
    per_micro = t.batch_size * m.block_size * world_size if isinstance(t.batch_size, int) else None
    if per_micro is not None and t.batch_tokens is not None:
        _positive("train.batch_tokens", t.batch_tokens)
        if t.batch_tokens % per_micro:
            lower = max(per_micro, t.batch_tokens // per_micro * per_micro)
            raise ConfigError(
                f"train.batch_tokens={t.batch_tokens} is not a multiple of batch_size x block_size x processes "
                f"= {t.batch_size} x {m.block_size} x {world_size} = {per_micro}; "
                f"try train.batch_tokens={lower} or {lower + per_micro}"
            )
    if t.batch_warmup_steps > 0 and (t.batch_tokens is None or (per_micro and t.batch_tokens // per_micro < 2)):
        raise ConfigError(
            f"train.batch_warmup_steps={t.batch_warmup_steps} grows the micro-steps per optimizer step up to the "
            f"gradient accumulation, but train.batch_tokens={t.batch_tokens} gives a single micro-step of "
            f"{per_micro or 'batch_size x block_size x processes'} tokens; set train.batch_tokens to at least twice "
            "that, or train.batch_warmup_steps=0"
        )
    for key in ("max_steps", "max_tokens", "max_time"):
        value = getattr(t, key)
        if value is not None and value <= 0:
            raise ConfigError(f"train.{key}: expected a positive number or empty (no limit), got {value}")
    if t.max_steps is None and t.max_tokens is None and t.max_time is None:
        raise ConfigError("train: no budget set; give at least one of train.max_steps, train.max_tokens, train.max_time")
    _positive("train.lr", t.lr)
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio: expected a fraction in [0, 1], got {t.min_lr_ratio}")
    if not 0.0 <= t.cooldown_frac <= 1.0:
        raise ConfigError(f"train.cooldown_frac: expected a fraction in [0, 1], got {t.cooldown_frac}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(t, key) < 1.0:
            raise ConfigError(f"train.{key}: expected a value in [0, 1), got {getattr(t, key)}")
    for key in ("warmup_steps", "eval_every", "save_every", "weight_decay", "grad_clip", "samples", "sample_tokens",
                "batch_warmup_steps", "early_stop_patience", "early_stop_min_delta", "neftune_alpha"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}: expected >= 0, got {getattr(t, key)}")
    for key in ("log_every", "eval_tokens", "keep_checkpoints", "muon_lr", "muon_ns_steps", "ce_chunk_tokens"):
        _positive(f"train.{key}", getattr(t, key))
    if not 0.0 <= t.muon_momentum < 1.0:
        raise ConfigError(f"train.muon_momentum: expected a value in [0, 1), got {t.muon_momentum}")
    for key in ("aug_span_delete", "aug_token_noise"):
        if not 0.0 <= getattr(d, key) < 1.0:
            raise ConfigError(f"data.{key}: expected a probability in [0, 1), got {getattr(d, key)}")
    if m.depth is not None and m.depth < 1:
        raise ConfigError(f"model.depth: expected a positive number of layers, got {m.depth}")
    if cfg.run.price_per_hour is not None and cfg.run.price_per_hour < 0:
        raise ConfigError(f"run.price_per_hour: expected >= 0, got {cfg.run.price_per_hour}")
    if t.lora.rank < 0 or t.lora.alpha <= 0 or not 0.0 <= t.lora.dropout < 1.0:
        raise ConfigError(
            f"train.lora: expected rank >= 0, alpha > 0 and dropout in [0, 1); got rank={t.lora.rank}, "
            f"alpha={t.lora.alpha}, dropout={t.lora.dropout}"
        )
    if t.lora.rank and t.qat:
        raise ConfigError("train.lora.rank and train.qat both replace the linear layers; use one of them at a time")
    if t.fp8 and (t.lora.rank or t.qat):
        raise ConfigError("train.fp8 replaces the linear layers, as train.lora.rank and train.qat do; use one at a time")
    if t.fused_ce and t.qat == "int8" and not m.tie_embeddings:
        raise ConfigError("train.fused_ce computes the output head from its plain weight, but train.qat=int8 with "
                          "model.tie_embeddings=false fake-quantizes that head; set train.fused_ce=false")
    if t.lora.rank and not [x for x in t.lora.targets.split(",") if x.strip()]:
        raise ConfigError("train.lora.targets: name at least one linear layer, e.g. c_attn,c_proj,c_fc")
    dc = cfg.dist
    if dc.grad_compression != "none" and dc.strategy != "ddp":
        raise ConfigError(
            f"dist.grad_compression={dc.grad_compression} works through DDP communication hooks; "
            f"dist.strategy={dc.strategy} reduces gradients itself (use dist.strategy=ddp)"
        )
    if dc.checkpoint == "sharded" and dc.strategy == "ddp":
        raise ConfigError("dist.checkpoint=sharded is for dist.strategy=fsdp2 or hsdp; ddp keeps a full copy on every process")
    _positive("dist.powersgd_rank", dc.powersgd_rank)
    if dc.powersgd_start_step < 2:
        raise ConfigError(f"dist.powersgd_start_step: PowerSGD needs at least 2 plain steps, got {dc.powersgd_start_step}")
    if dc.hsdp_shard_size < 0:
        raise ConfigError(f"dist.hsdp_shard_size: expected >= 0 (0: one node), got {dc.hsdp_shard_size}")
    g = cfg.guard
    for key in ("window", "max_consecutive_skips"):
        _positive(f"guard.{key}", getattr(g, key))
    _positive("guard.spike_sigmas", g.spike_sigmas)
    _positive("guard.fit_patience", g.fit_patience)
    if not 2 <= g.min_history <= g.window:
        raise ConfigError(f"guard.min_history: expected 2..guard.window ({g.window}), got {g.min_history}")
    for key in ("inject_nan_at_step", "inject_spike_at_step"):
        if getattr(cfg.debug, key) is not None and getattr(cfg.debug, key) < 1:
            raise ConfigError(f"debug.{key}: steps are counted from 1, got {getattr(cfg.debug, key)}")
    _positive("debug.inject_count", cfg.debug.inject_count)
    if t.eval_tokens < m.block_size:
        raise ConfigError(f"train.eval_tokens={t.eval_tokens} is below one sequence (model.block_size={m.block_size})")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: expected a positive number, got {value}")


# ----------------------------------------------------------------------------------------------------------
# Writing and documenting


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


def describe_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every config key, from the dataclass fields and their docstrings."""
    rows = []
    defaults = cls()
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        kind = _hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(kind):
            rows.extend(describe_keys(kind, prefix=f"{key}."))
            continue
        default = getattr(defaults, f.name)
        text = docs.get(f.name, "")
        if key in CHOICES and "one of" not in text:
            text = f"{text} [{'|'.join(CHOICES[key])}]"
        rows.append((key, "" if default is None else str(default), text))
    return rows


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right under a field) of a dataclass and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def keys_help() -> str:
    """The config-key reference printed by `gptforge train --help`."""
    rows = describe_keys()
    width = max(len(k) for k, _, _ in rows)
    lines = ["config keys (key=value after the subcommand; YAML sections with --config):"]
    section = None
    for key, default, text in rows:
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            lines.append("")
        shown = f" (default: {default})" if default != "" else ""
        lines.append(f"  {key:<{width}}  {text}{shown}")
    lines.append("")
    lines.append("presets (model.preset=NAME): " + ", ".join(f"{k} ({_preset_line(v)})" for k, v in PRESETS.items()))
    return "\n".join(lines)


def _preset_line(values: dict[str, Any]) -> str:
    return f"{values['n_layer']}x{values['n_embd']}, {values['n_head']} heads, context {values['block_size']}"
