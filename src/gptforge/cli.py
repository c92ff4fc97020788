"""The `gptforge` command: subcommands map to library functions; no training logic lives here."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from gptforge import __version__
from gptforge.errors import GptforgeError

MAIN_HELP = """\
Train, adapt, compress, check and serve GPT models.

  gptforge prepare INPUT... --out DATA_DIR     tokenize text, JSONL or Parquet into token shards (--format chat:
                                               conversations with a loss mask)
  gptforge train [--config FILE] [key=value]   train (or resume) a GPT; no data given: the built-in corpus
  gptforge lr-find [key=value] [--max-lr X]    learning-rate range test: loss against lr, a suggested optim.lr
  gptforge tune --trials N [key=value]         hyperparameter search with Optuna, pruning, resumable study
  gptforge sample RUN_DIR --prompt TEXT        generate text from a trained run
  gptforge chat RUN_DIR [--prompt TEXT]        talk to a chat-tuned run (prepare --format chat, then train)
  gptforge eval RUN_DIR [--json] [--bias]      validation loss, bits per byte, perplexity; bias gaps
  gptforge eval RUN_DIR --tasks builtin|FILE   multiple-choice accuracy (95% intervals), CORE aggregate
  gptforge inspect RUN_DIR --prompt TEXT       attention maps, logit lens, token attributions
  gptforge report RUN_DIR [--out FILE]         one self-contained HTML page of a run
  gptforge runs [DIR] [--json]                 the runs under a folder: state, step, losses, size
  gptforge bench [key=value] [--nproc N]       time the training step; scaling across processes
  gptforge bench --ablate [key=value]          climb the speed ladder one switch at a time
  gptforge doctor [--quick] [--json FILE]      what this machine can do, measured; recommended settings
  gptforge quantize RUN_DIR --method M --out DIR          weight-only int8 / int4
  gptforge prune RUN_DIR --pattern 2:4 --out DIR          magnitude pruning, optional recovery
  gptforge compare RUN_DIR DIR...              size, loss, bits per byte, speed, memory of variants
  gptforge import-hf HF_DIR --out RUN_DIR      a Hugging Face GPT-2/Llama/Qwen3 folder (safetensors) as a run
  gptforge export-hf RUN_DIR --out HF_DIR      a run as a folder that transformers loads
  gptforge export-gguf RUN_DIR --out F.gguf    a run as a GGUF file for llama.cpp (f32, f16, q8_0)
  gptforge serve RUN_DIR --keys FILE           an OpenAI-compatible server with batched generation
  gptforge keys add|list|revoke --file FILE    API keys for serve (stored as salted hashes)

Run `gptforge SUBCOMMAND --help` for every option.
"""


def _train(args: argparse.Namespace) -> int:
    from gptforge.config import load_config

    cfg = load_config(args.config, args.overrides)  # a mistake is reported before torch is imported
    from gptforge.train.loop import train

    try:
        train(cfg)
    except KeyboardInterrupt:
        return 130
    return 0


def _sample(args: argparse.Namespace) -> int:
    from gptforge.evaluate.generate import generate, prompt_ids
    from gptforge.evaluate.safety import safety_from_args
    from gptforge.runs import load_run
    from gptforge.runtime import pick_device

    if args.temperature < 0 or args.top_k < 0 or args.top_p is not None and not 0 < args.top_p <= 1:
        raise GptforgeError(f"sampling needs --temperature >= 0, --top-k >= 0 and --top-p in (0, 1]; got "
                            f"{args.temperature}, {args.top_k} and {args.top_p}")
    safety = safety_from_args(args)  # a bad lists file fails before the model loads
    run = load_run(args.run_dir, pick_device(args.device))
    if run.tokenizer is None:
        raise GptforgeError(f"{run.checkpoint} has no tokenizer.json: cannot turn a prompt into tokens")
    tok = run.tokenizer
    block_size = run.config.model.block_size
    if args.context_keep is not None and not 1 <= args.context_keep < block_size:
        raise GptforgeError(f"--context-keep must be in [1, {block_size}) for this model (block_size {block_size}), "
                            f"got {args.context_keep}")
    ids = prompt_ids(tok, args.prompt, eot_prefix=not args.no_eot_prefix)
    for i in range(args.num_samples):
        new = generate(
            run.model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
            top_p=args.top_p, seed=args.seed + i, eot_id=None if args.no_stop else tok.eot_id,
            context_keep=args.context_keep,
        )
        text = args.prompt + tok.decode(new)  # filtered whole: a completion can finish what the prompt began
        if safety is not None:
            text, _ = safety.apply(text)
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(text)
    if safety is not None:
        print(safety.summary(), file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.tasks:
        if args.bias:
            raise GptforgeError("--tasks and --bias are separate evaluations; give one of them")
        from gptforge.evaluate.task_eval import run_eval_tasks

        return run_eval_tasks(args)
    if args.bias:
        from gptforge.evaluate.bias import run_bias

        return run_bias(args)
    if args.templates:
        raise GptforgeError("--templates belongs to --bias: gptforge eval RUN_DIR --bias --templates FILE")
    from gptforge.data.loader import val_batches
    from gptforge.data.datadir import load_data_dir
    from gptforge.evaluate.loss import evaluate
    from gptforge.runs import load_run
    from gptforge.train.builder import data_eot, resolve_data
    from gptforge.runtime import pick_device, resolve_precision

    device = pick_device(args.device)
    run = load_run(args.run_dir, device, report=lambda m: print(m, file=sys.stderr))
    data = load_data_dir(args.data) if args.data else resolve_data(run.config)
    if run.tokenizer is not None and data.tokenizer is not None and run.tokenizer.sha256 != data.tokenizer.sha256:
        raise GptforgeError(f"{data.path} was tokenized with a different tokenizer than the run in {args.run_dir}")
    if data.vocab_size > run.config.model.vocab_size:
        raise GptforgeError(f"{data.path} has {data.vocab_size} token ids, the model only {run.config.model.vocab_size}")
    cfg = run.config
    tokens = args.tokens or cfg.eval.tokens
    batches = val_batches(data.val, cfg.model.block_size, args.batch_size or cfg.train.batch_size, tokens,
                          eot_id=data_eot(data))
    tokenizer = data.tokenizer or run.tokenizer
    token_bytes = None
    if tokenizer is not None:
        import torch

        token_bytes = torch.from_numpy(tokenizer.token_byte_lengths())
    from gptforge.progress import Progress

    with Progress("eval", len(batches), "batches") as bar:
        result = evaluate(run.model, bar.track(batches), resolve_precision(args.precision, device), token_bytes,
                          device)
    result.update(step=run.state["step"], checkpoint=str(run.checkpoint),
                  tokens=sum(int((y >= 0).sum()) for _, y in batches))
    if data.chat:
        result["counted"] = "assistant tokens" if data.chat["train_on"] == "assistant" else "all tokens"
    if args.json:
        print(json.dumps(result))
    else:
        bpb = f"{result['val_bpb']:.4f}" if result["val_bpb"] is not None else "n/a (no tokenizer)"
        print(f"{run.checkpoint} (step {result['step']}) on {data.path} val, {result['tokens']:,} tokens")
        print(f"val loss {result['val_loss']:.4f} | bits per byte {bpb} | perplexity {result['perplexity']:.2f}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from gptforge.config import load_config

    if args.steps is None:  # the ladder runs many rungs: shorter defaults
        args.steps = 5 if args.ablate else 10
    if args.warmup is None:
        args.warmup = 2 if args.ablate else 3
    if args.steps < 1 or args.warmup < 0:
        raise GptforgeError("--steps must be >= 1 and --warmup >= 0")
    if args.ablate:
        return _ablate(args)
    if args.skip or args.png:
        raise GptforgeError("--skip and --png belong to --ablate")
    if args.nproc:
        from gptforge.bench.scaling import print_scaling, scaling

        if args.nproc < 2:
            raise GptforgeError("--nproc compares 1 process with N >= 2 processes")
        load_config(args.config, args.overrides)  # fail on a bad key before starting any process
        report = scaling(args.overrides, args.nproc, args.steps, args.warmup)
        print_scaling(report)
        if args.json:
            from gptforge.bench.step import write_json

            write_json(report, args.json)
        return 0
    cfg = load_config(args.config, args.overrides)
    from gptforge.bench.step import bench, print_record, write_json

    record = bench(cfg, steps=args.steps, warmup=args.warmup)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, every process holds the same record
        print_record(record)
        if args.json:
            write_json(record, args.json)
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from gptforge.bench.ablate import ablate, print_ablation, write_chart
    from gptforge.bench.step import write_json

    if args.nproc:
        raise GptforgeError("--ablate runs one process; leave out --nproc")
    skip = tuple(s for s in (args.skip or "").split(",") if s)
    report = ablate(args.overrides, args.steps, args.warmup, skip=skip, config=args.config)
    print_ablation(report)
    json_path = args.json or "ablate.json"
    write_json(report, json_path)
    png = args.png or str(os.path.splitext(json_path)[0]) + ".png"
    problem = write_chart(report, png)
    print(f"wrote {json_path}" + (f" and {png}" if problem is None else f"; {problem}"))
    return 0


# Every subcommand's arguments are declared below and its function is named as "module:function", imported
# only when that subcommand runs: building the parser imports neither torch nor any module that does, so
# `--help`, a usage error and a config error answer at once.

RUN_DIR_HELP = "run directory (newest intact checkpoint) or a checkpoint folder"
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps (default: auto)"
CONFIG_HELP = "YAML file of config sections (data, model, train, optim, schedule, speed, eval, ...)"
SAME_KEYS = "Takes the same config keys as train (see gptforge train --help)."


def _config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for train")


def _safety_arguments(p: argparse.ArgumentParser) -> None:
    """`--safety` and `--safety-lists` (evaluate/safety.py), for a subcommand that prints generated text."""
    p.add_argument("--safety", choices=("mask", "block", "off"), default="mask",
                   help="output filter: mask matched words, patterns and secrets as [masked:<category>], "
                   "block (withhold the whole output), or off (default: mask)")
    p.add_argument("--safety-lists", metavar="FILE",
                   help="YAML word lists and patterns per category, replacing the shipped modest ones "
                   "(layout: gptforge/evaluate/safety_lists.yaml)")


def _prepare_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="files, directories (recursive) or glob patterns; .jsonl/.ndjson, .parquet, anything "
                   "else is UTF-8 text, one document per file (default: the Python standard library's source)")
    p.add_argument("--out", required=True, metavar="DATA_DIR", help="folder to create with the shards")
    p.add_argument("--format", choices=("text", "chat"), default="text",
                   help="text: documents (the default). chat: JSONL conversations ({\"messages\": [{\"role\", "
                   "\"content\"}, ...]}, {\"prompt\", \"completion\"} or Alpaca's {\"instruction\", \"input\", "
                   "\"output\"}) rendered by the chat template with a loss mask; with no INPUT, the built-in "
                   "questions on the standard library answered from its docstrings")
    p.add_argument("--tokenizer", default=None,
                   help="'bpe' (trained on the inputs; the default), 'bytes', or a tokenizer.json / Hugging Face "
                   "tokenizer folder. --format chat: the base run's tokenizer.json, to which the chat tokens are "
                   "added (default: the built-in corpus's, what plain `gptforge train` uses)")
    p.add_argument("--train-on", choices=("assistant", "all"), default="assistant",
                   help="--format chat: the tokens the loss counts: the assistant's answers (default) or all")
    p.add_argument("--max-tokens", type=int, default=256, metavar="N",
                   help="--format chat: skip (and count) conversations longer than N tokens once rendered; "
                   "the context of the model to fine-tune (default: 256, the default model's block_size)")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size, end-of-text included")
    p.add_argument("--text-field", default="text", help="JSONL key holding the text")
    p.add_argument("--text-column", default="text", help="Parquet column holding the text")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="share of the tokens held out for validation, in whole documents chosen by hash where "
                   "the corpus has enough of them, else cut off the end of each document at a line break "
                   "(default: 0.5%%, but at least 200 windows of 1024 tokens and at most 10%% of the corpus)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="most tokens per shard file")
    p.add_argument("--dedup", choices=("exact", "near", "none"), default="exact",
                   help="drop repeated documents: 'exact' (same text up to whitespace; the default), 'near' (also "
                   "MinHash/LSH near-duplicates; needs pip install gptforge[curate]) or 'none'")
    p.add_argument("--near-dup-threshold", type=float, default=0.85, metavar="JACCARD",
                   help="--dedup near: Jaccard similarity of word 5-grams the LSH index is tuned to (default: 0.85)")
    p.add_argument("--blocklist", metavar="FILE",
                   help="drop documents containing any term or phrase of FILE (one per line, whole words, any "
                   "case; # comments)")
    p.add_argument("--scrub-pii", action="store_true",
                   help="replace e-mail addresses, phone numbers and secrets (API keys, tokens, private keys, "
                   "passwords) with <EMAIL>, <PHONE>, <SECRET>. Off by default: it rewrites the text the model "
                   "learns from")
    p.add_argument("--force", action="store_true", help="replace DATA_DIR if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress (bar or lines); print one line at the end")
    p.set_defaults(func="gptforge.data.prepare:run_prepare")


def _train_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.n_layer=4 train.max_steps=200")
    p.set_defaults(func=_train)


def _lr_find_parser(p: argparse.ArgumentParser) -> None:
    _config_arguments(p)
    p.add_argument("--min-lr", type=float, default=1e-5, metavar="LR", help="first learning rate of the sweep (default: 1e-5)")
    p.add_argument("--max-lr", type=float, default=10.0, metavar="LR", help="last learning rate of the sweep (default: 10)")
    p.add_argument("--steps", type=int, default=100, metavar="N", help="optimizer steps of the sweep (default: 100)")
    p.add_argument("--out", metavar="DIR", help="folder for lr_find.json and lr_find.png (default: run.dir)")
    p.set_defaults(func="gptforge.train.lr_find:run_lr_find")


def _tune_parser(p: argparse.ArgumentParser) -> None:
    _config_arguments(p)
    p.add_argument("--trials", type=int, required=True, metavar="N",
                   help="total trials in the study (a resumed study runs only the missing ones)")
    p.add_argument("--study-dir", metavar="DIR", default="runs/tune",
                   help="folder of the study: study.db, trials/, results.json, best.yaml (default: runs/tune)")
    p.add_argument("--space", metavar="FILE", help="YAML search space replacing the default one (see above)")
    p.add_argument("--timeout", type=float, metavar="S", help="start no new trial after S seconds (a running trial finishes)")
    p.set_defaults(func="gptforge.tune:run_tune")


def _sample_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens (default: 200; 0: off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set of tokens with this probability")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--num-samples", type=int, default=1, help="how many samples (default: 1)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--no-eot-prefix", action="store_true",
                   help="start from the prompt's tokens alone, as transformers' generate does (default: an "
                   "end-of-text token first, marking the start of a document; needs a --prompt)")
    p.add_argument("--context-keep", type=int, default=None, metavar="K",
                   help="past the model's window, re-read only the last K tokens and decode on from there, a "
                   "prefill every block_size - K tokens (default: re-read the full window for every token: "
                   "exact, and slower)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    _safety_arguments(p)
    p.set_defaults(func=_sample)


def _chat_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument("--prompt", default=None, help="answer this one message and exit (for scripts)")
    p.add_argument("--system", default=None, help="system message the conversation starts with")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per answer (default: 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 is greedy (default: 0.7)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (default: 50; 0: off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set of tokens with this probability")
    p.add_argument("--seed", type=int, default=0, help="random seed of the first answer (default: 0)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    _safety_arguments(p)
    p.set_defaults(func="gptforge.evaluate.chat:run_chat")


def _eval_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument("--data", metavar="DIR", help="prepared data directory (default: the run's own data)")
    p.add_argument("--tokens", type=int, default=None, help="validation tokens to use (default: the run's eval.tokens)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default: the run's train.batch_size)")
    p.add_argument("--precision", default="auto", help="auto, fp32, tf32, bf16 or fp16 (default: auto)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object: val_loss, val_bpb, perplexity, ...")
    p.add_argument("--bias", action="store_true",
                   help="counterfactual bias probe instead of the validation loss: per attribute, the gap in "
                   "mean log-likelihood per token between groups put into the same sentences")
    p.add_argument("--templates", metavar="FILE",
                   help="--bias template set: YAML {attributes: {name: {groups: [...], templates: [...]}}} or "
                   'JSONL lines {"attribute", "groups", "template"}; each template has one {group} slot '
                   "(default: the shipped set)")
    p.add_argument("--n-boot", type=int, default=1000, help="--bias bootstrap resamples (default: 1000)")
    p.add_argument("--tasks", nargs="+", metavar="builtin|FILE",
                   help="multiple-choice accuracy instead of the validation loss: builtin (next_line, docstring, "
                   "closing, made from the data's held-out val text) and/or JSONL files of "
                   '{"context", "choices", "label"} lines; prints acc, acc_norm with 95%% intervals and a CORE '
                   "aggregate")
    p.add_argument("--limit", type=int, default=None, help="--tasks: at most this many items a task "
                   "(default: 500 for builtin, every line of a file)")
    p.set_defaults(func=_eval)


def _inspect_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument("--prompt", required=True, help="text to inspect (read after the end-of-text token)")
    p.add_argument("--out", metavar="DIR",
                   help="also write attention maps (one PNG per layer, needs matplotlib) and inspect.json "
                   "(logit lens at every position, attributions) to DIR")
    p.add_argument("--top-k", type=int, default=5, help="tokens per position in the logit lens (default: 5)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func="gptforge.evaluate.interpret:run_inspect")


def _report_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (holds metrics.jsonl)")
    p.add_argument("--out", metavar="FILE", help="HTML file to write (default: RUN_DIR/report.html)")
    p.set_defaults(func="gptforge.observe.report:run_report")


def _bench_parser(p: argparse.ArgumentParser) -> None:
    _config_arguments(p)
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default: 10; 5 with --ablate)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3; 2 with --ablate)")
    p.add_argument("--nproc", type=int, default=0, help="compare 1 process with N processes (torchrun, same host)")
    p.add_argument("--json", metavar="FILE", help="write the record (device, versions, git sha, per-step times) as JSON")
    p.add_argument("--ablate", action="store_true", help="climb the ladder fp32 -> tf32 -> bf16 -> flash attention -> "
                   "fused AdamW -> compile -> fused kernels -> fp8, keeping each switch only if it is faster; writes "
                   "--json (default: ablate.json) and a PNG chart beside it")
    p.add_argument("--skip", metavar="RUNG,...", help="--ablate: rungs not to run, e.g. compile (reported as skipped)")
    p.add_argument("--png", metavar="FILE", help="--ablate: the chart (default: the --json path with .png)")
    p.set_defaults(func=_bench)


def _doctor_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="skip the slow probes (torch.compile, a Triton kernel, a training step) and shorten the timings")
    p.add_argument("--json", metavar="FILE", help="write every fact, measurement and recommendation as JSON")
    p.set_defaults(func="gptforge.observe.doctor:run_doctor")


def _quantize_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument("--method", required=True, metavar="{int8,int4}",
                   help="int8: per-channel symmetric; int4: grouped asymmetric, two weights per byte")
    p.add_argument("--out", required=True, metavar="DIR", help="the quantized run to write")
    p.add_argument("--group-size", type=int, default=64,
                   help="int4 only: input weights sharing a scale and zero point; must divide every "
                   "layer's in_features (default: 64)")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.set_defaults(func="gptforge.adapt.quantize:run_quantize")


def _prune_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument("--sparsity", type=float, default=0.5,
                   help="fraction of each layer's weights set to zero, in [0, 1) (default: 0.5; 2:4 needs 0.5)")
    p.add_argument("--pattern", default="unstructured", metavar="{unstructured,2:4}",
                   help="unstructured: smallest |w| per layer; 2:4: 2 smallest of every 4 inputs (default: unstructured)")
    p.add_argument("--out", required=True, metavar="DIR", help="the pruned run to write")
    p.add_argument("--recover-steps", type=int, default=0,
                   help="fine-tune this many steps afterwards, keeping the zeros (default: 0, no recovery)")
    p.add_argument("--data", metavar="DIR", help="prepared data for the recovery (default: the run's own data)")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.set_defaults(func="gptforge.adapt.prune:run_prune")


def _compare_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="the reference run first, then its variants (run directories or checkpoint folders)")
    p.add_argument("--data", metavar="DIR", help="prepared data to evaluate on (default: the first run's data)")
    p.add_argument("--tokens", type=int, default=128, help="tokens to generate for the speed figure (default: 128)")
    p.add_argument("--eval-tokens", type=int, default=None, help="validation tokens (default: the first run's eval.tokens)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print a JSON list of objects instead of the table")
    p.add_argument("--png", metavar="FILE", help="also write bar charts to FILE (needs matplotlib)")
    p.set_defaults(func="gptforge.adapt.compare:run_compare")


def _import_hf_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face folder (GPT-2, Llama, Qwen3, Arcee, Apertus or "
                   "GPT-NeoX): config.json and safetensors weights")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to create")
    p.add_argument("--force", action="store_true", help="replace RUN_DIR if it exists")
    p.set_defaults(func="gptforge.adapt.hf:run_import")


def _export_gguf_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument("--out", required=True, metavar="FILE", help="GGUF file to write (for llama.cpp)")
    p.add_argument("--dtype", default="f16", choices=("f32", "f16", "q8_0"),
                   help="weight type of the matrices (norms stay f32; default: f16)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.set_defaults(func="gptforge.adapt.gguf_export:run_export_gguf")


def _export_hf_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument("--out", required=True, metavar="HF_DIR", help="Hugging Face folder to create")
    p.add_argument("--force", action="store_true", help="replace HF_DIR if it exists")
    p.set_defaults(func="gptforge.adapt.hf:run_export")


def _runs_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", nargs="?", default="runs", metavar="DIR", help="folder to look in, recursively (default: runs)")
    p.add_argument("--json", action="store_true", help="print a JSON list with one object per run")
    p.set_defaults(func="gptforge.observe.runlist:run_runs")


def _serve_parser(p: argparse.ArgumentParser) -> None:
    from gptforge.serve.main import add_arguments

    add_arguments(p)
    _safety_arguments(p)
    p.set_defaults(func="gptforge.serve.main:run_serve")


def _keys_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("add", "list", "revoke"), help="add a key (printed once), list them, revoke one")
    p.add_argument("name", nargs="?", help="the key's name (add, revoke): it appears in the audit log, never the key")
    p.add_argument("--file", required=True, metavar="FILE", help="the key file (JSON, mode 0600; created by add)")
    p.add_argument("--rpm", type=int, help="add: this key's requests per minute (default: the server's --rpm)")
    p.add_argument("--tpm", type=int, help="add: this key's generated tokens per minute (default: the server's --tpm)")
    p.set_defaults(func=_keys)


def _keys(args: argparse.Namespace) -> int:
    from gptforge.serve.keys import run_keys

    if args.action != "list" and not args.name:
        raise GptforgeError(f"keys {args.action} needs a NAME: gptforge keys {args.action} NAME --file {args.file}")
    return run_keys(args)


def build_parser() -> argparse.ArgumentParser:
    from gptforge.config import keys_help
    from gptforge.tune import TUNE_HELP

    parser = argparse.ArgumentParser(prog="gptforge", description=MAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"gptforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")

    def command(name: str, build, help: str, description: str, epilog: str | None = None) -> None:
        build(sub.add_parser(name, help=help, description=description, epilog=epilog,
                             formatter_class=argparse.RawDescriptionHelpFormatter))

    command("prepare", _prepare_parser, "tokenize text, JSONL or Parquet into token shards",
            "Tokenize files, folders and globs into llm.c-format token shards with a manifest.")
    command("train", _train_parser, "train or resume a GPT",
            "Train a GPT. With no data.dir, trains on the built-in corpus (the Python standard library's "
            "source). A run.dir holding checkpoints is resumed from its newest intact one.", epilog=keys_help())
    command("lr-find", _lr_find_parser, "learning-rate range test: a suggested optim.lr",
            "Train a fresh model for --steps steps while the learning rate grows exponentially from --min-lr to "
            "--max-lr; stop once the smoothed loss diverges (4x its best). Suggests optim.lr: the rate of "
            "steepest descent and a conservative one (a tenth of the rate at the lowest loss). Writes "
            "lr_find.json and, with matplotlib, lr_find.png.", epilog=SAME_KEYS)
    command("tune", _tune_parser, "hyperparameter search with Optuna (resumable, with pruning)", TUNE_HELP,
            epilog=SAME_KEYS)
    command("sample", _sample_parser, "generate text from a trained run",
            "Generate text with a KV cache from a run directory or checkpoint folder.\n\n"
            "An end-of-text token goes before the prompt, so the prompt reads as the start of a document "
            "(training\ndocuments are joined by end-of-text, so each began right after one). Hugging Face "
            "transformers'\ngenerate feeds the prompt alone; --no-eot-prefix does the same, and greedy output "
            "then matches it.")
    command("chat", _chat_parser, "talk to a chat-tuned run in the terminal, or answer one --prompt",
            "An interactive chat with a run fine-tuned on conversations (prepare --format chat, then train "
            "finetune.init_from=RUN): answers stream as they are decoded, the KV cache carries across turns, "
            "the output safety filter applies. Commands: /reset, /system TEXT, /exit. Ctrl-C stops the current "
            "answer, not the session. With --prompt, answers once and exits.")
    command("eval", _eval_parser, "validation loss, bits per byte, perplexity",
            "Evaluate a run on a validation split: its own data, or --data DIR.")
    command("inspect", _inspect_parser, "attention maps, logit lens and token attributions for a prompt",
            "Look inside a trained model on one prompt: attention maps per layer and head (PNG), the logit lens "
            "(top tokens after each layer) and token attributions (gradient x input).")
    command("bench", _bench_parser, "time the real training step; --nproc N for a scaling report",
            "Time the training step (data, forward, backward, optimizer) after a warm-up: tokens/s, MFU, peak "
            "memory, data wait. With --nproc N, runs 1 and N processes and reports scaling efficiency and the "
            "time spent communicating.", epilog=SAME_KEYS)
    command("doctor", _doctor_parser, "what this machine can do, measured; recommended settings",
            "Devices, bf16 / fp8 / compile / Triton / NCCL support, measured matmul and copy rates, then the "
            "config settings that suit this machine, each with its reason.")
    command("report", _report_parser, "one self-contained HTML page of a run",
            "Write RUN_DIR/report.html: loss, learning rate, gradient norm, throughput, MFU, memory, guard "
            "events, samples, config and environment, plots inline.")
    command("runs", _runs_parser, "the runs under a folder: state, step, losses, tokens, time, size",
            "List the runs under DIR (default: runs), each with its state (running, finished, stopped early, "
            "stopped, interrupted, weights only), step, best and last validation loss, tokens, training time "
            "and size on disk. Reads the run's files only: it answers at once, even while a run trains.")
    command("quantize", _quantize_parser, "weight-only int8 / int4 quantization of a run",
            "Quantize the linear layers of a run's newest checkpoint (weight-only int8 per channel, or int4 per "
            "group); the output loads, samples and evaluates like any run.")
    command("prune", _prune_parser, "magnitude pruning (unstructured or 2:4), optional recovery",
            "Prune a run's linear weights by magnitude; --recover-steps N fine-tunes with the zeros kept, "
            "through the same training loop.")
    command("compare", _compare_parser, "one table of a run and its variants",
            "Size on disk, parameters, val loss and bits per byte on the same split, generation tokens/s and "
            "memory for each run or variant.")
    command("import-hf", _import_hf_parser,
            "import a Hugging Face GPT-2, Llama, Qwen3, Arcee, Apertus or GPT-NeoX folder",
            "Turn a Hugging Face folder of a family gptforge computes exactly (config.json, safetensors weights, "
            "tokenizer files) into a gptforge run. Pickle-only folders are refused.")
    command("export-hf", _export_hf_parser, "export a run as a standard transformers folder",
            "Write a run as the transformers family that computes it exactly (GPT-2, Llama, Qwen3, Arcee, "
            "Apertus or GPT-NeoX; no trust_remote_code); LoRA adapters are merged, quantized layers dequantized. "
            "A model no family computes is refused before anything is written, naming the switch to change.")
    command("export-gguf", _export_gguf_parser, "export a run as a GGUF file for llama.cpp",
            "Write a run's weights, hyperparameters and tokenizer as one GGUF file (f32, f16 or q8_0) through "
            "the gguf package, in the llama.cpp architecture of its Hugging Face family.")
    command("serve", _serve_parser, "an OpenAI-compatible HTTP server with batched generation",
            "Serve a run over HTTP: /v1/models, /v1/completions, /v1/chat/completions (streaming with "
            "\"stream\": true), /healthz, /metrics (Prometheus) and a chat page at /. Concurrent requests decode "
            "together. API keys are required (gptforge keys), HTTPS with --tls-cert/--tls-key. SIGHUP (or --watch) "
            "swaps in the run's newest intact checkpoint while requests in flight finish on the old weights; "
            "SIGTERM drains, then exits. Needs pip install \"gptforge[serve]\".")
    command("keys", _keys_parser, "API keys for gptforge serve: add, list, revoke",
            "Manage the key file of gptforge serve. `add NAME` prints a new key once and stores only a salted hash; "
            "`revoke NAME` takes effect on a running server at its next request.")
    return parser


def command_function(func):
    """A subcommand's function: a callable, or a "module:function" path imported now."""
    if callable(func):
        return func
    module, _, name = func.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C outside training (which saves and says so itself)
        print("gptforge: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return command_function(args.func)(args)
    except GptforgeError as e:
        print(f"gptforge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
