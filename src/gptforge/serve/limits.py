"""Per-key rate limits: requests per minute and generated tokens per minute, as token buckets.

Each key has two buckets that refill continuously (rpm/60 and tpm/60 per second) up to a minute's worth.
A request takes one request token up front; the tokens it generates are charged when it ends, so a bucket
can go below zero and the key then waits until it refills. A refused request is told how long to wait
(HTTP 429 with Retry-After, in whole seconds).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass


@dataclass
class Bucket:
    rate: float  # per minute, also the capacity
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        self.level = min(self.rate, self.level + (now - self.stamp) * self.rate / 60.0)
        self.stamp = now

    def wait(self, need: float) -> float:
        """Seconds until the bucket holds `need`."""
        return max(0.0, (need - self.level) * 60.0 / self.rate)


class Limiter:
    """Buckets per key name; None for a limit means unlimited. Thread-safe."""

    def __init__(self, rpm: int | None, tpm: int | None, clock=time.monotonic):
        self.rpm, self.tpm, self.clock = rpm, tpm, clock
        self._buckets: dict[tuple[str, str], Bucket] = {}
        self._lock = threading.Lock()

    def _bucket(self, name: str, kind: str, rate: int | None, now: float) -> Bucket | None:
        if rate is None:
            return None
        bucket = self._buckets.get((name, kind))
        if bucket is None or bucket.rate != rate:
            bucket = self._buckets[(name, kind)] = Bucket(float(rate), float(rate), now)
        bucket.refill(now)
        return bucket

    def admit(self, name: str, rpm: int | None = None, tpm: int | None = None) -> int | None:
        """Take one request for `name`: None when allowed, else the seconds to wait (>= 1)."""
        with self._lock:
            now = self.clock()
            requests = self._bucket(name, "rpm", rpm or self.rpm, now)
            tokens = self._bucket(name, "tpm", tpm or self.tpm, now)
            wait = 0.0
            if requests is not None and requests.level < 1:
                wait = requests.wait(1)
            if tokens is not None and tokens.level <= 0:
                wait = max(wait, tokens.wait(0.0), 1e-9)
            if wait > 0:
                return max(1, math.ceil(wait))
            if requests is not None:
                requests.level -= 1
            return None

    def charge(self, name: str, tokens: int, tpm: int | None = None) -> None:
        """Count `tokens` generated for `name` against its tokens-per-minute bucket."""
        with self._lock:
            bucket = self._bucket(name, "tpm", tpm or self.tpm, self.clock())
            if bucket is not None:
                bucket.level -= tokens
