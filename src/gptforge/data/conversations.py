"""Conversations for chat fine-tuning: read from JSONL in the common shapes, or generated from the standard library.

A JSONL line may be any of

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}   OpenAI-style
    {"prompt": "...", "completion": "..."}                                              prompt/completion
    {"instruction": "...", "input": "...", "output": "..."}                             Alpaca ("input" optional)

and becomes a list of messages. A line that cannot be used is skipped and counted by reason (BAD_REASONS),
as `prepare` does for text, with the first few locations kept as examples.

The built-in set asks about the standard library's public functions and classes and answers from their
own docstrings: "What does `json.dumps(obj, *, skipkeys=False, ...)` do?" is answered by the first
paragraph of that docstring. It is read from the source with `ast`, never by importing a module, so it is
the same on every machine with the same Python and has no side effects. Its split is by module: every
question about a module goes to the same side, so validation asks about modules never answered in training.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from gptforge.data.chat import ROLES
from gptforge.data.corpus import MAX_EXAMPLES, stdlib_dir, stdlib_files

BAD_REASONS = {
    "malformed_json": "a line that does not parse as JSON, or is not an object",
    "unknown_shape": "an object without messages, prompt/completion or instruction/output",
    "unknown_role": "a message whose role is not system, user or assistant",
    "non_string_content": "a message whose content (or role) is not a string",
    "empty_content": "a message with empty or whitespace-only content",
    "no_assistant": "no assistant message to learn from",
    "too_long": "longer than the context (--max-tokens) once rendered",
}
MAX_LINE_BYTES = 16 << 20  # a longer line is skipped as malformed without being parsed
ANSWER_CHARS = 600  # the built-in answers: a docstring's first paragraph, cut at a line near this length
QUESTIONS = (
    "What does `{name}` do?",
    "Explain `{name}` from the {module} module.",
    "What is `{name}` for?",
    "In Python's {module} module, what does `{name}` do?",
)


class BadConversation(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Tally:
    """Skipped conversations by reason, with up to MAX_EXAMPLES locations each."""

    def __init__(self):
        self.skipped: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def skip(self, reason: str, location: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < MAX_EXAMPLES:
            self.examples[reason].append(location)

    def summary(self) -> str:
        if not self.skipped:
            return "nothing was skipped"
        return "; ".join(f"{reason} {n} (e.g. {', '.join(self.examples[reason][:2])})"
                         for reason, n in self.skipped.items())


def messages_of(record: object) -> list[dict]:
    """The messages of one parsed JSONL record, checked; BadConversation(reason) when it cannot be used."""
    if not isinstance(record, dict):
        raise BadConversation("malformed_json")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BadConversation("unknown_shape")
        messages = [{"role": m.get("role"), "content": m.get("content")} for m in messages]
    elif "prompt" in record and "completion" in record:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]}]
    elif "instruction" in record and "output" in record:
        instruction, extra = record["instruction"], record.get("input") or ""
        if isinstance(instruction, str) and isinstance(extra, str) and extra.strip():
            instruction = f"{instruction}\n\n{extra}"
        messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": record["output"]}]
    else:
        raise BadConversation("unknown_shape")
    for m in messages:
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise BadConversation("non_string_content")
        if m["role"] not in ROLES:
            raise BadConversation("unknown_role")
        if not m["content"].strip():
            raise BadConversation("empty_content")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadConversation("no_assistant")
    return messages


def read_jsonl(path: Path, tally: Tally) -> Iterator[tuple[list[dict], str]]:
    """(messages, location) for each usable line of a JSONL file; the rest counted in `tally`."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            location = f"{path}:{n}"
            if not line.strip():
                continue
            if len(line) > MAX_LINE_BYTES:
                tally.skip("malformed_json", location)
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                tally.skip("malformed_json", location)
                continue
            try:
                yield messages_of(record), location
            except BadConversation as bad:
                tally.skip(bad.reason, location)


def split_of(key: str, val_share: float) -> str:
    """"val" for a stable `val_share` of keys by hash, else "train"."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    return "val" if h < val_share else "train"


# ---------------------------------------------------------------- the built-in set


def _first_paragraph(doc: str) -> str:
    """A docstring's first paragraph, cut at a line end once past ANSWER_CHARS."""
    lines = inspect.cleandoc(doc).split("\n\n")[0].splitlines()
    out = []
    for line in lines:
        out.append(line.rstrip())
        if sum(len(x) + 1 for x in out) > ANSWER_CHARS:
            break
    return "\n".join(out).strip()


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> str:
    if isinstance(node, ast.ClassDef):
        init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if init is None:
            return node.name
        args = ast.unparse(init.args)
        args = args[len("self"):].lstrip(", ") if args.startswith("self") else args
        return f"{node.name}({args})"
    args, first = ast.unparse(node.args), node.args.args[0].arg if node.args.args else ""
    if first in ("self", "cls"):  # a method is asked about as it is called
        args = args[len(first):].lstrip(", ")
    return f"{node.name}({args})"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def builtin_items(files: list[Path] | None = None, root: Path | None = None) -> Iterator[dict]:
    """One record per documented public module-level function or class of the standard library:
    {"module", "name", "signature", "answer"}; test packages, idlelib and private names are left out."""
    root = stdlib_dir() if root is None else root
    for path in files if files is not None else stdlib_files():
        module = module_name(path, root)
        if not module or any(p.startswith(("_", "test")) or p in ("idlelib", "lib2to3", "site-packages")
                             for p in module.split(".")):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node, owner in _documented(tree):
            answer = _first_paragraph(ast.get_docstring(node))
            if len(answer) >= 20:
                yield {"module": module, "name": f"{owner}{node.name}", "signature": f"{owner}{_signature(node)}",
                       "answer": answer}


def _documented(tree: ast.Module) -> Iterator[tuple[ast.AST, str]]:
    """(node, owner prefix) of each public function, class and public method of a public class that has
    a docstring."""
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for node in tree.body:
        if not isinstance(node, defs) or node.name.startswith("_"):
            continue
        if ast.get_docstring(node):
            yield node, ""
        if isinstance(node, ast.ClassDef):
            for method in node.body:
                if (isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)) and not method.name.startswith("_")
                        and ast.get_docstring(method)):
                    yield method, f"{node.name}."


def builtin_conversation(item: dict) -> list[dict]:
    """The question and answer about one item; the question's wording is picked by the item's hash."""
    qualified = f"{item['module']}.{item['signature']}"
    pick = int(hashlib.sha256(qualified.encode("utf-8")).hexdigest()[:8], 16) % len(QUESTIONS)
    question = QUESTIONS[pick].format(name=qualified, module=item["module"])
    return [{"role": "user", "content": question}, {"role": "assistant", "content": item["answer"]}]
