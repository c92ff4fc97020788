"""Checkpoints: safetensors for tensors, JSON for the rest, a sha256 manifest, written atomically.

Layout of RUN_DIR/checkpoints/step_<N>/:
    model.safetensors      model weights (tied weights stored once, under their first name), or instead
    shards/                with dist.checkpoint=sharded: every process's pieces of model and optimizer in
                           safetensors, and index.json, which box of which tensor each file holds
                           (parallel/shards.py).
    optimizer.safetensors  optimizer tensors, keyed "state.<parameter name>.<state name>"
    state.json             step, counters, config, RNG states, loader position, optimizer hyper-parameters
    tokenizer.json         copy of the run's tokenizer, so a checkpoint stands alone
    manifest.json          size and sha256 of every file above; written last

RUN_DIR/best/ (eval.keep_best) has the same layout and holds the checkpoint of the best validation loss so
far; it is replaced as a whole, never pruned, and never taken as a step checkpoint to resume from.

A checkpoint is built in a hidden sibling folder, every file fsynced, then renamed into place: a crash leaves
either the previous set of checkpoints or the new one, never a half-written `step_<N>`.

Before a byte of a checkpoint is used, verify() checks it in two passes, and a checkpoint that fails either is
reported (file, field and check) and the next older intact one is taken:
1. the files: the folder is a real folder (not a link); the manifest lists plain names inside it; every
   listed file is a regular file of the listed size and sha256; nothing else is in the folder. Whether a
   checkpoint is sharded is read from its manifest (and state.json agrees), never from what lies in it.
2. what they hold (train/contents.py): state.json against its schema, the step agreeing with the folder's
   name, the config valid and of a size this machine can hold, every tensor named and shaped as the
   config's model has it, and finite.
The manifest proves that files are those the writer wrote, not who wrote them: it is not a signature.
Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gptforge.errors import CheckpointError
from gptforge.fileio import fsync_dir, fsync_file, sha256_file
from gptforge.train.contents import WEIGHTS_FORMAT, check_contents

MANIFEST = "manifest.json"
SHARD_INDEX = "shards/index.json"  # what a sharded checkpoint's manifest lists
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


# ----------------------------------------------------------------------------------------------------------
# Writing


def staging_dir(run_dir: str | Path, step: int, tag: str | None = None) -> Path:
    """The hidden folder a checkpoint is built in; `tag` names one that several processes share."""
    return checkpoint_root(run_dir) / f".tmp-step_{step:08d}-{tag or os.getpid()}"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module | dict[str, torch.Tensor] | None,
    optimizer: dict | None,
    state: dict[str, Any],
    files: dict[str, Path] | None = None,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    keep: int = 3,
    staged: Path | None = None,
    dest: Path | None = None,
) -> Path:
    """Write step_<step> atomically and prune all but the newest `keep`. Returns the checkpoint folder.

    `dest` writes the same checkpoint to another folder instead (RUN_DIR/best); that folder is replaced as
    a whole, is never pruned, and is not a step checkpoint, so resuming never picks it up.
    """
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = Path(dest) if dest is not None else root / f"step_{step:08d}"
    tmp = staged or staging_dir(run_dir, step)
    if staged is None:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    if model is not None:  # None: the model is already in `staged` as shards
        weights = model_tensors(model) if isinstance(model, nn.Module) else model
        save_file(weights, str(tmp / "model.safetensors"))
    if optimizer is not None:
        opt_tensors, meta = flatten_optimizer_state(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        state = {**state, "optimizer": meta}
    state = {**state, "layout": "full" if model is not None else "sharded"}
    _write_json(tmp / "state.json", state)
    for name, src in (files or {}).items():
        shutil.copyfile(src, tmp / name)
    for name, extra in (tensors or {}).items():
        save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(tmp / name))

    entries = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        fsync_file(path)
        entries[path.relative_to(tmp).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    _write_json(tmp / MANIFEST, {"format": "gptforge-checkpoint", "version": 1, "step": step, "files": entries})
    fsync_file(tmp / MANIFEST)
    fsync_dir(tmp)

    if final.exists():  # the same step written again (after a resume): swap, so one intact copy always exists
        old = root / f".old-{final.name}-{os.getpid()}"  # prune() removes it if a crash leaves it
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)
    if dest is None:
        prune(root, keep)
    return final




def save_weights(
    run_dir: str | Path,
    model: nn.Module,
    config: dict[str, Any],
    *,
    step: int = 0,
    tokenizer_file: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """A weights-only run (imported, quantized, pruned): loads like any run, cannot be resumed as training.

    Writes RUN_DIR/config.yaml, RUN_DIR/tokenizer.json and one checkpoint whose state.json has format
    "gptforge-weights", the config and `extra` (e.g. {"quantization": ...}, {"source": ...}).
    """
    import yaml

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    files = {}
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, run_dir / "tokenizer.json")
        files["tokenizer.json"] = run_dir / "tokenizer.json"
    state = {"format": WEIGHTS_FORMAT, "step": step, "config": config, **(extra or {})}
    return save_checkpoint(run_dir, step, model=model, optimizer=None, state=state, files=files, keep=1)


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and folders left by interrupted writes."""
    for stale in root.glob(".tmp-step_*"):
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    for old in root.glob(".old-*"):
        shutil.rmtree(old, ignore_errors=True)
    for path in list_checkpoints(root)[keep:]:
        shutil.rmtree(path, ignore_errors=True)


def set_aside(path: Path) -> Path:
    """Move a rejected checkpoint to checkpoints/rejected/ (a name not taken there): out of what is resumed
    and pruned, never deleted."""
    target_dir = path.parent / "rejected"
    target_dir.mkdir(exist_ok=True)
    target = target_dir / path.name
    n = 1
    while target.exists():
        target, n = target_dir / f"{path.name}.{n}", n + 1
    os.rename(path, target)
    fsync_dir(path.parent)
    return target


def flatten_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON (everything else)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in sd["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        param, name = key[len("state.") :].rsplit(".", 1)  # parameter names contain dots, state names do not
        state.setdefault(param, {})[name] = value
    for param, values in meta.get("scalars", {}).items():
        state.setdefault(param, {}).update(values)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------------------------------------
# Reading


def list_checkpoints(root: str | Path) -> list[Path]:
    """Finished checkpoint folders, newest first. Hidden temporary folders are never listed."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def verify(path: str | Path) -> list[str]:
    """Problems with a checkpoint folder, each naming the file (and field) and the failed check; empty when
    intact. The files against the manifest first; then, only once those hold, what the files contain."""
    path = Path(path)
    entries, problems = _manifest_entries(path)
    if problems:
        return problems
    problems = _check_files(path, entries)
    return problems or check_contents(path, layout_of(entries), step_of(path))


_PLAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _manifest_entries(path: Path) -> tuple[dict[str, dict], list[str]]:
    """The manifest's file entries, or the reasons it cannot be trusted to describe the folder."""
    if path.is_symlink():
        return {}, [f"{path}: a symbolic link to {os.readlink(path)}; checkpoints are read from real folders only"]
    manifest_path = path / MANIFEST
    if manifest_path.is_symlink() or not manifest_path.is_file():
        return {}, [f"{manifest_path}: missing (the checkpoint was never completed)"]
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, RecursionError, OSError) as e:
        return {}, [f"{manifest_path}: unreadable manifest ({type(e).__name__}: {str(e)[:200]})"]
    entries = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(entries, dict):
        return {}, [f"{manifest_path}: expected an object with a \"files\" object, got {type(entries).__name__}"]
    if any(name.startswith("dcp/") for name in entries):
        return entries, [f"{manifest_path}: a sharded checkpoint in torch.distributed.checkpoint's format, whose "
                         "files are pickles; gptforge reads no pickle (its sharded checkpoints are shards/, "
                         "safetensors and JSON)"]
    problems = []
    for name, entry in entries.items():
        where = f"{manifest_path}: files[{name!r}]"
        if (reason := _bad_name(name)) is not None:
            problems.append(f"{where}: {reason}")
        elif not (isinstance(entry, dict) and _is_count(entry.get("bytes"))
                  and isinstance(entry.get("sha256"), str) and _SHA256.match(entry["sha256"])):
            problems.append(f"{where}: expected {{\"bytes\": a count, \"sha256\": 64 hex digits}}, got {entry!r:.80}")
    step = manifest.get("step")
    if not problems and step_of(path) is not None and step != step_of(path):
        problems.append(f"{manifest_path}: step {step!r} does not match the folder {path.name}")
    if not problems and "state.json" not in entries:
        problems.append(f"{path / 'state.json'}: not listed in the manifest")
    if not problems and ("model.safetensors" in entries) == (SHARD_INDEX in entries):
        problems.append(f"{manifest_path}: expected exactly one of model.safetensors (full) or {SHARD_INDEX} "
                        "(sharded) among the files")
    return entries, problems


def _bad_name(name: str) -> str | None:
    """Why a manifest entry is not a plain file name inside the checkpoint (None: it is one): a name, or
    shards/NAME for the shards of a sharded checkpoint. No absolute paths, no parts that climb."""
    parts = name.split("/")
    if len(parts) == 2 and parts[0] == "shards" and _PLAIN.match(parts[1]):
        return None
    if len(parts) == 1 and _PLAIN.match(name):
        return None
    return "not a plain file name inside the checkpoint (no folders but shards/, no '..', no absolute paths)"


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_files(path: Path, entries: dict[str, dict]) -> list[str]:
    """Every listed file a regular file of its size and sha256; every file in the folder listed."""
    problems = []
    for name, entry in entries.items():
        file = path / name
        if file.is_symlink() or file.parent.is_symlink():
            problems.append(f"{file}: a symbolic link; a checkpoint holds its own files only")
        elif not file.exists():
            problems.append(f"{file}: missing")
        elif not file.is_file():
            problems.append(f"{file}: not a regular file")
        elif file.stat().st_size != entry["bytes"]:
            problems.append(f"{file}: {file.stat().st_size} bytes, manifest says {entry['bytes']} (truncated or changed)")
        elif sha256_file(file) != entry["sha256"]:
            problems.append(f"{file}: sha256 does not match the manifest (corrupted)")
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = Path(root) / name
            rel = full.relative_to(path).as_posix()
            shards = rel == "shards" and full.is_dir() and not full.is_symlink() and layout_of(entries) == "sharded"
            if rel in entries or rel == MANIFEST or shards:
                continue
            problems.append(f"{full}: not listed in the manifest (a checkpoint may hold only what its manifest "
                            "lists; something else put it there)")
    return problems


def layout_of(entries: dict[str, Any]) -> str:
    """"sharded" for a manifest that lists shards/index.json, else "full"."""
    return "sharded" if SHARD_INDEX in entries else "full"


def step_of(path: Path) -> int | None:
    """The step in a folder's name (step_00000030 -> 30), or None for another name (best/)."""
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def intact(run_dir: str | Path, report: Callable[[str], None] = print) -> Iterator[Path]:
    """A run's intact checkpoints, newest first, each verified as it is reached; every rejected one is
    reported. Lazy: a caller that takes the first checks no older ones."""
    for path in list_checkpoints(checkpoint_root(run_dir)):
        problems = verify(path)
        if not problems:
            yield path
        else:
            report(f"checkpoint {path.name} rejected: " + "; ".join(problems))


def find_latest(run_dir: str | Path, report: Callable[[str], None] = print) -> Path | None:
    """The newest intact checkpoint of a run (or None); every rejected newer one is reported."""
    return next(intact(run_dir, report), None)


def is_checkpoint_folder(path: str | Path) -> bool:
    """Whether `path` names one checkpoint (step_<N>/, best/, a weights-only one) rather than a run."""
    path = Path(path)
    return (path / MANIFEST).is_file() or bool(_STEP_DIR.match(path.name))


def candidates(path: str | Path, report: Callable[[str], None] = print) -> Iterator[Path]:
    """What a command given `path` may load, in order: that checkpoint folder (verified; an error if it
    fails), or a run directory's intact checkpoints, newest first. An error when there is none."""
    path = Path(path)
    if is_checkpoint_folder(path):
        problems = verify(path)
        if problems:
            raise CheckpointError(f"checkpoint {path} failed its checks: " + "; ".join(problems))
        yield path
        return
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint")
    found = False
    for ckpt in intact(path, report):
        found = True
        yield ckpt
    if not found:
        raise CheckpointError(f"{path}: no intact checkpoint under {checkpoint_root(path)}")


def resolve(path: str | Path, report: Callable[[str], None] = print) -> Path:
    """A checkpoint folder from a run directory (its newest intact checkpoint) or a checkpoint folder."""
    return next(candidates(path, report))


def read_state(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{Path(path) / 'state.json'}: unreadable ({e})") from None


def model_tensors(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """What model.safetensors holds: `state` (default: the module's) with each tied weight once, on CPU."""
    state = model.state_dict() if state is None else state
    canonical = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {k: v.detach().contiguous().cpu() for k, v in state.items() if k in canonical}


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    file = Path(path) / "model.safetensors"
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load model.safetensors into `model`: every tensor, every shape; a tied weight may appear under either name."""
    file = Path(path) / "model.safetensors"
    tensors = read_weights(path)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{file}: cannot be loaded into this model ({e})") from None
    storage = {k: v.data_ptr() for k, v in model.state_dict().items()}
    loaded = {storage[k] for k in tensors if k in storage}
    missing = [k for k in missing if storage[k] not in loaded]
    if missing or unexpected:
        raise CheckpointError(
            f"{file}: does not match this model (missing: {', '.join(missing[:5]) or 'none'}; "
            f"unexpected: {', '.join(unexpected[:5]) or 'none'})"
        )


def is_sharded(path: str | Path) -> bool:
    """Whether a verified checkpoint is sharded: as its manifest says, never by what lies in the folder."""
    try:
        entries = json.loads((Path(path) / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{Path(path) / MANIFEST}: unreadable ({e})") from None
    return layout_of(entries) == "sharded"


def read_optimizer(path: str | Path, state: dict[str, Any]) -> dict:
    """The name-keyed optimizer state dict of a checkpoint."""
    file = Path(path) / "optimizer.safetensors"
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None
    return unflatten_optimizer_state(tensors, state["optimizer"])


# ----------------------------------------------------------------------------------------------------------
# Files


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, allow_nan=True))
