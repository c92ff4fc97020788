"""train.batch_size=auto: the search recovers from (simulated) out-of-memory errors, leaves the model as it
was, keeps batch_tokens whole, and a run stores and resumes with the number it found."""

from dataclasses import dataclass

import pytest
import torch
import yaml

from gptforge.config import load_config
from gptforge.errors import ConfigError, GptforgeError
from gptforge.model.gpt import GPT
from gptforge.observe.metrics import read_metrics
from gptforge.train import batch_finder
from gptforge.train.batch_finder import (
    allowed_sizes,
    find_batch_size,
    fits_in_memory,
    friendly,
    largest_fitting,
    resolve_batch_size,
    with_margin,
)
from gptforge.train.loop import train
from gptforge.runtime import Precision

OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def threshold_fits(threshold):
    calls = []

    def fits(n):
        calls.append(n)
        return n <= threshold

    return fits, calls


@pytest.mark.parametrize("threshold", [1, 2, 3, 37, 64, 100, 1000])
def test_search_finds_the_largest_size_that_fits(threshold):
    fits, calls = threshold_fits(threshold)
    assert largest_fitting(fits, limit=1024) == (threshold, True)
    assert len(calls) <= 2 * threshold.bit_length() + 1


def test_search_stops_at_the_limit_without_an_oom():
    fits, calls = threshold_fits(10_000)
    assert largest_fitting(fits, limit=48) == (48, False)
    assert calls == [1, 2, 4, 8, 16, 32, 48]


def test_nothing_fits_is_a_clear_error():
    with pytest.raises(GptforgeError, match="activation_checkpointing"):
        largest_fitting(lambda n: False, limit=64)


def test_simulated_oom_is_caught_and_cleaned_up_after_every_trial():
    held, cleanups = [], []

    def trial(n):
        held.append(torch.zeros(n))  # what a trial leaves behind, OOM or not
        if n > 23:
            raise OOM("CUDA out of memory (simulated)")

    def cleanup(out_of_memory):
        cleanups.append((held[-1].numel(), out_of_memory))
        held.clear()

    fits = fits_in_memory(trial, cleanup)
    assert largest_fitting(fits, limit=1024) == (23, True)
    assert held == [] and cleanups == [(n, n > 23) for n in [1, 2, 4, 8, 16, 32, 24, 20, 22, 23]]


def test_errors_other_than_out_of_memory_surface():
    def trial(n):
        raise ValueError("a bug, not a full GPU")

    with pytest.raises(ValueError, match="a bug"):
        fits_in_memory(trial, lambda out_of_memory: None)(1)

    def shape_bug(n):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        fits_in_memory(shape_bug, lambda out_of_memory: None)(1)


def test_library_allocation_failures_count_as_out_of_memory():
    def trial(n):
        if n > 5:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    assert largest_fitting(fits_in_memory(trial, lambda out_of_memory: None), limit=64) == (5, True)


def test_margin_and_power_of_two_friendly_sizes():
    assert [friendly(n) for n in (1, 2, 3, 5, 7, 8, 15, 33, 100)] == [1, 2, 2, 4, 4, 8, 8, 32, 96]
    assert with_margin(37, bounded=True, allowed=None) == 32  # 37 x 0.9 = 33 -> 32
    assert with_margin(5, bounded=True, allowed=None) == 4
    assert with_margin(1, bounded=True, allowed=None) == 1
    assert with_margin(100, bounded=False, allowed=None) == 100  # no OOM: the limit itself
    allowed = allowed_sizes(48 * 64, 64, 1)
    assert allowed == [1, 2, 3, 4, 6, 8, 12, 16, 24, 48]
    assert with_margin(30, bounded=True, allowed=allowed) == 24  # 27 -> the largest divisor below
    assert with_margin(48, bounded=False, allowed=allowed) == 48


def test_batch_tokens_must_split_into_sequences_per_process():
    assert allowed_sizes(None, 64, 1) is None
    assert allowed_sizes(4 * 64 * 2, 64, 2) == [1, 2, 4]
    with pytest.raises(ConfigError, match="train.batch_tokens"):
        allowed_sizes(1000, 64, 2)
    with pytest.raises(ConfigError, match="train.batch_tokens"):
        load_config(None, ["train.batch_size=auto", "train.batch_tokens=1000", "model.block_size=64"])


def tiny_model_and_config(*overrides):
    cfg = load_config(None, ["model.preset=tiny", "model.block_size=16", "model.vocab_size=256",
                             "train.batch_size=auto", "eval.tokens=16", *overrides])
    torch.manual_seed(0)
    return GPT(cfg.model), cfg


def oom_above(model, threshold):
    """Make the model run out of memory in its last block for batches above `threshold`, mid-forward."""

    def hook(module, args, output):
        if output.shape[0] > threshold:
            raise OOM("CUDA out of memory (simulated)")

    return model.transformer.h[-1].register_forward_hook(hook)


def test_finder_on_a_real_model_recovers_and_leaves_it_as_it_was():
    model, cfg = tiny_model_and_config()
    oom_above(model, 11)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    size = find_batch_size(model, cfg, Precision("fp32", "cpu"), torch.device("cpu"), search=True)
    assert size == 8  # 11 fits, 12 does not: 11 x 0.9 = 9 -> a multiple of 8
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert model.training


def test_finder_keeps_batch_tokens_whole():
    model, cfg = tiny_model_and_config("train.batch_tokens=384")  # 24 sequences of 16 tokens per step
    hook = oom_above(model, 20)
    cpu, fp32 = torch.device("cpu"), Precision("fp32", "cpu")
    assert find_batch_size(model, cfg, fp32, cpu, search=True) == 12  # 20 x 0.9 = 18 -> divisor 12
    hook.remove()
    assert find_batch_size(model, cfg, fp32, cpu, search=True) == 24  # no OOM: the whole batch
    assert find_batch_size(model, cfg, fp32, cpu, world_size=2, search=True) == 12


def test_cpu_picks_a_capped_size_without_trials(monkeypatch):
    model, cfg = tiny_model_and_config()
    monkeypatch.setattr(batch_finder, "micro_step_trial", lambda *a, **k: pytest.fail("no trials on a CPU"))
    size = find_batch_size(model, cfg, Precision("fp32", "cpu"), torch.device("cpu"))
    assert 1 <= size <= batch_finder.CPU_MAX_BATCH and size == friendly(size)


@dataclass
class FakeWorld:
    world_size: int = 2
    others: int = 4

    def gather_json(self, obj):
        return [obj, self.others]


def test_every_process_takes_the_smallest_size_and_a_resume_reuses_its_number(monkeypatch):
    model, cfg = tiny_model_and_config()
    monkeypatch.setattr(batch_finder, "find_batch_size", lambda *a, **k: 8)
    messages = []
    resolved = resolve_batch_size(cfg, model, None, torch.device("cpu"), FakeWorld(), report=messages.append)
    assert resolved.train.batch_size == 4 and "4 sequences" in messages[0]
    saved = {"config": {"train": {"batch_size": 6}}}
    resumed = resolve_batch_size(cfg, model, None, torch.device("cpu"), FakeWorld(), saved=saved, report=messages.append)
    assert resumed.train.batch_size == 6
    fixed = load_config(None, ["train.batch_size=12"])
    assert resolve_batch_size(fixed, model, None, torch.device("cpu"), FakeWorld()) is fixed


def test_a_run_stores_the_found_size_and_resumes_with_it(small_data, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "r"
    args = ["model.preset=tiny", "train.batch_size=auto", "train.batch_tokens=512", "train.max_time=null",
            "eval.tokens=1024", "train.samples=0", "run.tensorboard=false", "train.save_every=2",
            f"data.dir={small_data}", f"run.dir={run_dir}"]
    train(load_config(None, [*args, "train.max_steps=2"]))
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["batch_size"]
    assert isinstance(stored, int) and 512 % (stored * 64) == 0
    assert f"train.batch_size=auto: {stored} sequences" in capsys.readouterr().out

    monkeypatch.setattr(batch_finder, "find_batch_size", lambda *a, **k: pytest.fail("a resume must not search"))
    result = train(load_config(None, [*args, "train.max_steps=4"]))
    assert result.resumed_from == 2 and result.step == 4
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["batch_size"] == stored
    assert [r["tokens"] for r in read_metrics(run_dir) if "train_loss" in r][-1] == 4 * 512
