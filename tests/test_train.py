"""End-to-end training through the library: loss falls, resume, budgets, bad input, the skip of bad steps."""

import json

import pytest
import torch

import gptforge
from gptforge.config import load_config
from gptforge.errors import CheckpointError, DataError
from gptforge.observe.metrics import read_metrics
from gptforge.train import checkpoint
from gptforge.train.loop import train

TINY = ["model.preset=tiny", "train.batch_size=8", "train.max_time=null", "eval.tokens=2048", "train.samples=0",
        "run.tensorboard=false"]


def run(data, run_dir, *extra):
    return train(load_config(None, [*TINY, f"data.dir={data}", f"run.dir={run_dir}", *extra]))


def losses(run_dir):
    return {r["step"]: r["train_loss"] for r in read_metrics(run_dir) if "train_loss" in r}


def test_loss_falls_and_run_is_usable(small_data, tmp_path):
    result = run(small_data, tmp_path / "r", "train.max_steps=120", "eval.every=60", "optim.lr=0.01")
    evals = [r["val_loss"] for r in read_metrics(tmp_path / "r") if "val_loss" in r]
    assert evals[0] > 6.0 and evals[-1] < evals[0] - 1.5, evals
    assert result.step == 120 and (tmp_path / "r" / "config.yaml").is_file()

    model, tok = gptforge.load(tmp_path / "r")
    assert not model.training
    ids = torch.tensor([tok.encode("def f(x):\n    return x")])
    assert model(ids).shape == (1, ids.shape[1], tok.vocab_size)


def test_every_metrics_line_has_its_keys(small_data, tmp_path):
    run(small_data, tmp_path / "r", "train.max_steps=6", "train.log_every=2", "eval.every=3")
    records = read_metrics(tmp_path / "r")
    train_lines = [r for r in records if "train_loss" in r]
    eval_lines = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train_lines] == [2, 4, 6]
    for r in train_lines:
        assert {"step", "tokens", "time_s", "lr", "train_loss", "grad_norm", "tokens_per_sec", "mfu"} <= set(r)
    assert [r["step"] for r in eval_lines] == [0, 3, 6]
    assert all({"val_loss", "val_bpb"} <= set(r) for r in eval_lines)


def test_budgets_stop_the_run(small_data, tmp_path):
    assert run(small_data, tmp_path / "a", "train.max_tokens=4000").step == 8  # 512 tokens a step
    timed = run(small_data, tmp_path / "b", "train.max_time=1.5")
    assert 1.5 <= timed.time_s < 4.0


def test_resume_continues_where_it_stopped(small_data, tmp_path):
    run(small_data, tmp_path / "r", "train.max_steps=4", "train.save_every=2")
    result = run(small_data, tmp_path / "r", "train.max_steps=8", "train.save_every=2")
    assert result.resumed_from == 4 and result.step == 8
    assert [r["step"] for r in read_metrics(tmp_path / "r") if r.get("event") == "resume"] == [4]


def test_runs_saved_in_the_old_config_layout_load_and_resume(small_data, tmp_path):
    """state.json of a run saved before the sections by concern: every key in train, no model.arch."""
    from gptforge.config.load import MIGRATIONS
    from gptforge.fileio import sha256_file

    run(small_data, tmp_path / "r", "train.max_steps=2", "train.save_every=2", "optim.name=adamw", "optim.lr=0.02")
    for ckpt in checkpoint.list_checkpoints(tmp_path / "r" / "checkpoints"):
        state = json.loads((ckpt / "state.json").read_text())
        tree = state["config"]
        del tree["model"]["arch"]
        for old, new in MIGRATIONS.items():
            section, name = new.split(".", 1)
            if old.startswith("train.") and section != "guard":
                tree["train"][old.split(".", 1)[1]] = tree[section].pop(name)
        for section in ("optim", "schedule", "speed", "eval", "finetune"):
            del tree[section]
        (ckpt / "state.json").write_text(json.dumps(state))
        manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
        manifest["files"]["state.json"] = {"bytes": (ckpt / "state.json").stat().st_size,
                                           "sha256": sha256_file(ckpt / "state.json")}
        (ckpt / checkpoint.MANIFEST).write_text(json.dumps(manifest))

    from gptforge.runs import load_run

    loaded = load_run(tmp_path / "r")
    assert loaded.config.optim.name == "adamw" and loaded.config.optim.lr == 0.02 and loaded.config.model.arch == "gpt"
    with pytest.raises(CheckpointError, match="trained with optim.name=adamw"):  # read from the old train.optimizer
        run(small_data, tmp_path / "r", "train.max_steps=4", "optim.name=muon")
    result = run(small_data, tmp_path / "r", "train.max_steps=4", "train.save_every=2", "train.optimizer=adamw")
    assert result.resumed_from == 2 and result.step == 4


def test_resume_refuses_another_model(small_data, tmp_path):
    run(small_data, tmp_path / "r", "train.max_steps=2")
    with pytest.raises(CheckpointError, match="model.n_layer"):
        run(small_data, tmp_path / "r", "train.max_steps=4", "model.n_layer=3")


def test_corrupt_newest_checkpoint_resumes_from_older(small_data, tmp_path, capsys):
    run(small_data, tmp_path / "r", "train.max_steps=4", "train.save_every=2")
    newest = checkpoint.list_checkpoints(tmp_path / "r" / "checkpoints")[0]
    blob = bytearray((newest / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (newest / "model.safetensors").write_bytes(bytes(blob))
    result = run(small_data, tmp_path / "r", "train.max_steps=6", "train.save_every=2")
    assert result.resumed_from == 2
    out = capsys.readouterr().out
    assert "step_00000004 rejected" in out and "model.safetensors" in out
    # The damaged one is kept aside for inspection, never deleted, never counted among the kept.
    assert "moved to" in out and (tmp_path / "r" / "checkpoints" / "rejected" / "step_00000004").is_dir()
    assert checkpoint.verify(tmp_path / "r" / "checkpoints" / "step_00000004") == []


def _damage_all(run_dir):
    for path in checkpoint.list_checkpoints(run_dir / "checkpoints"):
        blob = bytearray((path / "model.safetensors").read_bytes())
        blob[-1] ^= 0xFF
        (path / "model.safetensors").write_bytes(bytes(blob))


def test_all_checkpoints_damaged_never_starts_over_silently(small_data, tmp_path):
    run(small_data, tmp_path / "r", "train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=2")
    _damage_all(tmp_path / "r")
    before = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    with pytest.raises(CheckpointError, match="none is intact.*nothing was changed.*run.start_over=true"):
        run(small_data, tmp_path / "r", "train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=2")
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == before

    result = run(small_data, tmp_path / "r", "train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=2",
                 "run.start_over=true")
    assert result.resumed_from is None and result.step == 4
    kept = [p.name for p in checkpoint.list_checkpoints(tmp_path / "r" / "checkpoints")]
    assert kept == ["step_00000004", "step_00000002"]  # the new ones, not pruned by the damaged ones
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints" / "rejected").iterdir()) == before


def test_data_dir_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        run(tmp_path / "nowhere", tmp_path / "r", "train.max_steps=1")


def test_pickle_in_place_of_a_shard_is_refused(small_data, tmp_path):
    import os
    import pickle
    import shutil

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    shard = sorted(data.glob("train_*.bin"))[0]
    shard.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(DataError, match=shard.name):
        run(data, tmp_path / "r", "train.max_steps=1")
    assert not (tmp_path / "pwned").exists()


def test_init_from_starts_from_the_source_weights(small_data, tmp_path):
    run(small_data, tmp_path / "a", "train.max_steps=10")
    last_a = [r["val_loss"] for r in read_metrics(tmp_path / "a") if "val_loss" in r][-1]
    # the model keys given here are ignored: the model section comes from the source run
    run(small_data, tmp_path / "b", "train.max_steps=2", f"finetune.init_from={tmp_path / 'a'}", "model.n_layer=5")
    first_b = [r["val_loss"] for r in read_metrics(tmp_path / "b") if "val_loss" in r][0]
    assert first_b == last_a
    assert gptforge.load(tmp_path / "b")[0].config.n_layer == 2


def test_weights_only_runs_are_fine_tuned_not_resumed(small_data, tmp_path):
    from gptforge.train.checkpoint import save_weights

    run(small_data, tmp_path / "a", "train.max_steps=2")
    model, _ = gptforge.load(tmp_path / "a")
    with torch.no_grad():
        for block in model.transformer.h:
            w = block.mlp.c_fc.weight
            w[w.abs() < w.abs().median()] = 0.0  # half the weights pruned
    cfg = json.loads((checkpoint.list_checkpoints(tmp_path / "a" / "checkpoints")[0] / "state.json").read_text())["config"]
    save_weights(tmp_path / "w", model, cfg, tokenizer_file=tmp_path / "a" / "tokenizer.json")
    with pytest.raises(CheckpointError, match="weights only"):
        run(small_data, tmp_path / "w", "train.max_steps=4")

    run(small_data, tmp_path / "c", "train.max_steps=4", f"finetune.init_from={tmp_path / 'w'}", "finetune.keep_sparsity=true")
    tuned, _ = gptforge.load(tmp_path / "c")
    for before, after in zip(model.transformer.h, tuned.transformer.h):
        zeros = before.mlp.c_fc.weight == 0
        assert (after.mlp.c_fc.weight[zeros] == 0).all()
        assert not torch.equal(before.mlp.c_fc.weight, after.mlp.c_fc.weight)  # it did train


def test_lora_fine_tune_trains_adapters_only_and_merges_on_load(small_data, tmp_path):
    from safetensors.torch import load_file

    run(small_data, tmp_path / "a", "train.max_steps=4")
    lora = ["finetune.lora.rank=4", "finetune.lora.targets=c_attn,c_fc", f"finetune.init_from={tmp_path / 'a'}",
            "train.save_every=2", "optim.lr=0.01"]
    run(small_data, tmp_path / "b", "train.max_steps=4", *lora)
    run(small_data, tmp_path / "b", "train.max_steps=6", *lora)  # resumes with the adapters in place

    newest = checkpoint.list_checkpoints(tmp_path / "b" / "checkpoints")[0]
    tuned = load_file(str(newest / "model.safetensors"))
    assert any(k.endswith(("lora_A", "lora_B")) for k in tuned)  # the adapters live beside the base weights
    base = load_file(str(checkpoint.list_checkpoints(tmp_path / "a" / "checkpoints")[0] / "model.safetensors"))
    for key, value in base.items():
        assert torch.equal(tuned[key], value), key  # the base model stayed frozen

    merged, tok = gptforge.load(tmp_path / "b")
    original, _ = gptforge.load(tmp_path / "a")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = torch.tensor([tok.encode("def f(x):")])
    assert not torch.allclose(merged(ids), original(ids))


def test_quantization_aware_training_then_quantize(small_data, tmp_path):
    from gptforge.adapt.qat import apply_qat
    from gptforge.adapt.quantize import quantize_run

    run(small_data, tmp_path / "a", "train.max_steps=4")
    run(small_data, tmp_path / "q", "train.max_steps=6", "finetune.qat=int8", f"finetune.init_from={tmp_path / 'a'}")
    quantize_run(tmp_path / "q", tmp_path / "q8", "int8", 64, False)
    trained, _ = gptforge.load(tmp_path / "q")
    quantized, _ = gptforge.load(tmp_path / "q8")
    ids = torch.randint(0, 500, (2, 32))
    # trained with the int8 rounding in the loop, the real int8 model computes what training saw
    apply_qat(trained, "int8")
    trained.eval()
    fake, real = trained(ids), quantized(ids)
    # the int8 CPU kernel takes bf16 activations (W8A16): agreement to bf16 precision of the logits
    torch.testing.assert_close(real, fake, rtol=0, atol=2e-2 * fake.abs().max().item())


def test_lora_and_qat_together_are_refused():
    from gptforge.errors import ConfigError

    with pytest.raises(ConfigError, match="finetune.qat"):
        load_config(None, ["finetune.lora.rank=4", "finetune.qat=int8"])


class _Payload:
    marker = None

    def __reduce__(self):
        import os

        return (os.system, (f"touch {_Payload.marker}",))


def test_a_pickle_planted_in_a_checkpoint_never_runs_in_train_or_load(small_data, tmp_path, capsys):
    import pickle

    run(small_data, tmp_path / "r", "train.max_steps=4", "train.save_every=2")
    newest = checkpoint.list_checkpoints(tmp_path / "r" / "checkpoints")[0]
    _Payload.marker = tmp_path / "pwned"
    (newest / "dcp").mkdir()
    (newest / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload()))
    gptforge.load(tmp_path / "r")  # load, sample and eval read runs this way
    result = run(small_data, tmp_path / "r", "train.max_steps=6", "train.save_every=2")
    assert result.resumed_from == 2 and not _Payload.marker.exists()
    assert "dcp/.metadata: not listed in the manifest" in capsys.readouterr().out


@pytest.mark.parametrize("shape", [["model.n_embd=1000000", "model.n_head=1000"], ["model.n_layer=100000"]])
def test_a_model_that_cannot_fit_is_refused_before_any_work(small_data, tmp_path, shape):
    from gptforge.errors import ConfigError

    with pytest.raises(ConfigError, match="parameters, whose fp32 weights, gradients and one optimizer moment"):
        run(small_data, tmp_path / "r", "train.max_steps=1", *shape)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_checkpoint_that_passes_its_checks_but_will_not_load_is_passed_over(small_data, tmp_path, monkeypatch):
    """Whatever still fails at load time (a torch reader refusing a file, say) costs that checkpoint only."""
    run(small_data, tmp_path / "r", "train.max_steps=4", "train.save_every=2")
    real = checkpoint.load_weights

    def load_weights(model, path):
        if path.name == "step_00000004":
            raise CheckpointError(f"{path}/model.safetensors: cannot be loaded into this model (simulated)")
        real(model, path)

    monkeypatch.setattr(checkpoint, "load_weights", load_weights)
    reports = []
    from gptforge.runs import load_run

    assert load_run(tmp_path / "r", report=reports.append).checkpoint.name == "step_00000002"
    assert "step_00000004 rejected" in reports[0] and "simulated" in reports[0]
    result = run(small_data, tmp_path / "r", "train.max_steps=6", "train.save_every=2")
    assert result.resumed_from == 2 and result.step == 6
    assert (tmp_path / "r" / "checkpoints" / "rejected" / "step_00000004").is_dir()
