"""`compare`: one row per variant with every field, the JSON output, the table, and errors."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math

import pytest
from support import random_weights_run

from gptforge.adapt.compare import FIELDS, compare, run_compare
from gptforge.adapt.prune import prune_run
from gptforge.adapt.quantize import quantize_run
from gptforge.cli import build_parser
from gptforge.errors import GptforgeError

quiet = dict(report=lambda m: None)


@pytest.fixture(scope="module")
def variants(small_data, tmp_path_factory):
    """A weights-only run of a small random GPT and its int8, int4 and 2:4-pruned variants."""
    root = tmp_path_factory.mktemp("variants")
    random_weights_run(small_data, root / "base")
    return [root / "base", quantize_run(root / "base", root / "int8", "int8", **quiet),
            quantize_run(root / "base", root / "int4", "int4", group_size=32, **quiet),
            prune_run(root / "base", root / "pruned", 0.5, "2:4", **quiet)]


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["compare", *argv])


def test_one_row_per_variant_with_every_field(variants):
    rows = compare(variants, tokens=4, **quiet)
    assert [r["name"] for r in rows] == [str(p) for p in variants]
    for r in rows:
        assert set(r) == set(FIELDS)
        assert r["device"] == "cpu" and r["memory_kind"] == "model_tensors" and r["step"] == 0
        assert math.isfinite(r["val_loss"]) and r["val_bpb"] > 0 and r["tokens_per_s"] > 0
        assert r["disk_bytes"] > 0 and r["memory_bytes"] > 0
    base, int8, int4, pruned = rows
    assert base["params"] == int8["params"] == int4["params"] == pruned["params"]
    assert int4["disk_bytes"] < int8["disk_bytes"] < base["disk_bytes"] == pruned["disk_bytes"]
    assert base["linear_bytes"] / int8["linear_bytes"] >= 3.5
    assert int8["val_loss"] == pytest.approx(base["val_loss"], rel=0.01)


def test_json_output_parses_and_the_table_prints(variants, capsys):
    assert run_compare(parse([*map(str, variants[:2]), "--tokens", "2", "--json", "--device", "cpu"])) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)  # progress goes to stderr: stdout stays one JSON document
    assert len(rows) == 2 and set(rows[0]) == set(FIELDS)
    progress = [line for line in captured.err.splitlines() if line.startswith("compare: ")]
    assert progress[0].startswith("compare: 0/2 runs") and progress[-1].startswith("compare: 2/2 runs (100%)")
    assert all("elapsed " in line for line in progress)
    assert run_compare(parse([str(variants[0]), "--tokens", "2", "--device", "cpu"])) == 0
    assert "val loss" in capsys.readouterr().out


def test_png_needs_matplotlib(variants, tmp_path):
    args = parse([str(variants[0]), "--tokens", "2", "--device", "cpu", "--png", str(tmp_path / "c.png")])
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(GptforgeError, match=r"--png needs matplotlib.*gptforge\[plot\]"):
            run_compare(args)
    else:
        assert run_compare(args) == 0 and (tmp_path / "c.png").stat().st_size > 0


def test_bad_inputs_give_clear_errors(variants, tmp_path):
    with pytest.raises(GptforgeError, match="no such run directory"):
        compare([variants[0], tmp_path / "missing"], tokens=2, **quiet)
    with pytest.raises(GptforgeError, match="--tokens must be at least 1"):
        compare(variants, tokens=0, **quiet)
