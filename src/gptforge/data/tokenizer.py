"""Tokenizers for training data: byte-level BPE, raw bytes, or a pretrained HF tokenizer.

Every tokenizer here is a `tokenizers.Tokenizer` underneath, so all of them save to
the same `tokenizer.json` and encode batches in parallel in Rust. Each carries an
end-of-text token (EOT) that `prepare` inserts *between* documents by id; text
itself never produces it (see `Tokenizer.encode`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from gptforge.errors import DataError

EOT = "<|endoftext|>"
TRAIN_RUN_CHARS = 4096  # the BPE trainer never sees a longer run of characters without whitespace
_LONG_RUN = re.compile(rf"(?<!\S)\S{{{TRAIN_RUN_CHARS + 1},}}")  # anchored at a run's start: linear time


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Byte-level BPE vocabularies (ours and GPT-2's) spell tokens in these characters,
    so mapping them back tells how many bytes of text a token stands for.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level(model: models.Model) -> tokenizers.Tokenizer:
    """A tokenizer around `model` with GPT-2's byte-level pre-tokenizer and decoder."""
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


class Tokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` with an end-of-text token."""

    def __init__(self, tok: tokenizers.Tokenizer):
        if tok.token_to_id(EOT) is None:
            raise ValueError(f"tokenizer has no {EOT} token; use Tokenizer.from_pretrained to add one")
        # Documents may legitimately contain the text "<|endoftext|>" (this very file
        # does); encode it as ordinary text so only `prepare` can emit the EOT id.
        tok.encode_special_tokens = True
        # A pretrained tokenizer.json may carry truncation or padding meant for a
        # classifier; either would silently corrupt a training stream.
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
        """Train a byte-level BPE (GPT-2 style) on a stream of texts, EOT included in `vocab_size`.

        The trainer's time grows steeply with the length of a word, and a megabyte
        without a space is one word (the trainer took minutes over one); so very long
        runs without whitespace are cut first (see `training_chunks`).
        """
        tok = _byte_level(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[EOT],
            show_progress=False,
        )
        tok.train_from_iterator((chunk for text in texts for chunk in training_chunks(text)), trainer=trainer)
        return cls(tok)

    @classmethod
    def bytes(cls) -> Tokenizer:
        """One token per byte (id = byte value) plus EOT as id 256.

        Built as a byte-level BPE without merges rather than special-cased, so it
        saves, loads and measures bytes exactly like a trained tokenizer.
        """
        vocab = {char: byte for byte, char in bytes_to_unicode().items()}
        tok = _byte_level(models.BPE(vocab=vocab, merges=[]))
        tok.add_special_tokens([AddedToken(EOT, special=True)])
        return cls(tok)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load a `tokenizer.json` file, or a folder holding one, or a GPT-2 style
        folder with `vocab.json` + `merges.txt`; EOT is added if the vocabulary lacks it."""
        path = Path(path)
        if path.is_dir() and (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        gpt2_style = (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
        if not path.is_file() and not gpt2_style:
            raise DataError(
                f"{path}: no tokenizer found; expected a tokenizer.json file, or a folder "
                "containing tokenizer.json or vocab.json + merges.txt"
            )
        try:
            if gpt2_style:
                tok = _byte_level(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
            else:
                tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers reports parse errors as bare Exceptions
            raise DataError(f"{path}: not a valid tokenizer ({exc})") from exc
        if tok.token_to_id(EOT) is None or not _is_special(tok, tok.token_to_id(EOT)):
            tok.add_special_tokens([AddedToken(EOT, special=True)])
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a `tokenizer.json` written by `save`."""
        return cls.from_pretrained(path)

    @cached_property
    def vocab_size(self) -> int:
        """Number of embedding rows needed: one past the largest id, special tokens included."""
        return max(self._tok.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def eot_id(self) -> int:
        return self._tok.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS from a post-processor, literal "<|endoftext|>" stays text."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once; tokenizers spreads the batch over every core."""
        return [enc.ids for enc in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; EOT shows up as "<|endoftext|>" so document boundaries stay visible."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token id stands for (0 for special tokens); the denominator of bits-per-byte."""
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        byte_chars = set(bytes_to_unicode().values())
        byte_level = isinstance(self._tok.decoder, decoders.ByteLevel)
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if _is_special(self._tok, i):
                continue
            if byte_level and all(c in byte_chars for c in token):
                lengths[i] = len(token)  # one character per byte by construction
            else:
                lengths[i] = len(self._tok.decode([i]).encode("utf-8"))
        return lengths

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` to `path` (a file name)."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    def to_json(self) -> str:
        return self._tok.to_str()

    @property
    def sha256(self) -> str:
        """Identifies the vocabulary a data dir or checkpoint was built with."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


def training_chunks(text: str) -> Iterator[str]:
    """`text` as the BPE trainer is fed it: whole, except that a run of more than TRAIN_RUN_CHARS characters
    without whitespace is cut every TRAIN_RUN_CHARS characters. Text without such a run (source code and
    prose, the built-in corpus included) is untouched, so it trains exactly the same vocabulary."""
    start = 0
    for run in _LONG_RUN.finditer(text):
        for cut in range(run.start() + TRAIN_RUN_CHARS, run.end(), TRAIN_RUN_CHARS):
            yield text[start:cut]
            start = cut
    yield text[start:]


def _is_special(tok: tokenizers.Tokenizer, token_id: int) -> bool:
    added = tok.get_added_tokens_decoder().get(token_id)
    return added is not None and added.special
