import json
import os
import pickle

import pytest
import torch

from gptforge.config import load_config
from gptforge.errors import CheckpointError
from gptforge.model.gpt import GPT
from gptforge.parallel.distribute import full_optimizer_state, load_optimizer_state
from gptforge.parallel.world import World
from gptforge.fileio import sha256_file
from gptforge.train import checkpoint


CONFIG = load_config(None, ["model.vocab_size=64", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
                             "model.block_size=8", "eval.tokens=64"])


def Tied() -> GPT:
    """A one-layer GPT whose head is its token embedding."""
    return GPT(CONFIG.model)


def _trained(seed=0):
    torch.manual_seed(seed)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.arange(5)[None])[0].sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save(tmp_path, step, keep=5):
    model, opt = _trained(step)
    optim = full_optimizer_state(model, opt)
    state = {"step": step, "tokens": 0, "config": CONFIG.to_dict()}
    return checkpoint.save_checkpoint(tmp_path, step, model=model, optimizer=optim, state=state, keep=keep), model, opt


def test_round_trip_is_exact(tmp_path):
    path, model, opt = _save(tmp_path, 7)
    assert path.name == "step_00000007" and checkpoint.verify(path) == []
    fresh = Tied()
    checkpoint.load_weights(fresh, path)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.lm_head.weight is fresh.transformer.wte.weight  # the tie survives
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    load_optimizer_state(fresh, opt2, checkpoint.read_optimizer(path, checkpoint.read_state(path)), World())
    before, after = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert before.keys() == after.keys()
    for idx in before:
        for key in before[idx]:
            assert torch.equal(before[idx][key], after[idx][key])
    assert opt2.param_groups[0]["betas"] == opt.param_groups[0]["betas"]


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "state.json"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_newest_falls_back_to_older(tmp_path, name, damage):
    _save(tmp_path, 1)
    newest, _, _ = _save(tmp_path, 2)
    file = newest / name
    data = bytearray(file.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) - 3]
    file.write_bytes(bytes(data))
    reports = []
    latest = checkpoint.find_latest(tmp_path, report=reports.append)
    assert latest.name == "step_00000001"
    assert len(reports) == 1 and name in reports[0] and "step_00000002" in reports[0]
    with pytest.raises(CheckpointError, match=name):
        checkpoint.resolve(newest)


def test_half_written_folders_are_never_checkpoints(tmp_path):
    _save(tmp_path, 1)
    root = checkpoint.checkpoint_root(tmp_path)
    partial = root / ".tmp-step_00000002-999999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"partial")
    no_manifest = root / "step_00000003"
    no_manifest.mkdir()
    (no_manifest / "model.safetensors").write_bytes(b"x")
    reports = []
    assert checkpoint.find_latest(tmp_path, report=reports.append).name == "step_00000001"
    assert "manifest.json" in reports[0] and "never completed" in reports[0]


def test_keeps_only_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    names = [p.name for p in checkpoint.list_checkpoints(checkpoint.checkpoint_root(tmp_path))]
    assert names == ["step_00000004", "step_00000003"]


def test_same_step_saved_twice_stays_intact(tmp_path):
    _save(tmp_path, 5)
    path, _, _ = _save(tmp_path, 5)
    assert checkpoint.verify(path) == []


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {Payload.marker}",))


def test_pickle_payload_never_runs(tmp_path):
    path, _, _ = _save(tmp_path, 1)
    Payload.marker = tmp_path / "pwned"
    evil = pickle.dumps({"weight": Payload()})
    (path / "model.safetensors").write_bytes(evil)
    # An attacker who also rewrites the manifest gets past the checksum, and still cannot run code.
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {"bytes": len(evil), "sha256": sha256_file(path / "model.safetensors")}
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert any("model.safetensors: not a readable safetensors file" in p for p in checkpoint.verify(path))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        checkpoint.load_weights(Tied(), path)
    assert not Payload.marker.exists()


# ----------------------------------------------------------------------------------------------------------
# What verify() refuses besides damaged bytes: planted files, paths that leave the folder, links, and
# contents that pass their hashes but make no sense. Each is reported and the older intact one is used.


def _reseal(path):
    """Rewrite the manifest to match the folder, as an attacker who edits files would."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {p.relative_to(path).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                         for p in sorted(path.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    (path / "manifest.json").write_text(json.dumps(manifest))


def _falls_back(tmp_path, *words):
    """The newest checkpoint is rejected with a report holding `words`, and step 1 is used instead."""
    reports = []
    assert checkpoint.find_latest(tmp_path, report=reports.append).name == "step_00000001"
    assert len(reports) == 1, reports
    for word in words:
        assert word in reports[0], reports[0]
    return reports[0]


def test_planted_dcp_metadata_is_reported_and_never_unpickled(tmp_path):
    from gptforge.runs import load_run

    _save(tmp_path, 1)
    newest, _, _ = _save(tmp_path, 2)
    Payload.marker = tmp_path / "pwned"
    (newest / "dcp").mkdir()
    (newest / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload()))
    _falls_back(tmp_path, "dcp/.metadata", "not listed in the manifest")
    with pytest.raises(CheckpointError, match="not listed"):
        load_run(newest)
    assert load_run(tmp_path, report=lambda _: None).checkpoint.name == "step_00000001"
    assert not Payload.marker.exists()


def _sharded(tmp_path, step=3):
    """A trained model and optimizer, saved as a one-process sharded checkpoint."""
    from gptforge.parallel.shards import save_shards

    model, opt = _trained(step)
    staged = checkpoint.staging_dir(tmp_path, step, tag="sharded")
    staged.mkdir(parents=True)
    save_shards(model, opt, staged / "shards")
    path = checkpoint.save_checkpoint(tmp_path, step, model=None, optimizer=None, staged=staged,
                                      state={"step": step, "tokens": 0, "config": CONFIG.to_dict()})
    return path, model, opt


def test_a_sharded_checkpoint_is_safetensors_and_json_and_loads_with_no_unpickler(tmp_path, monkeypatch):
    """Weights and optimizer state round-trip exactly while every way to unpickle raises; the non-tensor
    values (learning rate, betas) are JSON in the index."""
    from gptforge.parallel.shards import load_shards
    from gptforge.runs import load_run

    path, model, opt = _sharded(tmp_path)
    assert checkpoint.is_sharded(path) and checkpoint.verify(path) == []
    assert sorted(p.name for p in (path / "shards").iterdir()) == ["index.json", "rank_00000.safetensors"]
    index = json.loads((path / "shards" / "index.json").read_text())
    assert index["values"]['["optim", "param_groups", 0, "lr"]'] == 0.01
    assert index["values"]['["optim", "param_groups", 0, "betas"]'] == [0.9, 0.999]

    def refuse(*args, **kwargs):
        raise AssertionError("a sharded checkpoint was unpickled")

    for target in ("pickle.load", "pickle.loads", "pickle.Unpickler", "torch.load"):
        monkeypatch.setattr(target, refuse)
    loaded = load_run(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    fresh = Tied()
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=0.5, betas=(0.1, 0.2))
    load_shards(fresh, opt2, path / "shards")
    before, after = opt.state_dict(), opt2.state_dict()
    for idx in before["state"]:
        for key, value in before["state"][idx].items():
            assert torch.equal(value, after["state"][idx][key]), (idx, key)
    assert after["param_groups"][0]["lr"] == 0.01 and after["param_groups"][0]["betas"] == (0.9, 0.999)


def test_a_damaged_shard_index_is_refused_and_nothing_runs(tmp_path):
    """An index replaced by a pickle, or one whose pieces no longer cover a tensor, each resealed into the
    manifest: a clear refusal, never an unpickle."""
    from gptforge.runs import load_run

    path, _, _ = _sharded(tmp_path)
    index_file = path / "shards" / "index.json"
    good = index_file.read_text()
    Payload.marker = tmp_path / "pwned"
    index_file.write_bytes(pickle.dumps(Payload()))
    _reseal(path)
    with pytest.raises(CheckpointError, match="not a shard index"):
        load_run(path)
    assert not Payload.marker.exists()

    index = json.loads(good)
    key = '["model", "transformer.wte.weight"]'
    index["tensors"][key]["pieces"][0]["shape"][0] -= 1  # the piece no longer reaches the last row
    index_file.write_text(json.dumps(index))
    _reseal(path)
    with pytest.raises(CheckpointError, match="the pieces cover"):
        load_run(path)
    index["tensors"][key]["pieces"][0]["file"] = "../../model.safetensors"
    index_file.write_text(json.dumps(index))
    _reseal(path)
    with pytest.raises(CheckpointError, match="expected a shape and pieces"):
        load_run(path)


def test_a_sharded_manifest_needs_a_state_that_says_sharded(tmp_path):
    """shards/ is read only where manifest and state.json agree: a state.json without the layout (or saying
    full) beside a resealed sharded manifest is a damaged checkpoint."""
    path, _, _ = _sharded(tmp_path)
    state = json.loads((path / "state.json").read_text())
    assert state.pop("layout") == "sharded" and checkpoint.verify(path) == []
    (path / "state.json").write_text(json.dumps(state))
    _reseal(path)
    assert any("layout is 'full' but the manifest lists a sharded checkpoint" in p for p in checkpoint.verify(path))


def test_a_checkpoint_in_torch_distributed_checkpoint_format_is_refused_unread(tmp_path):
    """Sharded checkpoints were once written by torch.distributed.checkpoint, whose files are pickles: one
    listed in its manifest is refused by name before any of its files is opened."""
    _save(tmp_path, 1)
    newest, _, _ = _save(tmp_path, 2)
    (newest / "model.safetensors").unlink()
    Payload.marker = tmp_path / "pwned"
    (newest / "dcp").mkdir()
    (newest / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload()))
    (newest / "dcp" / "__0_0.distcp").write_bytes(pickle.dumps(Payload()))
    _reseal(newest)
    _falls_back(tmp_path, "torch.distributed.checkpoint's format", "reads no pickle")
    assert not Payload.marker.exists()


def test_shardedness_comes_from_the_manifest_not_the_folder(tmp_path):
    path, _, _ = _save(tmp_path, 1)
    assert not checkpoint.is_sharded(path)
    assert json.loads((path / "state.json").read_text())["layout"] == "full"


@pytest.mark.parametrize("name", ["../../../../etc/hostname", "/etc/hostname", "shards/../../x", "a/b", "..", ".hidden"])
def test_manifest_entries_stay_inside_the_folder(tmp_path, monkeypatch, name):
    _save(tmp_path, 1)
    newest, _, _ = _save(tmp_path, 2)
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": 1, "sha256": "0" * 64}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    read = []
    monkeypatch.setattr(checkpoint, "sha256_file", lambda p: read.append(str(p)) or sha256_file(p))
    _falls_back(tmp_path, "not a plain file name")
    assert not any(name.strip("./") in r for r in read if "step_00000002" in r and name not in ("..", ".hidden"))
    assert not any("hostname" in r for r in read)


def test_a_listed_file_that_links_outside_is_refused(tmp_path):
    _save(tmp_path, 1)
    newest, _, _ = _save(tmp_path, 2)
    outside = tmp_path / "outside.json"
    outside.write_text((newest / "state.json").read_text())
    (newest / "state.json").unlink()
    (newest / "state.json").symlink_to(outside)
    _falls_back(tmp_path, "state.json", "symbolic link")


def test_a_checkpoint_folder_that_is_a_link_is_refused(tmp_path):
    _save(tmp_path, 1)
    elsewhere = tmp_path / "elsewhere"
    other, _, _ = _save(elsewhere, 2)
    (checkpoint.checkpoint_root(tmp_path) / "step_00000002").symlink_to(other)
    _falls_back(tmp_path, "step_00000002", "symbolic link")


def _tamper_state(path, change):
    state = json.loads((path / "state.json").read_text())
    state = change(state)
    (path / "state.json").write_text(json.dumps(state, allow_nan=True))
    _reseal(path)


def _put(key, value):
    def change(state):
        state[key] = value
        return state
    return change


def _drop(key):
    def change(state):
        del state[key]
        return state
    return change


@pytest.mark.parametrize("change, words", [
    (lambda s: [], ["expected an object"]),
    (_drop("config"), ["config: missing"]),
    (_put("step", "thirty"), ["step: expected a whole number"]),
    (_put("step", 1), ["step: 1 does not match the folder's step 2"]),
    (_put("tokens", -5), ["tokens: expected a whole number >= 0"]),
    (_put("time_s", float("nan")), ["time_s: expected a finite number"]),
    (_put("rng", "garbage"), ["rng: expected an object of RNG states"]),
    (_put("rng", {"0": {"python": [3, [0] * 625, None], "numpy": {"keys": [1, 2], "pos": 0}, "torch": "AA=="}}),
     ["rng: rank '0': numpy"]),
    (_put("loader", {"mode": "random", "rng": "x"}), ["loader: expected mode random"]),
    (_put("world_size", 0), ["world_size: expected a whole number >= 1"]),
    (_put("format", "something-else"), ["format: expected"]),
    (_put("config", {"model": {"n_layer": "many"}}), ["config: ", "model.n_layer: expected an integer"]),
    (_put("config", {**CONFIG.to_dict(), "model": {**CONFIG.to_dict()["model"], "n_embd": 32}}),
     ["model.safetensors", "attn.c_proj.weight' has shape [16, 16], the config's model [32, 32]"]),
    (_put("layout", "sharded"), ["layout is 'sharded' but the manifest lists a full checkpoint"]),
])
def test_state_json_is_checked_after_its_hash(tmp_path, change, words):
    _save(tmp_path, 1)
    newest, _, _ = _save(tmp_path, 2)
    _tamper_state(newest, change)
    _falls_back(tmp_path, *(words if "shape" in words[-1] else ["state.json", *words]))


@pytest.mark.parametrize("manifest, words", [
    ({"format": "gptforge-checkpoint", "files": ["state.json"]}, ['"files" object']),
    ({"files": {"state.json": 5}}, ["files['state.json']", "expected {"]),
    ({"files": {"state.json": {"bytes": -1, "sha256": "0" * 64}}}, ["expected {"]),
    ([], ['"files" object']),
])
def test_manifest_is_checked_against_its_schema(tmp_path, manifest, words):
    _save(tmp_path, 1)
    newest, _, _ = _save(tmp_path, 2)
    (newest / "manifest.json").write_text(json.dumps(manifest))
    _falls_back(tmp_path, "manifest.json", *words)


def _tamper_weights(path, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"))
    _reseal(path)


@pytest.mark.parametrize("change, words", [
    (lambda t: t["transformer.h.0.mlp.c_fc.weight"].fill_(float("nan")), ["c_fc.weight", "NaN"]),
    (lambda t: t.pop("transformer.h.0.mlp.c_fc.weight"), ["missing tensors", "c_fc.weight"]),
    (lambda t: t.update({"transformer.h.0.mlp.c_fc.weight": torch.zeros(3, 3)}), ["c_fc.weight", "shape [3, 3]"]),
    (lambda t: t.update({"stray.weight": torch.zeros(1)}), ["'stray.weight' is not in this config's model"]),
])
def test_weights_are_checked_after_their_hash(tmp_path, change, words):
    from gptforge.runs import load_run

    _save(tmp_path, 1)
    newest, _, _ = _save(tmp_path, 2)
    _tamper_weights(newest, change)
    _falls_back(tmp_path, "model.safetensors", *words)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_run(newest)


def test_a_config_too_large_for_the_machine_is_refused_before_building(tmp_path):
    _save(tmp_path, 1)
    newest, _, _ = _save(tmp_path, 2)
    _tamper_state(newest, _put("config", {**CONFIG.to_dict(), "model": {**CONFIG.to_dict()["model"], "n_layer": 100000,
                                                                        "n_embd": 512, "n_head": 8}}))
    _falls_back(tmp_path, "state.json", "parameters", "GiB", "choose a smaller model")


def test_unlisted_files_are_reported(tmp_path):
    _save(tmp_path, 1)
    newest, _, _ = _save(tmp_path, 2)
    (newest / "notes.txt").write_text("hello")
    _falls_back(tmp_path, "notes.txt", "not listed in the manifest")


@pytest.mark.parametrize("change, words", [
    (lambda t: t.update({"state.transformer.h.0.mlp.c_fc.weight.exp_avg": torch.zeros(2, 2)}), ["has shape [2, 2]"]),
    (lambda t: t.update({"state.no.such.param.exp_avg": torch.zeros(1)}), ["not the state of a parameter"]),
    (lambda t: t["state.transformer.h.0.mlp.c_fc.weight.exp_avg"].fill_(float("inf")), ["NaN or infinite"]),
])
def test_optimizer_state_is_checked_after_its_hash(tmp_path, change, words):
    from safetensors.torch import load_file, save_file

    _save(tmp_path, 1)
    newest, _, _ = _save(tmp_path, 2)
    tensors = load_file(str(newest / "optimizer.safetensors"))
    change(tensors)
    save_file(tensors, str(newest / "optimizer.safetensors"))
    _reseal(newest)
    _falls_back(tmp_path, "optimizer.safetensors", *words)
