"""The one builder: its fixed order, its use by every command that trains, and the registries it reads."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import gptforge
from gptforge.config import load_config
from gptforge.parallel.world import World
from gptforge.train import builder
from gptforge.train.loop import train
from gptforge.train.resume import find_resume

SRC = Path(gptforge.__file__).parent
TINY = ["model.preset=tiny", "train.batch_size=4", "train.max_time=null", "eval.tokens=256", "train.samples=0",
        "run.tensorboard=false", "speed.precision=fp32", "train.device=cpu"]


def config(data, run_dir, *extra):
    return load_config(None, [*TINY, f"data.dir={data}", f"run.dir={run_dir}", *extra])


def test_builder_applies_everything_in_its_documented_order(small_data, tmp_path, monkeypatch):
    train(config(small_data, tmp_path / "r", "train.max_steps=2"))
    resume = find_resume(tmp_path / "r", report=print)
    calls = []

    def record(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        monkeypatch.setattr(builder, fn.__name__, wrapped)

    for name, fn in [("weights", builder._initial_model), ("adapters", builder.apply_adapters),
                     ("kernels and noise", builder._apply_kernels_and_noise),
                     ("activation checkpointing", builder.apply_activation_checkpointing),
                     ("batch size", builder.resolve_batch_size), ("distribute", builder.distribute),
                     ("compile", builder.apply_compile), ("optimizer", builder.build_optimizer),
                     ("restored state", builder.restore)]:
        record(name, fn)
    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(calls[-1]) or self)
    cfg = config(small_data, tmp_path / "r", "train.max_steps=4", "train.batch_size=auto",
                 "speed.activation_checkpointing=full", "speed.compile=false")
    t = builder.build(cfg, World(), resume=resume)
    t.close()
    assert calls == ["weights", "adapters", "kernels and noise", "activation checkpointing", "batch size",
                     "distribute", "compile", "optimizer", "restored state"]
    assert moved[0] == "kernels and noise"  # the model moved to its device between those stages
    assert t.cfg.train.batch_size == 4  # a resumed run keeps the batch size its saved config holds


def _calls_of(name: str) -> set[str]:
    """The modules under src/gptforge that call `name(...)`."""
    found = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                fn = node.func
                called = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else None
                if called == name:
                    found.add(path.relative_to(SRC).as_posix())
    return found


@pytest.mark.parametrize("name", ["build_optimizer", "Stepper", "distribute", "apply_compile", "TokenLoader"])
def test_only_the_builder_assembles_a_training_step(name):
    assert _calls_of(name) == {"train/builder.py"}


def test_every_training_command_goes_through_the_builder():
    for module in ("train/loop.py", "train/lr_find.py", "bench/step.py", "observe/doctor.py"):
        tree = ast.parse((SRC / module).read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.module == "gptforge.train.builder" for alias in node.names}
        assert "build" in imported, module
    # tune trains through train(), and bench --ablate through bench(): both reach the builder from there
    assert "train" in (SRC / "tune.py").read_text() and "step.bench(" in (SRC / "bench/ablate.py").read_text()


def test_start_banner_names_the_budgets_in_force(small_data, tmp_path, capsys):
    train(config(small_data, tmp_path / "r", "train.max_steps=2", "train.max_tokens=100000"))
    out = " ".join(capsys.readouterr().out.split())
    assert "budget: stops at 2 steps (train.max_steps) or 100,000 tokens (train.max_tokens), whichever" in out
    no_time = [k for k in TINY if not k.startswith("train.max_time")]  # nothing said about time
    train(load_config(None, [*no_time, f"data.dir={small_data}", f"run.dir={tmp_path / 's'}", "train.max_steps=2"]))
    out = " ".join(capsys.readouterr().out.split())
    assert "budget: stops at 2 steps (train.max_steps) " in out and "max_time" not in out  # no default 300 s


def test_a_new_optimizer_is_one_registry_entry(small_data, tmp_path, monkeypatch):
    from gptforge.train import optim

    def sgd(model, cfg, device_type):
        return torch.optim.SGD([{"params": [p for p in model.parameters() if p.requires_grad], "base_lr": cfg.lr}],
                               lr=cfg.lr)

    monkeypatch.setitem(optim.OPTIMIZERS, "sgd", optim.OptimizerEntry(sgd))
    cfg = config(small_data, tmp_path / "r", "train.max_steps=2", "optim.name=sgd")  # the choices follow
    t = builder.build(cfg, World())
    try:
        before = [p.detach().clone() for p in t.raw_model.parameters()]
        loss, _, skipped = t.stepper.step(t.loader.next_step(), 1.0, 1)
    finally:
        t.close()
    assert isinstance(t.optimizer, torch.optim.SGD) and skipped is None
    assert any(not torch.equal(a, b) for a, b in zip(before, t.raw_model.parameters()))
    with pytest.raises(Exception, match="optim.name: 'rmsprop' is not one of: adamw, muon, sgd"):
        config(small_data, tmp_path / "r", "optim.name=rmsprop")


def test_model_arch_picks_from_the_registry(monkeypatch):
    from gptforge import model

    assert type(model.build_model(load_config(None, ["model.preset=tiny"]).model)).__name__ == "GPT"
    assert type(model.build_model(load_config(None, ["model.arch=lstm"]).model)).__name__ == "RecurrentLM"
    assert type(model.build_model(load_config(None, ["model.arch=cnn"]).model)).__name__ == "ResNet"
    with pytest.raises(Exception, match="model.arch: 'rnn' is not one of: gpt, lstm, gru, cnn"):
        load_config(None, ["model.arch=rnn"])
