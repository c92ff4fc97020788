"""The `gptforge` command: subcommands map to library functions; no training logic lives here."""

from __future__ import annotations

import argparse
import json
import os
import sys

from gptforge import __version__
from gptforge.errors import GptforgeError

MAIN_HELP = """\
Train, adapt, compress, check and serve GPT models.

  gptforge prepare INPUT... --out DATA_DIR     tokenize text, JSONL or Parquet into token shards
  gptforge train [--config FILE] [key=value]   train (or resume) a GPT; no data given: the built-in corpus
  gptforge lr-find [key=value] [--max-lr X]    learning-rate range test: loss against lr, a suggested optim.lr
  gptforge tune --trials N [key=value]         hyperparameter search with Optuna, pruning, resumable study
  gptforge sample RUN_DIR --prompt TEXT        generate text from a trained run
  gptforge eval RUN_DIR [--json] [--bias]      validation loss, bits per byte, perplexity; bias gaps
  gptforge inspect RUN_DIR --prompt TEXT       attention maps, logit lens, token attributions
  gptforge report RUN_DIR [--out FILE]         one self-contained HTML page of a run
  gptforge bench [key=value] [--nproc N]       time the training step; scaling across processes
  gptforge bench --ablate [key=value]          climb the speed ladder one switch at a time
  gptforge doctor [--quick] [--json FILE]      what this machine can do, measured; recommended settings
  gptforge quantize RUN_DIR --method M --out DIR          weight-only int8 / int4
  gptforge prune RUN_DIR --pattern 2:4 --out DIR          magnitude pruning, optional recovery
  gptforge compare RUN_DIR DIR...              size, loss, bits per byte, speed, memory of variants
  gptforge import-hf HF_DIR --out RUN_DIR      a Hugging Face GPT-2 folder (safetensors) as a run
  gptforge export-hf RUN_DIR --out HF_DIR      a run as a folder that transformers loads

Run `gptforge SUBCOMMAND --help` for every option.
"""


def _train(args: argparse.Namespace) -> int:
    from gptforge.config import load_config
    from gptforge.train.loop import train

    cfg = load_config(args.config, args.overrides)
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

    safety = safety_from_args(args)  # a bad lists file fails before the model loads
    run = load_run(args.run_dir, pick_device(args.device))
    if run.tokenizer is None:
        raise GptforgeError(f"{run.checkpoint} has no tokenizer.json: cannot turn a prompt into tokens")
    tok = run.tokenizer
    ids = prompt_ids(tok, args.prompt, eot_prefix=not args.no_eot_prefix)
    for i in range(args.num_samples):
        new = generate(
            run.model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, seed=args.seed + i, eot_id=None if args.no_stop else tok.eot_id,
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
    if args.bias:
        from gptforge.evaluate.bias import run_bias

        return run_bias(args)
    if args.templates:
        raise GptforgeError("--templates belongs to --bias: gptforge eval RUN_DIR --bias --templates FILE")
    from gptforge.data.loader import val_batches
    from gptforge.data.datadir import load_data_dir
    from gptforge.evaluate.loss import evaluate
    from gptforge.runs import load_run
    from gptforge.train.builder import resolve_data
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
    batches = val_batches(data.val, cfg.model.block_size, args.batch_size or cfg.train.batch_size, tokens)
    tokenizer = data.tokenizer or run.tokenizer
    token_bytes = None
    if tokenizer is not None:
        import torch

        token_bytes = torch.from_numpy(tokenizer.token_byte_lengths())
    result = evaluate(run.model, batches, resolve_precision(args.precision, device), token_bytes, device)
    result.update(step=run.state["step"], checkpoint=str(run.checkpoint), tokens=sum(y.numel() for _, y in batches))
    if args.json:
        print(json.dumps(result))
    else:
        bpb = f"{result['val_bpb']:.4f}" if result["val_bpb"] is not None else "n/a (no tokenizer)"
        print(f"{run.checkpoint} (step {result['step']}) on {data.path} val, {result['tokens']:,} tokens")
        print(f"val loss {result['val_loss']:.4f} | bits per byte {bpb} | perplexity {result['perplexity']:.2f}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from gptforge.bench.step import bench, print_record, write_json
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
            write_json(report, args.json)
        return 0
    record = bench(load_config(args.config, args.overrides), steps=args.steps, warmup=args.warmup)
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


def build_parser() -> argparse.ArgumentParser:
    from gptforge.config import keys_help
    from gptforge.data.prepare import add_prepare_arguments

    parser = argparse.ArgumentParser(prog="gptforge", description=MAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"gptforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("prepare", help="tokenize text, JSONL or Parquet into token shards", formatter_class=raw,
                       description="Tokenize files, folders and globs into llm.c-format token shards with a manifest.")
    add_prepare_arguments(p)
    p.set_defaults(func=None)

    p = sub.add_parser("train", help="train or resume a GPT", formatter_class=raw, epilog=keys_help(),
                       description="Train a GPT. With no data.dir, trains on the built-in corpus (the Python standard "
                       "library's source). A run.dir holding checkpoints is resumed from its newest intact one.")
    p.add_argument("--config", metavar="FILE", help="YAML file of config sections (data, model, train, optim, schedule, speed, eval, ...)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.n_layer=4 train.max_steps=200")
    p.set_defaults(func=_train)

    from gptforge import tune
    from gptforge.train import lr_find

    p = sub.add_parser("lr-find", help="learning-rate range test: a suggested optim.lr", formatter_class=raw,
                       epilog="Takes the same config keys as train (see gptforge train --help).",
                       description="Train a fresh model for --steps steps while the learning rate grows "
                       "exponentially from --min-lr to --max-lr; stop once the smoothed loss diverges (4x its "
                       "best). Suggests optim.lr: the rate of steepest descent and a conservative one (a tenth "
                       "of the rate at the lowest loss). Writes lr_find.json and, with matplotlib, lr_find.png.")
    lr_find.add_lr_find_arguments(p)
    p.set_defaults(func=lr_find.run_lr_find)

    p = sub.add_parser("tune", help="hyperparameter search with Optuna (resumable, with pruning)", formatter_class=raw,
                       description=tune.TUNE_HELP, epilog="Takes the same config keys as train (see gptforge train --help).")
    tune.add_tune_arguments(p)
    p.set_defaults(func=tune.run_tune)

    p = sub.add_parser("sample", help="generate text from a trained run", formatter_class=raw,
                       description="Generate text with a KV cache from a run directory or checkpoint folder.\n\n"
                       "An end-of-text token goes before the prompt, so the prompt reads as the start of a "
                       "document (training\ndocuments are joined by end-of-text, so each began right after "
                       "one). Hugging Face transformers'\ngenerate feeds the prompt alone; --no-eot-prefix does "
                       "the same, and greedy output then matches it.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (newest intact checkpoint) or a checkpoint folder")
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
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    from gptforge.evaluate.safety import add_safety_arguments

    add_safety_arguments(p)
    p.set_defaults(func=_sample)

    p = sub.add_parser("eval", help="validation loss, bits per byte, perplexity", formatter_class=raw,
                       description="Evaluate a run on a validation split: its own data, or --data DIR.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (newest intact checkpoint) or a checkpoint folder")
    p.add_argument("--data", metavar="DIR", help="prepared data directory (default: the run's own data)")
    p.add_argument("--tokens", type=int, default=None, help="validation tokens to use (default: the run's eval.tokens)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default: the run's train.batch_size)")
    p.add_argument("--precision", default="auto", help="auto, fp32, tf32, bf16 or fp16 (default: auto)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--json", action="store_true", help="print one JSON object: val_loss, val_bpb, perplexity, ...")
    from gptforge.evaluate.bias import add_bias_arguments

    add_bias_arguments(p)
    p.set_defaults(func=_eval)

    from gptforge.evaluate import interpret

    p = sub.add_parser("inspect", help="attention maps, logit lens and token attributions for a prompt",
                       formatter_class=raw, description="Look inside a trained model on one prompt: attention "
                       "maps per layer and head (PNG), the logit lens (top tokens after each layer) and token "
                       "attributions (gradient x input).")
    interpret.add_inspect_arguments(p)
    p.set_defaults(func=interpret.run_inspect)

    p = sub.add_parser("bench", help="time the real training step; --nproc N for a scaling report", formatter_class=raw,
                       epilog="Takes the same config keys as train (see gptforge train --help).",
                       description="Time the training step (data, forward, backward, optimizer) after a warm-up: "
                       "tokens/s, MFU, peak memory, data wait. With --nproc N, runs 1 and N processes and reports "
                       "scaling efficiency and the time spent communicating.")
    p.add_argument("--config", metavar="FILE", help="YAML file of config sections (data, model, train, optim, schedule, speed, eval, ...)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for train")
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

    from gptforge.observe import doctor

    p = sub.add_parser("doctor", help="what this machine can do, measured; recommended settings", formatter_class=raw,
                       description="Devices, bf16 / fp8 / compile / Triton / NCCL support, measured matmul and copy "
                       "rates, then the config settings that suit this machine, each with its reason.")
    doctor.add_doctor_arguments(p)
    p.set_defaults(func=doctor.run_doctor)

    from gptforge.observe import report

    p = sub.add_parser("report", help="one self-contained HTML page of a run", formatter_class=raw,
                       description="Write RUN_DIR/report.html: loss, learning rate, gradient norm, throughput, MFU, "
                       "memory, guard events, samples, config and environment, plots inline.")
    report.add_report_arguments(p)
    p.set_defaults(func=report.run_report)

    from gptforge.adapt import compare, prune, quantize

    p = sub.add_parser("quantize", help="weight-only int8 / int4 quantization of a run", formatter_class=raw,
                       description="Quantize the linear layers of a run's newest checkpoint (weight-only int8 per "
                       "channel, or int4 per group); the output loads, samples and evaluates like any run.")
    quantize.add_quantize_arguments(p)
    p.set_defaults(func=quantize.run_quantize)
    p = sub.add_parser("prune", help="magnitude pruning (unstructured or 2:4), optional recovery", formatter_class=raw,
                       description="Prune a run's linear weights by magnitude; --recover-steps N fine-tunes with the "
                       "zeros kept, through the same training loop.")
    prune.add_prune_arguments(p)
    p.set_defaults(func=prune.run_prune)
    p = sub.add_parser("compare", help="one table of a run and its variants", formatter_class=raw,
                       description="Size on disk, parameters, val loss and bits per byte on the same split, "
                       "generation tokens/s and memory for each run or variant.")
    compare.add_compare_arguments(p)
    p.set_defaults(func=compare.run_compare)

    from gptforge.adapt import hf

    p = sub.add_parser("import-hf", help="import a Hugging Face GPT-2-family folder", formatter_class=raw,
                       description="Turn a Hugging Face GPT-2-family folder (config.json, safetensors weights, "
                       "tokenizer files) into a gptforge run. Pickle-only folders are refused.")
    hf.add_import_arguments(p)
    p.set_defaults(func=hf.run_import)
    p = sub.add_parser("export-hf", help="export a run as a Hugging Face GPT-2 folder", formatter_class=raw,
                       description="Write a run (GPT-2 architecture) as a folder that transformers loads; "
                       "LoRA adapters are merged first.")
    hf.add_export_arguments(p)
    p.set_defaults(func=hf.run_export)
    return parser


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
        if args.command == "prepare":
            from gptforge.data.prepare import run_prepare

            return run_prepare(args)
        return args.func(args)
    except GptforgeError as e:
        print(f"gptforge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
