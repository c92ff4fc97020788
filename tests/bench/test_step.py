import pytest
import torch

from gptforge.bench.step import bench
from gptforge.config import load_config
from gptforge.observe.phases import PhaseTimer


def test_bench_record_has_what_a_result_file_needs(small_data, capsys):
    record = bench(load_config(None, [f"data.dir={small_data}", "model.preset=tiny", "train.batch_size=4"]), steps=3, warmup=1)
    last = capsys.readouterr().err.splitlines()[-1]  # the progress: warm-up and timed steps, to the end
    assert last.startswith("bench: 4/4 steps (100%)") and "| step " in last and " ms" in last
    for key in ("device", "torch", "cuda", "git_sha", "command", "config", "model", "tokens_per_sec", "mfu",
                "mfu_datasheet", "peak_flops_measured", "peak_mem_gb", "step_times_s", "median_data_wait_s",
                "median_split_s", "split_times_s"):
        assert key in record
    assert len(record["step_times_s"]) == 3 and record["tokens_per_sec"] > 0 and 0 < record["mfu"] < 1.5
    assert record["tokens_per_step"] == 4 * 64
    assert record["mfu_datasheet"] is None  # no datasheet for a CPU
    assert set(record["median_split_s"]) == {"data", "forward", "backward", "optimizer"}
    for i, total in enumerate(record["step_times_s"]):
        parts = [record["split_times_s"][phase][i] for phase in ("data", "forward", "backward", "optimizer")]
        assert all(p >= 0 for p in parts) and min(parts[1:]) > 0
        assert sum(parts) <= total * 1.001  # the phases lie inside the step


def test_phase_timer_sums_repeated_phases(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 3.5, 6.0, 10.0, 20.0, 20.25])
    monkeypatch.setattr("gptforge.observe.phases.time.perf_counter", lambda: next(clock))
    timer = PhaseTimer(torch.device("cpu"))
    timer.start()  # 0.0
    for _ in range(2):  # two micro-steps: forward 1.0 + 0.5, backward 2.0 + 2.5
        timer.mark("forward")
        timer.mark("backward")
    timer.mark("optimizer")  # 4.0
    assert timer.split() == {"forward": 1.5, "backward": 4.5, "optimizer": 4.0}
    timer.start()  # 20.0: a new step starts from nothing
    timer.mark("optimizer")
    assert timer.split() == {"forward": 0.0, "backward": 0.0, "optimizer": 0.25}


@pytest.mark.parametrize("accum", [1, 2])
def test_split_counts_every_micro_step(small_data, accum, monkeypatch):
    marks = []
    original = PhaseTimer.mark
    monkeypatch.setattr(PhaseTimer, "mark", lambda self, phase: (marks.append(phase), original(self, phase))[1])
    cfg = load_config(None, [f"data.dir={small_data}", "model.preset=tiny", "train.batch_size=2",
                             f"train.batch_tokens={2 * 64 * accum}"])
    bench(cfg, steps=2, warmup=1)
    assert marks == (["forward", "backward"] * accum + ["optimizer"]) * 3  # warm-up step included
