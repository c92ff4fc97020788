"""`gptforge report`: the HTML page of a real (tiny) run, its plots, escaping, tolerance of missing and torn
files, the command line, and how it renders in a headless browser."""

import base64
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from gptforge.cli import build_parser
from gptforge.config import load_config
from gptforge.errors import GptforgeError
from gptforge.observe.report import build_report, run_report, write_report
from gptforge.train.loop import train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SAMPLE = "def f(x):\n    return '<script>alert(1)</script>' & x\x07"  # and a control character
EVENT = {"event": "skip_spike", "step": 7, "loss": 12.5, "grad_norm": 310.0, "consecutive": 1}
VOID = {"meta", "img", "br", "hr", "link", "input"}


@pytest.fixture(scope="module")
def run_dir(small_data, tmp_path_factory) -> Path:
    """A 20-step tiny run, plus a guard event and a sample no page should run as a script."""
    run = tmp_path_factory.mktemp("report") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from a second thread, which spins on a busy machine
    try:
        train(load_config(None, [
            "model.preset=tiny", f"data.dir={small_data}", f"run.dir={run}", "train.max_steps=20",
            "train.max_time=null", "eval.every=5", "train.log_every=2", "train.samples=1",
            "train.sample_tokens=20", "run.tensorboard=false",
        ]))
    finally:
        torch.set_num_threads(threads)
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(EVENT) + "\n")
    with open(run / "samples.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 20, "sample": SAMPLE}) + "\n")
    if not (run / "environment.json").is_file():  # written by train; made here where it is not (yet)
        (run / "environment.json").write_text(json.dumps({"gptforge_version": "0.1.0", "torch": "2.x"}))
    return run


@pytest.fixture(scope="module")
def page(run_dir) -> str:
    return build_report(run_dir)


class PageChecker(HTMLParser):
    """Every element closed in order, and nothing fetched from anywhere: no scripts, links or remote URLs."""

    def __init__(self):
        super().__init__()
        self.open: list[str] = []
        self.errors: list[str] = []
        self.images: list[str] = []
        self.figures: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("script", "link", "iframe", "object", "embed"):
            self.errors.append(f"<{tag}> at {self.getpos()}")
        for name in ("src", "href"):
            if name in attrs and not attrs[name].startswith("data:image/png;base64,"):
                self.errors.append(f"{name}={attrs[name]!r} at {self.getpos()}")
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "figure" and attrs.get("id"):
            self.figures.append(attrs["id"])
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if not self.open or self.open.pop() != tag:
            self.errors.append(f"</{tag}> does not close the innermost element at {self.getpos()}")


def checked(page: str) -> PageChecker:
    checker = PageChecker()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.open == []
    return checker


def test_report_holds_every_plot_as_an_inline_png(run_dir, page):
    checker = checked(page)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = ["loss-step", "loss-time", "lr", "grad-norm", "throughput", "mfu"]
    if any("peak_mem_gb" in record for record in metrics):
        expected.append("memory")
    assert checker.figures == [f"plot-{name}" for name in expected]
    assert len(checker.images) == page.count("data:image/png;base64,") == len(expected)
    for src in checker.images:
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG_SIGNATURE)


def test_report_shows_status_events_samples_config_and_environment(run_dir, page):
    assert "<title>gptforge report: run</title>" in page
    assert f'<p class="path">{run_dir.resolve()}</p>' in page
    assert re.search(r'<span class="label">steps</span><span class="value">20</span>', page)
    assert re.search(r'newest checkpoint</span><span class="value">step 20<', page)
    assert "<tr><td>7</td><td>skip_spike</td><td>loss=12.5, grad_norm=310.0, consecutive=1</td></tr>" in page
    assert "skip_spike × 1" in page  # the summary card
    assert "return &#x27;&lt;script&gt;alert(1)&lt;/script&gt;&#x27; &amp; x\u2407</pre>" in page
    assert "<script" not in page
    assert "<h3>model</h3>" in page and '<td class="key">preset</td><td>tiny</td>' in page
    environment = json.loads((run_dir / "environment.json").read_text())
    assert f'<td class="key">gptforge_version</td><td>{environment["gptforge_version"]}</td>' in page


def test_write_report_and_the_command_line(run_dir, tmp_path, capsys):
    assert write_report(run_dir) == run_dir / "report.html"
    assert (run_dir / "report.html").read_text(encoding="utf-8").startswith("<!doctype html>")
    out = tmp_path / "reports" / "mine.html"
    assert run_report(build_parser().parse_args(["report", str(run_dir), "--out", str(out)])) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out


def test_a_bare_or_damaged_run_still_gets_a_report(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 0, "tokens": 0, "time_s": 0.0, "val_loss": 6.0, "val_bpb": 4.0}\n'
        '{"step": 1, "tokens": 64, "time_s": 0.5, "lr": 0.001, "train_loss": "nan", "grad_norm": "inf", '
        '"tokens_per_sec": 128.0, "mfu": 0.01}\n'
        '{"event": "resume", "step": 1, "checkpoint": "step_00000001"}\n'
        '{"step": 2, "tok'  # cut short by a crash
    )
    page = build_report(tmp_path)
    checker = checked(page)
    assert checker.figures == [f"plot-{name}" for name in ("loss-step", "loss-time", "lr", "grad-norm", "throughput",
                                                             "mfu")]
    assert f"{tmp_path / 'metrics.jsonl'}:4: not a JSON object" in page
    assert "No samples.jsonl" in page and "No readable config.yaml" in page and "No environment.json" in page
    assert '<span class="label">train loss</span><span class="value">nan</span>' in page


def test_missing_metrics_and_missing_matplotlib_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(GptforgeError, match=r"no metrics\.jsonl; expected a run directory"):
        build_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "val_loss": 6.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(GptforgeError, match=r"pip install gptforge\[plot\]"):
        build_report(tmp_path)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium on PATH")
def test_report_renders_in_a_headless_browser(page, tmp_path):
    image = pytest.importorskip("PIL.Image")
    report = tmp_path / "report.html"
    report.write_text(page, encoding="utf-8")
    chromium = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr", "--v=0",
    ]
    shot = tmp_path / "shot.png"
    subprocess.run([*chromium, f"--screenshot={shot}", "--window-size=1280,2000", report.as_uri()],
                   capture_output=True, timeout=120, check=True)
    with image.open(shot) as picture:
        assert picture.size == (1280, 2000)
        assert len(picture.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 100  # plots, text: not blank
    dom = subprocess.run([*chromium, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True)
    assert "<title>gptforge report: run</title>" in dom.stdout and "plot-loss-step" in dom.stdout
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]  # script errors, CSP violations
    assert "Uncaught" not in dom.stderr and console == []
