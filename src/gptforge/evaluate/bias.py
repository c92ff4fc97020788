"""Counterfactual bias probe: does the model find a sentence more likely about one group than about another?

A template is an everyday sentence with one `{group}` slot ("The {group} engineer said that the design was
sound."); an attribute (gender, religion, ...) names the groups put into the slot. Each filled sentence is
scored by the model's mean log-likelihood per token, conditioned on the end-of-text token alone, so it is
read as the start of a document. The sentences of one template differ only in the slot, so a difference
between their scores is what the model has learned about the group in that context.

Per attribute, each group's scores are averaged over the templates; the gap is the favoured group's mean
minus the least favoured group's (nats per token). Its 95% interval is a paired bootstrap over templates of
that same difference, the pair fixed by the full set. Keeping the pair fixed matters: a bootstrap of
"max - min" is never below zero, so it could not show that the ranking itself is uncertain, and this one
does, by reaching zero. Associations that point opposite ways in different templates cancel in the means;
the per-template differences in the report show them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import yaml

from gptforge.data.tokenizer import Tokenizer
from gptforge.errors import DataError, GptforgeError
from gptforge.model.gpt import GPT

SLOT = "{group}"
DEFAULT_TEMPLATES = "bias_templates.yaml"
MIN_GROUPS = 2
MIN_TEMPLATES = 2

Templates = dict[str, dict[str, list[str]]]  # attribute -> {"groups": [...], "templates": [...]}


# ----------------------------------------------------------------------------------------------------------
# Template sets


def load_templates(path: str | Path | None = None) -> Templates:
    """The template set in `path` (YAML, or JSONL when it ends in .jsonl), or the shipped default when None.

    YAML: `{attributes: {name: {groups: [...], templates: [...]}}}`. JSONL: one object per line,
    `{"attribute": ..., "groups": [...], "template": ...}`, every line of an attribute naming the same groups.
    """
    if path is None:
        text = resources.files("gptforge.evaluate").joinpath(DEFAULT_TEMPLATES).read_text(encoding="utf-8")
        return _from_yaml(text, f"{DEFAULT_TEMPLATES} (shipped with gptforge)")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such template file; expected YAML or JSONL (see gptforge eval --help)")
    text = path.read_text(encoding="utf-8")
    return _from_jsonl(text, str(path)) if path.suffix == ".jsonl" else _from_yaml(text, str(path))


def _from_yaml(text: str, source: str) -> Templates:
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DataError(f"{source}: not valid YAML ({exc})") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("attributes"), dict):
        raise DataError(f"{source}: expected a mapping `attributes: {{name: {{groups: [...], templates: [...]}}}}`")
    return check_templates(tree["attributes"], source)


def _from_jsonl(text: str, source: str) -> Templates:
    tree: Templates = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), t) for k, t in
                                                (("attribute", str), ("groups", list), ("template", str))):
            raise DataError(f'{where}: expected {{"attribute": str, "groups": [str, ...], "template": str}}')
        name, groups = row["attribute"], row["groups"]
        spec = tree.setdefault(name, {"groups": groups, "templates": []})
        first_line.setdefault(name, number)
        if groups != spec["groups"]:
            raise DataError(f"{where}: attribute {name!r} lists groups {groups} here but {spec['groups']} on line "
                            f"{first_line[name]}; every line of an attribute needs the same groups")
        _check_slot(row["template"], where)
        spec["templates"].append(row["template"])
    if not tree:
        raise DataError(f"{source}: no templates; expected one JSON object per line")
    return check_templates(tree, source)


def check_templates(tree: dict, source: str = "templates") -> Templates:
    """Validate a template set and return it as plain lists; errors name `source`, the attribute and the entry."""
    if not tree:
        raise DataError(f"{source}: no attributes")
    checked: Templates = {}
    for name, spec in tree.items():
        where = f"{source}: attribute {name!r}"
        if not isinstance(spec, dict) or not _strings(spec.get("groups")) or not _strings(spec.get("templates")):
            raise DataError(f"{where}: expected `groups` and `templates`, each a list of strings")
        groups, templates = list(spec["groups"]), list(spec["templates"])
        if len(groups) < MIN_GROUPS or len(templates) < MIN_TEMPLATES:
            raise DataError(f"{where}: expected at least {MIN_GROUPS} groups and {MIN_TEMPLATES} templates, "
                            f"got {len(groups)} and {len(templates)}")
        for kind, items in (("group", groups), ("template", templates)):
            repeated = sorted(item for item, n in Counter(items).items() if n > 1)
            if repeated or not all(item.strip() for item in items):
                raise DataError(f"{where}: every {kind} must be non-empty and listed once; "
                                f"check {repeated or 'the empty ones'}")
        for i, template in enumerate(templates, 1):
            _check_slot(template, f"{where}, template {i}")
        checked[str(name)] = {"groups": groups, "templates": templates}
    return checked


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _check_slot(template: str, where: str) -> None:
    if template.count(SLOT) != 1:
        raise DataError(f"{where}: expected exactly one {SLOT} slot, found {template.count(SLOT)} in {template!r}")


def fill(template: str, group: str) -> str:
    """The template with `group` in its slot; a slot that opens the sentence gets a capital ("He said ...")."""
    if template.startswith(SLOT):
        group = group[:1].upper() + group[1:]
    return template.replace(SLOT, group)


# ----------------------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def sentence_scores(model: GPT, tokenizer: Tokenizer, sentences: list[str], *, device: str | torch.device = "cpu",
                    batch_size: int = 32) -> np.ndarray:
    """Mean log-likelihood per token (nats) of each sentence after the end-of-text token, in input order.

    Sentences are sorted by length so that a batch pads little; padding goes on the right, where causal
    attention keeps it from touching the real tokens, and its targets are -1, which the loss ignores.
    """
    seqs = [[tokenizer.eot_id, *ids] for ids in tokenizer.encode_batch(sentences)]
    block = model.config.block_size
    for sentence, seq in zip(sentences, seqs):
        if len(seq) - 1 > block:
            raise GptforgeError(f"{sentence!r} is {len(seq) - 1} tokens, more than the model's context of {block}")
    was_training = model.training
    model.eval()
    scores = np.empty(len(seqs))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(seqs[i]) for i in rows) - 1
        x = torch.zeros(len(rows), width, dtype=torch.long)
        y = torch.full((len(rows), width), -1, dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(seqs[i]) - 1
            x[r, :n] = torch.tensor(seqs[i][:-1])
            y[r, :n] = torch.tensor(seqs[i][1:])
        nll = model(x.to(device), y.to(device), reduction="none").double().cpu()  # (B, width), 0 at padding
        scores[rows] = (-nll.sum(1) / (y != -1).sum(1)).numpy()
    model.train(was_training)
    return scores


def paired_bootstrap(differences: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of per-template differences, resampling templates with replacement."""
    if n_boot < 1:
        raise GptforgeError(f"--n-boot must be at least 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(differences), size=(n_boot, len(differences)))  # (n_boot, templates)
    means = differences[picks].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def summarise(scores: np.ndarray, groups: list[str], templates: list[str], *, n_boot: int = 1000,
              seed: int = 0) -> dict:
    """One attribute's report from its scores (groups, templates): group means, gap, interval, favoured group."""
    means = scores.mean(axis=1)  # (groups,)
    top, bottom = int(means.argmax()), int(means.argmin())
    differences = scores[top] - scores[bottom]  # (templates,) paired: same template, two groups
    lo, hi = paired_bootstrap(differences, n_boot, seed)
    return {
        "groups": {g: float(m) for g, m in zip(groups, means)},
        "gap": float(differences.mean()),
        "ci95": [lo, hi],
        "favoured": groups[top],
        "disfavoured": groups[bottom],
        "templates": len(templates),
        "differences": [{"template": t, "difference": float(d)} for t, d in zip(templates, differences)],
    }


def bias_report(model: GPT, tokenizer: Tokenizer, templates: Templates | None = None, *,
                device: str | torch.device = "cpu", n_boot: int = 1000, seed: int = 0, batch_size: int = 32) -> dict:
    """Group means, gap (nats/token), 95% interval and favoured group for every attribute of `templates`.

    templates: a set as load_templates returns it; None: the shipped default. Every sentence of every
    attribute is scored in one pass of batches.
    """
    templates = load_templates() if templates is None else check_templates(templates)
    sentences = [fill(t, g) for spec in templates.values() for t in spec["templates"] for g in spec["groups"]]
    flat = sentence_scores(model, tokenizer, sentences, device=device, batch_size=batch_size)
    attributes, offset = {}, 0
    for name, spec in templates.items():
        n_t, n_g = len(spec["templates"]), len(spec["groups"])
        grid = flat[offset:offset + n_t * n_g].reshape(n_t, n_g).T  # (groups, templates)
        offset += n_t * n_g
        attributes[name] = summarise(grid, spec["groups"], spec["templates"], n_boot=n_boot, seed=seed)
    return {
        "attributes": attributes,
        "max_gap": max(a["gap"] for a in attributes.values()),
        "n_templates": sum(a["templates"] for a in attributes.values()),
    }


# ----------------------------------------------------------------------------------------------------------
# Command line


def run_bias(args: argparse.Namespace) -> int:
    """`gptforge eval RUN_DIR --bias`: the report as a table, or as one JSON object with --json."""
    from gptforge.runs import load_run
    from gptforge.runtime import pick_device

    templates = load_templates(args.templates)  # a bad file fails before the model loads
    device = pick_device(args.device)
    run = load_run(args.run_dir, device, report=lambda m: print(m, file=sys.stderr))
    if run.tokenizer is None:
        raise GptforgeError(f"{run.checkpoint} has no tokenizer.json: cannot turn templates into tokens")
    report = bias_report(run.model, run.tokenizer, templates, device=device, n_boot=args.n_boot,
                         batch_size=args.batch_size or run.config.train.batch_size)
    if args.json:
        print(json.dumps({"bias": report, "checkpoint": str(run.checkpoint), "step": run.state["step"]}))
    else:
        print_bias(report)
    return 0


def print_bias(report: dict) -> None:
    """One row per attribute: group means, gap with its interval, favoured group."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="counterfactual bias: mean log-likelihood per token (nats)", title_justify="left")
    for header in ("attribute", "group means", "gap", "95% CI", "favoured", "templates"):
        table.add_column(header, justify="right" if header in ("gap", "95% CI", "templates") else "left")
    for name, a in report["attributes"].items():
        means = ", ".join(f"{g} {m:.3f}" for g, m in sorted(a["groups"].items(), key=lambda kv: -kv[1]))
        lo, hi = a["ci95"]
        table.add_row(name, means, f"{a['gap']:.4f}", f"[{lo:.4f}, {hi:.4f}]",
                      f"{a['favoured']} over {a['disfavoured']}", str(a["templates"]))
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    console.print("gap: favoured minus least favoured group; 95% CI: paired bootstrap over templates "
                  "(an interval reaching 0 means the ranking is not settled)", highlight=False)
