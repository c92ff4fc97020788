"""Built-in multiple-choice tasks, made offline from Python source the model did not train on.

The source is the run's validation split: `gptforge prepare` (and so the built-in standard-library corpus)
sends each whole document to val when a 64-bit hash of its text falls below a threshold (data/split.py), and
training never reads val. The val tokens are decoded and cut at `<|endoftext|>` into documents, so the tasks
are the same for every run on the same data, and for two runs on different data they differ.

    next_line  the true next line of a function among four: the context is the lines of the function so far
               (at most CONTEXT_LINES = 6), the wrong choices are lines from other held-out functions at the same
               indentation.
    docstring  the docstring that belongs to a signature: the context is `def name(args):` and the opening
               quotes, the choices the first line of this function's docstring and of three others.
    closing    the closing brackets of an expression: the context is two lines and the line up to its run
               of closing brackets, the wrong choices the same run reordered, one bracket short, or one too many.

Items are drawn with a fixed seed, at most `limit` a task; every choice within an item is distinct.
"""

from __future__ import annotations

import itertools
import random
import re

import numpy as np

from gptforge.errors import DataError
from gptforge.evaluate.tasks import Item, Task, encode_pair

CONTEXT_LINES = 6
TASK_NAMES = ("next_line", "docstring", "closing")
_SIGNATURE = re.compile(r'^([ \t]*)(?:async[ \t]+)?def[ \t]+\w+\([^\n]*\)[^\n]*:[ \t]*\n([ \t]*)[rRuU]?"""'
                        r'([^\n"]{12,})', re.MULTILINE)
_CLOSERS = ")]}"


def held_out_documents(data) -> list[str]:
    """The decoded documents of a prepared data directory's val split (a DataDir with a tokenizer)."""
    from gptforge.data.shards import open_shard

    if data.tokenizer is None:
        raise DataError(f"{data.path}: no tokenizer.json, so the held-out text cannot be decoded for the "
                        "built-in tasks; give --data a prepared directory with one")
    tokens = np.concatenate([np.asarray(open_shard(info.path)) for info in data.val])
    eot = data.tokenizer.eot_id
    cuts = np.flatnonzero(tokens == eot)
    pieces = np.split(tokens, cuts)
    return [d for d in (data.tokenizer.decode(p[p != eot].tolist()) for p in pieces) if d.strip()]


def builtin_tasks(documents: list[str], tokenizer, limit: int = 500, seed: int = 0) -> list[Task]:
    """The three built-in tasks from held-out Python documents. Items where the tokenizer merges a choice
    into the context's last token are left out: their continuation would not be the choice's own tokens."""
    makers = {"next_line": _next_line, "docstring": _docstring, "closing": _closing}
    tasks = []
    for name in TASK_NAMES:
        candidates = makers[name](documents, random.Random(f"{seed}:{name}"))
        random.Random(seed).shuffle(candidates)
        items = list(itertools.islice((it for it in candidates if _splits_cleanly(tokenizer, it)), limit))
        if len(items) < 20:
            raise DataError(f"built-in task {name}: only {len(items)} items in the held-out text "
                            f"({len(documents)} documents); it needs Python source with at least 20")
        tasks.append(Task(name, tuple(items), f"builtin:{name} ({len(documents)} held-out documents)"))
    return tasks


def _splits_cleanly(tokenizer, item: Item) -> bool:
    for choice in item.choices:
        ctx, cont = encode_pair(tokenizer.encode, item.context, choice)
        if not cont or tokenizer.encode(item.context.rstrip())[:len(ctx)] != ctx or \
                tokenizer.encode(item.context.rstrip() + choice)[:len(ctx)] != ctx:
            return False
    return True


def _lines(documents: list[str]) -> list[list[str]]:
    return [d.splitlines(keepends=True) for d in documents]


def _indent(line: str) -> str:
    return line[:len(line) - len(line.lstrip(" \t"))]


def _function_lines(lines: list[str]) -> list[tuple[int, int]]:
    """(index of a `def` line, index of a body line after it) pairs: the body lines of each function."""
    out = []
    for i, line in enumerate(lines):
        if not line.lstrip().startswith(("def ", "async def ")):
            continue
        base = len(_indent(line))
        for j in range(i + 1, len(lines)):
            text = lines[j]
            if text.strip() and len(_indent(text)) <= base:
                break
            out.append((i, j))
    return out


def _next_line(documents: list[str], rng: random.Random) -> list[Item]:
    docs = _lines(documents)
    by_indent: dict[str, list[str]] = {}
    candidates = []
    for d, lines in enumerate(docs):
        for start, j in _function_lines(lines):
            line = lines[j]
            body = line.strip()
            if len(body) < 10 or body.startswith(("#", '"""', "'''")) or j - start < 2:
                continue
            by_indent.setdefault(_indent(line), []).append(body)
            candidates.append((d, start, j))
    items = []
    for d, start, j in candidates:
        lines = docs[d]
        true = lines[j]
        indent = _indent(true)
        pool = by_indent[indent]
        wrong = _distinct(rng, pool, {true.strip()}, 3)
        if wrong is None:
            continue
        context = "".join(lines[max(start, j - CONTEXT_LINES):j])
        choices = [true.rstrip("\n")] + [indent + w for w in wrong]
        items.append(_shuffled(rng, context, choices))
    return items


def _docstring(documents: list[str], rng: random.Random) -> list[Item]:
    found = []  # (signature text, docstring first line)
    for doc in documents:
        for m in _SIGNATURE.finditer(doc):
            signature = doc[m.start():m.start(3)]  # through the opening quotes
            found.append((signature, m.group(3).strip()))
    firsts = [f for _, f in found]
    items = []
    for signature, first in found:
        wrong = _distinct(rng, firsts, {first}, 3)
        if wrong is not None:
            items.append(_shuffled(rng, signature, [first, *wrong]))
    return items


def _closing(documents: list[str], rng: random.Random) -> list[Item]:
    items = []
    for lines in _lines(documents):
        for j, line in enumerate(lines):
            text = line.rstrip()
            run = len(text) - len(text.rstrip(_CLOSERS))
            if run < 2 or "'" in text or '"' in text or "#" in text or not _balanced(text):
                continue
            head, tail = text[:-run], text[-run:]
            options = {"".join(p) for p in itertools.permutations(tail)} | {tail[:-1]} | {tail + c for c in _CLOSERS}
            options.discard(tail)
            if len(options) < 3:
                continue
            wrong = rng.sample(sorted(options), 3)
            context = "".join(lines[max(0, j - 2):j]) + head
            items.append(_shuffled(rng, context, [tail, *wrong]))
    return items


def _balanced(text: str) -> bool:
    """Every bracket closes the one opened last (strings and comments were ruled out before)."""
    stack = []
    for ch in text:
        if ch in "([{":
            stack.append(ch)
        elif ch in _CLOSERS:
            if not stack or "([{"[_CLOSERS.index(ch)] != stack.pop():
                return False
    return not stack


def _distinct(rng: random.Random, pool: list[str], exclude: set[str], k: int) -> list[str] | None:
    """k different strings of `pool`, none in `exclude`; None when the pool has too few."""
    picked: list[str] = []
    for _ in range(20 * k):
        s = pool[rng.randrange(len(pool))]
        if s not in exclude and s not in picked:
            picked.append(s)
            if len(picked) == k:
                return picked
    return None


def _shuffled(rng: random.Random, context: str, choices: list[str]) -> Item:
    """The item with its choices in random order; choices[0] was the right one."""
    order = list(range(len(choices)))
    rng.shuffle(order)
    return Item(context, tuple(choices[i] for i in order), order.index(0))
