import json
import os
import pickle

import pytest
import torch
from torch import nn

from gptforge.errors import CheckpointError
from gptforge.parallel.distribute import full_optimizer_state, load_optimizer_state
from gptforge.parallel.world import World
from gptforge.fileio import sha256_file
from gptforge.train import checkpoint


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.emb.weight


def _trained(seed=0):
    torch.manual_seed(seed)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model.head(model.mid(model.emb(torch.arange(5)))).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save(tmp_path, step, keep=5):
    model, opt = _trained(step)
    optim = full_optimizer_state(model, opt)
    return checkpoint.save_checkpoint(tmp_path, step, model=model, optimizer=optim, state={"step": step}, keep=keep), model, opt


def test_round_trip_is_exact(tmp_path):
    path, model, opt = _save(tmp_path, 7)
    assert path.name == "step_00000007" and checkpoint.verify(path) == []
    fresh = Tied()
    checkpoint.load_weights(fresh, path)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.head.weight is fresh.emb.weight  # the tie survives
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
    assert checkpoint.verify(path) == []
    with pytest.raises(CheckpointError, match="model.safetensors"):
        checkpoint.load_weights(Tied(), path)
    assert not Payload.marker.exists()
