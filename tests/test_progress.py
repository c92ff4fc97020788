"""Progress lines: a first line at once, then at most one per interval, each with elapsed time, rate and ETA."""

import io
import json
import subprocess
import sys
import time

import pytest

from gptforge.observe.console import TrainProgress
from gptforge.progress import Progress, clock_text, eta_s


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("seconds, text", [(0, "0:00"), (7.4, "0:07"), (754, "12:34"), (3723, "1:02:03"),
                                           (None, "?"), (float("inf"), "?")])
def test_clock_text(seconds, text):
    assert clock_text(seconds) == text


def test_eta_counts_the_pace_since_the_start_fraction():
    assert eta_s(10.0, 0.25) == pytest.approx(30.0)
    assert eta_s(10.0, 0.75, start_fraction=0.5) == pytest.approx(10.0)  # a resumed run: its own pace
    assert eta_s(0.0, 0.5) is None and eta_s(5.0, 0.5, start_fraction=0.5) is None


def test_plain_lines_start_at_once_then_at_most_one_per_interval():
    out, clock = io.StringIO(), Clock()
    bar = Progress("prepare: tokenizing", 40e6, "MB", scale=1e6, every_s=10, file=out, clock=clock, live=False)
    assert out.getvalue().splitlines() == ["prepare: tokenizing: 0/40 MB (0%) | elapsed 0:00 | eta ?"]
    for second in range(1, 10):  # nine updates inside the first interval: no line
        clock.now += 1
        bar.update(second * 1e6, info=f"{second}/40 files")
    assert len(out.getvalue().splitlines()) == 1
    clock.now += 1
    bar.update(10e6, info="10/40 files")
    assert out.getvalue().splitlines()[-1] == \
        "prepare: tokenizing: 10/40 MB (25%) | 1 MB/s | elapsed 0:10 | eta 0:30 | 10/40 files"
    clock.now += 2
    bar.close()
    bar.close()  # twice is harmless
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("prepare: tokenizing: 10/40 MB (25%)") and "elapsed 0:12" in lines[-1]


def test_track_counts_items_and_an_unknown_total_has_no_eta():
    out, clock = io.StringIO(), Clock()
    with Progress("eval", None, "batches", every_s=0, file=out, clock=clock, live=False) as bar:
        for _ in bar.track(range(3)):
            clock.now += 0.5
    last = out.getvalue().splitlines()[-1]
    assert last == "eval: 3 batches | 2 batches/s | elapsed 0:02"


def test_disabled_progress_prints_nothing():
    out = io.StringIO()
    with Progress("bench", 5, "steps", enabled=False, file=out, live=False) as bar:
        bar.update(3)
    assert out.getvalue() == ""


def test_train_lines_carry_elapsed_time_and_the_budget_eta(capsys, monkeypatch):
    monkeypatch.setattr("gptforge.observe.console.is_tty", lambda: False)
    clock = Clock()
    bar = TrainProgress(start_fraction=0.2, clock=clock)
    clock.now += 60
    record = {"step": 10, "train_loss": 5.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_sec": 2048.0, "mfu": None}
    bar.update(record, fraction=0.4)
    line = capsys.readouterr().out.strip()
    assert "2,048 tok/s" in line and "mfu n/a" in line
    assert line.endswith("| elapsed 1:00 | eta 3:00")  # 0.2 of the budget a minute: 0.6 left takes three


def test_the_first_line_of_a_logged_train_run_comes_before_the_step_0_evaluation(small_data, tmp_path):
    """stdout to a pipe, as to a log file: the banner shows within seconds, before any evaluation."""
    command = [sys.executable, "-m", "gptforge", "train", f"data.dir={small_data}", f"run.dir={tmp_path / 'run'}",
               "model.preset=tiny", "train.max_steps=3", "train.log_every=1", "train.samples=0", "eval.tokens=4096",
               "run.tensorboard=false"]
    start = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = child.stdout.readline()
    first_s = time.monotonic() - start
    rest, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    assert first.startswith("gptforge ") and "parameters" in first
    assert first_s < 60  # generous: importing torch on a loaded 2-core machine
    steps = [line for line in rest.splitlines() if line.startswith("step ") and "| loss" in line]
    assert len(steps) == 3 and all("| elapsed " in line and "| eta " in line for line in steps)
    assert rest.index("step 0: val loss") < rest.index(steps[0])
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 0


def test_slow_work_shows_seconds_each_and_the_end_is_not_printed_twice():
    out, clock = io.StringIO(), Clock()
    bar = Progress("compare", 3, "runs", every_s=0, file=out, clock=clock, live=False)
    clock.now += 40
    bar.update(advance=1, info="r1")
    bar.close()  # nothing new since the line just printed
    lines = out.getvalue().splitlines()
    assert lines == ["compare: 0/3 runs (0%) | elapsed 0:00 | eta ?",
                     "compare: 1/3 runs (33%) | 40 s each | elapsed 0:40 | eta 1:20 | r1"]
