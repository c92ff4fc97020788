"""The speed switches: activation checkpointing (same numbers, same names), compile_mode, sync_free (same
losses, non-finite steps skipped on the device) and fp8's errors where it cannot run."""

import copy
import sys
import types

import pytest
import torch

from gptforge.config import load_config
from gptforge.errors import ConfigError
from gptforge.model.gpt import GPT
from gptforge.observe.metrics import read_metrics
from gptforge.train import techniques as apply
from gptforge.train.techniques import apply_activation_checkpointing, apply_compile, check_fp8, checkpointed_blocks
from gptforge.parallel.world import World
from gptforge.train.guard import Guard
from gptforge.train.loop import train
from gptforge.train.step import Stepper, masked_step
from gptforge.train.optim import build_optimizer
from gptforge.runtime import Precision

TINY = ["model.preset=tiny", "train.batch_size=4", "train.max_time=null", "eval.tokens=256", "train.samples=0",
        "run.tensorboard=false", "speed.precision=fp32"]


def run(data, run_dir, *extra):
    return train(load_config(None, [*TINY, f"data.dir={data}", f"run.dir={run_dir}", *extra]))


def losses(run_dir):
    return [r["train_loss"] for r in read_metrics(run_dir) if "train_loss" in r]


def tiny_gpt(n_layer=3, dropout=0.1):
    cfg = load_config(None, ["model.preset=tiny", f"model.n_layer={n_layer}", "model.vocab_size=256",
                             f"model.dropout={dropout}", "model.block_size=16", "eval.tokens=16"])
    torch.manual_seed(0)
    return GPT(cfg.model), cfg


# ----------------------------------------------------------------------------------------------------------
# Activation checkpointing


def test_checkpointing_chooses_blocks():
    assert checkpointed_blocks(5, "none") == []
    assert checkpointed_blocks(5, "selective") == [0, 2, 4]
    assert checkpointed_blocks(5, "full") == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        checkpointed_blocks(5, "some")


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_checkpointing_keeps_names_numbers_and_checkpoints(mode):
    plain, _ = tiny_gpt()
    wrapped = apply_activation_checkpointing(copy.deepcopy(plain), mode)
    assert [apply.is_checkpointed(b) for b in wrapped.transformer.h] == [i in checkpointed_blocks(3, mode) for i in range(3)]
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in plain.named_parameters()]

    x, y = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    torch.manual_seed(1)
    loss_plain = plain(x, y)
    loss_plain.backward()
    torch.manual_seed(1)
    loss_wrapped = wrapped(x, y)  # dropout: the recomputation must replay the same masks
    loss_wrapped.backward()
    assert loss_wrapped.item() == loss_plain.item()
    for (name, p), q in zip(plain.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-7, msg=name)

    # checkpoints load either way, and a copy stays checkpointed
    fresh = apply_activation_checkpointing(GPT(plain.config), mode)
    fresh.load_state_dict(plain.state_dict())
    plain.load_state_dict(copy.deepcopy(fresh).state_dict())
    assert apply.is_checkpointed(copy.deepcopy(wrapped).transformer.h[0])
    assert apply_activation_checkpointing(wrapped, mode) is wrapped  # idempotent


def test_checkpointing_modes_train_to_the_same_losses_and_resume_across(small_data, tmp_path):
    steps = ["train.max_steps=4", "train.log_every=1", "model.dropout=0.1", "model.n_layer=3"]
    reference = run(small_data, tmp_path / "none", *steps)
    for mode in ("selective", "full"):
        run(small_data, tmp_path / mode, *steps, f"speed.activation_checkpointing={mode}")
        assert losses(tmp_path / mode) == pytest.approx(losses(tmp_path / "none"), abs=1e-6)
    # a run saved with checkpointing resumes without it (same parameter names)
    resumed = run(small_data, tmp_path / "full", *steps[1:], "train.max_steps=5")
    assert resumed.resumed_from == 4 and reference.step == 4


# ----------------------------------------------------------------------------------------------------------
# compile_mode


def test_compile_mode_reaches_torch_compile(monkeypatch, small_data):
    seen = []
    monkeypatch.setattr(apply.torch, "compile", lambda model, mode=None: seen.append(mode) or model)
    from gptforge.train.builder import build

    model = torch.nn.Linear(2, 2)
    assert apply_compile(model, False, "max-autotune") is model and seen == []
    apply_compile(model, True, "default")
    cfg = load_config(None, [*TINY, f"data.dir={small_data}", "train.max_steps=1", "train.device=cpu",
                             "speed.compile=true", "speed.compile_mode=reduce-overhead"])
    build(cfg, World()).close()  # the builder compiles what distribute returned, in speed.compile_mode
    assert seen == [None, "reduce-overhead"]
    with pytest.raises(ConfigError, match="speed.compile_mode"):
        load_config(None, ["speed.compile_mode=fast"])


# ----------------------------------------------------------------------------------------------------------
# sync_free


def test_sync_free_trains_to_the_same_losses_and_weights(small_data, tmp_path):
    import gptforge

    steps = ["train.max_steps=6", "train.log_every=3", "eval.every=0", "train.save_every=0",
             "run.deterministic=true"]
    run(small_data, tmp_path / "default", *steps)
    run(small_data, tmp_path / "sync_free", *steps, "speed.sync_free=true")
    assert losses(tmp_path / "sync_free") == losses(tmp_path / "default")
    a, _ = gptforge.load(tmp_path / "default")
    b, _ = gptforge.load(tmp_path / "sync_free")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def optimizer_snapshot(optimizer):
    return {i: {k: v.clone() for k, v in optimizer.state[p].items()}
            for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]) if p in optimizer.state}


def assert_same_state(before, optimizer):
    after = optimizer_snapshot(optimizer)
    assert before.keys() == after.keys()
    for i, state in before.items():
        for key, value in state.items():
            assert torch.equal(value, after[i][key]), (i, key)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_sync_free_skips_an_injected_nan_on_the_device(optimizer):
    model, cfg = tiny_gpt(n_layer=2, dropout=0.0)
    overrides = [f"optim.name={optimizer}", "speed.sync_free=true", "train.log_every=10", "eval.every=0",
                 "train.save_every=0", "debug.inject_nan_at_step=2", "model.preset=tiny", "model.n_layer=2",
                 "model.block_size=16", "eval.tokens=16", "model.vocab_size=256"]
    cfg = load_config(None, overrides)
    opt = build_optimizer(model, cfg.optim, "cpu")
    guard = Guard(cfg.guard)
    stepper = Stepper(model, model, opt, None, Precision("fp32", "cpu"), World(), cfg, [], guard)
    batch = [(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16)))]

    loss, grad_norm, reason = stepper.step(batch, 1.0, 1)
    assert torch.is_tensor(loss) and reason is None  # nothing read back between log steps
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = optimizer_snapshot(opt)
    loss, grad_norm, reason = stepper.step(batch, 1.0, 2)  # the injected NaN
    assert not torch.isfinite(loss)
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert_same_state(state, opt)

    stepper.step(batch, 1.0, 3)
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, weights["transformer.h.0.mlp.c_fc.weight"])
    loss, grad_norm, reason = stepper.step(batch, 1.0, 10)  # a log step reads the counters back
    assert isinstance(loss, float) and reason is None
    assert stepper.device_skips == 1 and guard.consecutive == 0


@pytest.mark.parametrize("fused", [False, True])
def test_masked_step_skips_and_applies_exactly(fused):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 4))
    reference = torch.nn.Parameter(p.detach().clone())
    opt = torch.optim.AdamW([p], lr=0.1, fused=fused)
    ref_opt = torch.optim.AdamW([reference], lr=0.1)
    grads = [torch.randn(4, 4) for _ in range(3)]

    p.grad = torch.full((4, 4), float("nan"))
    masked_step(opt, torch.tensor(False))  # a skipped first step: state as if never stepped
    assert torch.equal(p, reference) and not hasattr(opt, "found_inf")
    for g in grads:
        p.grad, reference.grad = g.clone(), g.clone()
        masked_step(opt, torch.tensor(True))
        ref_opt.step()
        before, state = p.detach().clone(), optimizer_snapshot(opt)
        p.grad = g * float("inf")
        masked_step(opt, torch.tensor(False))
        assert torch.equal(p, before)
        assert_same_state(state, opt)
    torch.testing.assert_close(p, reference, rtol=0, atol=1e-6)
    assert opt.state[p]["step"].item() == 3


def test_sync_free_run_reports_device_skips(small_data, tmp_path):
    run(small_data, tmp_path / "r", "train.max_steps=4", "train.log_every=4", "speed.sync_free=true",
        "debug.inject_nan_at_step=2")
    records = read_metrics(tmp_path / "r")
    skips = [r for r in records if r.get("event") == "skip_nonfinite"]
    assert [(r["step"], r["on_device"]) for r in skips] == [(4, 1)]


# ----------------------------------------------------------------------------------------------------------
# fp8


def fake_torchao(monkeypatch, convert=None):
    ao, float8 = types.ModuleType("torchao"), types.ModuleType("torchao.float8")
    float8.convert_to_float8_training = convert or (lambda model, module_filter_fn=None: model)
    ao.float8 = float8
    monkeypatch.setitem(sys.modules, "torchao", ao)
    monkeypatch.setitem(sys.modules, "torchao.float8", float8)


def test_fp8_without_torchao_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(ConfigError, match=r"pip install 'gptforge\[fp8\]'"):
        check_fp8(torch.device("cuda", 0))


def test_fp8_needs_a_recent_cuda_gpu(monkeypatch):
    fake_torchao(monkeypatch)
    with pytest.raises(ConfigError, match="CUDA GPU"):
        check_fp8(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ConfigError, match=r"fp8 needs Hopper/Ada \(sm_89\+\)"):
        check_fp8(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8(torch.device("cuda", 0))


def test_fp8_is_refused_before_any_data_work(tmp_path):
    with pytest.raises(ConfigError, match="speed.fp8"):  # not a DataError about the missing directory
        run(tmp_path / "nowhere", tmp_path / "r", "train.max_steps=1", "speed.fp8=true", "train.device=cpu")
    with pytest.raises(ConfigError, match="speed.fp8"):
        load_config(None, ["speed.fp8=true", "finetune.qat=int8"])


def test_fp8_converts_the_eligible_linear_layers(monkeypatch):
    chosen = []

    def convert(model, module_filter_fn=None):
        for fqn, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and module_filter_fn(module, fqn):
                chosen.append(fqn)
        return model

    fake_torchao(monkeypatch, convert)
    model, _ = tiny_gpt(n_layer=1)
    model.transformer.h[0].mlp.c_proj = torch.nn.Linear(24, 64)  # 24 is no multiple of 16
    apply.apply_fp8(model)
    assert chosen == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc"]
