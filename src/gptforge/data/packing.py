"""Packing whole documents into training windows, best fit, for data with a loss mask (chat data).

Text pre-training reads windows that start anywhere; a conversation cut in the middle would lose the
question its answer follows. So for chat data each window of `window` tokens (block_size + 1) is a set of
whole documents (each begins with its end-of-text token), placed by best-fit decreasing: longest first,
each into the window with the least room left that still holds it. The rest of a window is padding
(end-of-text tokens that are never targets). Document masking (model.doc_token) keeps the documents
of a window from seeing each other.

A document longer than a window is split: its first piece fills a window, and each later piece starts a
window of its own one token before where the last one ended, so every token is a target exactly once.
A later piece is the continuation of a document: it starts its window without an end-of-text token, which
is what document masking reads as "a document begun before this window"; shorter documents may fill the
room left after its last piece.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Packed:
    """Windows as lists of pieces of the token stream: window i holds pieces offsets[i]..offsets[i+1]."""

    window: int
    offsets: np.ndarray  # (windows + 1,) int64
    starts: np.ndarray  # (pieces,) int64, where each piece begins in the stream
    lengths: np.ndarray  # (pieces,) int64
    continued: int  # pieces that continue a document split across windows

    @property
    def windows(self) -> int:
        return len(self.offsets) - 1

    def pieces(self, i: int) -> list[tuple[int, int]]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return list(zip(self.starts[a:b].tolist(), self.lengths[a:b].tolist()))

    def fill(self) -> float:
        """Share of window tokens that are document tokens, not padding."""
        return float(self.lengths.sum()) / max(1, self.windows * self.window)


def document_bounds(boundaries: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the documents of a stream of `total` tokens whose documents begin at
    `boundaries` (sorted positions of end-of-text tokens); tokens before the first boundary are a document."""
    starts = np.asarray(boundaries, dtype=np.int64)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts]).astype(np.int64)
    lengths = np.diff(np.concatenate([starts, [total]]))
    return starts, lengths


def pack(starts: np.ndarray, lengths: np.ndarray, window: int, seed: int = 0) -> Packed:
    """Best-fit decreasing packing of documents (starts, lengths) into windows of `window` tokens; the
    windows come out in an order shuffled by `seed`, so a sequential sweep does not go longest first."""
    if window < 2:
        raise ValueError(f"a window needs at least 2 tokens, got {window}")
    bins: list[list[tuple[int, int]]] = []
    room: list[tuple[int, int]] = []  # (room left, window index), sorted: the best fit is a bisect away
    continued = 0
    for s, n in zip(starts.tolist(), lengths.tolist()):
        if n > window:  # one window per piece; a piece after the first starts one token back
            first = True
            while n > 0:
                take = min(window, n)
                bins.append([(s, take)])
                continued += not first
                first = False
                if take < window:
                    bisect.insort(room, (window - take, len(bins) - 1))
                if n == take:
                    break
                s, n = s + take - 1, n - take + 1
    order = np.argsort(-lengths, kind="stable")
    for d in order.tolist():
        n = int(lengths[d])
        if n > window or n == 0:
            continue
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            left, b = room.pop(k)
            bins[b].append((int(starts[d]), n))
            if left - n > 0:
                bisect.insort(room, (left - n, b))
        else:
            bins.append([(int(starts[d]), n)])
            if window - n > 0:
                bisect.insort(room, (window - n, len(bins) - 1))
    shuffled = [bins[i] for i in np.random.default_rng(seed).permutation(len(bins))]
    sizes = np.array([len(b) for b in shuffled], dtype=np.int64)
    flat = [p for b in shuffled for p in b]
    return Packed(window, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                  np.array([p[0] for p in flat], dtype=np.int64), np.array([p[1] for p in flat], dtype=np.int64),
                  continued)
