"""Multiple-choice scoring against hand-computed cases, JSONL tasks and their errors, the built-in tasks made
from held-out source, and `gptforge eval --tasks`. fp32 throughout (the suite's default)."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch
from torch import nn

from support import random_weights_run

from gptforge.cli import main
from gptforge.data.tokenizer import Tokenizer
from gptforge.errors import DataError
from gptforge.evaluate.builtin_tasks import TASK_NAMES, builtin_tasks
from gptforge.evaluate.tasks import (
    Item, Task, core_score, encode_pair, loglikelihoods, read_jsonl_task, score_from_loglikelihoods, wilson,
)


class Bigram(nn.Module):
    """logits[b, t] = TABLE[idx[b, t]]: the next token's distribution depends on the current token only."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx]  # (B, T, V)


TABLE = torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])


def _logp(a: int, b: int) -> float:
    row = TABLE[a].tolist()
    return row[b] - math.log(sum(math.exp(v) for v in row))


def test_loglikelihood_is_the_sum_over_the_continuation_by_hand():
    (ll, greedy), (ll2, greedy2), (ll3, _) = loglikelihoods(
        Bigram(TABLE), [([0, 1], [0, 2]), ([2], [2, 2]), ([0, 1, 0, 2], [2])], block_size=8, batch_size=2)
    assert ll == pytest.approx(_logp(1, 0) + _logp(0, 2), abs=1e-6)
    assert greedy  # 1 -> 0 and 0 -> 2 are each row's largest logit
    assert ll2 == pytest.approx(2 * _logp(2, 2), abs=1e-6) and greedy2
    assert ll3 == pytest.approx(_logp(2, 2), abs=1e-6)
    # a window of 2 keeps the last 3 tokens [1, 0, 2] of [0, 1, 0, 2]: the continuation is unchanged
    (short, _), = loglikelihoods(Bigram(TABLE), [([0, 1, 0], [2, 1])], block_size=2)
    assert short == pytest.approx(_logp(0, 2) + _logp(2, 1), abs=1e-6)


def test_acc_and_acc_norm_by_hand():
    task = Task("t", (Item("c", ("a", "bbbb"), 1), Item("c", ("xx", "y", "z"), 0)), "here")
    # item 1: sums favour "a" (-1 > -2), per character "bbbb" (-0.5 > -1); item 2: "xx" wins both ways
    result = score_from_loglikelihoods(task, [[-1.0, -2.0], [-1.0, -3.0, -2.0]])
    assert result["acc"] == 0.5 and result["acc_norm"] == 1.0
    assert result["chance"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    lo, hi = wilson(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)  # Wilson's interval for 8 of 10
    assert core_score([dict(acc_norm=0.625, chance=0.25), dict(acc_norm=0.25, chance=0.25)]) == pytest.approx(0.25)


def test_encode_pair_moves_trailing_space_to_the_continuation():
    encode = lambda s: [ord(c) for c in s]  # noqa: E731
    assert encode_pair(encode, "ab ", "c") == ([97, 98], [32, 99])


@pytest.mark.parametrize("line, words", [
    ("{not json", "t.jsonl:2: not valid JSON"),
    ('{"context": 3, "choices": ["a", "b"], "label": 0}', "t.jsonl:2: context: expected a string"),
    ('{"context": "x", "choices": ["a"], "label": 0}', "t.jsonl:2: choices: expected a list of at least 2"),
    ('{"context": "x", "choices": ["a", "b"], "label": 2}', "t.jsonl:2: label: expected an index into the 2"),
])
def test_a_bad_jsonl_line_is_named(tmp_path, line, words):
    path = tmp_path / "t.jsonl"
    path.write_text('{"context": "x", "choices": ["a", "b"], "label": 1}\n' + line + "\n")
    with pytest.raises(DataError, match=words):
        read_jsonl_task(path)


@pytest.fixture(scope="module")
def stdlib_docs() -> list[str]:
    """Held-out-like Python: a few standard-library modules read as they are."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    names = ("argparse.py", "textwrap.py", "calendar.py", "fractions.py", "shlex.py", "configparser.py")
    return [(lib / n).read_text(encoding="utf-8") for n in names]


def test_builtin_items_come_from_the_text_and_are_well_formed(stdlib_docs):
    tok = Tokenizer.train_bpe(stdlib_docs, vocab_size=512)
    tasks = builtin_tasks(stdlib_docs, tok, limit=40)
    assert [t.name for t in tasks] == list(TASK_NAMES) and all(len(t.items) == 40 for t in tasks)
    joined = "\n".join(stdlib_docs)
    for task in tasks:
        for item in task.items:
            assert len(set(item.choices)) == len(item.choices) == 4
            right = item.choices[item.label]
            assert (item.context + right) in joined or (item.context.rstrip() + right) in joined
            for wrong in item.choices[:item.label] + item.choices[item.label + 1:]:
                assert (item.context + wrong + "\n") not in joined or task.name == "docstring"
    assert builtin_tasks(stdlib_docs, tok, limit=40)[0].items == tasks[0].items  # a fixed seed


def test_eval_tasks_on_the_command_line(small_data, tmp_path, capsys):
    run = random_weights_run(small_data, tmp_path / "run")
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"context": f"def f{i}(x):\n    return", "choices": [" x", " y", " (x"],
                                        "label": 0}) + "\n" for i in range(5)))
    assert main(["eval", str(run), "--tasks", str(path), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    (mine,) = result["tasks"]
    assert mine["task"] == "mine" and mine["n"] == 5 and mine["chance"] == pytest.approx(1 / 3)
    assert result["core"] == pytest.approx((mine["acc_norm"] - 1 / 3) / (2 / 3))
    assert main(["eval", str(run), "--tasks", str(path), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "mine" in table and "CORE" in table
    assert main(["eval", str(run), "--tasks", str(tmp_path / "none.jsonl")]) == 2
    assert "no such task file" in capsys.readouterr().err
