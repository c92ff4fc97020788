"""Magnitude pruning: sparsity reached, the 2:4 pattern, pruned runs, the recovery fine-tune, errors."""

from __future__ import annotations

import pytest
import torch

import gptforge
from gptforge.adapt.prune import has_2_4_pattern, magnitude_mask, prune_model, prune_run, to_semi_structured
from gptforge.adapt.qlinear import block_linears
from gptforge.adapt.quantize import quantize_run
from gptforge.config import load_config
from gptforge.data.datadir import load_data_dir
from gptforge.errors import GptforgeError
from gptforge.model.gpt import GPT, GPTConfig
from gptforge.runs import load_run
from gptforge.train.checkpoint import WEIGHTS_FORMAT, save_weights

quiet = dict(report=lambda m: None)


def tiny_gpt() -> GPT:
    """Random weights in every block linear: zero-initialised projections would already be all zeros."""
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=64, zero_init_proj=False)).eval()


@pytest.fixture(scope="module")
def run(small_data, tmp_path_factory):
    """A weights-only run of a small random GPT on the shared small corpus (no all-zero projections to prune)."""
    vocab = load_data_dir(small_data).vocab_size
    cfg = load_config(None, [f"data.dir={small_data}", f"model.vocab_size={vocab}", "model.n_layer=2", "model.n_head=2",
                             "model.n_embd=64", "model.block_size=32", "model.zero_init_proj=false",
                             "train.batch_size=4", "eval.tokens=512", "train.samples=0", "eval.every=0",
                             "run.tensorboard=false"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run") / "base"
    save_weights(path, GPT(cfg.model), cfg.to_dict(), step=7, tokenizer_file=small_data / "tokenizer.json")
    return path


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_reaches_the_sparsity_in_every_layer_and_drops_the_smallest(sparsity):
    model = tiny_gpt()
    before = {name: model.get_submodule(name).weight.detach().clone() for name in block_linears(model)}
    stats = prune_model(model, sparsity, "unstructured")
    assert stats["overall"] == pytest.approx(sparsity, abs=0.01)
    assert set(stats["modules"]) == set(before)
    for name, old in before.items():
        new = model.get_submodule(name).weight.detach()
        assert stats["modules"][name] == pytest.approx(sparsity, abs=0.01)
        kept, dropped = old[new != 0].abs(), old[new == 0].abs()
        if len(dropped) and len(kept):
            assert dropped.max() <= kept.min()
        assert torch.equal(new[new != 0], old[new != 0])


def test_2_4_keeps_the_two_largest_of_every_group_of_four():
    model = tiny_gpt()
    before = {name: model.get_submodule(name).weight.detach().clone() for name in block_linears(model)}
    stats = prune_model(model, 0.5, "2:4")
    assert stats["overall"] == pytest.approx(0.5)
    for name, old in before.items():
        new = model.get_submodule(name).weight.detach()
        assert has_2_4_pattern(new)
        groups_new, groups_old = new.view(new.shape[0], -1, 4), old.view(old.shape[0], -1, 4).abs()
        assert ((groups_new != 0).sum(-1) == 2).all()
        kept_min = groups_old.masked_fill(groups_new == 0, float("inf")).amin(-1)
        dropped_max = groups_old.masked_fill(groups_new != 0, -1.0).amax(-1)
        assert (dropped_max <= kept_min).all()
    assert not has_2_4_pattern(torch.ones(4, 8))


def test_pruned_run_is_a_weights_only_run_that_loads(run, tmp_path):
    out = prune_run(run, tmp_path / "p", 0.5, "2:4", **quiet)
    loaded = load_run(out, **quiet)
    assert loaded.state["format"] == WEIGHTS_FORMAT and loaded.state["pruning"]["pattern"] == "2:4"
    assert loaded.state["source"]["step"] == 7
    model, _ = gptforge.load(out)
    assert all(has_2_4_pattern(model.get_submodule(n).weight) for n in block_linears(model))


def test_semi_structured_conversion_is_skipped_off_cuda():
    model = tiny_gpt()
    prune_model(model, 0.5, "2:4")
    assert to_semi_structured(model) == []
    assert all(type(model.get_submodule(n).weight) is torch.nn.Parameter for n in block_linears(model))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="semi-structured sparse kernels need a CUDA GPU of compute capability 8.0 or newer")
def test_semi_structured_conversion_on_cuda_computes_the_same():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=256)).eval()
    prune_model(model, 0.5, "2:4")
    model = model.cuda().half()
    idx = torch.randint(0, 300, (2, 64), device="cuda")
    with torch.no_grad():
        dense = model(idx)
        assert len(to_semi_structured(model)) == 8
        torch.testing.assert_close(model(idx), dense, rtol=2e-2, atol=2e-2)


def test_recovery_fine_tune_keeps_the_zeros(run, tmp_path):
    pruned = load_run(prune_run(run, tmp_path / "pruned", 0.5, "unstructured", **quiet), **quiet).model
    out = prune_run(run, tmp_path / "recovered", 0.5, "unstructured", recover_steps=3, **quiet)
    recovered = load_run(out, **quiet)
    assert recovered.state["step"] == 3 and recovered.state["format"] != WEIGHTS_FORMAT
    for name in block_linears(pruned):
        before, after = pruned.get_submodule(name).weight, recovered.model.get_submodule(name).weight
        assert torch.equal(after == 0, before == 0)  # same zeros, none regrown
        assert not torch.equal(after, before)  # and the rest trained


def test_bad_inputs_give_clear_errors(run, tmp_path):
    model = tiny_gpt()
    for sparsity in (1.0, -0.1):
        with pytest.raises(GptforgeError, match=r"--sparsity must be a fraction in \[0, 1\)"):
            prune_model(model, sparsity, "unstructured")
    with pytest.raises(GptforgeError, match="2:4 keeps 2 of every 4 weights, so its sparsity is 0.5; got --sparsity 0.7"):
        prune_model(model, 0.7, "2:4")
    with pytest.raises(GptforgeError, match="'1:2' is not one of: unstructured, 2:4"):
        prune_model(model, 0.5, "1:2")
    with pytest.raises(GptforgeError, match="in_features divisible by 4, got 6"):
        magnitude_mask(torch.randn(4, 6), 0.5, "2:4")
    with pytest.raises(GptforgeError, match="no such run directory"):
        prune_run(tmp_path / "missing", tmp_path / "out", 0.5, "2:4", **quiet)
    with pytest.raises(GptforgeError, match="--recover-steps must be >= 0"):
        prune_run(run, tmp_path / "out", 0.5, "2:4", recover_steps=-1, **quiet)
    quantized = quantize_run(run, tmp_path / "int8", "int8", **quiet)
    with pytest.raises(GptforgeError, match="is quantized; prune the full-precision run, then quantize"):
        prune_run(quantized, tmp_path / "out", 0.5, "2:4", **quiet)
