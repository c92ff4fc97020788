"""`gptforge runs`: every state a run can be in, read from its own files, quickly and without torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from gptforge.cli import main
from gptforge.config import load_config
from gptforge.model.gpt import GPT
from gptforge.observe.metrics import read_metrics
from gptforge.observe.runlist import list_runs
from gptforge.train.checkpoint import save_weights
from gptforge.train.loop import train
from gptforge.train.runlock import run_lock

TINY = ["model.preset=tiny", "train.max_time=null", "eval.every=5", "eval.tokens=2048", "train.samples=0",
        "run.tensorboard=false"]


@pytest.fixture(scope="module")
def finished(small_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "done"
    train(load_config(None, [*TINY, f"data.dir={small_data}", f"run.dir={run_dir}", "train.max_steps=10"]))
    return run_dir


def rewrite(run_dir, last_line):
    """The run as another ending would have left it: its final `finished` line replaced (or dropped)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["event"] == "finished"
    (run_dir / "metrics.jsonl").write_text("\n".join(lines[:-1] + ([json.dumps(last_line)] if last_line else [])) + "\n")


def by_name(root):
    return {row["run"].removeprefix(str(root) + "/"): row for row in list_runs(root)}


def test_every_state_with_its_figures(finished, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(finished, root / "done")
    for name, ending in [("killed", None), ("ctrl-c", {"event": "interrupted", "step": 10, "saved": True}),
                         ("early", {"event": "finished", "step": 10, "reason": "early_stop"}),
                         ("pruned-trial", {"event": "stopped", "step": 10, "reason": "pruned"})]:
        shutil.copytree(finished, root / "study" / name)
        rewrite(root / "study" / name, ending)
    shutil.copytree(finished, root / "busy")
    cfg = load_config(None, ["model.preset=tiny", "model.vocab_size=300"])
    save_weights(root / "imported", GPT(cfg.model), cfg.to_dict())
    with open(root / "study" / "killed" / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "tokens": 112')  # torn by the kill

    with run_lock(root / "busy"):
        rows = by_name(root)
    assert {name: row["state"] for name, row in rows.items()} == {
        "done": "finished", "busy": "running", "imported": "weights only", "study/killed": "interrupted",
        "study/ctrl-c": "interrupted", "study/early": "stopped early", "study/pruned-trial": "stopped"}
    assert "held by pid" in rows["busy"]["holder"]
    assert rows["study/killed"]["unreadable_lines"] == 1

    records = [r for r in read_metrics(finished) if "event" not in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    done = rows["done"]
    assert done["step"] == 10 and done["checkpoints"] == [10]
    assert done["best_val_loss"] == min(vals) and done["last_val_loss"] == vals[-1]
    assert done["tokens"] == records[-1]["tokens"] and done["time_s"] == records[-1]["time_s"]
    assert done["size_bytes"] == sum(p.stat().st_size for p in finished.rglob("*") if p.is_file())
    assert rows["imported"]["step"] == 0 and rows["imported"]["best_val_loss"] is None


def test_a_resumed_run_reads_as_its_newest_session(finished, small_data, tmp_path):
    run_dir = tmp_path / "r"
    shutil.copytree(finished, run_dir)
    rewrite(run_dir, {"event": "interrupted", "step": 10, "saved": True})
    assert list_runs(tmp_path)[0]["state"] == "interrupted"
    train(load_config(None, [*TINY, f"data.dir={small_data}", f"run.dir={run_dir}", "train.max_steps=15"]))
    [row] = list_runs(tmp_path)
    assert (row["state"], row["step"]) == ("finished", 15)


def test_the_table_and_json_on_the_command_line(finished, tmp_path, capsys):
    shutil.copytree(finished, tmp_path / "a")
    assert main(["runs", str(tmp_path)]) == 0
    header, line = capsys.readouterr().out.splitlines()
    assert header.split() == ["run", "state", "step", "best", "val", "last", "val", "tokens", "time", "size"]
    assert line.split()[:3] == [str(tmp_path / "a"), "finished", "10"]
    assert main(["runs", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["state"] == "finished"
    assert main(["runs", str(tmp_path / "none")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_runs_and_help_answer_without_importing_torch(finished, tmp_path):
    """A generous bound on the wall time, and the cause checked directly: torch is never imported."""
    shutil.copytree(finished, tmp_path / "a")
    code = ("import sys, contextlib, io\n"
            "from gptforge.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            f"    assert main(['runs', {str(tmp_path)!r}]) == 0\n"
            "    assert main(['train', 'model.n_layr=2']) == 2\n"
            "    for command in ('', 'prepare', 'train', 'lr-find', 'tune', 'sample', 'eval', 'inspect', 'report',\n"
            "                    'bench', 'doctor', 'runs', 'quantize', 'prune', 'compare', 'import-hf', 'export-hf'):\n"
            "        try:\n"
            "            main([command, '--help'] if command else ['--help'])\n"
            "        except SystemExit:\n"
            "            pass\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    for argv in (["--help"], ["runs", str(tmp_path)], ["train", "model.n_layr=2"]):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "gptforge", *argv], capture_output=True, timeout=60)
        assert time.perf_counter() - start < 2.0, argv  # torch's import alone takes about 2 s on 2 cores
