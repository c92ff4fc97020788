"""`gptforge eval RUN --tasks builtin|FILE...`: load the tasks, score a run on each, print a table or JSON."""

from __future__ import annotations

import json
import sys
from typing import Callable, Sequence

from gptforge.errors import DataError
from gptforge.evaluate.builtin_tasks import builtin_tasks, held_out_documents
from gptforge.evaluate.tasks import Task, core_score, read_jsonl_task, score_task


def load_tasks(specs: Sequence[str], data_for_builtin: Callable[[], object], limit: int | None,
               tokenizer=None) -> list[Task]:
    """`builtin` (the three built-in tasks from the held-out text of `data_for_builtin()`, kept to items that
    `tokenizer`, the scoring model's, splits cleanly; default: the data's) and JSONL files."""
    tasks: list[Task] = []
    for spec in specs:
        if spec == "builtin":
            data = data_for_builtin()
            tasks += builtin_tasks(held_out_documents(data), tokenizer or data.tokenizer,
                                   **({"limit": limit} if limit else {}))
        else:
            task = read_jsonl_task(spec)
            tasks.append(Task(task.name, task.items[:limit] if limit else task.items, task.source))
    return tasks


def evaluate_tasks(loaded, tasks: Sequence[Task], device="cpu", autocast=None, batch_size: int = 32) -> dict:
    """Every task's scores and the CORE-style aggregate, for a loaded run (runs.LoadedRun)."""
    if loaded.tokenizer is None:
        raise DataError(f"{loaded.checkpoint}: the run has no tokenizer.json, so text tasks cannot be scored")
    block = loaded.config.model.block_size
    results = [score_task(loaded.model, loaded.tokenizer, t, block, device, batch_size, autocast) for t in tasks]
    return {"step": loaded.state["step"], "checkpoint": str(loaded.checkpoint), "tasks": results,
            "core": core_score(results)}


def run_eval_tasks(args) -> int:
    """`gptforge eval RUN --tasks ...`: a table, or one JSON object with --json."""
    from gptforge.data.datadir import load_data_dir
    from gptforge.runs import load_run
    from gptforge.runtime import pick_device, resolve_precision
    from gptforge.train.builder import resolve_data

    if args.limit is not None and args.limit < 1:
        raise DataError(f"--limit must be a positive number of items per task, got {args.limit}")
    device = pick_device(args.device)
    loaded = load_run(args.run_dir, device, report=lambda m: print(m, file=sys.stderr))
    tasks = load_tasks(args.tasks, lambda: load_data_dir(args.data) if args.data else resolve_data(loaded.config),
                       args.limit, loaded.tokenizer)
    precision = resolve_precision(args.precision, device)
    result = evaluate_tasks(loaded, tasks, device, precision.autocast, args.batch_size or 32)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{loaded.checkpoint} (step {result['step']}): multiple choice, 95% intervals")
    print(f"{'task':<14}{'items':>6}{'chance':>8}{'acc':>8}{'':16}{'acc_norm':>9}")
    for r in result["tasks"]:
        lo, hi = r["acc_ci95"]
        nlo, nhi = r["acc_norm_ci95"]
        print(f"{r['task']:<14}{r['n']:>6}{r['chance']:>8.3f}{r['acc']:>8.3f} [{lo:.3f}, {hi:.3f}]"
              f"{r['acc_norm']:>9.3f} [{nlo:.3f}, {nhi:.3f}]")
    print(f"CORE (acc_norm centred on chance, mean over {len(tasks)} tasks): {result['core']:.4f}")
    return 0
