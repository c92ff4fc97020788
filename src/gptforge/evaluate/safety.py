"""Output safety filter: find what generated text should not show, then mask it or withhold the output.

Word lists and regular expressions are predictable, auditable and nearly free at generation time; they
also miss whatever they do not spell out. So the shipped lists (safety_lists.yaml) are a modest start,
a domain brings its own (`--safety-lists FILE`), and an optional classifier, any callable from text to a
probability of harm, covers what lists cannot see.

Modes: `mask` replaces each matched span with `[masked:<category>]`; `block` replaces the whole output with
a refusal message. A classifier judges the whole text and cannot point at a span, so a score at or over its
threshold withholds the output in either mode. The filter counts what it did (`.counts`), for a report
after a batch of samples.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from gptforge.errors import DataError, GptforgeError

MODES = ("mask", "block")
DEFAULT_LISTS = "safety_lists.yaml"
CLASSIFIER = "classifier"  # the category a classifier's verdict is reported under
DEFAULT_REFUSAL = "[output withheld by the safety filter: {categories}]"


def luhn(text: str) -> bool:
    """The Luhn checksum of the digits in `text`, which every payment card number satisfies."""
    digits = [int(c) for c in text if c.isdigit()][::-1]
    total = sum(d if i % 2 == 0 else (2 * d - 9 if d > 4 else 2 * d) for i, d in enumerate(digits))
    return total % 10 == 0


CHECKS: dict[str, Callable[[str], bool]] = {"luhn": luhn}


@dataclass(frozen=True)
class Rule:
    """One compiled word list or pattern of a category; `check`, when set, must accept a match too."""

    category: str
    regex: re.Pattern
    check: Callable[[str], bool] | None = None


@dataclass
class Verdict:
    """What check() found in one text.

    categories: matches per category (the classifier's verdict counts as one match of "classifier");
    spans: (start, end, category), sorted and non-overlapping; score: the classifier's probability, None
    without one; blocked: whether apply() withholds the whole text.
    """

    categories: dict[str, int]
    spans: list[tuple[int, int, str]]
    score: float | None
    blocked: bool


@dataclass
class Counts:
    """Totals over every apply(): outputs seen, masked and blocked, and the outputs in which each category was found."""

    outputs: int = 0
    masked: int = 0
    blocked: int = 0
    categories: Counter = field(default_factory=Counter)


class SafetyFilter:
    """Masks or withholds generated text that matches its rules or that its classifier scores as harmful."""

    def __init__(self, rules: list[Rule], *, mode: str = "mask", classifier: Callable[[str], float] | None = None,
                 threshold: float = 0.5, refusal: str = DEFAULT_REFUSAL):
        if mode not in MODES:
            raise GptforgeError(f"safety mode {mode!r} is not one of {', '.join(MODES)} (no filter at all: off)")
        if not 0.0 <= threshold <= 1.0:
            raise GptforgeError(f"safety classifier threshold must be in [0, 1], got {threshold}")
        if classifier is not None and not callable(classifier):
            raise GptforgeError(f"safety classifier must be a callable text -> probability, got {classifier!r}")
        self.rules = rules
        self.mode = mode
        self.classifier = classifier
        self.threshold = threshold
        self.refusal = refusal
        self.counts = Counts()

    @classmethod
    def from_file(cls, path: str | Path | None = None, mode: str = "mask",
                  classifier: Callable[[str], float] | None = None, threshold: float = 0.5) -> SafetyFilter:
        """A filter with the lists in `path` (YAML, see safety_lists.yaml), or the shipped ones when None."""
        if path is None:
            text = resources.files("gptforge.evaluate").joinpath(DEFAULT_LISTS).read_text(encoding="utf-8")
            source = f"{DEFAULT_LISTS} (shipped with gptforge)"
        else:
            if not Path(path).is_file():
                raise DataError(f"{path}: no such safety list file")
            text, source = Path(path).read_text(encoding="utf-8"), str(path)
        rules, refusal = parse_lists(text, source)
        return cls(rules, mode=mode, classifier=classifier, threshold=threshold, refusal=refusal)

    def check(self, text: str) -> Verdict:
        """Every rule's matches in `text` and the classifier's score; counts nothing."""
        found = sorted((m.start(), m.end(), rule.category) for rule in self.rules for m in rule.regex.finditer(text)
                       if rule.check is None or rule.check(m.group()))
        spans = _merge(found)
        categories = dict(Counter(category for _, _, category in spans))
        score = None
        if self.classifier is not None:
            score = float(self.classifier(text))
            if not 0.0 <= score <= 1.0:  # also catches nan
                raise GptforgeError(f"the safety classifier returned {score}; expected a probability in [0, 1]")
            if score >= self.threshold:
                categories[CLASSIFIER] = 1
        blocked = CLASSIFIER in categories or (self.mode == "block" and bool(spans))
        return Verdict(categories, spans, score, blocked)

    def apply(self, text: str) -> tuple[str, Verdict]:
        """The text to show (unchanged, masked, or the refusal) and the verdict; updates `.counts`."""
        verdict = self.check(text)
        self.counts.outputs += 1
        self.counts.categories.update(verdict.categories.keys())
        if verdict.blocked:
            self.counts.blocked += 1
            return self.refusal.replace("{categories}", ", ".join(sorted(verdict.categories))), verdict
        if verdict.spans:
            self.counts.masked += 1
            return _mask(text, verdict.spans), verdict
        return text, verdict

    def summary(self) -> str:
        """One line for after a batch of outputs, e.g. 'safety (mask): 4 outputs, 1 masked, 0 blocked; ...'."""
        c = self.counts
        outputs = f"{c.outputs} output" + "s" * (c.outputs != 1)
        line = f"safety ({self.mode}): {outputs}, {c.masked} masked, {c.blocked} blocked"
        if c.categories:
            line += "; found " + ", ".join(f"{name} in {n}" for name, n in sorted(c.categories.items()))
        return line


def _merge(spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Sorted spans with overlaps joined; a joined span keeps the category of the match that starts first."""
    merged: list[tuple[int, int, str]] = []
    for start, end, category in spans:
        if merged and start < merged[-1][1]:
            prev_start, prev_end, prev_category = merged[-1]
            merged[-1] = (prev_start, max(prev_end, end), prev_category)
        else:
            merged.append((start, end, category))
    return merged


def _mask(text: str, spans: list[tuple[int, int, str]]) -> str:
    pieces, pos = [], 0
    for start, end, category in spans:
        pieces += [text[pos:start], f"[masked:{category}]"]
        pos = end
    return "".join(pieces) + text[pos:]


# ----------------------------------------------------------------------------------------------------------
# List files


def parse_lists(text: str, source: str) -> tuple[list[Rule], str]:
    """Rules and refusal message from the YAML text of a list file; errors name `source` and the entry."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DataError(f"{source}: not valid YAML ({exc})") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("categories"), dict) or not tree["categories"]:
        raise DataError(f"{source}: expected a mapping `categories: {{name: {{words: [...], patterns: [...]}}}}`")
    unknown = set(tree) - {"categories", "refusal"}
    if unknown:
        raise DataError(f"{source}: unknown top-level keys {sorted(unknown)}; expected categories and refusal")
    refusal = tree.get("refusal", DEFAULT_REFUSAL)
    if not isinstance(refusal, str):
        raise DataError(f"{source}: refusal must be a string, got {refusal!r}")
    rules = []
    for name, spec in tree["categories"].items():
        where = f"{source}: category {name!r}"
        if name == CLASSIFIER:
            raise DataError(f"{where}: the name is reserved for the classifier's verdict; choose another")
        if not isinstance(spec, dict) or not spec or set(spec) - {"words", "patterns"}:
            raise DataError(f"{where}: expected a mapping with `words` and/or `patterns`, got {spec!r}")
        words = spec.get("words", [])
        if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
            raise DataError(f"{where}: words must be a list of non-empty strings")
        if words:
            rules.append(Rule(str(name), _word_regex(words)))
        patterns = spec.get("patterns", [])
        if not isinstance(patterns, list):
            raise DataError(f"{where}: patterns must be a list")
        rules += [_pattern_rule(str(name), entry, f"{where}, pattern {i}") for i, entry in enumerate(patterns, 1)]
    return rules, refusal


def _word_regex(words: list[str]) -> re.Pattern:
    """One case-insensitive alternation of whole words and phrases, longest first so phrases win."""
    alternatives = sorted({r"\s+".join(map(re.escape, w.split())) for w in words}, key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def _pattern_rule(category: str, entry, where: str) -> Rule:
    check = None
    if isinstance(entry, dict):
        name = entry.get("check")
        if set(entry) - {"regex", "check"} or (name is not None and name not in CHECKS):
            raise DataError(f"{where}: expected {{regex: ..., check: {' | '.join(CHECKS)}}}, got {entry!r}")
        check = None if name is None else CHECKS[name]
        entry = entry.get("regex")
    if not isinstance(entry, str) or not entry:
        raise DataError(f"{where}: expected a regular expression string, got {entry!r}")
    try:
        regex = re.compile(entry)
    except re.error as exc:
        raise DataError(f"{where}: not a valid regular expression ({exc}): {entry!r}") from None
    if regex.search("") is not None:
        raise DataError(f"{where}: matches the empty string, so it would match everywhere: {entry!r}")
    return Rule(category, regex, check)


# ----------------------------------------------------------------------------------------------------------
# Command line


def safety_from_args(args: argparse.Namespace) -> SafetyFilter | None:
    """The filter the arguments ask for; None for --safety off."""
    if args.safety == "off":
        if args.safety_lists:
            raise GptforgeError("--safety-lists has no effect with --safety off; drop one of them")
        return None
    return SafetyFilter.from_file(args.safety_lists, mode=args.safety)
