"""The config sections: one dataclass per concern, each field a config key `<section>.<field>`.

A field's docstring (the string literal under it) is its help text. A field with a fixed set of values
says so on the field itself, `choice(default, choices)`: that metadata is what validation, coercion and
`--help` read, and nothing else lists the values. Each section's `check()` holds the rules about its own
fields (positive, in range, a probability); rules that relate fields to each other live in rules.py.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

from gptforge.errors import ConfigError
from gptforge.model import ARCHITECTURES
from gptforge.model.config import FamilyConfig, GPTConfig

Choices = tuple[str, ...] | Callable[[], tuple[str, ...]]


def choice(default: Any, choices: Choices) -> Any:
    """A field that takes one of `choices`: a tuple, or a function returning one when a registry elsewhere
    (model architectures, MLP variants) is the source, so the list is read when it is needed."""
    return field(default=default, metadata={"choices": choices})


def choices_of(f: dataclasses.Field) -> tuple[str, ...] | None:
    """The values a field allows, or None for a field that takes any value of its type."""
    allowed = f.metadata.get("choices")
    return allowed() if callable(allowed) else allowed


def choice_message(key: str, value: Any, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f". Did you mean {close[0]}?" if close else ""
    return f"{key}: {value!r} is not one of: {', '.join(choices)}{hint}"


# ----------------------------------------------------------------------------------------------------------
# Rules a section's check() uses; `section.KEY` is the key prefix the messages name.


# While collecting() is active (validate() runs every check under it), a rule's problem is noted and the
# checks go on, so that one run reports every mistake; elsewhere the first problem raises.
_found: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("config_problems", default=None)


@contextlib.contextmanager
def collecting() -> Iterator[list[str]]:
    """Note the problems the rules below find instead of raising at the first; yields the list."""
    found: list[str] = []
    token = _found.set(found)
    try:
        yield found
    finally:
        _found.reset(token)


def problem(message: str) -> None:
    """A rule is broken: noted while collecting(), raised otherwise."""
    found = _found.get()
    if found is None:
        raise ConfigError(message)
    found.append(message)


_PROBLEM_KEY = re.compile(r"^(?:unknown config key ')?([A-Za-z_]\w*(?:\.\w+)+)")


def problem_key(message: str) -> str | None:
    """The dotted key a problem is about: the one its message starts with (every message here does)."""
    m = _PROBLEM_KEY.match(message)
    return m.group(1) if m else None


def _key(section: Any, name: str) -> str:
    return f"{section.KEY}.{name}"


def positive(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value <= 0:
            problem(f"{_key(section, name)}: expected a positive number, got {value}")


def non_negative(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value < 0:
            problem(f"{_key(section, name)}: expected >= 0, got {value}")


def below_one(section: Any, *names: str, what: str = "a value") -> None:
    """Each field in [0, 1): probabilities, momenta, betas."""
    for name in names:
        value = getattr(section, name)
        if not 0.0 <= value < 1.0:
            problem(f"{_key(section, name)}: expected {what} in [0, 1), got {value}")


def fraction(section: Any, *names: str) -> None:
    """Each field in [0, 1]."""
    for name in names:
        value = getattr(section, name)
        if not 0.0 <= value <= 1.0:
            problem(f"{_key(section, name)}: expected a fraction in [0, 1], got {value}")


# ----------------------------------------------------------------------------------------------------------
# Sections


@dataclass
class DataConfig:
    KEY: ClassVar[str] = "data"

    dir: str | None = None
    """Prepared data directory (gptforge, llm.c or modded-nanogpt shards); empty: the built-in corpus."""
    tokenizer: str = choice("bpe", ("bpe", "bytes"))
    """Tokenizer for the built-in corpus: bpe (trained on it) or bytes."""
    vocab_size: int = 8192
    """BPE vocabulary size for the built-in corpus."""
    loader: str = choice("random", ("random", "sequential"))
    """How training batches are drawn: random windows, or a sequential sweep over the shards."""
    aug_span_delete: float = 0.0
    """Text augmentation for small data sets: the probability that a training sequence has one random span of
    its input deleted (the rest shifts left); 0 disables it."""
    aug_token_noise: float = 0.0
    """Text augmentation for small data sets: the fraction of input tokens replaced by random tokens (targets
    stay the real text); 0 disables it."""
    aug_crop: int = 0
    """Image augmentation (model.arch=cnn): pad by this many pixels and crop back at random; 0 disables it."""
    aug_flip: bool = False
    """Image augmentation (model.arch=cnn): flip half the images left to right (not for digits or text)."""
    aug_cutout: int = 0
    """Image augmentation (model.arch=cnn): set one random square of this side to zero; 0 disables it."""
    verify: bool = True
    """Check every shard's sha256 against manifest.json before training."""
    prefetch: int = 2
    """Optimizer steps of batches built ahead of time in a background thread (0: build them inline)."""
    document_mask: bool = False
    """Document masking for text: attention never crosses an end-of-text token, so the documents packed into
    one window do not see each other (chat data, from prepare --format chat, always has it)."""

    def check(self) -> None:
        positive(self, "vocab_size")
        if self.vocab_size < 257 and self.tokenizer == "bpe":
            raise ConfigError(f"data.vocab_size: a byte-level BPE needs at least 257 tokens, got {self.vocab_size}")
        non_negative(self, "prefetch", "aug_crop", "aug_cutout")
        below_one(self, "aug_span_delete", "aug_token_noise", what="a probability")


# Named shapes for model.preset; they set the shape and architecture, and any explicit model key still wins.
_GPT2 = dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True, block_size=1024,
             qk_norm=False, zero_init_proj=False)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "gpt2-124m": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-350m": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
}


# What model.arch sets before any explicit key (as a preset does): the defaults that suit the family. A cnn
# counts images as tokens (block_size 1) and trains with AdamW: Muon's matrices are 2-D, convolutions 4-D.
ARCH_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "cnn": {"model": dict(norm="batchnorm", block_size=1), "optim": dict(name="adamw", weight_decay=5e-4),
            "train": dict(batch_size=64), "eval": dict(tokens=10000), "guard": dict(spikes=False)},
    "lstm": {"optim": dict(name="adamw")},
    "gru": {"optim": dict(name="adamw")},
}


@dataclass
class ModelConfig(FamilyConfig, GPTConfig):
    """The model's own fields (GPTConfig, and FamilyConfig for the other families) and the config's shortcuts
    to them."""

    KEY: ClassVar[str] = "model"

    preset: str | None = choice(None, lambda: tuple(PRESETS))
    """Named shape applied before any explicit model key: tiny, small, gpt2-124m, gpt2-350m."""
    depth: int | None = None
    """The depth dial: N layers sets width, heads, learning rates and a compute-optimal token budget at once;
    any explicit key still wins."""
    arch: str = choice("gpt", lambda: tuple(ARCHITECTURES))
    """Model architecture, by name (gptforge.model.ARCHITECTURES): gpt, lstm or gru (recurrent language models)
    on the same token shards, cnn (a ResNet on labelled images); see docs/families.md."""

    def check(self) -> None:
        try:  # the model's own rules (shapes it can be built with), kept with the model
            self.validate() if self.arch == "gpt" else self.validate_family(self.arch)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.depth is not None and self.depth < 1:
            raise ConfigError(f"model.depth: expected a positive number of layers, got {self.depth}")


@dataclass
class TrainConfig:
    KEY: ClassVar[str] = "train"
    BUDGETS: ClassVar[tuple[str, ...]] = ("max_steps", "max_tokens", "max_time")

    batch_size: int | str = 16
    """Sequences per device per micro-step, or auto: the largest that fits in memory (found with
    out-of-memory recovery, less a safety margin); train.batch_tokens is kept through gradient accumulation."""
    batch_tokens: int | None = None
    """Tokens per optimizer step across all devices; gradient accumulation is derived from it. Empty: one micro-step."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (empty: no step limit)."""
    max_tokens: int | None = None
    """Stop after this many training tokens (empty: no token limit)."""
    max_time: float | None = None
    """Stop after this many seconds of training, evaluation excluded (empty: no time limit). A config that
    sets none of train.max_steps, train.max_tokens and train.max_time trains for 300 seconds; one that sets
    any of them gets exactly the limits it sets."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu), or a torch device string such as cpu or cuda:1."""
    log_every: int = 10
    """Write a metrics line every this many steps."""
    save_every: int = 200
    """Write a checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep."""
    samples: int = 2
    """Samples printed at the end of training."""
    sample_tokens: int = 200
    """Length of each printed sample, in tokens."""

    def check(self) -> None:
        if isinstance(self.batch_size, str):
            if self.batch_size != "auto":
                raise ConfigError(f"train.batch_size: expected a positive integer or auto, got {self.batch_size!r}")
        else:
            positive(self, "batch_size")
        if self.batch_tokens is not None:
            positive(self, "batch_tokens")
        for name in self.BUDGETS:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"train.{name}: expected a positive number or empty (no limit), got {value}")
        if all(getattr(self, name) is None for name in self.BUDGETS):
            raise ConfigError("train: no budget set; give at least one of train.max_steps, train.max_tokens, "
                              "train.max_time")
        positive(self, "log_every", "keep_checkpoints")
        non_negative(self, "save_every", "samples", "sample_tokens")


OPTIMIZER_NAMES = ("adamw", "muon")  # train/optim.py's OPTIMIZERS builds each (it checks they agree)


def _optimizer_names() -> tuple[str, ...]:
    """The OPTIMIZERS registry's names once train/optim.py is loaded (registering one needs it loaded), the
    built-in names before: a config error is found without importing torch."""
    optim = sys.modules.get("gptforge.train.optim")
    return tuple(optim.OPTIMIZERS) if optim is not None else OPTIMIZER_NAMES


@dataclass
class OptimConfig:
    KEY: ClassVar[str] = "optim"

    name: str = choice("muon", lambda: _optimizer_names())
    """adamw, or muon: Newton-Schulz-orthogonalized momentum for the 2-D hidden matrices, AdamW (optim.lr) for
    embeddings, head, norms and scalars."""
    lr: float = 3e-3
    """Peak learning rate (AdamW's, and under muon that of the parameters AdamW updates)."""
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
    fused: bool = True
    """AdamW through torch's fused kernel where the device has one (CUDA, CPU): one pass over all parameters
    instead of a loop over them."""
    muon_lr: float = 0.02
    """muon only: learning rate of the hidden matrices (the schedule scales it like optim.lr)."""
    muon_momentum: float = 0.95
    """muon only: Nesterov momentum of the hidden matrices."""
    muon_ns_steps: int = 5
    """muon only: Newton-Schulz iterations per update."""

    def check(self) -> None:
        positive(self, "lr", "muon_lr", "muon_ns_steps")
        non_negative(self, "weight_decay", "grad_clip")
        below_one(self, "beta1", "beta2", "muon_momentum")


@dataclass
class ScheduleConfig:
    KEY: ClassVar[str] = "schedule"

    name: str = choice("wsd", ("cosine", "wsd", "constant"))
    """Learning-rate schedule after warmup: cosine, wsd (warmup-stable-decay) or constant."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    cooldown_frac: float = 0.4
    """wsd only: fraction of the run spent decaying at the end."""
    cooldown: str = choice("linear", ("linear", "cosine"))
    """wsd only: shape of the decay at the end, linear or cosine."""
    batch_warmup_steps: int = 0
    """Batch-size warmup: over this many first steps the micro-steps per optimizer step grow linearly from 1
    to the full accumulation (0: full batch from the start)."""

    def check(self) -> None:
        fraction(self, "min_lr_ratio", "cooldown_frac")
        non_negative(self, "warmup_steps", "batch_warmup_steps")


@dataclass
class SpeedConfig:
    KEY: ClassVar[str] = "speed"

    precision: str = choice("auto", ("auto", "fp32", "tf32", "bf16", "fp16"))
    """auto (what the device does well), fp32, tf32, bf16 (autocast) or fp16 (autocast with a gradient scaler)."""
    compile: bool = False
    """Compile the model with torch.compile."""
    compile_mode: str = choice("default", ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    """torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune or max-autotune-no-cudagraphs."""
    sync_free: bool = False
    """Read the loss and gradient norm back to the host only on log steps (no per-step sync, CUDA-graph
    friendly); non-finite updates are still skipped, on the device; the spike rule looks at log steps only."""
    fused_kernels: bool = False
    """Fused RMSNorm and RoPE kernels: Triton where it runs, the PyTorch reference elsewhere."""
    fused_ce: bool = False
    """Linear + cross-entropy in chunks of speed.ce_chunk_tokens, so the full logits tensor never exists."""
    ce_chunk_tokens: int = 8192
    """fused_ce only: tokens per chunk."""
    activation_checkpointing: str = choice("none", ("none", "selective", "full"))
    """Recompute activations in the backward pass to save memory: none, selective (every other transformer
    block: about half the saving for half the recompute) or full (every block)."""
    channels_last: bool = True
    """model.arch=cnn on a GPU: weights and activations in channels-last memory, the layout tensor cores
    convolve fastest."""
    fp8: bool = False
    """fp8 linear layers through torchao (Ada / Hopper GPUs and newer, sm_89+; needs the fp8 extra); the
    output head and layers with a dimension not a multiple of 16 stay as they are."""

    def check(self) -> None:
        positive(self, "ce_chunk_tokens")


@dataclass
class EvalConfig:
    KEY: ClassVar[str] = "eval"

    every: int = 100
    """Evaluate on the validation subset every this many steps (0: only at the end)."""
    tokens: int = 65536
    """Size of the fixed validation subset, in tokens."""
    early_stop_patience: int = 0
    """Stop when validation loss has not improved by eval.early_stop_min_delta for this many evaluations
    (0: never stop early)."""
    early_stop_min_delta: float = 0.0
    """The improvement in validation loss that counts as one."""
    keep_best: bool = True
    """Keep the checkpoint of the best validation loss apart, in RUN_DIR/best."""

    def check(self) -> None:
        positive(self, "tokens")
        non_negative(self, "every", "early_stop_patience", "early_stop_min_delta")


@dataclass
class LoraConfig:
    KEY: ClassVar[str] = "finetune.lora"

    rank: int = 0
    """LoRA rank; 0 trains every weight (full fine-tune), > 0 freezes the model and trains low-rank adapters."""
    alpha: float = 16.0
    """LoRA scale numerator: adapters add (alpha / rank) * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    targets: str = "c_attn,c_proj,c_fc"
    """Comma-separated names of the linear layers that get adapters (matched against the end of module names)."""

    def check(self) -> None:
        non_negative(self, "rank")
        positive(self, "alpha")
        below_one(self, "dropout", what="a probability")
        if self.rank and not [name for name in self.targets.split(",") if name.strip()]:
            raise ConfigError("finetune.lora.targets: name at least one linear layer, e.g. c_attn,c_proj,c_fc")


@dataclass
class FinetuneConfig:
    KEY: ClassVar[str] = "finetune"

    init_from: str | None = None
    """Start from the weights of this run directory or checkpoint (fine-tuning); the model section is taken from it."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Low-rank adapters for fine-tuning."""
    qat: str | None = choice(None, ("int8", "int4"))
    """Quantization-aware training: int8 or int4 fake-quantized linear weights (empty: off)."""
    keep_sparsity: bool = False
    """Keep the zeros of the initial weights zero (recovery fine-tune after pruning)."""
    neftune_alpha: float = 0.0
    """NEFTune: uniform noise of scale alpha / sqrt(tokens x width) on the input embeddings during training
    (for fine-tuning; 0 disables it)."""

    def check(self) -> None:
        non_negative(self, "neftune_alpha")
        self.lora.check()


@dataclass
class RunConfig:
    KEY: ClassVar[str] = "run"

    dir: str = "runs/gpt"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/. A run there with checkpoints is resumed."""
    start_over: bool = False
    """Start from step 0 in a run directory whose checkpoints are all damaged (without it, such a run refuses to start); they are moved to checkpoints/rejected/, not deleted."""
    seed: int = 1337
    """Seed of every random generator (Python, NumPy, torch, the data loader)."""
    deterministic: bool = False
    """Deterministic algorithms only: with the same seed on the same CPU, bit-identical runs and resumes."""
    tensorboard: bool = True
    """Write TensorBoard events when the tensorboard package is installed."""
    price_per_hour: float | None = None
    """Price of the machine per hour; with nvidia-ml-py on a GPU, energy and cost are reported at the end."""

    # Seeds every generator takes: NumPy's are 32-bit.
    SEEDS: ClassVar[range] = range(2**32)

    def check(self) -> None:
        if self.price_per_hour is not None:
            non_negative(self, "price_per_hour")
        if self.seed not in self.SEEDS:
            problem(f"run.seed: expected a whole number from 0 to {self.SEEDS.stop - 1}, got {self.seed}")


@dataclass
class DistConfig:
    KEY: ClassVar[str] = "dist"

    strategy: str = choice("ddp", ("ddp", "fsdp2", "hsdp"))
    """Data parallelism under torchrun: ddp (replicate), fsdp2 (shard parameters, gradients, optimizer) or hsdp (shard within a node, replicate across nodes)."""
    backend: str = choice("auto", ("auto", "nccl", "gloo"))
    """Process-group backend: auto (nccl on GPUs, gloo on CPUs), nccl or gloo."""
    grad_compression: str = choice("none", ("none", "bf16", "fp16", "powersgd"))
    """ddp only: compress gradients before the all-reduce: none, bf16, fp16 or powersgd."""
    powersgd_rank: int = 4
    """Rank of PowerSGD's low-rank gradient approximation."""
    powersgd_start_step: int = 10
    """Optimizer steps of plain all-reduce before PowerSGD starts (it needs a warm start)."""
    hsdp_shard_size: int = 0
    """hsdp only: processes per shard group (0: the processes of one node)."""
    sync_batchnorm: bool = False
    """model.arch=cnn under DDP: BatchNorm statistics over the global batch instead of each process's own."""
    checkpoint: str = choice("full", ("full", "sharded"))
    """full: gather the whole state into safetensors on rank 0; sharded: each process writes its own pieces (safetensors, with a JSON index), for models that do not fit on one host."""

    def check(self) -> None:
        positive(self, "powersgd_rank")
        if self.powersgd_start_step < 2:
            raise ConfigError(f"dist.powersgd_start_step: PowerSGD needs at least 2 plain steps, "
                              f"got {self.powersgd_start_step}")
        if self.hsdp_shard_size < 0:
            raise ConfigError(f"dist.hsdp_shard_size: expected >= 0 (0: one node), got {self.hsdp_shard_size}")


@dataclass
class GuardConfig:
    KEY: ClassVar[str] = "guard"

    enabled: bool = True
    """Skip updates whose loss or gradient norm is not finite or spikes (see below); roll back after too many."""
    spikes: bool = True
    """Skip spikes too, not only non-finite steps. Off by default for model.arch=cnn: a classifier's loss per
    batch is heavy-tailed near zero once it fits, and a batch holding one hard image is no fault."""
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

    def check(self) -> None:
        positive(self, "window", "max_consecutive_skips", "spike_sigmas", "fit_patience")
        if not 2 <= self.min_history <= self.window:
            raise ConfigError(f"guard.min_history: expected 2..guard.window ({self.window}), got {self.min_history}")


@dataclass
class DebugConfig:
    KEY: ClassVar[str] = "debug"

    inject_nan_at_step: int | None = None
    """Make the loss of this optimizer step (counted from 1) non-finite, to watch the guard work."""
    inject_spike_at_step: int | None = None
    """Multiply the loss of this optimizer step by 100, to watch the spike rule work."""
    inject_count: int = 1
    """How many consecutive steps the injection above lasts (enough of them trigger a rollback)."""

    def check(self) -> None:
        for name in ("inject_nan_at_step", "inject_spike_at_step"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"debug.{name}: steps are counted from 1, got {value}")
        positive(self, "inject_count")


@dataclass
class Config:
    """The whole configuration, one field per section; a section's field name is its key prefix."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sections(self) -> list[Any]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def grad_accum_steps(self, world_size: int = 1) -> int:
        """Micro-steps per optimizer step, derived from batch_tokens (validated to divide exactly).
        train.batch_size=auto must have been resolved to a number first (train.batch_finder)."""
        per_micro = self.train.batch_size * self.model.block_size * world_size
        if self.train.batch_tokens is None:
            return 1
        return self.train.batch_tokens // per_micro

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.grad_accum_steps(world_size) * self.train.batch_size * self.model.block_size * world_size
