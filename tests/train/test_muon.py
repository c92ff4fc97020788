"""Muon: Newton-Schulz against an SVD, the parameter groups, training, accumulation, bitwise resume, and
the same losses under DDP and FSDP2 (2 CPU processes) as in one process."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from gptforge.config import OptimConfig, load_config
from gptforge.errors import CheckpointError
from gptforge.model.gpt import GPT, GPTConfig
from gptforge.observe.metrics import read_metrics
from gptforge.parallel.world import World
from gptforge.train import checkpoint
from gptforge.train.loop import train
from gptforge.train.step import Stepper
from gptforge.train.muon import GRAM_MIN_ASPECT, NS_COEFFICIENTS, Muon, _newtonschulz_gram, zeropower_via_newtonschulz5
from gptforge.train.optim import build_optimizer
from gptforge.runtime import resolve_precision

TINY = ["model.preset=tiny", "train.max_time=null", "eval.tokens=2048", "train.samples=0",
        "run.tensorboard=false", "optim.name=muon"]


def run(data, run_dir, *extra):
    return train(load_config(None, [*TINY, f"data.dir={data}", f"run.dir={run_dir}", *extra]))


# ----------------------------------------------------------------------------------------------------------
# Newton-Schulz


@pytest.mark.parametrize("shape", [(64, 64), (48, 192), (192, 48)], ids=["square", "wide", "tall"])
def test_newton_schulz_orthogonalizes_like_the_svd(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape)
    out = zeropower_via_newtonschulz5(G, steps=5)
    assert out.shape == G.shape and out.dtype == torch.float32  # float32 on a CPU

    U, S, Vh = torch.linalg.svd(G, full_matrices=False)  # G = U diag(S) Vh
    D = U.T @ out @ Vh.T  # diagonal exactly when out has G's singular vectors
    diag = torch.diagonal(D)
    assert (D - torch.diag(diag)).abs().max() < 1e-4
    assert torch.allclose(torch.linalg.svdvals(out).sort().values, diag.sort().values, atol=1e-4)
    # The documented band: singular values of at least 1% of the Frobenius norm land in [0.68, 1.14]; none
    # comes out above 1.21.
    large = S >= 0.01 * G.norm()
    assert large.sum() >= min(shape) - 8
    assert diag[large].min() >= 0.68 and diag[large].max() <= 1.14, diag
    assert diag.max() <= 1.21 and diag.min() >= 0
    # So the result points where U V^T does.
    polar = U @ Vh
    assert (out * polar).sum() / (out.norm() * polar.norm()) > 0.97


def plain_newton_schulz_float64(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = NS_COEFFICIENTS
    X = G.double()
    tall = X.size(0) > X.size(1)
    X = X.T if tall else X
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


@pytest.mark.parametrize("shape", [(48, 64), (48, 192), (192, 48), (384, 1536), (1536, 384)])
@pytest.mark.parametrize("spectrum", ["random", "ill-conditioned"])
def test_gram_form_equals_the_plain_iteration(shape, spectrum):
    """From an aspect of GRAM_MIN_ASPECT the float32 iteration runs on the m x m Gram matrices; it must give
    the plain iteration's result, also for singular values spread over six decades: within 2e-3 of the largest
    entry (measured: up to 7e-4 there, 1e-5 for the plain form in float32, 0.3 for the plain form in bfloat16,
    the way it runs on a GPU)."""
    torch.manual_seed(0)
    G = torch.randn(*shape, dtype=torch.float64)
    if spectrum == "ill-conditioned":
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        G = U @ torch.diag(torch.logspace(0, -6, min(shape), dtype=torch.float64)) @ Vh
    m, n = sorted(shape)
    assert (n >= GRAM_MIN_ASPECT * m) == (shape != (48, 64))  # (48, 64) keeps the plain form
    out = zeropower_via_newtonschulz5(G.float())
    reference = plain_newton_schulz_float64(G)
    assert (out.double() - reference).abs().max() < 2e-3 * reference.abs().max()
    wide = (G.T if shape[0] > shape[1] else G) / G.norm()  # the Gram function itself, at every aspect
    reference = plain_newton_schulz_float64(wide, 3)
    assert (_newtonschulz_gram(wide.float(), 3).double() - reference).abs().max() < 2e-3 * reference.abs().max()


def test_newton_schulz_of_zero_is_zero():
    assert torch.equal(zeropower_via_newtonschulz5(torch.zeros(8, 4)), torch.zeros(8, 4))


# ----------------------------------------------------------------------------------------------------------
# Parameter groups


@pytest.mark.parametrize("arch", [dict(), dict(tie_embeddings=False, bias=True, pos="learned", norm="layernorm")],
                         ids=["tied", "untied-bias-learned"])
def test_every_parameter_in_exactly_one_group_of_the_right_kind(arch):
    model = GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=32, **arch))
    cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=0.05, weight_decay=0.1)
    opt = build_optimizer(model, cfg, "cpu")
    assert isinstance(opt, Muon)
    owner = {}
    for i, group in enumerate(opt.param_groups):
        for p in group["params"]:
            assert id(p) not in owner, "a parameter in two groups"
            owner[id(p)] = group
    names = dict(model.named_parameters())  # a tied matrix once, as transformer.wte.weight
    assert set(owner) == {id(p) for p in names.values()}
    for name, p in names.items():
        group = owner[id(p)]
        hidden = name.startswith("transformer.h.") and p.ndim == 2
        assert group["use_muon"] is hidden, name
        assert group["base_lr"] == (0.05 if hidden else 1e-3), name
        decays = hidden or name == "lm_head.weight"  # the untied head decays, as under adamw
        assert group["weight_decay"] == (0.1 if decays else 0.0), name
    assert owner[id(model.transformer.wte.weight)]["use_muon"] is False
    assert owner[id(model.lm_head.weight)]["use_muon"] is False


def test_adamw_groups_carry_their_base_lr():
    model = GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=1, n_head=2, n_embd=32))
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=2e-3), "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["base_lr"] for g in opt.param_groups] == [2e-3, 2e-3]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_configured_base_lr_wins_over_a_loaded_one(optimizer):
    """As optim.lr always did: a resumed run at another rate uses it; old checkpoints have no base_lr."""
    model = GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=1, n_head=2, n_embd=32))
    saved = build_optimizer(model, OptimConfig(name=optimizer, lr=1e-3, muon_lr=0.01), "cpu").state_dict()
    for group in saved["param_groups"]:
        del group["base_lr"]
    opt = build_optimizer(model, OptimConfig(name=optimizer, lr=2e-3, muon_lr=0.03), "cpu")
    opt.load_state_dict(saved)
    expected = [0.03, 2e-3] if optimizer == "muon" else [2e-3, 2e-3]  # (muon or decay, no-decay) groups
    assert [g["base_lr"] for g in opt.param_groups] == expected


def test_adamw_path_is_torch_adamw_bit_for_bit():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    hyper = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}],
                            foreach=False, **hyper)
    muon = Muon([{"params": twins[:1], "use_muon": False, "weight_decay": 0.1, **hyper},
                 {"params": twins[1:], "use_muon": False, "weight_decay": 0.0, **hyper}])
    for _ in range(10):
        for p, q in zip(params, twins):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ref.step()
        muon.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twins))


# ----------------------------------------------------------------------------------------------------------
# Training


def test_muon_trains_a_tiny_model(small_data, tmp_path):
    run(small_data, tmp_path / "r", "train.batch_size=8", "train.max_steps=40", "schedule.warmup_steps=5",
        "eval.every=0")
    evals = [r["val_loss"] for r in read_metrics(tmp_path / "r") if "val_loss" in r]
    assert evals[0] > 6.0 and evals[-1] < evals[0] - 0.8, evals  # about 6.24 -> 5.19
    state = load_file(str(checkpoint.list_checkpoints(tmp_path / "r" / "checkpoints")[0] / "optimizer.safetensors"))
    assert any(k.endswith(".momentum_buffer") for k in state) and any(k.endswith(".exp_avg_sq") for k in state)


def _stepper(model, cfg):
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    precision = resolve_precision("fp32", torch.device("cpu"))
    return Stepper(model, model, optimizer, None, precision, World(), cfg, [])


def test_accumulation_feeds_muon_the_whole_batch_gradient():
    cfg = load_config(None, ["model.preset=tiny", "model.vocab_size=256", "optim.name=muon", "train.max_steps=1"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    twin = copy.deepcopy(model)
    x = torch.randint(0, 256, (8, 64))
    y = torch.randint(0, 256, (8, 64))
    whole, halves = _stepper(model, cfg), _stepper(twin, cfg)
    for step in (1, 2):  # the second step uses the momentum and Adam state the first one left
        whole.step([(x, y)], 1.0, step)
        halves.step([(x[:4], y[:4]), (x[4:], y[4:])], 1.0, step)
    # The accumulated gradient matches the whole batch's to fp32 rounding (~1e-9 here). Muon's orthogonalized
    # update is insensitive to that; AdamW's first steps are not for entries whose gradient is near eps
    # (g / (|g| + eps): a 2e-10 gradient difference at |g| = 4e-8 moves the update by 1e-3 * lr), and with
    # zero-initialized c_proj the tied embedding has such entries. Hence a looser bound for the AdamW groups.
    muon_params = {id(p) for g in whole.optimizer.param_groups if g["use_muon"] for p in g["params"]}
    assert muon_params
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=2e-6 if id(a) in muon_params else 1e-5), name


def test_resume_is_bitwise_with_accumulation_and_batch_warmup(small_data, tmp_path):
    common = ["train.batch_size=4", "train.batch_tokens=768", "schedule.batch_warmup_steps=3", "model.dropout=0.1",
              "train.log_every=1", "eval.every=0", "train.save_every=0", "eval.tokens=512",
              "run.deterministic=true", "data.prefetch=2"]
    whole = run(small_data, tmp_path / "whole", *common, "train.max_steps=6")
    run(small_data, tmp_path / "split", *common, "train.max_steps=2")  # stops inside the batch warmup
    split = run(small_data, tmp_path / "split", *common, "train.max_steps=6")
    assert split.resumed_from == 2
    assert whole.tokens == split.tokens == (1 + 1 + 2 + 3 * 3) * 256  # micro-steps 1, 1, 2, then 3 x 3

    def losses(run_dir):
        return {r["step"]: r["train_loss"] for r in read_metrics(run_dir) if "train_loss" in r}

    assert losses(tmp_path / "split") == losses(tmp_path / "whole")  # exact floats
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = (load_file(str(checkpoint.list_checkpoints(tmp_path / d / "checkpoints")[0] / name))
                for d in ("whole", "split"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_refuses_another_optimizer(small_data, tmp_path):
    run(small_data, tmp_path / "r", "train.batch_size=4", "train.max_steps=1")
    with pytest.raises(CheckpointError, match="optim.name=muon"):
        run(small_data, tmp_path / "r", "train.batch_size=4", "train.max_steps=2", "optim.name=adamw")


# ----------------------------------------------------------------------------------------------------------
# Two processes (gloo on CPU): DDP replicates the update; FSDP2 orthogonalizes gathered gradients per matrix


def _launch(nproc, data, run_dir, *extra):
    argv = ["train", f"data.dir={data}", f"run.dir={run_dir}", "model.preset=tiny", "optim.name=muon",
            "train.batch_size=4", "train.batch_tokens=1024", "train.max_steps=4", "train.max_time=null",
            "train.log_every=1", "eval.every=2", "eval.tokens=1024", "train.samples=0",
            "run.tensorboard=false", "data.prefetch=0", *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "gptforge", *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "gptforge", *argv]
    result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {(r["step"], k): r[k] for r in read_metrics(run_dir) for k in ("train_loss", "val_loss") if k in r}


@pytest.fixture(scope="module")
def one_process(small_data, tmp_path_factory):
    return _launch(1, small_data, tmp_path_factory.mktemp("muon1") / "run")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_equal_one(small_data, one_process, tmp_path, strategy):
    got = _launch(2, small_data, tmp_path / "run", f"dist.strategy={strategy}")
    assert got.keys() == one_process.keys() and len(got) == 4 + 3
    for key, value in one_process.items():
        assert got[key] == pytest.approx(value, rel=1e-4), key
