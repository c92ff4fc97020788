"""Reading a data dir: a folder of token shards written by `gptforge prepare`, llm.c or modded-nanogpt.

`load_data_dir` checks the folder before training touches it: every shard listed in
manifest.json must be there with its recorded token count (and sha256), and a folder
without a manifest must still say how large its vocabulary is.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from gptforge.data.shards import ShardInfo, find_shards, read_header
from gptforge.data.tokenizer import Tokenizer
from gptforge.errors import DataError
from gptforge.fileio import sha256_file

FORMAT, FORMAT_VERSION = "gptforge-data", 1  # what manifest.json says it is
SPLITS = ("train", "val")
GPT2_VOCAB_SIZE = 50257  # what an llm.c uint16 shard means when nothing says otherwise


@dataclass
class DataDir:
    """An opened data dir: its shards per split, its tokenizer (None when the folder has no tokenizer.json),
    vocabulary size, and manifest (None for a folder of shards without one)."""

    path: Path
    train: list[ShardInfo]
    val: list[ShardInfo]
    tokenizer: Tokenizer | None
    vocab_size: int
    manifest: dict | None

    @property
    def chat(self) -> dict | None:
        """What `prepare --format chat` recorded (train_on, conversations, skipped), or None for text data."""
        return (self.manifest or {}).get("chat")

    def model_fields(self) -> dict[str, int]:
        """The model section's fields the data decides: the vocabulary (data/images.py has its own)."""
        return {"vocab_size": self.vocab_size}


def load_data_dir(data_dir: str | Path, *, verify_sha256: bool = True) -> DataDir:
    """Open a folder of shards written by `prepare`, llm.c or modded-nanogpt, checking it first.

    With a manifest every shard must match its recorded token count (and sha256 when
    `verify_sha256`); without one, shards are found by name and the vocabulary size
    comes from tokenizer.json, the shard headers, or GPT-2's for llm.c uint16 shards.
    """
    path = Path(data_dir)
    if ".tmp-" in path.name:
        raise DataError(f"{path}: a folder left by an interrupted prepare; run gptforge prepare again")
    if not path.is_dir():
        raise DataError(f"{path}: not a data directory; create one with gptforge prepare")
    tokenizer_path = path / "tokenizer.json"
    tokenizer = Tokenizer.load(tokenizer_path) if tokenizer_path.is_file() else None
    manifest_path = path / "manifest.json"
    if manifest_path.is_file():
        manifest = _read_manifest(manifest_path)
        splits = _manifest_shards(path, manifest, verify_sha256)
        vocab_size = manifest["tokenizer"]["vocab_size"]
        if tokenizer and verify_sha256 and sha256_file(tokenizer_path) != manifest["tokenizer"]["sha256"]:
            raise DataError(f"{tokenizer_path}: sha256 differs from manifest.json; the file was changed or damaged")
    else:
        manifest = None
        splits = {split: [read_header(p) for p in find_shards(path, split)] for split in SPLITS}
        vocab_size = tokenizer.vocab_size if tokenizer else _vocab_from_headers(path, splits)
    if not splits["train"] or not splits["val"]:
        found = sorted(p.name for p in path.iterdir())
        raise DataError(
            f"{path}: found {len(splits['train'])} train and {len(splits['val'])} val shards "
            f"(files: {', '.join(found[:10]) or 'none'}); expected train_*.bin and val_*.bin "
            "(or llm.c's *_train*.bin / *_val*.bin); create them with gptforge prepare"
        )
    return DataDir(path, splits["train"], splits["val"], tokenizer, vocab_size, manifest)


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a gptforge data manifest (expected \"format\": \"{FORMAT}\")")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {manifest.get('format_version')} is not supported "
            f"(expected {FORMAT_VERSION}); prepare the data again"
        )
    return manifest


def _manifest_shards(path: Path, manifest: dict, verify_sha256: bool) -> dict[str, list[ShardInfo]]:
    splits = {}
    try:
        for split in SPLITS:
            splits[split] = []
            for entry in manifest["splits"][split]["shards"]:
                shard = path / entry["file"]
                if not shard.is_file():
                    raise DataError(f"{shard}: listed in manifest.json but missing")
                info = read_header(shard)
                if info.num_tokens != entry["tokens"]:
                    raise DataError(f"{shard}: has {info.num_tokens} tokens, manifest.json says {entry['tokens']}")
                if verify_sha256 and sha256_file(shard) != entry["sha256"]:
                    raise DataError(f"{shard}: sha256 differs from manifest.json; the file was changed or damaged")
                if "mask" in entry:
                    info = dataclasses.replace(info, mask=_checked_mask(path, entry, verify_sha256))
                splits[split].append(info)
    except (KeyError, TypeError) as exc:
        raise DataError(f"{path / 'manifest.json'}: malformed, missing or wrong entry {exc}") from exc
    return splits


def _checked_mask(path: Path, entry: dict, verify_sha256: bool) -> Path:
    """The loss mask a manifest lists beside a shard, checked like the shard: present, as long, intact."""
    mask = path / entry["mask"]["file"]
    if not mask.is_file():
        raise DataError(f"{mask}: listed in manifest.json but missing")
    if read_header(mask).num_tokens != entry["tokens"]:
        raise DataError(f"{mask}: a loss mask of {read_header(mask).num_tokens} values for {entry['tokens']} tokens")
    if verify_sha256 and sha256_file(mask) != entry["mask"]["sha256"]:
        raise DataError(f"{mask}: sha256 differs from manifest.json; the file was changed or damaged")
    return mask


def _vocab_from_headers(path: Path, splits: dict[str, list[ShardInfo]]) -> int:
    shards = [info for infos in splits.values() for info in infos]
    recorded = {info.vocab_size for info in shards if info.vocab_size}
    if len(recorded) > 1:
        raise DataError(f"{path}: shards disagree on the vocabulary size: {sorted(recorded)}")
    if recorded:
        return recorded.pop()
    if shards and all(info.dtype.itemsize == 2 for info in shards):
        return GPT2_VOCAB_SIZE
    raise DataError(
        f"{path}: cannot tell the vocabulary size of its uint32 shards; "
        "put the tokenizer.json they were made with into the folder"
    )
