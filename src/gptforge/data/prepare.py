"""`gptforge prepare INPUT... --out DATA_DIR`: turn text, JSONL and Parquet into token shards.

The corpus is streamed, never held in memory: documents are read lazily, tokenized
in batches of a few MB (in parallel, in Rust), and appended to shard files as they
come. Bad input is skipped and counted by reason rather than aborting a long run,
and the output folder appears only when it is complete, so a folder named like a
data dir is always a finished one. Reading one back is `datadir.load_data_dir`.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from itertools import islice
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gptforge.data.corpus import (
    MAX_DOCUMENT_CHARS,
    SKIP_REASONS,
    Reader,
    cache_root,
    collect_files,
    file_size,
    is_later_piece,
    parquet_module,
    stdlib_dir,
    stdlib_files,
)
from gptforge.data.curate import CURATION_SKIP_REASONS, DEDUP_MODES, PII_KINDS, Blocklist, Curator, Deduplicator
from gptforge.data.datadir import FORMAT, FORMAT_VERSION, SPLITS
from gptforge.data.shards import ShardWriter, read_header
from gptforge.data.split import MIN_WINDOWS, WINDOW, SplitPlan, SplitPlanner, target_share
from gptforge.data.tokenizer import Tokenizer
from gptforge.fileio import fsync_dir, sha256_file
from gptforge.progress import Progress
from gptforge.errors import ConfigError, DataError, GptforgeError

SHORT_DOCUMENT_TOKENS = 64
BUILTIN_VERSION = 2  # in the built-in corpus's cache folder name; 2: val split by a share of the tokens
PLAN_SAMPLE_CHARS = 1 << 20  # text encoded while planning the split, to turn characters into tokens
BATCH_CHARS = 2 << 20  # per encode_batch call: enough documents to keep cores busy; encoding costs ~120 MB per MiB
PID_LIMIT = 1 << 22  # no system hands out larger process ids (Linux's ceiling)
ALL_SKIP_REASONS = {**SKIP_REASONS, **CURATION_SKIP_REASONS}


class OutputExistsError(DataError):
    """DATA_DIR already holds something; a concurrent prepare of the same folder may have won."""


# ---------------------------------------------------------------- splitting


class SplitWriter:
    """Routes documents to train and val shards so that both splits end non-empty.

    The latest document of each split is held back; at the end, if one split got
    nothing, the other's held-back document goes there instead (a single document
    is cut in two). That one document is the only exception to the hash split.
    """

    def __init__(self, out_dir: Path, vocab_size: int, shard_tokens: int):
        self.writers = {s: ShardWriter(out_dir, s, vocab_size, shard_tokens) for s in SPLITS}
        self.documents = dict.fromkeys(SPLITS, 0)
        self._held: dict[str, list[int] | None] = dict.fromkeys(SPLITS)
        self._buffers: dict[str, list[int]] = {s: [] for s in SPLITS}

    def add(self, split: str, tokens: list[int]) -> None:
        """Queue one document's tokens (EOT included); call `flush` after each batch."""
        if self._held[split] is not None:
            self._buffers[split].extend(self._held[split])
        self._held[split] = tokens
        self.documents[split] += 1

    def flush(self) -> None:
        for split, buffer in self._buffers.items():
            if buffer:
                self.writers[split].add(buffer)
                buffer.clear()

    def close(self) -> dict[str, list[Path]]:
        """Write the held-back documents, first giving one to a split that got none."""
        missing = [split for split in SPLITS if self._held[split] is None]
        if len(missing) == 1:
            (receiver,) = missing
            donor = "val" if receiver == "train" else "train"
            held = self._held[donor]
            if self.documents[donor] >= 2:
                self._held = {donor: None, receiver: held}
                self.documents[donor] -= 1
                self.documents[receiver] += 1
            else:
                cut = len(held) - max(1, len(held) // 10)
                self._held = {"train": held[:cut], "val": held[cut:]}
                self.documents[receiver] += 1  # the document now counts in both splits
        for split, held in self._held.items():
            self._buffers[split].extend(held or [])
        self.flush()
        return {split: writer.close() for split, writer in self.writers.items()}


# ---------------------------------------------------------------- prepare


def _check_options(
    tokenizer: str, vocab_size: int, val_fraction: float | None, shard_tokens: int, dedup: str,
    near_dup_threshold: float,
) -> None:
    """Refuse bad options before any work, so a typo never costs a first pass over the corpus."""
    if tokenizer not in ("bpe", "bytes") and not Path(tokenizer).exists():
        raise ConfigError(
            f"--tokenizer {tokenizer!r}: expected 'bpe', 'bytes', or the path of a tokenizer.json or tokenizer folder"
        )
    if tokenizer == "bpe" and vocab_size < 257:
        raise ConfigError(f"--vocab-size must be at least 257 (256 bytes + end-of-text), got {vocab_size}")
    if val_fraction is not None and not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ConfigError(f"--shard-tokens must be positive, got {shard_tokens}")
    if dedup not in DEDUP_MODES:
        raise ConfigError(f"--dedup must be one of {', '.join(DEDUP_MODES)}, got {dedup!r}")
    if not 0 < near_dup_threshold < 1:
        raise ConfigError(f"--near-dup-threshold must be in (0, 1), got {near_dup_threshold}")


def _make_tokenizer(spec: str, vocab_size: int, training_texts: Iterator[str]) -> tuple[str, Tokenizer]:
    """(manifest kind, tokenizer); `training_texts` is consumed only when a BPE is trained."""
    if spec == "bpe":
        return "bpe", Tokenizer.train_bpe(training_texts, vocab_size)
    if spec == "bytes":
        return "bytes", Tokenizer.bytes()
    return "pretrained", Tokenizer.from_pretrained(spec)


def _tracked(reader: Reader, description: str, enabled: bool) -> Iterator[tuple[str, str]]:
    """`reader.documents()`, with progress by bytes read (updated at most once per MB)."""
    total = sum(file_size(path) for path in reader.files)
    bar = Progress(description, total, "MB", scale=1e6, enabled=enabled)
    shown = 0
    try:
        for document in reader.documents():
            yield document
            if reader.bytes_done - shown >= 1 << 20:
                shown = reader.bytes_done
                bar.update(shown, info=f"{reader.files_done}/{len(reader.files)} files")
        bar.update(total, info=f"{len(reader.files)}/{len(reader.files)} files")
    finally:
        bar.close()


def _batches(documents: Iterator[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    batch, chars = [], 0
    for document in documents:
        batch.append(document)
        chars += len(document[0])
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _skip_summary(reader: Reader) -> str:
    if not reader.skipped:
        return "nothing was skipped"
    return "; ".join(
        f"{reason} {reader.skipped[reason]} (e.g. {', '.join(reader.examples[reason][:2])})"
        for reason in ALL_SKIP_REASONS
        if reader.skipped[reason]
    )


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"{out}: already exists and is not empty; pass --force to replace it")


def _remove_stale(out: Path) -> None:
    """Remove the temporary folders (`.NAME.tmp-PID`, `.NAME.old-PID`) that killed runs of prepare left
    beside `out`. One whose process is alive is another prepare at work and is left alone; so is
    everything on a system where a process cannot be probed without touching it."""
    if os.name != "posix":
        return
    for path in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        kind, _, pid = path.name[len(out.name) + 2:].rpartition("-")
        if kind in ("tmp", "old") and pid.isdigit() and int(pid) < PID_LIMIT and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        pass
    return True


def _install(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished folder into place; with `force`, swap it with the old one."""
    try:
        os.rename(tmp, out)  # atomic; also replaces an empty directory
    except OSError as exc:
        if not out.is_dir() or not any(out.iterdir()):
            raise
        if not force:
            raise OutputExistsError(f"{out}: was created by someone else while preparing") from exc
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    fsync_dir(out.parent)


def _gptforge_version() -> str:
    try:
        return version("gptforge")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def prepare(
    inputs: list[str],
    out: str | Path,
    *,
    tokenizer: str = "bpe",
    vocab_size: int = 8192,
    text_field: str = "text",
    text_column: str = "text",
    val_fraction: float | None = None,
    shard_tokens: int = 100_000_000,
    force: bool = False,
    progress: bool = True,
    max_train_docs_for_tokenizer: int | None = None,
    dedup: str = "none",
    near_dup_threshold: float = 0.85,
    blocklist: str | Path | None = None,
    scrub_pii: bool = False,
) -> dict:
    """Tokenize `inputs` (the built-in corpus when empty) into DATA_DIR `out`; returns the manifest.

    A BPE tokenizer is trained on a first pass over the documents (or the first
    `max_train_docs_for_tokenizer` of them); a second pass plans the train/val split
    (data/split.py: val gets `val_fraction` of the tokens, None for the default share);
    the third tokenizes. Every pass sees the curated text (see `gptforge.data.curate`),
    so the tokenizer learns from exactly what gets tokenized. Curation is off unless asked for: called as a
    library, `prepare` keeps every usable document as it is (`gptforge prepare`
    deduplicates exactly by default).
    """
    start = time.perf_counter()
    _check_options(tokenizer, vocab_size, val_fraction, shard_tokens, dedup, near_dup_threshold)
    blocked = Blocklist.from_file(blocklist) if blocklist is not None else None

    def curator() -> Curator:  # one per pass: each pass must see every document once
        return Curator(Deduplicator(dedup, near_dup_threshold), blocked, scrub_pii)

    out = Path(out)
    _check_output(out, force)
    files = collect_files(inputs, exclude=out) if inputs else stdlib_files()
    if any(path.suffix.lower() == ".parquet" for path in files):
        parquet_module()  # fail now, not after training a tokenizer
    with building(out, force) as tmp:
        # The tokenizer learns from the first piece of each long document: enough to learn its words,
        # and what the trainer holds then does not grow with the length of one document.
        first_reader = Reader(files, text_field, text_column, first_piece_only=True)
        first_pass = curator().documents(_tracked(first_reader, "prepare: reading for the tokenizer", progress),
                                         first_reader.skip)
        training_texts = (text for text, _ in islice(first_pass, max_train_docs_for_tokenizer))
        kind, tok = _make_tokenizer(tokenizer, vocab_size, training_texts)
        plan = _plan_split(Reader(files, text_field, text_column), curator(), tok, val_fraction, progress)
        reader, curation = Reader(files, text_field, text_column), curator()
        splits, short = _tokenize(reader, curation, tok, progress, tmp, plan, shard_tokens)
        _write_durably(tmp / "tokenizer.json", tok.to_json())
        # A curation reason is listed when its step ran, so a manifest without curation reads as before.
        reasons = [*SKIP_REASONS, *curation.reasons]
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tokenizer": {"kind": kind, "sha256": tok.sha256, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id},
            "splits": splits,
            "split": _split_record(plan, splits),
            "skipped": {reason: reader.skipped[reason] for reason in reasons},
            "skipped_examples": {reason: reader.examples.get(reason, []) for reason in reasons},
            "curation": {
                "dedup": dedup,
                "near_dup_threshold": near_dup_threshold if dedup == "near" else None,
                "blocklist": str(blocklist) if blocklist is not None else None,
                "scrub_pii": scrub_pii,
            },
            "pii_scrubbed": {kind: curation.pii[kind] for kind in PII_KINDS} if scrub_pii else None,
            "stats": {
                "files": len(files),
                "bytes": reader.bytes_done,
                "short_documents": short,
                "split_documents": reader.split_documents,
                "split_pieces": reader.split_pieces,
                "split_examples": reader.split_examples,
                "elapsed_s": round(time.perf_counter() - start, 3),
            },
            "inputs": list(inputs) or [f"builtin:{stdlib_dir()}"],
            "val_fraction": val_fraction,
        }
        write_manifest(tmp, manifest)
    return manifest


@contextlib.contextmanager
def building(out: Path, force: bool) -> Iterator[Path]:
    """A temporary folder beside `out` to build a data dir in: renamed into place when the block ends, removed
    when it fails, so a folder named like a data dir is always a finished one."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    _remove_stale(out)
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier run that had our pid
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_dir(tmp)
        _install(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(folder: Path, manifest: dict) -> None:
    """manifest.json, stamped with the time and gptforge's version, written durably."""
    manifest.update(created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    gptforge_version=_gptforge_version())
    _write_durably(folder / "manifest.json", json.dumps(manifest, indent=2) + "\n")


def _plan_split(reader: Reader, curator: Curator, tok: Tokenizer, val_fraction: float | None,
                progress: bool) -> SplitPlan:
    """Second pass: characters per hash bucket, and tokens per character on the first PLAN_SAMPLE_CHARS, so
    the split can aim at a share of the tokens before any is written."""
    planner, sample, sampled = SplitPlanner(), [], 0
    for text, location in curator.documents(_tracked(reader, "prepare: planning the split", progress), reader.skip):
        planner.add(text, continues=is_later_piece(location))
        if sampled < PLAN_SAMPLE_CHARS:
            sample.append(text[: PLAN_SAMPLE_CHARS - sampled])
            sampled += len(sample[-1])
    sample_tokens = sum(len(ids) for ids in tok.encode_batch(sample)) if sample else 0
    est_tokens = planner.total_chars * sample_tokens / sampled if sampled else 0.0
    return planner.plan(target_share(val_fraction, est_tokens))


def _tokenize(
    reader: Reader, curator: Curator, tok: Tokenizer, progress: bool, out_dir: Path, plan: SplitPlan,
    shard_tokens: int,
) -> tuple[dict, int]:
    """Third pass: tokenize every curated document into split shards, placed by `plan`; returns the
    manifest's splits and the number of short documents.

    Curation comes before the split, which hashes the final text: duplicates are gone
    before they could land on both sides, and a scrubbed document is placed by what
    is actually stored."""
    writer = SplitWriter(out_dir, tok.vocab_size, shard_tokens)
    short = 0
    for batch in _batches(curator.documents(_tracked(reader, "prepare: tokenizing", progress), reader.skip)):
        parts = [(split, part, location) for text, location in batch
                 for split, part in plan.place(text, continues=is_later_piece(location))]
        for (split, _, location), ids in zip(parts, tok.encode_batch([part for _, part, _ in parts])):
            if not ids:  # possible with tokenizers whose normalizer drops characters
                reader.skip("empty", location)
                continue
            short += len(ids) < SHORT_DOCUMENT_TOKENS
            writer.add(split, ids + [tok.eot_id])
        writer.flush()
    if not any(writer.documents.values()):
        raise DataError(f"no usable documents in {len(reader.files)} input files: {_skip_summary(reader)}")
    paths = writer.close()
    splits = {}
    for split in SPLITS:
        shards = [
            {"file": path.name, "tokens": read_header(path).num_tokens, "sha256": sha256_file(path)}
            for path in paths[split]
        ]
        tokens = sum(shard["tokens"] for shard in shards)
        splits[split] = {"documents": writer.documents[split], "tokens": tokens, "shards": shards}
    return splits, short


def _split_record(plan: SplitPlan, splits: dict) -> dict:
    """How the split was made and what val holds: tokens, share, windows of 256 and of WINDOW tokens, and
    the tokens it is short of MIN_WINDOWS windows by (0 when it is not)."""
    val, total = splits["val"]["tokens"], splits["val"]["tokens"] + splits["train"]["tokens"]
    return {**plan.to_dict(), "val_share": round(val / total, 6) if total else 0.0,
            "val_windows": {str(n): val // n for n in (256, WINDOW)},
            "short_of_min_windows_by": max(0, MIN_WINDOWS * WINDOW - val), "min_windows": MIN_WINDOWS,
            "window": WINDOW}


# ---------------------------------------------------------------- the built-in corpus, prepared


def builtin_data_dir(tokenizer: str = "bpe", vocab_size: int = 8192, progress: bool = True) -> Path:
    """The prepared built-in corpus for this Python version, preparing it on first use.

    Safe to call from several processes at once: each prepares into its own
    temporary folder, the first to rename it into place wins, the others use that.
    """
    if tokenizer not in ("bpe", "bytes"):
        raise ConfigError(f"built-in corpus tokenizer must be 'bpe' or 'bytes', got {tokenizer!r}")
    name = f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{tokenizer}"
    out = cache_root() / "data" / f"{name}{vocab_size if tokenizer == 'bpe' else ''}-v{BUILTIN_VERSION}"
    if not (out / "manifest.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            prepare([], out, tokenizer=tokenizer, vocab_size=vocab_size, progress=progress)
        except OutputExistsError:
            if not (out / "manifest.json").is_file():
                raise
    return out


# ---------------------------------------------------------------- command line


def run_prepare(args: argparse.Namespace) -> int:
    """`gptforge prepare`: prepare, then print the summary; errors become one line and exit code 2."""
    if args.format == "chat":
        return _run_prepare_chat(args)
    try:
        manifest = prepare(
            args.inputs, args.out, tokenizer=args.tokenizer or "bpe", vocab_size=args.vocab_size,
            text_field=args.text_field, text_column=args.text_column, val_fraction=args.val_fraction,
            shard_tokens=args.shard_tokens, force=args.force, progress=not args.quiet, dedup=args.dedup,
            near_dup_threshold=args.near_dup_threshold, blocklist=args.blocklist, scrub_pii=args.scrub_pii,
        )
    except GptforgeError as exc:
        print(f"gptforge prepare: error: {exc}", file=sys.stderr)
        return 2
    splits = manifest["splits"]
    if args.quiet:
        print(f"{args.out}: {splits['train']['tokens']:,} train and {splits['val']['tokens']:,} val tokens")
    else:
        Console().print(summary_table(manifest, args.out))
    return 0


def _run_prepare_chat(args: argparse.Namespace) -> int:
    from gptforge.data.prepare_chat import prepare_chat

    try:
        manifest = prepare_chat(args.inputs, args.out, tokenizer=args.tokenizer, train_on=args.train_on,
                                max_tokens=args.max_tokens, val_fraction=args.val_fraction, force=args.force,
                                progress=not args.quiet)
    except GptforgeError as exc:
        print(f"gptforge prepare: error: {exc}", file=sys.stderr)
        return 2
    splits, skipped = manifest["splits"], {k: v for k, v in manifest["skipped"].items() if v}
    print(f"{args.out}: {splits['train']['documents']:,} train conversations ({splits['train']['tokens']:,} tokens) "
          f"and {splits['val']['documents']:,} val ({splits['val']['tokens']:,} tokens), split by "
          f"{manifest['chat']['split_by']}; loss on {manifest['chat']['train_on']} tokens")
    print("skipped: " + (", ".join(f"{reason} {n}" for reason, n in skipped.items()) or "none"))
    for reason in skipped:
        print(f"  {reason}: e.g. {', '.join(manifest['skipped_examples'][reason][:3])}")
    return 0


def summary_table(manifest: dict, out: str | Path) -> Table:
    """What `prepare` did, for people: sizes, speed, and every reason something was skipped."""
    stats, tok = manifest["stats"], manifest["tokenizer"]
    table = Table(title=f"Prepared {escape(str(out))}", show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")  # long paths wrap rather than lose their line numbers
    mb = stats["bytes"] / 1e6
    speed = mb / stats["elapsed_s"] if stats["elapsed_s"] else 0.0
    table.add_row("files read", f"{stats['files']:,} ({mb:,.1f} MB in {stats['elapsed_s']:.1f} s, {speed:,.1f} MB/s)")
    table.add_row("tokenizer", f"{tok['kind']}, vocab {tok['vocab_size']:,}, end-of-text id {tok['eot_id']}")
    for split, info in manifest["splits"].items():
        table.add_row(
            split, f"{info['documents']:,} documents, {info['tokens']:,} tokens, {len(info['shards'])} shard(s)"
        )
    split = manifest.get("split")
    if split:
        windows = split["val_windows"]
        how = "whole documents" if split["method"] == "documents" else \
            "each document cut at a boundary (" + ", ".join(f"{n:,} at a {kind}" for kind, n in split["boundaries"].items()
                                                           if n) + ")"
        table.add_row("val split", f"{100 * split['val_share']:.2f}% of the tokens (target {100 * split['target_share']:.2f}%), "
                      f"{windows['256']:,} windows of 256 / {windows[str(split['window'])]:,} of {split['window']}; {how}")
        if split["short_of_min_windows_by"]:
            table.add_row("val is small", f"{split['short_of_min_windows_by']:,} tokens short of {split['min_windows']} "
                          f"windows of {split['window']}: the corpus is small; --val-fraction raises the share",
                          style="yellow")
    table.add_row("short documents", f"{stats['short_documents']:,} (< {SHORT_DOCUMENT_TOKENS} tokens, kept)")
    if stats.get("split_documents"):
        table.add_row("long documents", escape(
            f"{stats['split_documents']:,} cut into {stats['split_pieces']:,} pieces of at most "
            f"{MAX_DOCUMENT_CHARS >> 20} MiB characters, e.g. {', '.join(stats['split_examples'])}"
        ))
    table.add_row("curation", escape(_curation_summary(manifest["curation"])))
    if manifest["pii_scrubbed"] is not None:
        counts = ", ".join(f"{count:,} {kind}" for kind, count in manifest["pii_scrubbed"].items())
        table.add_row("PII scrubbed", f"{counts} (replaced; documents kept)")
    for reason, count in manifest["skipped"].items():
        if count:
            examples = escape(", ".join(manifest["skipped_examples"][reason]))
            description = ALL_SKIP_REASONS[reason]
            table.add_row(f"skipped: {reason}", f"{count:,} ({description}) e.g. {examples}", style="yellow")
    return table


def _curation_summary(curation: dict) -> str:
    dedup = curation["dedup"]
    if dedup == "near":
        dedup = f"near (threshold {curation['near_dup_threshold']})"
    blocklist = curation["blocklist"] or "none"
    return f"dedup {dedup}, blocklist {blocklist}, PII scrubbing {'on' if curation['scrub_pii'] else 'off'}"
