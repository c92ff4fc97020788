"""`gptforge report RUN_DIR`: one HTML file that shows what happened in a run.

The file stands alone: plots are PNG data URIs, the CSS is inline, and there are no
scripts, fonts or links, so it can be attached to an issue or opened offline years
later. A Content-Security-Policy in the page tells the browser to fetch nothing.
Every string that comes from the run is HTML-escaped: samples are model output and
config values are user input, and either can hold anything.

The run directory is read leniently, because a report is most useful for a run
that went wrong. A line torn by a crash is listed, not fatal, and files the run
did not write (samples, environment) leave their section saying so.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import itertools
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from gptforge import __version__
from gptforge.errors import GptforgeError
from gptforge.train.checkpoint import checkpoint_root, list_checkpoints

EVENT_COLORS = ("tab:red", "tab:green", "tab:purple", "black", "tab:olive", "tab:cyan", "tab:pink", "tab:brown")
QUIET_EVENTS = ("resume", "interrupted")  # expected in a healthy run; any other event deserves a look
MAX_EVENT_ROWS = 200  # a run that skipped every step would otherwise bury the page
MAX_SAMPLES = 10


@dataclass
class Run:
    """The parts of a run directory a report shows."""

    path: Path
    train: list[dict[str, Any]]  # metrics lines with train_loss
    evals: list[dict[str, Any]]  # metrics lines with val_loss
    events: list[dict[str, Any]]  # metrics lines with an event key
    problems: list[str]  # lines that could not be read, named by file and line
    samples: list[dict[str, Any]]
    config: dict[str, Any] | None
    environment: dict[str, Any] | None
    checkpoint: Path | None


def read_run(run_dir: str | Path) -> Run:
    """Everything the report shows; only a missing metrics.jsonl is an error, anything else is noted."""
    path = Path(run_dir)
    if not (path / "metrics.jsonl").is_file():
        raise GptforgeError(f"{path}: no metrics.jsonl; expected a run directory written by gptforge train")
    problems: list[str] = []
    records = _jsonl(path / "metrics.jsonl", problems)
    config = None
    if (path / "config.yaml").is_file():
        try:
            config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            problems.append(f"{path / 'config.yaml'}: unreadable ({exc})")
    environment = None
    if (path / "environment.json").is_file():
        try:
            environment = json.loads((path / "environment.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            problems.append(f"{path / 'environment.json'}: unreadable ({exc})")
    samples = _jsonl(path / "samples.jsonl", problems) if (path / "samples.jsonl").is_file() else []
    checkpoints = list_checkpoints(checkpoint_root(path))
    return Run(
        path=path,
        train=[r for r in records if "train_loss" in r and "event" not in r],
        evals=[r for r in records if "val_loss" in r and "event" not in r],
        events=[r for r in records if r.get("event") not in (None, "finished")],  # finished: the run's end, not news
        problems=problems,
        samples=[s for s in samples if "sample" in s],
        config=config if isinstance(config, dict) else None,
        environment=environment if isinstance(environment, dict) else None,
        checkpoint=checkpoints[0] if checkpoints else None,
    )


def _jsonl(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            problems.append(f"{path}:{number}: not a JSON object (a line cut short by a crash?); left out")
    return records


def _number(value: Any) -> float | None:
    """A metric as a float; metrics.jsonl writes NaN and infinity as strings."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return None


def _series(records: list[dict[str, Any]], key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    pairs = [(_number(r.get(x)), _number(r.get(key))) for r in records]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    return np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])


# ---------------------------------------------------------------- plots


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise GptforgeError("gptforge report draws its plots with matplotlib: pip install gptforge[plot]") from exc
    return Figure


def _time_unit(seconds: float) -> tuple[str, float]:
    if seconds < 180:
        return "s", 1.0
    if seconds < 3 * 3600:
        return "min", 60.0
    return "h", 3600.0


@dataclass
class _Line:
    x: np.ndarray
    y: np.ndarray
    label: str
    style: str = "-"


@dataclass
class _Plot:
    id: str
    caption: str
    ylabel: str
    lines: list[_Line]
    xlabel: str = "step"
    event_x: Callable[[float], float] | None = None  # where an event of a given step goes; None: no markers
    axis: str = "linear"  # or "zero" (amounts: from 0, so a small wiggle looks small) or "log" (if it spans decades)


def _line(records: list[dict[str, Any]], key: str, label: str, style: str = "-", x: str = "step",
          x_unit: float = 1.0, y_factor: float = 1.0) -> _Line:
    xs, ys = _series(records, key, x)
    return _Line(xs / x_unit, ys * y_factor, label, style)


def _plot_specs(run: Run) -> list[_Plot]:
    steps, times = _series(run.train, "time_s")
    unit, seconds = _time_unit(float(times.max()) if len(times) else 0.0)
    at_time = (lambda step: float(np.interp(step, steps, times)) / seconds) if len(steps) else None
    return [
        _Plot("loss-step", "Loss against steps; dashed lines mark events", "loss",
              [_line(run.train, "train_loss", "train"), _line(run.evals, "val_loss", "val", "o-")],
              event_x=lambda step: step),
        _Plot("loss-time", "Loss against training time (evaluation excluded)", "loss",
              [_line(run.train, "train_loss", "train", x="time_s", x_unit=seconds),
               _line(run.evals, "val_loss", "val", "o-", x="time_s", x_unit=seconds)],
              xlabel=f"training time ({unit})", event_x=at_time),
        _Plot("accuracy", "Validation accuracy (image models)", "accuracy (%)",
              [_line(run.evals, "val_acc", "top-1", "o-", y_factor=100),
               _line(run.evals, "val_top5", "top-5", "o-", y_factor=100)]),
        _Plot("lr", "Learning rate", "learning rate", [_line(run.train, "lr", "lr")]),
        _Plot("grad-norm", "Gradient norm before clipping", "gradient norm",
              [_line(run.train, "grad_norm", "grad norm")], axis="log"),
        _Plot("throughput", "Throughput", "tokens/s", [_line(run.train, "tokens_per_sec", "tokens/s")], axis="zero"),
        _Plot("mfu", "Model FLOPs utilization", "MFU (%)", [_line(run.train, "mfu", "MFU", y_factor=100)], axis="zero"),
        _Plot("memory", "Peak memory", "GB", [_line(run.train, "peak_mem_gb", "peak memory")], axis="zero"),
    ]


def _plots(run: Run) -> list[tuple[str, str, str]]:
    """(id, caption, base64 PNG) for every plot the run has data for."""
    Figure = _figure_class()
    return [
        (plot.id, plot.caption, _render(plot, run.events, Figure))
        for plot in _plot_specs(run)
        if any(len(line.x) for line in plot.lines)
    ]


def _render(plot: _Plot, events: list[dict[str, Any]], Figure) -> str:
    """One plot as a base64 PNG. Made without pyplot: no global state, and no GUI backend whatever the
    calling process has configured."""
    fig = Figure(figsize=(6.4, 3.4), dpi=144, layout="constrained")
    ax = fig.add_subplot()
    lines = [line for line in plot.lines if len(line.x)]
    for line in lines:
        ax.plot(line.x, line.y, line.style, label=line.label, markersize=4, linewidth=1.4)
    if plot.event_x is not None:
        _mark_events(ax, events, plot.event_x)
    values = np.concatenate([line.y for line in lines])
    values = values[np.isfinite(values)]
    if plot.axis == "zero" and len(values) and values.max() > 0:
        ax.set_ylim(0, 1.1 * values.max())
    elif plot.axis == "log" and len(values) and values.min() > 0 and values.max() > 20 * values.min():
        ax.set_yscale("log")
    ax.set(xlabel=plot.xlabel, ylabel=plot.ylabel)
    ax.grid(alpha=0.3)
    if len(ax.get_legend_handles_labels()[1]) > 1:
        ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _mark_events(ax, events: list[dict[str, Any]], event_x: Callable[[float], float]) -> None:
    """A dashed vertical line per event, one color per kind (the same on every plot)."""
    steps: dict[str, list[float]] = {}
    for event in events:
        step = _number(event.get("step"))
        steps.setdefault(str(event["event"]), []).extend([step] if step is not None else [])
    for color, (kind, at) in zip(itertools.cycle(EVENT_COLORS), sorted(steps.items())):
        label = f"{kind} ({len(at)})".replace("$", r"\$")  # a name from the run, never matplotlib math
        for i, step in enumerate(at):
            ax.axvline(event_x(step), color=color, linestyle="--", linewidth=1, alpha=0.8,
                       label=label if i == 0 else None)


# ---------------------------------------------------------------- HTML

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: #1d2330; background: #f4f5f7; margin: 0; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 28px 40px; }
h1 { font-size: 24px; margin: 0 0 2px; } h2 { font-size: 18px; margin: 32px 0 10px; }
h3 { font-size: 14px; margin: 0 0 6px; }
.path { color: #5b6475; font-family: ui-monospace, Menlo, Consolas, monospace; word-break: break-all; margin: 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 10px; margin-top: 16px; }
.card { background: #fff; border-radius: 8px; padding: 10px 14px; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.card .label { display: block; color: #5b6475; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { display: block; font-size: 20px; font-weight: 600; overflow-wrap: anywhere; }
.card.warn { background: #fff4e5; } .card.wide { grid-column: span 2; }
.card .small { font-size: 14px; font-weight: 500; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 14px; }
figure { margin: 0; background: #fff; border-radius: 8px; padding: 10px; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
figure img { width: 100%; height: auto; display: block; }
figcaption { color: #5b6475; font-size: 13px; margin-top: 4px; }
figure.sample { margin-bottom: 10px; } figure.sample figcaption { margin: 0 0 6px; }
table { border-collapse: collapse; background: #fff; box-shadow: 0 1px 2px rgba(0,0,0,.08); border-radius: 8px;
        overflow: hidden; width: 100%; }
th, td { text-align: left; padding: 5px 12px; border-bottom: 1px solid #eceef2; vertical-align: top; }
th { background: #eceef2; font-weight: 600; } td.key { color: #5b6475; white-space: nowrap; }
td { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; overflow-wrap: anywhere; }
.config { columns: 3 340px; column-gap: 14px; } .config > div { break-inside: avoid; margin-bottom: 14px; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; margin: 0; max-height: 420px; overflow: auto;
      font: 13px/1.4 ui-monospace, Menlo, Consolas, monospace; }
.notes { background: #fff4e5; border-radius: 8px; padding: 8px 14px; margin-top: 16px; }
.muted { color: #5b6475; } footer { color: #5b6475; font-size: 12px; margin-top: 36px; }
"""


# Control characters (model samples are full of them) as their visible Unicode pictures: HTML has no place
# for them, and an invisible character in a sample is worth seeing.
_CONTROL_PICTURES = {code: 0x2400 + code for code in range(32) if chr(code) not in "\t\n\r"} | {0x7F: 0x2421}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True).translate(_CONTROL_PICTURES)


def _count(n: float) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.2f}{suffix}"
    return f"{n:g}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 120 else f"{int(minutes // 60)} h {int(minutes % 60):02d} min"


def _fmt(value: Any, digits: int = 4) -> str:
    number = _number(value)
    return "n/a" if number is None else (f"{number:.{digits}f}" if math.isfinite(number) else str(number))


def _cards(run: Run) -> str:
    last_train = run.train[-1] if run.train else {}
    last_eval = run.evals[-1] if run.evals else {}
    last = max((*run.train, *run.evals), key=lambda r: _number(r.get("step")) or 0, default={})
    checkpoint = f"step {int(run.checkpoint.name.removeprefix('step_'))}" if run.checkpoint else "none"
    cards = [
        ("steps", f"{int(_number(last.get('step')) or 0):,}"),
        ("tokens", _count(_number(last.get("tokens")) or 0)),
        ("training time", _duration(_number(last.get("time_s")) or 0.0)),
        ("train loss", _fmt(last_train.get("train_loss"))),
        ("val loss", _fmt(last_eval.get("val_loss"))),
        ("bits per byte", _fmt(last_eval.get("val_bpb"))),
        ("newest checkpoint", checkpoint),
    ]
    events = Counter(str(e["event"]) for e in run.events)
    html_cards = [
        f'<div class="card"><span class="label">{_e(label)}</span><span class="value">{_e(value)}</span></div>'
        for label, value in cards
    ]
    if events:
        summary = ", ".join(f"{kind} × {n}" for kind, n in sorted(events.items()))
        warn = " warn" if set(events) - set(QUIET_EVENTS) else ""
        html_cards.append(f'<div class="card wide{warn}"><span class="label">events</span>'
                          f'<span class="value small">{_e(summary)}</span></div>')
    return '<section class="cards">' + "".join(html_cards) + "</section>"


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...] | None = None, key_column: bool = True) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join(
        "<tr>" + "".join(f'<td class="key">{_e(c)}</td>' if i == 0 and key_column else f"<td>{_e(c)}</td>"
                         for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table>{head}{body}</table>"


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _flatten(mapping: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            rows.extend(_flatten(value, f"{prefix}{key}."))
        else:
            rows.append((f"{prefix}{key}", _value(value)))
    return rows


def _events_section(run: Run) -> str:
    if not run.events:
        return '<p class="muted">No events: no resumes, skipped updates, rollbacks or fitting flags.</p>'
    rows = [
        (event.get("step", ""), event["event"],
         ", ".join(f"{key}={_value(value)}" for key, value in event.items() if key not in ("event", "step")))
        for event in run.events[:MAX_EVENT_ROWS]
    ]
    more = len(run.events) - MAX_EVENT_ROWS
    note = f'<p class="muted">… and {more} more in metrics.jsonl.</p>' if more > 0 else ""
    return _table(rows, ("step", "event", "details"), key_column=False) + note


def _samples_section(run: Run) -> str:
    if not run.samples:
        return '<p class="muted">No samples.jsonl in this run.</p>'
    shown = run.samples[-MAX_SAMPLES:]
    older = len(run.samples) - len(shown)
    note = f'<p class="muted">{older} older samples are in samples.jsonl.</p>' if older else ""
    return note + "".join(
        f'<figure class="sample"><figcaption>step {_e(sample.get("step", "?"))}</figcaption>'
        f'<pre>{_e(sample["sample"])}</pre></figure>'
        for sample in shown
    )


def _config_section(run: Run) -> str:
    if run.config is None:
        return '<p class="muted">No readable config.yaml in this run.</p>'
    tables = []
    for section, values in run.config.items():
        rows = _flatten(values) if isinstance(values, dict) else [(section, _value(values))]
        tables.append(f"<div><h3>{_e(section)}</h3>{_table(rows)}</div>")
    return '<div class="config">' + "".join(tables) + "</div>"


def _environment_section(run: Run) -> str:
    if run.environment is None:
        return '<p class="muted">No environment.json in this run.</p>'
    return _table(_flatten(run.environment))


def build_report(run_dir: str | Path) -> str:
    """The report of `run_dir` as one self-contained HTML page."""
    run = read_run(run_dir)
    figures = "".join(
        f'<figure id="plot-{plot_id}"><img alt="{_e(caption)}" src="data:image/png;base64,{png}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
        for plot_id, caption, png in _plots(run)
    )
    notes = "".join(f"<li>{_e(problem)}</li>" for problem in run.problems)
    sections = [
        ("Training curves", f'<div class="plots">{figures}</div>' if figures else
         '<p class="muted">No training or evaluation lines yet.</p>'),
        ("Events", _events_section(run)),
        ("Samples", _samples_section(run)),
        ("Configuration", _config_section(run)),
        ("Environment", _environment_section(run)),
    ]
    body = "".join(f"<section><h2>{title}</h2>{content}</section>" for title, content in sections)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gptforge report: {_e(run.path.resolve().name)}</title><style>{CSS}</style></head>
<body><main>
<h1>gptforge run report</h1><p class="path">{_e(run.path.resolve())}</p>
{_cards(run)}
{f'<div class="notes"><ul>{notes}</ul></div>' if notes else ""}
{body}
<footer>Written by gptforge {_e(__version__)} on {_e(time.strftime("%Y-%m-%d %H:%M:%S %Z"))}.</footer>
</main></body></html>
"""


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report (default: RUN_DIR/report.html) and return its path."""
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    page = build_report(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


# ---------------------------------------------------------------- command line


def run_report(args: argparse.Namespace) -> int:
    """`gptforge report`: write the page and say where it is."""
    path = write_report(args.run_dir, args.out)
    print(f"wrote {path}; open it in a browser")
    return 0
