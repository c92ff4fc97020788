"""Sharded checkpoints in safetensors and JSON: every process writes its own pieces, nothing is pickled.

A checkpoint's shards/ folder (dist.checkpoint=sharded):
    index.json               {"format": "gptforge-shards", "version": 1, "world_size": N,
                              "tensors": {key: {"shape", "dtype", "pieces": [{"file", "offset", "shape"}]}},
                              "values": {key: a JSON value}}
    rank_00000.safetensors   the pieces rank 0 wrote, each under its key (one file per process)

The state is {"model": the model's state dict, "optim": the optimizer's}, as torch's distributed state-dict
API gives them (sharded tensors stay sharded, keyed by parameter name). A key is the JSON list of the path
to a leaf, e.g. ["optim", "state", "transformer.wte.weight", "exp_avg"]. A tensor leaf is stored as the box
(offset, shape) of the global tensor each process holds; a box held by several processes (replicas) is
written once, by the lowest rank. Every other leaf (learning rates, betas, parameter names) is JSON.

Loading reads, for each tensor of the model as it is sharded now, the parts of the stored boxes that
overlap its own box, so a checkpoint written by N processes loads into M, or into one without a process
group, and checks that every element was covered. safetensors and json are the only readers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from gptforge.errors import CheckpointError
from gptforge.parallel.world import World

FORMAT = "gptforge-shards"
INDEX = "index.json"


def _leaves(tree: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, leaf) for every tensor, and for every value that holds no tensor and no dict, in `tree`."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(tree, (list, tuple)) and any(isinstance(v, (dict, list, tuple, torch.Tensor)) for v in tree):
        for i, value in enumerate(tree):
            yield from _leaves(value, (*path, i))
    else:
        yield path, tree


def _set(tree: Any, path: tuple, value: Any) -> None:
    for part in path[:-1]:
        tree = tree[part]
    old = tree[path[-1]]
    tree[path[-1]] = tuple(value) if isinstance(old, tuple) and isinstance(value, list) else value


def _box(tensor: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], torch.Tensor]:
    """(global offset, shape, local tensor) of what this process holds of `tensor`."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        return tuple(offset), tuple(shape), tensor.to_local()
    return (0,) * tensor.dim(), tuple(tensor.shape), tensor


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_shards(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, world: World | None = None) -> None:
    """Write the model's and optimizer's state to `path` (a collective: every process calls it)."""
    world = world or World()
    rank = world.rank
    tensors, values = {}, {}
    for keypath, leaf in _leaves(_state(model, optimizer)):
        if isinstance(leaf, torch.Tensor):
            tensors[json.dumps(keypath)] = leaf
        else:
            values[json.dumps(keypath)] = leaf
    try:  # checked on every process, so that none waits at the barrier for one that failed
        json.dumps(values, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / INDEX}: a non-tensor value of the state is not JSON ({e})") from None
    boxes = {key: _box(t) for key, t in tensors.items()}
    held = world.gather_json({key: [list(offset), list(shape)] for key, (offset, shape, _) in boxes.items()})
    owner: dict[str, dict[str, int]] = {}  # key -> box -> the lowest rank that holds it
    for r, theirs in enumerate(held):
        for key, box in theirs.items():
            if all(box[1]):  # an empty box (more processes than rows) holds nothing
                owner.setdefault(key, {}).setdefault(json.dumps(box), r)
    mine = {key: local.detach().cpu().contiguous().clone() for key, (offset, shape, local) in boxes.items()
            if owner.get(key, {}).get(json.dumps([list(offset), list(shape)])) == rank}
    path.mkdir(parents=True, exist_ok=True)
    save_file(mine, str(path / f"rank_{rank:05d}.safetensors"))
    if rank == 0:
        index = {"format": FORMAT, "version": 1, "world_size": len(held), "values": values, "tensors": {
            key: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                  "pieces": [{"file": f"rank_{r:05d}.safetensors", "offset": json.loads(box)[0],
                              "shape": json.loads(box)[1]} for box, r in owner.get(key, {}).items()]}
            for key, t in tensors.items()}}
        (path / INDEX).write_text(json.dumps(index, indent=1, allow_nan=False))
    world.barrier()


def read_index(path: Path) -> dict:
    """The shards' index, its shape checked (every file it names is a rank file inside `path`)."""
    file = path / INDEX
    try:
        index = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{file}: not a shard index ({type(e).__name__}: {str(e)[:200]})") from None
    if not (isinstance(index, dict) and index.get("format") == FORMAT and isinstance(index.get("tensors"), dict)
            and isinstance(index.get("values"), dict)):
        raise CheckpointError(f"{file}: not a shard index (expected {{\"format\": \"{FORMAT}\", \"tensors\": "
                              "{...}, \"values\": {...}})")
    for key, entry in index["tensors"].items():
        if not (isinstance(entry, dict) and _is_shape(entry.get("shape")) and isinstance(entry.get("pieces"), list)
                and all(_is_piece(p, len(entry["shape"])) for p in entry["pieces"])):
            raise CheckpointError(f"{file}: tensors[{key[:80]}]: expected a shape and pieces of "
                                  "{\"file\": \"rank_N.safetensors\", \"offset\": [...], \"shape\": [...]}")
    return index


def _is_shape(value) -> bool:
    return isinstance(value, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value)


def _is_piece(piece, ndim: int) -> bool:
    return (isinstance(piece, dict) and isinstance(piece.get("file"), str) and piece["file"].startswith("rank_")
            and piece["file"].endswith(".safetensors") and "/" not in piece["file"] and "\\" not in piece["file"]
            and _is_shape(piece.get("offset")) and _is_shape(piece.get("shape"))
            and len(piece["offset"]) == len(piece["shape"]) == ndim)


def load_shards(model: nn.Module, optimizer: torch.optim.Optimizer | None, path: Path) -> None:
    """Read shards written by any number of processes into a model sharded in any way, or not at all."""
    index = read_index(path)
    state = _state(model, optimizer)
    files: dict[str, Any] = {}
    try:
        for keypath, leaf in _leaves(state):
            key = json.dumps(keypath)
            if not isinstance(leaf, torch.Tensor):
                if key in index["values"]:
                    _set(state, keypath, index["values"][key])
                continue
            entry = index["tensors"].get(key)
            if entry is None:
                raise CheckpointError(f"{path / INDEX}: has no tensor {key[:120]}")
            if entry["shape"] != list(leaf.shape):
                raise CheckpointError(f"{path / INDEX}: {key[:120]} is {entry['shape']}, this model's is "
                                      f"{list(leaf.shape)}")
            _fill(leaf, entry, key, path, files)
    finally:
        for f in files.values():
            f.__exit__(None, None, None)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optim"])


def _fill(leaf: torch.Tensor, entry: dict, key: str, path: Path, files: dict) -> None:
    """Copy into this process's box of `leaf` every stored piece that overlaps it; all of it must be covered."""
    offset, shape, local = _box(leaf)
    covered = 0
    for piece in entry["pieces"]:
        lo = [max(a, b) for a, b in zip(offset, piece["offset"])]
        hi = [min(a + n, b + m) for a, n, b, m in zip(offset, shape, piece["offset"], piece["shape"])]
        if any(h <= low for low, h in zip(lo, hi)):
            continue
        name = piece["file"]
        if name not in files:
            try:
                files[name] = safe_open(str(path / name), framework="pt").__enter__()
            except Exception as e:  # safetensors raises its own error types for a damaged header
                raise CheckpointError(f"{path / name}: unreadable ({str(e)[:200]})") from None
        src = tuple(slice(low - b, h - b) for low, h, b in zip(lo, hi, piece["offset"]))
        dst = tuple(slice(low - a, h - a) for low, h, a in zip(lo, hi, offset))
        try:
            part = files[name].get_slice(key)[src] if src else files[name].get_tensor(key)
        except Exception as e:  # safetensors' own error types: a missing key, a slice past the stored shape
            raise CheckpointError(f"{path / name}: {key[:120]}: {str(e)[:200]}") from None
        if list(part.shape) != [h - low for low, h in zip(lo, hi)]:
            raise CheckpointError(f"{path / name}: {key[:120]} holds {list(part.shape)}, less than its index says")
        with torch.no_grad():
            local[dst].copy_(part)
        covered += part.numel()
    if covered != local.numel():
        raise CheckpointError(f"{path / INDEX}: {key[:120]}: the pieces cover {covered} of this process's "
                              f"{local.numel()} values")
