"""`gptforge prepare --format chat`: conversations into token shards with a loss mask beside each.

The tokenizer is a base run's (`--tokenizer RUN/tokenizer.json`, by default the built-in corpus's) with the
chat tokens added; the data dir's tokenizer.json is that extended tokenizer, so a model fine-tuned on it
grows its embedding by those rows (train.init_from does it). Each conversation is rendered by the chat
template (data/chat.py) into tokens and a mask, and written whole to one split: by module for the built-in
set, by the hash of the conversation for the user's files. The output appears only when complete, as
with text data (the same temporary folder and rename as `prepare`).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from gptforge.data.chat import TRAIN_ON, ChatTemplate, with_chat_tokens
from gptforge.data.conversations import BAD_REASONS, Tally, builtin_conversation, builtin_items, read_jsonl, split_of
from gptforge.data.corpus import collect_files, stdlib_dir
from gptforge.data.datadir import FORMAT, FORMAT_VERSION, SPLITS
from gptforge.data.prepare import _check_output, _write_durably, building, write_manifest
from gptforge.data.shards import MASK_SUFFIX, ShardWriter, read_header
from gptforge.data.tokenizer import Tokenizer
from gptforge.errors import DataError
from gptforge.fileio import sha256_file
from gptforge.progress import Progress

DEFAULT_MAX_TOKENS = 256  # the default model's context (model.block_size)
BUILTIN_VAL_SHARE = 0.05  # of the standard library's modules


def prepare_chat(inputs: list[str], out: str | Path, *, tokenizer: str | Path | None = None,
                 train_on: str = "assistant", max_tokens: int = DEFAULT_MAX_TOKENS, val_fraction: float | None = None,
                 force: bool = False, progress: bool = True) -> dict:
    """Render the conversations of `inputs` (JSONL files; the built-in set when empty) into DATA_DIR `out`."""
    if train_on not in TRAIN_ON:
        raise DataError(f"--train-on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    if max_tokens < 2:
        raise DataError(f"--max-tokens must be at least 2, got {max_tokens}")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    start = time.perf_counter()
    out = Path(out)
    _check_output(out, force)
    tok = with_chat_tokens(_base_tokenizer(tokenizer))
    template = ChatTemplate(tok)
    files = collect_files(inputs, exclude=out) if inputs else []
    tally = Tally()
    with building(out, force) as tmp:
        writers = {s: (ShardWriter(tmp, s, tok.vocab_size), ShardWriter(tmp, s, 2, suffix=MASK_SUFFIX))
                   for s in SPLITS}
        counts = dict.fromkeys(SPLITS, 0)
        share = val_fraction if val_fraction is not None else BUILTIN_VAL_SHARE
        bar = Progress("prepare: rendering conversations", None, unit="conversations", enabled=progress)
        for messages, location, key in _conversations(files, tally):
            ids, mask = template.render(messages, train_on)
            if len(ids) > max_tokens:
                tally.skip("too_long", location)
                continue
            split = split_of(key, share)
            writers[split][0].add(ids)
            writers[split][1].add(mask)
            counts[split] += 1
            bar.update(advance=1)
        bar.close()
        missing = [s for s in SPLITS if counts[s] == 0]
        if missing:
            where = ", ".join(map(str, files)) or "the built-in set"
            raise DataError(f"{where}: {counts['train']} train and {counts['val']} val conversations usable "
                            f"({tally.summary()}); both splits need at least one"
                            + ("; pass a larger --val-fraction" if missing == ["val"] else ""))
        splits = {s: _split_entry(*writers[s], counts[s]) for s in SPLITS}
        _write_durably(tmp / "tokenizer.json", tok.to_json())
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tokenizer": {"kind": "chat", "sha256": tok.sha256, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id},
            "splits": splits,
            "chat": {
                "train_on": train_on,
                "max_tokens": max_tokens,
                "conversations": sum(counts.values()),
                "split_by": "module (built-in set)" if not files else "hash of the conversation",
                "val_share": share,
            },
            "skipped": {reason: tally.skipped[reason] for reason in BAD_REASONS},
            "skipped_examples": {reason: tally.examples.get(reason, []) for reason in BAD_REASONS},
            "stats": {"files": len(files), "elapsed_s": round(time.perf_counter() - start, 3)},
            "inputs": list(inputs) or [f"builtin-chat:{stdlib_dir()}"],
            "val_fraction": val_fraction,
        }
        write_manifest(tmp, manifest)
    return manifest


def _base_tokenizer(spec: str | Path | None) -> Tokenizer:
    """The tokenizer of the base model: a tokenizer.json, a run or data folder holding one, or by default
    the built-in corpus's (what plain `gptforge train` trains with)."""
    if spec is None:
        from gptforge.data.prepare import builtin_data_dir

        return Tokenizer.load(builtin_data_dir() / "tokenizer.json")
    path = Path(spec)
    if path.is_dir() and not (path / "tokenizer.json").is_file():
        raise DataError(f"{path}: no tokenizer.json in this folder; pass --tokenizer RUN/tokenizer.json")
    return Tokenizer.from_pretrained(path)


def _conversations(files: list[Path], tally: Tally):
    """(messages, location, split key) of every usable conversation: the files' lines, or the built-in set."""
    if not files:
        for n, item in enumerate(builtin_items()):
            yield builtin_conversation(item), f"builtin:{item['module']}.{item['name']}", item["module"]
        return
    for path in files:
        for messages, location in read_jsonl(path, tally):
            key = hashlib.sha256(json.dumps(messages, sort_keys=True).encode("utf-8")).hexdigest()
            yield messages, location, key


def _split_entry(tokens: ShardWriter, masks: ShardWriter, conversations: int) -> dict:
    shards = []
    for path, mask in zip(tokens.close(), masks.close()):
        shards.append({"file": path.name, "tokens": read_header(path).num_tokens, "sha256": sha256_file(path),
                       "mask": {"file": mask.name, "sha256": sha256_file(mask)}})
    return {"documents": conversations, "tokens": sum(s["tokens"] for s in shards), "shards": shards}
