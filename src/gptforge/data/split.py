"""How `prepare` divides a corpus into train and val: by a share of the tokens, in whole documents where it can.

**The target.** `--val-fraction F` gives val about F of the tokens. The default (None) gives it
DEFAULT_SHARE of them, but at least MIN_WINDOWS windows of WINDOW tokens (the largest preset context), and
never more than MAX_AUTO_SHARE of a small corpus. A val split under MIN_WINDOWS windows is reported, with the
tokens it is short by.

**Whole documents.** A document's side is decided by a 64-bit hash of its final text (after curation; a long
document's pieces all follow its first): val takes the documents whose hash falls below a threshold. A planning pass (`SplitPlanner`) counts characters
per hash bucket and picks the threshold whose val documents hold the share closest to the target. The
threshold depends on the set of documents only, not on their order or the number of workers, and identical
documents share a hash, so they always land on the same side.

**Inside documents.** When whole documents cannot come near the target (a corpus of fewer than MIN_DOCUMENTS
documents, or of a few large ones: val would get less than half or more than OVER times the target),
every document is cut once instead, near its (1 - share) point: the head goes to train, the tail to val, as
nanoGPT's position split does (each piece of a document longer than corpus.py's MAX_DOCUMENT_CHARS is cut
on its own). The cut is at the line break nearest that point; a document with no line
break is cut at a space, and one with neither at a character. The manifest records the method, the target
and how many cuts fell on each kind of boundary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

WINDOW = 1024  # tokens: the largest preset context (gpt2-124m, gpt2-350m)
MIN_WINDOWS = 200
DEFAULT_SHARE = 0.005
MAX_AUTO_SHARE = 0.10
OVER = 1.5  # whole documents are used while val gets between 1 / 2 and OVER times the target share,
MIN_DOCUMENTS = 10  # from a corpus of at least this many documents
BUCKET_BITS = 16
BOUNDARIES = ("line", "space", "char")


def doc_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def target_share(val_fraction: float | None, est_tokens: float) -> float:
    """The share of the tokens val should get (see the module docstring)."""
    if val_fraction is not None:
        return val_fraction
    wanted = MIN_WINDOWS * WINDOW / max(est_tokens, 1.0)
    return min(max(DEFAULT_SHARE, wanted), MAX_AUTO_SHARE)


@dataclass
class SplitPlan:
    """Where each document goes: `place(text)` -> [(split, text), ...] (one part, or train's head and val's tail)."""

    method: str  # "documents" or "inside_documents"
    target_share: float
    threshold: int = 0  # documents: val takes a hash below it
    planned_share: float = 0.0  # the share of characters the plan gives val
    boundaries: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BOUNDARIES, 0))
    _side: str = "train"  # where the last whole document went

    def place(self, text: str, continues: bool = False) -> list[tuple[str, str]]:
        """`continues`: a later piece of a long document, which goes where the document's first piece went."""
        if self.method == "documents":
            if not continues:
                self._side = "val" if doc_hash(text) < self.threshold else "train"
            return [(self._side, text)]
        cut, kind = cut_point(text, 1.0 - self.target_share)
        if cut is None:  # too short to cut: whole, by its hash, so the choice stays deterministic
            return [("val" if doc_hash(text) < int(self.target_share * 2**64) else "train", text)]
        self.boundaries[kind] += 1
        return [("train", text[:cut]), ("val", text[cut:])]

    def to_dict(self) -> dict:
        record = {"method": self.method, "target_share": round(self.target_share, 6),
                  "planned_share": round(self.planned_share, 6)}
        if self.method == "documents":
            record["threshold"] = self.threshold  # val: doc_hash(text) < threshold
        else:
            record["boundaries"] = dict(self.boundaries)
        return record


def cut_point(text: str, at: float) -> tuple[int | None, str]:
    """Where to cut `text` near the fraction `at` of its length, and the kind of boundary: just after the
    nearest line break, else before the nearest space, else at that character. None for a text that cannot
    leave something on both sides."""
    if len(text) < 2:
        return None, "char"
    target = min(max(int(len(text) * at), 1), len(text) - 1)
    for kind, mark, offset in (("line", "\n", 1), ("space", " ", 0)):
        before, after = text.rfind(mark, 0, target), text.find(mark, target)
        candidates = [i + offset for i in (before, after) if i >= 0 and 0 < i + offset < len(text)]
        if candidates:
            return min(candidates, key=lambda i: abs(i - target)), kind
    return target, "char"


class SplitPlanner:
    """The planning pass: characters and documents per hash bucket, in bounded memory."""

    def __init__(self):
        self.chars = np.zeros(1 << BUCKET_BITS, dtype=np.int64)
        self.documents = 0
        self.total_chars = 0
        self._bucket = 0

    def add(self, text: str, continues: bool = False) -> None:
        """One document; `continues`: a later piece of a long one, counted with its first piece."""
        if not continues:
            self._bucket = doc_hash(text) >> (64 - BUCKET_BITS)
            self.documents += 1
        self.chars[self._bucket] += len(text)
        self.total_chars += len(text)

    def plan(self, share: float) -> SplitPlan:
        """Whole documents when a threshold gives val between half and OVER times `share` and leaves train
        something; else cuts inside every document."""
        if share <= 0 or self.total_chars == 0:
            return SplitPlan("documents", share, threshold=0)
        cumulative = np.cumsum(self.chars) / self.total_chars  # val's share with buckets [0, k] in val
        k = int(np.searchsorted(cumulative, share))  # the first bucket that reaches the share
        options = [k - 1, k] if k > 0 else [k]
        best = min(options, key=lambda i: abs(cumulative[i] - share))
        planned = float(cumulative[best])
        if self.documents >= MIN_DOCUMENTS and share / 2 <= planned <= OVER * share and planned < 1.0:
            return SplitPlan("documents", share, threshold=(best + 1) << (64 - BUCKET_BITS), planned_share=planned)
        return SplitPlan("inside_documents", share, planned_share=share)
