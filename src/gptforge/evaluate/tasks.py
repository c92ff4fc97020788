"""Multiple-choice evaluation: each choice scored by its log-likelihood after the context, as HellaSwag and
ARC are scored; tasks from JSONL; accuracy with a 95% interval; a CORE-style aggregate over tasks.

Scoring one item: every choice is a continuation of the context. Its log-likelihood is the sum, over the
continuation's tokens, of log p(token | everything before it), with `<|endoftext|>` first (every training
document follows one). `acc` picks the choice of highest sum; `acc_norm` divides each sum by the choice's
length in characters first (lm-evaluation-harness's acc_norm), so a long choice is not penalised for having
more tokens. Tokenization follows lm-evaluation-harness: whitespace ending the context moves to the start of
the continuation, the pair is encoded together, and the continuation is what follows the context's tokens.
A sequence longer than the context window keeps its last block_size + 1 tokens.

The interval is Wilson's score interval at 95%. The aggregate is nanochat's CORE idea: each task's accuracy
centred on chance, (acc_norm - chance) / (1 - chance), averaged over tasks, so 0 is guessing and 1 is perfect.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from gptforge.errors import DataError

Z95 = 1.959964  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    label: int  # index of the right choice


@dataclass(frozen=True)
class Task:
    name: str
    items: tuple[Item, ...]
    source: str  # a file, or how a built-in task was made

    @property
    def chance(self) -> float:
        """Expected accuracy of a uniform guess."""
        return sum(1 / len(it.choices) for it in self.items) / max(len(self.items), 1)


# ----------------------------------------------------------------------------------------------------------
# Tasks from JSONL


def read_jsonl_task(path: str | Path, name: str | None = None) -> Task:
    """One item a line: {"context": str, "choices": [str, ...] (at least 2), "label": int}; a bad line is an
    error naming the file and line. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such task file; expected JSONL lines {{\"context\", \"choices\", \"label\"}}")
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                items.append(_item(line, f"{path}:{number}"))
    if not items:
        raise DataError(f"{path}: no items; expected JSONL lines {{\"context\", \"choices\", \"label\"}}")
    return Task(name or path.stem, tuple(items), str(path))


def _item(line: str, where: str) -> Item:
    try:
        raw = json.loads(line)
    except ValueError as e:
        raise DataError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object with context, choices and label")
    context, choices, label = raw.get("context"), raw.get("choices"), raw.get("label")
    if not isinstance(context, str):
        raise DataError(f"{where}: context: expected a string, got {json.dumps(context)[:40]}")
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
        raise DataError(f"{where}: choices: expected a list of at least 2 non-empty strings")
    if not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(choices)):
        raise DataError(f"{where}: label: expected an index into the {len(choices)} choices, got "
                        f"{json.dumps(label)[:40]}")
    return Item(context, tuple(choices), label)


# ----------------------------------------------------------------------------------------------------------
# Log-likelihoods


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness's HFLM makes them."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model: torch.nn.Module, requests: Sequence[tuple[list[int], list[int]]], block_size: int,
                   device: torch.device | str = "cpu", batch_size: int = 32,
                   autocast=None) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the continuation's summed log-probability, and whether every
    one of its tokens is the model's greedy choice. The context ids should start with the document marker."""
    rows = []
    for ctx, cont in requests:
        if not cont:
            raise ValueError("an empty continuation has no log-likelihood")
        seq = (ctx + cont)[-(block_size + 1):]
        rows.append((seq, min(len(cont), len(seq) - 1)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(rows[i][0]) for i in chunk) - 1
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, i in enumerate(chunk):
            seq = rows[i][0]
            x[r, :len(seq) - 1] = torch.tensor(seq[:-1])
        with autocast() if autocast is not None else _nothing():
            logits = model(x.to(device))  # (B, width, V); padding sits after each row, so causal attention ignores it
        for r, i in enumerate(chunk):
            seq, n = rows[i]
            end = len(seq) - 1
            targets = torch.tensor(seq[end - n + 1:end + 1])  # (n,)
            # (n, V): only the positions that predict the continuation, in fp32
            lp = torch.log_softmax(logits[r, end - n:end].float(), dim=-1).cpu()
            out[i] = (lp.gather(1, targets[:, None]).sum().item(), bool((lp.argmax(-1) == targets).all()))
    return out


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------------------------------------
# Scores


def item_requests(encode: Callable[[str], list[int]], eot: int, item: Item) -> list[tuple[list[int], list[int]]]:
    return [(lambda c, k: ([eot, *c], k))(*encode_pair(encode, item.context, choice)) for choice in item.choices]


def score_task(model: torch.nn.Module, tokenizer, task: Task, block_size: int, device="cpu", batch_size: int = 32,
               autocast=None) -> dict:
    """acc and acc_norm with their 95% intervals, the number of items and chance, for one task."""
    requests, spans = [], []
    for number, item in enumerate(task.items, 1):
        spans.append((len(requests), len(item.choices)))
        requests += item_requests(tokenizer.encode, tokenizer.eot_id, item)
        if any(not cont for _, cont in requests[-len(item.choices):]):
            raise DataError(f"{task.source}: item {number}: a choice adds no token after the context (the "
                            "tokenizer merges it into the context's last token); end the context at a word break")
    lls = [ll for ll, _ in loglikelihoods(model, requests, block_size, device, batch_size, autocast)]
    return score_from_loglikelihoods(task, [lls[s:s + n] for s, n in spans])


def score_from_loglikelihoods(task: Task, per_item: Sequence[Sequence[float]]) -> dict:
    """The task's metrics from each item's choice log-likelihoods (as gptforge or lm-eval computed them)."""
    right = right_norm = 0
    for item, lls in zip(task.items, per_item):
        right += _argmax(lls) == item.label
        right_norm += _argmax([ll / len(c) for ll, c in zip(lls, item.choices)]) == item.label
    n = len(task.items)
    return {"task": task.name, "n": n, "chance": task.chance, "acc": right / n, "acc_ci95": wilson(right, n),
            "acc_norm": right_norm / n, "acc_norm_ci95": wilson(right_norm, n), "source": task.source}


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def core_score(results: Sequence[dict]) -> float:
    """Mean over tasks of acc_norm centred on chance: 0 for guessing, 1 for every item right."""
    return sum((r["acc_norm"] - r["chance"]) / (1 - r["chance"]) for r in results) / len(results)
