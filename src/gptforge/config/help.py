"""The config-key reference: every key with its default and help text, for `gptforge train --help`.

The help text of a key is its field's attribute docstring (the string literal right under it) and its
allowed values are the field's choices metadata, so the reference cannot drift from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from typing import Any

from gptforge.config.sections import PRESETS, Config, choices_of


def describe_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every config key, from the dataclass fields and their docstrings."""
    rows = []
    defaults = cls()
    docs = _field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe_keys(hints[f.name], prefix=f"{key}."))
            continue
        default = getattr(defaults, f.name)
        text = docs.get(f.name, "")
        allowed = choices_of(f)
        if allowed is not None and "one of" not in text:
            text = f"{text} [{'|'.join(allowed)}]"
        rows.append((key, "" if default is None else str(default), text))
    return rows


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right under a field) of a dataclass and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def keys_help() -> str:
    """The config-key reference printed by `gptforge train --help`, one block per section."""
    rows = describe_keys()
    width = max(len(k) for k, _, _ in rows)
    lines = ["config keys (key=value after the subcommand; YAML sections with --config):"]
    section = None
    for key, default, text in rows:
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            lines.append("")
        shown = f" (default: {default})" if default != "" else ""
        lines.append(f"  {key:<{width}}  {text}{shown}")
    lines.append("")
    lines.append("presets (model.preset=NAME): " + ", ".join(f"{k} ({_preset_line(v)})" for k, v in PRESETS.items()))
    lines.append("keys of earlier versions still work as their current ones (train.lr is optim.lr, train.eval_every "
                 "is eval.every, ...; the full list is gptforge.config.MIGRATIONS)")
    return "\n".join(lines)


def _preset_line(values: dict[str, Any]) -> str:
    return f"{values['n_layer']}x{values['n_embd']}, {values['n_head']} heads, context {values['block_size']}"
