"""From YAML files and `key=value` overrides to a validated Config, and back to YAML.

The order, each step overriding the one before: a preset, then the depth dial, then every key the user
gave (the file, then the overrides, left to right). Keys of earlier versions are moved to their current
place first (MIGRATIONS), in files, overrides and the configs saved in old runs alike.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from gptforge.config.rules import validate
from gptforge.config.sections import (ARCH_DEFAULTS, PRESETS, Config, DataConfig, TrainConfig, choice_message, choices_of,
                                      problem_key)
from gptforge.errors import ConfigError
from gptforge.model.config import GPTConfig

# The budget of a config that sets none of train.max_steps, train.max_tokens, train.max_time: five minutes.
DEFAULT_MAX_TIME = 300.0


def _moved(old: str, new: str, *names: str, **renamed: str) -> dict[str, str]:
    """Keys `old.NAME` now at `new.NAME`, and `old.OLD_NAME` now at `new.NEW_NAME`."""
    return {**{f"{old}.{n}": f"{new}.{n}" for n in names}, **{f"{old}.{o}": f"{new}.{n}" for o, n in renamed.items()}}


# Keys of earlier versions and where their value lives now (None: dropped), as dotted paths; a section
# (train.lora) moves with everything in it. Saved runs and old command lines keep working.
MIGRATIONS: dict[str, str | None] = {
    "train.skip_nonfinite": "guard.enabled",
    **_moved("train", "optim", "lr", "weight_decay", "beta1", "beta2", "eps", "grad_clip", "muon_lr",
             "muon_momentum", "muon_ns_steps", optimizer="name", fused_optimizer="fused"),
    **_moved("train", "schedule", "warmup_steps", "min_lr_ratio", "cooldown_frac", "cooldown", "batch_warmup_steps",
             schedule="name"),
    **_moved("train", "speed", "precision", "compile", "compile_mode", "sync_free", "fused_kernels", "fused_ce",
             "ce_chunk_tokens", "activation_checkpointing", "fp8"),
    **_moved("train", "eval", "early_stop_patience", "early_stop_min_delta", "keep_best", eval_every="every",
             eval_tokens="tokens"),
    **_moved("train", "finetune", "init_from", "lora", "qat", "keep_sparsity", "neftune_alpha"),
}

# Keys added since, with what a section of an earlier version means by leaving them out: every run saved
# before model.arch existed is a GPT. Filled in only where the section is there.
ADDED: dict[str, Any] = {"model.arch": "gpt"}


# ----------------------------------------------------------------------------------------------------------
# Keys of earlier versions


def canonical_key(key: str) -> str:
    """The current name of a dotted key: `train.lr` -> `optim.lr`, `train.lora.rank` -> `finetune.lora.rank`."""
    for old, new in MIGRATIONS.items():
        if new is not None and (key == old or key.startswith(f"{old}.")):
            return new + key[len(old):]
    return key


def migrate(tree: dict[str, Any]) -> dict[str, Any]:
    """A copy of a raw config tree with the keys of earlier versions moved to their current place (and the
    keys added since filled in, see ADDED).

    Where a tree holds both a key and its old name, the current one wins. Used on every tree from_dict
    reads, and by code that reads a saved run's config without building a Config from it."""
    tree = copy.deepcopy(tree)
    for key, value in ADDED.items():
        *parents, name = key.split(".")
        node = _node(tree, parents)
        if node is not None:
            node.setdefault(name, value)
    for old, new in MIGRATIONS.items():
        *parents, name = old.split(".")
        node = _node(tree, parents)
        if node is None or name not in node:
            continue
        value = node.pop(name)
        if new is not None:
            *parents, name = new.split(".")
            target = _node(tree, parents, create=True)
            if target is not None:
                target[name] = _merge(value, target[name]) if name in target else value
    return tree


def _node(tree: dict[str, Any], path: list[str], create: bool = False) -> dict[str, Any] | None:
    """The section at `path` in `tree` (made when `create`), or None where there is none or it is a value."""
    node = tree
    for part in path:
        if create and part not in node:
            node[part] = {}
        node = node.get(part)
        if not isinstance(node, dict):
            return None
    return node


def _merge(old: Any, current: Any) -> Any:
    """A value given under both names: sections merge, and the current name wins."""
    if isinstance(old, dict) and isinstance(current, dict):
        return {**old, **{k: _merge(old[k], v) if k in old else v for k, v in current.items()}}
    return current


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then `key=value` overrides; presets first; then validation. Every
    problem is reported at once, those of keys in the file with their line."""
    tree, lines = _read_yaml(Path(path)) if path is not None else ({}, {})
    tree = migrate(tree)
    for item in overrides:
        key, value = _split_override(item)
        key = canonical_key(key)
        _set_dotted(tree, key, value)
        lines.pop(key, None)  # the value in effect is the override's, not the file's
    try:
        return from_dict(tree)
    except ConfigError as e:
        if not lines:
            raise
        raise ConfigError(*(_located(p, path, lines) for p in e.problems)) from None


def from_dict(tree: dict[str, Any], source: str = "config") -> Config:
    """Build a validated Config from a nested dict (YAML, overrides, or a checkpoint's saved config)."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(tree).__name__}")
    tree = _default_budget(_apply_depth(_apply_preset(_apply_arch(migrate(tree)))))
    found: list[str] = []
    cfg = _build(Config, tree, prefix="", found=found)
    validate(cfg, found=found)
    return cfg


def _apply_preset(tree: dict[str, Any]) -> dict[str, Any]:
    """model.preset's shape under every model key the user gave explicitly."""
    model = tree.get("model")
    if not isinstance(model, dict) or model.get("preset") is None:
        return tree
    name = str(model["preset"])
    if name not in PRESETS:
        raise ConfigError(choice_message("model.preset", name, tuple(PRESETS)))
    return {**tree, "model": {**PRESETS[name], **model}}


def _apply_arch(tree: dict[str, Any]) -> dict[str, Any]:
    """model.arch's defaults (ARCH_DEFAULTS) under every key the user gave, preset included."""
    model = tree.get("model")
    defaults = ARCH_DEFAULTS.get(str(model.get("arch"))) if isinstance(model, dict) else None
    if not defaults:
        return tree
    tree = dict(tree)
    for section, values in defaults.items():
        given = tree.get(section) or {}
        if isinstance(given, dict):  # _build reports a bad section
            tree[section] = {**values, **given}
    return tree


def _default_budget(tree: dict[str, Any]) -> dict[str, Any]:
    """DEFAULT_MAX_TIME, for a tree that names no budget key at all (a budget left empty on purpose counts
    as named: train.max_time=null with no other limit is an error, not five minutes)."""
    train = tree.get("train", {})
    if not isinstance(train, dict) or any(name in train for name in TrainConfig.BUDGETS):
        return tree
    return {**tree, "train": {**train, "max_time": DEFAULT_MAX_TIME}}


# ----------------------------------------------------------------------------------------------------------
# The depth dial


def depth_settings(depth: int, vocab_size: int = 8192) -> dict[str, dict[str, Any]]:
    """What `model.depth=N` sets (nanochat's single dial): N layers of width 64 N with heads of 64 (so
    depth 6 is the `small` shape and depth 12 GPT-2 small's), AdamW rates scaled by 1/sqrt(width) from 3e-3
    at width 384, and a compute-optimal budget of 20 training tokens per parameter (Chinchilla)."""
    from gptforge.model.flops import num_params

    n_embd = 64 * depth
    model = dict(n_layer=depth, n_head=depth, n_embd=n_embd)
    params = num_params(GPTConfig(vocab_size=vocab_size, **model))["total"]
    return {"model": model, "optim": dict(lr=round(3e-3 * (384 / n_embd) ** 0.5, 6)),
            "train": dict(max_tokens=20 * params)}


def _apply_depth(tree: dict[str, Any]) -> dict[str, Any]:
    """Fill the keys model.depth decides, under every key the user gave explicitly (preset included). Its
    token budget is the run's only when the user named no budget key: any one of them replaces it."""
    model = tree.get("model")
    if not isinstance(model, dict) or model.get("depth") is None:
        return tree
    depth = _coerce("model.depth", model["depth"], int)
    if depth < 1:
        raise ConfigError(f"model.depth: expected a positive number of layers, got {depth}")
    data = tree.get("data") if isinstance(tree.get("data"), dict) else {}
    vocab = _coerce("data.vocab_size", data.get("vocab_size", DataConfig.vocab_size), int)
    tree = dict(tree)
    for section, values in depth_settings(depth, vocab).items():
        given = tree.get(section) or {}
        if not isinstance(given, dict):
            continue  # _build reports the bad section
        if section == "train" and any(name in given for name in TrainConfig.BUDGETS):
            values = {k: v for k, v in values.items() if k not in TrainConfig.BUDGETS}
        tree[section] = {**values, **given}
    return tree


# ----------------------------------------------------------------------------------------------------------
# Reading


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The tree of a YAML config file, and the line of each dotted key in it (keys of earlier versions also
    under their current name)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                          "save the file as UTF-8") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config (a config has sections of keys, two or "
                          "three levels deep)") from None
    if tree is None:
        return {}, {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, train, optim, ...), "
                          f"got {type(tree).__name__}")
    lines: dict[str, int] = {}
    _key_lines(node, "", lines)
    lines.update({canonical_key(k): n for k, n in list(lines.items()) if canonical_key(k) not in lines})
    return tree, lines


def _key_lines(node: yaml.Node, prefix: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                dotted = f"{prefix}{key.value}"
                lines[dotted] = key.start_mark.line + 1
                _key_lines(value, f"{dotted}.", lines)


def _located(problem: str, path: str | Path, lines: dict[str, int]) -> str:
    """`FILE:LINE: problem` for a problem about a key written in the file (the key a problem is about is
    the dotted name it starts with)."""
    key = problem_key(problem)
    line = lines.get(key) if key else None
    return f"{path}:{line}: {problem}" if line else problem


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


# ----------------------------------------------------------------------------------------------------------
# Building and coercion


def _build(cls: type, tree: Any, prefix: str, found: list[str]) -> Any:
    """An instance of the section `cls` from its subtree, every value coerced to its field's type. A key
    that cannot be used joins `found` and keeps its default, so that every such key is reported at once."""
    if not isinstance(tree, dict):
        found.append(f"{prefix.rstrip('.') or 'config'}: expected a section (mapping), got {tree!r:.80}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, raw in tree.items():
        full = f"{prefix}{key}"
        if key not in fields:
            found.append(_unknown_key_message(full, [f"{prefix}{n}" for n in fields]))
            continue
        kind = _hints(cls)[key]
        try:
            kwargs[key] = _build(kind, raw, f"{full}.", found) if dataclasses.is_dataclass(kind) else \
                _coerce_field(full, raw, kind, fields[key])
        except ConfigError as e:
            found.extend(e.problems)
    return cls(**kwargs)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce_field(key: str, raw: Any, kind: Any, f: dataclasses.Field) -> Any:
    """The value for field `f`: of its type, and one of its choices where it lists them."""
    value = _coerce(key, raw, kind)
    allowed = choices_of(f)
    if allowed is not None and value is not None and value not in allowed:
        raise ConfigError(choice_message(key, value, allowed))
    return value


def _coerce(key: str, raw: Any, kind: Any) -> Any:
    """Turn a YAML value or a command-line string into the field's type, or say what was expected."""
    optional = False
    if typing.get_origin(kind) in (Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        optional = len(args) < len(typing.get_args(kind))
        if args == [int, str]:  # a number or a word (train.batch_size=auto); the section's check() checks the word
            if isinstance(raw, str) and not raw.strip().replace("_", "").lstrip("-").isdigit():
                return raw.strip()
        kind = args[0]
    if raw is None:
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required (expected {kind.__name__})")
    if optional and isinstance(raw, str) and raw.strip().lower() in ("", "none", "null"):
        return None
    if kind not in _CONVERTERS:
        raise ConfigError(f"{key}: unsupported field type {kind}")  # a programming error, not a user one
    try:
        return _CONVERTERS[kind](raw, raw.strip() if isinstance(raw, str) else None)
    except (TypeError, ValueError):
        what = {int: "an integer", float: "a finite number"}.get(kind, kind.__name__)
        raise ConfigError(f"{key}: expected {what}, got {raw!r:.80}") from None


def _to_bool(raw: Any, text: str | None) -> bool:
    if isinstance(raw, bool):
        return raw
    if text is not None and text.lower() in ("true", "yes", "on", "1"):
        return True
    if text is not None and text.lower() in ("false", "no", "off", "0"):
        return False
    raise ValueError


def _to_int(raw: Any, text: str | None) -> int:
    """An int, or a float or string that holds a whole number (1e3, 1_000); never a bool."""
    if isinstance(raw, bool):
        raise ValueError
    if isinstance(raw, int):
        return raw
    value = float(text.replace("_", "")) if text is not None else float(raw)
    if not value.is_integer():
        raise ValueError
    return int(value)


def _to_float(raw: Any, text: str | None) -> float:
    """A finite float: nan and inf are never what a rate, a budget or a weight means."""
    if isinstance(raw, bool):
        raise ValueError
    value = float(text.replace("_", "")) if text is not None else float(raw)
    if not math.isfinite(value):
        raise ValueError
    return value


def _to_str(raw: Any, text: str | None) -> str:
    if isinstance(raw, (dict, list)):
        raise ValueError
    return str(raw)


_CONVERTERS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _unknown_key_message(key: str, valid: list[str]) -> str:
    close = close_keys(key, valid)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {key!r}.{hint} Valid keys here: {', '.join(valid)}"


def close_keys(key: str, valid: list[str] | None = None) -> list[str]:
    """Keys the user may have meant by an unknown `key`: the same field name in other sections
    (optim.warmup_steps: schedule.warmup_steps), then keys close to it among `valid` (default: every key)
    and the old names of its section, an old name shown as its new one (train.lrr: optim.lr)."""
    parent, _, name = key.rpartition(".")
    valid = list(_all_keys()) if valid is None else valid
    elsewhere = [k for k in _all_keys() if k.rpartition(".")[2] == name and k != key]
    aliases = [old for old in MIGRATIONS if old.rpartition(".")[0] == parent]
    close = [canonical_key(k) for k in difflib.get_close_matches(key, valid + aliases, n=3)]
    return list(dict.fromkeys(elsewhere + close))[:3]


@functools.cache
def _all_keys(cls: type = Config, prefix: str = "") -> tuple[str, ...]:
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        kind = _hints(cls)[f.name]
        keys.extend(_all_keys(kind, f"{prefix}{f.name}.") if dataclasses.is_dataclass(kind) else [prefix + f.name])
    return tuple(keys)


# ----------------------------------------------------------------------------------------------------------
# Writing


def save_config(cfg: Config, path: str | Path) -> None:
    """The whole config as YAML, in the current layout (from_dict reads it back to the same Config)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
