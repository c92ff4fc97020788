"""From base model to assistant: the default base model, fine-tuned on the built-in conversations.

    python benchmarks/chat_sft.py [--base RUN] [--base-tokens N] [--sft-tokens N] [--out DIR]

1. the base model: the default recipe on the built-in corpus for --base-tokens tokens (1.96M by default:
   where plain `gptforge train`'s 5 minutes end on a 2-core Xeon with AMX, BENCHMARKS.md), or --base RUN.
   A token budget, not a time budget, so the model does not depend on what else the machine runs;
2. `gptforge prepare --format chat` with the base run's tokenizer: questions on the standard library's
   functions and classes answered by their docstrings, split by module;
3. `gptforge train finetune.init_from=BASE data.dir=CHAT` for --sft-tokens tokens;
4. on the held-out questions (modules never answered in training): the loss on the assistant's tokens
   before fine-tuning (the base model with the chat tokens added, the fine-tune's step-0 evaluation) and
   after, and the share of greedy answers whose first line is the docstring's first line, before and after;
5. `gptforge chat SFT --prompt ...` once, to show an answer in the template's format.

Writes benchmarks/results/chat_sft_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from gptforge.data.chat import ChatTemplate
from gptforge.data.datadir import load_data_dir
from gptforge.evaluate.chat import answer, val_conversations
from gptforge.model import build_model
from gptforge.observe.metrics import read_metrics
from gptforge.runs import load_run
from gptforge.train.builder import grown_state

PROMPT = "What does `json.dumps(obj)` do?"


def gptforge(*argv: str) -> subprocess.CompletedProcess:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "gptforge", *argv], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"gptforge {' '.join(argv)} failed:\n{result.stderr[-3000:]}")
    result.wall_s = round(time.perf_counter() - start, 1)
    return result


def first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip()


def first_line_share(model, template: ChatTemplate, conversations: list[list[dict]]) -> tuple[float, list[dict]]:
    """Share of greedy answers whose first line equals the reference answer's, and a few examples."""
    hits, examples = 0, []
    for conversation in conversations:
        question, reference = conversation[0]["content"], conversation[1]["content"]
        reply = answer(model, template, conversation[:1], 96, temperature=0.0)
        hit = first_line(reply) == first_line(reference)
        hits += hit
        if len(examples) < 6:
            examples.append({"question": question, "reference": first_line(reference), "answer": reply, "match": hit})
    return hits / len(conversations), examples


def base_with_chat_tokens(base: Path, vocab_size: int, doc_token: int):
    """The base model as the fine-tune starts from it: its vocabulary grown by the chat tokens."""
    import dataclasses

    run = load_run(base)
    config = dataclasses.replace(run.config.model, vocab_size=vocab_size, doc_token=doc_token)
    model = build_model(config)
    torch.manual_seed(0)
    model.load_state_dict(grown_state(run.model.state_dict(), model.state_dict()))
    return model.eval()


def base_summary(base: Path, wall_s: float | None) -> dict:
    records = read_metrics(base)
    evals = [r for r in records if "val_loss" in r]
    steps = [r for r in records if "train_loss" in r]
    return {"run": str(base), "tokens": steps[-1]["tokens"], "steps": steps[-1]["step"],
            "val_loss": round(evals[-1]["val_loss"], 4), "train_time_s": steps[-1]["time_s"], "wall_s": wall_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="a base run to fine-tune (default: train one with gptforge train)")
    parser.add_argument("--base-tokens", type=int, default=1_960_000, help="tokens of base training")
    parser.add_argument("--sft-tokens", type=int, default=600_000,
                        help="tokens of fine-tuning (default: 600,000, about three passes over the built-in set)")
    parser.add_argument("--out", type=Path, default=Path("runs/chat_sft"))
    parser.add_argument("--json", default="benchmarks/results/chat_sft_cpu.json")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    base = args.base or out / "base"
    base_wall = None
    if args.base is None and not (base / "checkpoints").is_dir():
        base_wall = gptforge("train", f"run.dir={base}", "train.samples=0", f"train.max_tokens={args.base_tokens}",
                             "train.max_time=null").wall_s
    chat = out / "chat_data"
    gptforge("prepare", "--format", "chat", "--out", str(chat), "--tokenizer", str(base / "tokenizer.json"),
             "--force", "--quiet")
    sft = out / "sft"
    tuned = gptforge("train", f"finetune.init_from={base}", f"data.dir={chat}", f"run.dir={sft}",
                     f"train.max_tokens={args.sft_tokens}", "train.max_time=null", "eval.every=25", "train.samples=2")
    evals = [r for r in read_metrics(sft) if "val_loss" in r]
    steps = [r for r in read_metrics(sft) if "train_loss" in r]

    data = load_data_dir(chat)
    template = ChatTemplate(data.tokenizer)
    held_out = val_conversations(data)
    after_run = load_run(sft)
    before_model = base_with_chat_tokens(base, after_run.config.model.vocab_size, after_run.config.model.doc_token)
    with torch.no_grad():
        share_before, _ = first_line_share(before_model, template, held_out)
        share_after, examples = first_line_share(after_run.model, template, held_out)
    said = gptforge("chat", str(sft), "--prompt", PROMPT, "--temperature", "0")
    result = {
        "command": " ".join(["python", "benchmarks/chat_sft.py", *sys.argv[1:]]),
        "base": base_summary(base, base_wall),
        "chat_data": {k: data.manifest["splits"][k]["documents"] for k in ("train", "val")},
        "sft": {"steps": steps[-1]["step"], "tokens": steps[-1]["tokens"], "train_time_s": steps[-1]["time_s"],
                "wall_s": tuned.wall_s},
        "held_out_questions": len(held_out),
        "assistant_loss_before": round(evals[0]["val_loss"], 4), "assistant_loss_after": round(evals[-1]["val_loss"], 4),
        "assistant_loss_curve": [[r["step"], round(r["val_loss"], 4)] for r in evals],
        "first_line_match_before": round(share_before, 4), "first_line_match_after": round(share_after, 4),
        "examples": examples,
        "chat_prompt": PROMPT, "chat_answer": said.stdout.strip(),
        "environment": json.loads((sft / "environment.json").read_text()),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"held-out assistant-token loss: {result['assistant_loss_before']} before, "
          f"{result['assistant_loss_after']} after {result['sft']['steps']} steps ({result['sft']['tokens']:,} tokens)")
    print(f"first line of the answer = the docstring's: {share_before:.1%} before, {share_after:.1%} after "
          f"({len(held_out)} held-out questions)")
    print(f"gptforge chat --prompt {PROMPT!r}:\n{result['chat_answer']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
