"""What a checkpoint's files must hold: the second pass of checkpoint.verify(), once every hash has passed.

The manifest proves that the files are the ones written, not that they make sense. A state.json whose step
disagrees with its folder, counters of the wrong type or sign, an RNG state that is not one, a config no
model can be built from (or none this machine can hold), tensors of other names or shapes than the config's
model has, weights that are not finite: each is a problem naming the file and the field, and the checkpoint
is passed over like a corrupted one, so the next older intact checkpoint is used.
"""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from gptforge.config import Config, from_dict
from gptforge.errors import ConfigError, GptforgeError
from gptforge.runtime import check_fits

TRAIN_FORMAT = "gptforge-train-state"
WEIGHTS_FORMAT = "gptforge-weights"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def check_contents(path: Path, layout: str, folder_step: int | None) -> list[str]:
    """Problems with what an intact checkpoint's files hold (empty: none). `layout`: full or sharded, as
    the manifest says; `folder_step`: the step in the folder's name (None for best/)."""
    state_file = path / "state.json"
    try:
        raw = json.loads(state_file.read_text())
    except (ValueError, RecursionError, OSError) as e:
        return [f"{state_file}: unreadable ({type(e).__name__}: {str(e)[:200]})"]
    problems = [f"{state_file}: {p}" for p in state_problems(raw, folder_step)]
    if problems:
        return problems
    stated = raw.get("layout", "full")  # written since sharded checkpoints exist; one without it is full
    if stated != layout:  # shards/ is read only where manifest and state.json both say sharded
        return [f"{state_file}: layout is {stated!r} but the manifest lists a {layout} checkpoint"]
    try:
        cfg = from_dict(raw["config"], source=f"{state_file}: config")
        check_fits(cfg.model, bytes_per_param=4, device="cpu", what="its fp32 weights")
    except (ConfigError, GptforgeError) as e:
        return [f"{state_file}: config: {e}"]
    if layout == "sharded":  # shards/index.json describes the shards; loading checks every box against it
        return []
    try:
        with torch.device("meta"):
            model = model_for(cfg, raw)
    except (GptforgeError, ValueError, KeyError, TypeError) as e:  # a quantization record that builds nothing
        return [f"{state_file}: quantization: {str(e)[:200] or type(e).__name__}"]
    return _tensor_problems(path, model, raw)


def model_for(cfg: Config, state: dict[str, Any]) -> nn.Module:
    """The module a checkpoint's tensors load into: the config's model with its quantized layers rebuilt and
    its LoRA adapters in place, on the current default device (under torch.device("meta") for shapes)."""
    from gptforge.model import build_model

    model = build_model(cfg.model)
    if "quantization" in state:
        from gptforge.adapt.qlinear import build_quantized

        build_quantized(model, state["quantization"])
    if cfg.finetune.lora.rank:
        from gptforge.adapt.lora import apply_lora

        apply_lora(model, cfg.finetune.lora)
    return model


# ----------------------------------------------------------------------------------------------------------
# state.json


def state_problems(raw: Any, folder_step: int | None) -> list[str]:
    """What is wrong with a state.json as read, field by field (empty: nothing)."""
    if not isinstance(raw, dict):
        return [f"expected an object, got {type(raw).__name__}"]
    fmt = raw.get("format", TRAIN_FORMAT)
    if fmt not in (TRAIN_FORMAT, WEIGHTS_FORMAT):
        return [f"format: expected {TRAIN_FORMAT!r} or {WEIGHTS_FORMAT!r}, got {fmt!r:.60}"]
    problems = []
    fields = _TRAIN_FIELDS if fmt == TRAIN_FORMAT else _WEIGHTS_FIELDS
    for name, (required, check) in fields.items():
        if name not in raw:
            if required:
                problems.append(f"{name}: missing")
            continue
        reason = check(raw[name])
        if reason is not None:
            problems.append(f"{name}: {reason}, got {json.dumps(raw[name])[:60]}")
    if not problems and folder_step is not None and raw["step"] != folder_step:
        problems.append(f"step: {raw['step']} does not match the folder's step {folder_step}")
    return problems


Check = Callable[[Any], "str | None"]


def _count(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else "expected a whole number >= 0"


def _seconds(v: Any) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
    return None if ok else "expected a finite number of seconds >= 0"


def _object(v: Any) -> str | None:
    return None if isinstance(v, dict) else "expected an object"


def _optional_object(v: Any) -> str | None:
    return None if v is None or isinstance(v, dict) else "expected an object or null"


def _sha256(v: Any) -> str | None:
    return None if v is None or (isinstance(v, str) and _HEX64.match(v)) else "expected 64 hex digits or null"


def _world_size(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else "expected a whole number >= 1"


def _rng(v: Any) -> str | None:
    """Every process's generators, as train/rng.py captures them."""
    if not isinstance(v, dict):
        return "expected an object of RNG states by rank"
    for rank, state in v.items():
        reason = _rng_state(state)
        if not rank.isdigit() or reason is not None:
            return f"rank {rank!r}: {reason or 'expected a rank number'}"
    return None


def _rng_state(state: Any) -> str | None:
    if not isinstance(state, dict):
        return "expected an object"
    py = state.get("python")
    if not (isinstance(py, list) and len(py) == 3 and isinstance(py[1], list) and len(py[1]) == 625
            and all(isinstance(x, int) and 0 <= x < 2**32 for x in py[1])):
        return "python: expected [version, 625 words, gauss] as random.getstate() gives"
    np_state = state.get("numpy")
    keys = np_state.get("keys") if isinstance(np_state, dict) else None
    if not (isinstance(keys, list) and len(keys) == 624 and all(isinstance(x, int) and 0 <= x < 2**32 for x in keys)
            and _count(np_state.get("pos")) is None):
        return "numpy: expected a Mersenne Twister state of 624 words and a position"
    for name in ("torch", *(["cuda"] if "cuda" in state else [])):
        values = state[name] if name == "cuda" else [state.get(name)]
        if not isinstance(values, list) or not all(_is_base64(s) for s in values):
            return f"{name}: expected the generator state as base64"
    if len(base64.b64decode(state["torch"])) != torch.get_rng_state().numel():
        return "torch: the generator state has the wrong size"
    return None


def _is_base64(s: Any) -> bool:
    try:
        return isinstance(s, str) and len(base64.b64decode(s, validate=True)) > 0
    except ValueError:
        return False


def _loader(v: Any) -> str | None:
    """The loader position of data/loader.py: a PCG64 state (random windows) or a cursor (sequential)."""
    if v is None:
        return None
    if not isinstance(v, dict):
        return "expected an object or null"
    if v.get("mode") == "sequential":
        return None if _count(v.get("cursor")) is None and _count(v.get("epoch")) is None else \
            "expected a cursor and an epoch >= 0"
    bits = v.get("rng") if v.get("mode") == "random" else None
    inner = bits.get("state") if isinstance(bits, dict) else None
    if isinstance(inner, dict) and bits.get("bit_generator") == "PCG64" and all(
            _count(inner.get(k)) is None for k in ("state", "inc")):
        return None
    return "expected mode random with a PCG64 state, or mode sequential"


def _optimizer(v: Any) -> str | None:
    groups = v.get("param_groups") if isinstance(v, dict) else None
    if isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                        and all(isinstance(p, str) for p in g["params"]) for g in groups):
        return None
    return "expected param_groups, each with the names of its parameters"


_TRAIN_FIELDS: dict[str, tuple[bool, Check]] = {
    "step": (True, _count),
    "tokens": (False, _count),
    "time_s": (False, _seconds),
    "config": (True, _object),
    "rng": (False, _rng),
    "loader": (False, _loader),
    "scaler": (False, _optional_object),
    "tokenizer_sha256": (False, _sha256),
    "world_size": (False, _world_size),
    "last_val": (False, _optional_object),
    "guard": (False, _optional_object),
    "early_stop": (False, _optional_object),
    "fit_watch": (False, _optional_object),
    "optimizer": (False, _optimizer),
}
_WEIGHTS_FIELDS: dict[str, tuple[bool, Check]] = {"step": (True, _count), "config": (True, _object)}


# ----------------------------------------------------------------------------------------------------------
# Tensors


def _tensor_problems(path: Path, model: nn.Module, state: dict[str, Any]) -> list[str]:
    """model.safetensors holds the model's tensors (a tied weight once, under either name), each of its shape
    and finite; optimizer.safetensors names only the model's parameters."""
    file = path / "model.safetensors"
    aliases = _tied_aliases(model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in aliases}
    problems = []
    try:
        with safe_open(str(file), framework="pt") as f:
            names = set(f.keys())
            for name in sorted(names):
                want = expected.get(aliases.get(name, name))
                shape = tuple(f.get_slice(name).get_shape())
                if want is None:
                    problems.append(f"{file}: tensor {name!r} is not in this config's model")
                elif shape != want:
                    problems.append(f"{file}: tensor {name!r} has shape {list(shape)}, the config's model {list(want)}")
                else:
                    tensor = f.get_tensor(name)
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        problems.append(f"{file}: tensor {name!r} holds NaN or infinite values")
                if len(problems) >= 5:
                    break
    except (SafetensorError, OSError, ValueError) as e:
        return [f"{file}: not a readable safetensors file ({str(e)[:200]})"]
    missing = sorted(k for k in expected if k not in names and not any(aliases.get(n) == k for n in names))
    if missing:
        problems.append(f"{file}: missing tensors of the config's model: {', '.join(missing[:5])}")
    if not problems and (path / "optimizer.safetensors").is_file():
        problems += _optimizer_problems(path / "optimizer.safetensors", model, state)
    return problems


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """Every other name of a tied tensor -> its first name (lm_head.weight -> transformer.wte.weight)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def _optimizer_problems(file: Path, model: nn.Module, state: dict[str, Any]) -> list[str]:
    """optimizer.safetensors: `state.<parameter>.<name>` of the model's trainable parameters only, each a
    step count (a scalar) or a moment of its parameter's shape, and finite."""
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    shapes.update({alias: shapes[first] for alias, first in _tied_aliases(model).items() if first in shapes})
    if "optimizer" not in state:
        return [f"{file.parent / 'state.json'}: optimizer: missing (optimizer.safetensors needs its layout)"]
    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                param = key[len("state."):].rsplit(".", 1)[0] if key.startswith("state.") else None
                if param not in shapes:
                    return [f"{file}: {key!r} is not the state of a parameter of this config's model"]
                shape = tuple(f.get_slice(key).get_shape())
                if shape not in ((), (1,), shapes[param]):
                    return [f"{file}: {key!r} has shape {list(shape)}, its parameter {list(shapes[param])}"]
                tensor = f.get_tensor(key)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    return [f"{file}: {key!r} holds NaN or infinite values"]
    except (SafetensorError, OSError, ValueError) as e:
        return [f"{file}: not a readable safetensors file ({str(e)[:200]})"]
    return []
