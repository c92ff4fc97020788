"""Token shards in the llm.c / modded-nanogpt `.bin` format.

A shard is a 1024-byte header of 256 little-endian int32 followed by the tokens:

    header[0]  magic    20240520 -> version 1, uint16 tokens (llm.c GPT-2, modded-nanogpt)
                        20240801 -> version 7, uint32 tokens (llm.c's Llama-3 layout), used
                                    here for vocabularies larger than 65,536
    header[1]  version
    header[2]  number of tokens
    header[3]  vocabulary size in shards written here; 0 in llm.c's own files

Keeping the format byte-compatible means shards made by llm.c or modded-nanogpt
train here unchanged, and ours load there.

Chat data (`prepare --format chat`) adds a loss mask beside each shard: `train_000000.mask` holds one value
per token of `train_000000.bin` in the same format (vocabulary size 2), 1 where the token is a training
target (an assistant's answer) and 0 where it is context. manifest.json lists each mask with its sha256.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptforge.errors import DataError

MASK_SUFFIX = ".mask"  # train_000000.mask beside train_000000.bin: the same format, values 0 or 1 (vocab_size 2)
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
UINT16_MAGIC, UINT16_VERSION = 20240520, 1
UINT32_MAGIC, UINT32_VERSION = 20240801, 7
_FORMATS = {
    UINT16_MAGIC: (UINT16_VERSION, np.dtype("<u2")),
    UINT32_MAGIC: (UINT32_VERSION, np.dtype("<u4")),
}


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    num_tokens: int
    dtype: np.dtype
    vocab_size: int | None  # None for shards whose header does not record it (llm.c's)
    mask: Path | None = None  # chat data: the loss mask beside the tokens, one 0/1 value per token (MASK_SUFFIX)


def _format_for(vocab_size: int) -> tuple[int, int, np.dtype]:
    magic = UINT16_MAGIC if vocab_size <= 1 << 16 else UINT32_MAGIC
    version, dtype = _FORMATS[magic]
    return magic, version, dtype


def _header(vocab_size: int, num_tokens: int) -> bytes:
    magic, version, _ = _format_for(vocab_size)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:4] = magic, version, num_tokens, vocab_size
    return header.tobytes()


def _check_range(tokens: np.ndarray, vocab_size: int) -> None:
    """Refuse ids the shard dtype or the vocabulary cannot hold, instead of wrapping them silently."""
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}); got {tokens.min()}..{tokens.max()}")


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Write one shard atomically (temporary file, fsync, rename) in the narrowest dtype that fits."""
    tokens = np.asarray(tokens)
    _check_range(tokens, vocab_size)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(_header(vocab_size, tokens.size))
        f.write(tokens.astype(_format_for(vocab_size)[2], copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_header(path: str | Path) -> ShardInfo:
    """Validate a shard's header and size against each other; DataError says what is wrong."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as exc:
        raise DataError(f"{path}: cannot read shard ({exc.strerror})") from exc
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes is too short for a shard header (expected at least {HEADER_BYTES})")
    header = np.frombuffer(raw, dtype="<i4")
    magic, version, num_tokens, vocab_size = (int(x) for x in header[:4])
    if magic not in _FORMATS:
        raise DataError(
            f"{path}: not a token shard: magic number {magic}, expected {UINT16_MAGIC} (uint16 tokens) "
            f"or {UINT32_MAGIC} (uint32 tokens)"
        )
    expected_version, dtype = _FORMATS[magic]
    if version != expected_version:
        raise DataError(f"{path}: unsupported shard version {version} for magic {magic} (expected {expected_version})")
    expected_size = HEADER_BYTES + num_tokens * dtype.itemsize
    if num_tokens < 0 or size != expected_size:
        state = "truncated" if size < expected_size else "has trailing bytes"
        raise DataError(
            f"{path}: {state}: header says {num_tokens} tokens ({expected_size} bytes) but file has {size} bytes"
        )
    return ShardInfo(path, num_tokens, dtype, vocab_size or None)


def open_shard(path: str | Path) -> np.ndarray:
    """Read-only memory map of a shard's tokens, so shards larger than RAM cost nothing to open."""
    info = read_header(path)
    if info.num_tokens == 0:  # mmap cannot map zero bytes
        return np.empty(0, dtype=info.dtype)
    return np.memmap(info.path, dtype=info.dtype, mode="r", offset=HEADER_BYTES, shape=(info.num_tokens,))


def find_shards(data_dir: str | Path, split: str) -> list[Path]:
    """Shards of `split` ("train" or "val"): ours (`train_000000.bin`) and foreign names
    such as llm.c's `tinyshakespeare_val.bin` or `fineweb_train_000001.bin`, sorted."""
    return sorted(Path(data_dir).glob(f"*{split}*.bin"))


class ShardWriter:
    """Streams tokens into numbered shards `{prefix}_{NNNNNN}.bin` of at most shard_tokens tokens each.

    Tokens go straight to disk, so memory stays flat however large the corpus;
    each shard gets its final header, fsync and name only once it is complete.
    """

    def __init__(self, out_dir: str | Path, prefix: str, vocab_size: int, shard_tokens: int = 100_000_000,
                 suffix: str = ".bin"):
        if not 0 < shard_tokens < 1 << 31:
            raise ValueError(f"shard_tokens must be in [1, 2**31), got {shard_tokens}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.vocab_size = vocab_size
        self.shard_tokens = shard_tokens
        self.suffix = suffix
        self.num_tokens = 0
        self._dtype = _format_for(vocab_size)[2]
        self._paths: list[Path] = []
        self._file = None
        self._in_shard = 0

    def add(self, tokens: np.ndarray | list[int]) -> None:
        tokens = np.asarray(tokens, dtype=np.int64)
        _check_range(tokens, self.vocab_size)
        while tokens.size:
            if self._file is None:
                self._open_next()
            take = min(tokens.size, self.shard_tokens - self._in_shard)
            self._file.write(tokens[:take].astype(self._dtype).tobytes())
            self._in_shard += take
            self.num_tokens += take
            tokens = tokens[take:]
            if self._in_shard == self.shard_tokens:
                self._finish()

    def close(self) -> list[Path]:
        """Finish the last partial shard and return every shard written, in order."""
        if self._file is not None:
            self._finish()
        return list(self._paths)

    def _path(self) -> Path:
        return self.out_dir / f"{self.prefix}_{len(self._paths):06d}{self.suffix}"

    def _open_next(self) -> None:
        self._file = open(f"{self._path()}.tmp", "wb")
        self._file.write(_header(self.vocab_size, 0))  # placeholder until the count is known
        self._in_shard = 0

    def _finish(self) -> None:
        f, path = self._file, self._path()
        f.seek(0)
        f.write(_header(self.vocab_size, self._in_shard))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(f.name, path)
        self._paths.append(path)
        self._file = None
