"""What the server tells its operator: Prometheus metrics, an audit log (JSONL) and a drift watch.

The audit log has one line per request: the key's name (never the key), endpoint, model step, tokens in
and out, latency, time to first token, why it ended and what the safety filter did; never the text. The
drift watch keeps the rolling perplexity of the prompts served (their tokens' mean negative
log-likelihood, computed for free from the prefill's logits) beside the run's validation perplexity, and
logs an event when the ratio leaves [1/band, band] and when it comes back.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from pathlib import Path

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (so two servers in one process do not mix)."""

    def __init__(self, queue_depth, active, capacity: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("gptforge_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("gptforge_request_seconds", "Time from request to last byte", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("gptforge_time_to_first_token_seconds", "Time from request to first generated token",
                              ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("gptforge_prompt_tokens", "Prompt tokens received", registry=r)
        self.completion_tokens = Counter("gptforge_completion_tokens", "Tokens generated", registry=r)
        self.cached_tokens = Counter("gptforge_cached_prompt_tokens", "Prompt tokens found in a slot's cache",
                                     registry=r)
        self.tokens_per_s = Gauge("gptforge_tokens_per_second", "Tokens generated per second over the last 10 s",
                                  registry=r)
        self.tokens_per_s.set_function(self._rate)
        Gauge("gptforge_queue_depth", "Requests waiting for a slot", registry=r).set_function(queue_depth)
        Gauge("gptforge_active_sequences", "Slots decoding a request", registry=r).set_function(active)
        Gauge("gptforge_slots", "Slots of the engine", registry=r).set(capacity)
        self.safety = Counter("gptforge_safety_actions", "Responses the safety filter changed", ["action"], registry=r)
        self.rejected = Counter("gptforge_rejected", "Requests refused before generation", ["reason"], registry=r)
        self.drift = Gauge("gptforge_drift_perplexity", "Rolling perplexity of served prompts", registry=r)
        self.val_ppl = Gauge("gptforge_validation_perplexity", "The served checkpoint's validation perplexity",
                             registry=r)
        self.drift_out = Gauge("gptforge_drift_out_of_band", "1 while the prompts' perplexity is outside the band",
                               registry=r)
        self.step = Gauge("gptforge_model_step", "Training step of the weights serving new requests", registry=r)
        self.reloads = Counter("gptforge_reloads", "Checkpoints swapped in without downtime", registry=r)
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def generated(self, n: int = 1) -> None:
        self.completion_tokens.inc(n)
        with self._lock:
            self._recent.append((time.monotonic(), n))

    def _rate(self) -> float:
        with self._lock:
            now = time.monotonic()
            while self._recent and self._recent[0][0] < now - 10:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / 10.0

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class AuditLog:
    """Appends one JSON object per line; each write is one os-level append, so lines never interleave."""

    def __init__(self, path: str | Path | None):
        self.path = None if path is None else Path(path)
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        line = json.dumps({"time": round(time.time(), 3), **record}, sort_keys=True) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line)


class DriftWatch:
    """Rolling perplexity of the last `window` prompt tokens against the validation perplexity."""

    def __init__(self, val_ppl: float | None, band: float, metrics: Metrics, audit: AuditLog,
                 window: int = 4096, min_tokens: int = 256):
        self.val_ppl, self.band, self.window, self.min_tokens = val_ppl, band, window, min_tokens
        self.metrics, self.audit = metrics, audit
        self._chunks: deque[tuple[float, int]] = deque()
        self._nll, self._count = 0.0, 0
        self.out = False
        self._lock = threading.Lock()
        if val_ppl is not None:
            metrics.val_ppl.set(val_ppl)

    def observe(self, nll_sum: float, count: int) -> None:
        with self._lock:
            self._chunks.append((nll_sum, count))
            self._nll += nll_sum
            self._count += count
            while self._chunks and self._count - self._chunks[0][1] >= self.window:
                old_nll, old_count = self._chunks.popleft()
                self._nll -= old_nll
                self._count -= old_count
            if self._count < self.min_tokens:
                return
            ppl = math.exp(min(self._nll / self._count, 50.0))
            self.metrics.drift.set(ppl)
            if self.val_ppl is None:
                return
            ratio = ppl / self.val_ppl
            out = not 1 / self.band <= ratio <= self.band
            if out != self.out:
                self.out = out
                self.metrics.drift_out.set(int(out))
                self.audit.write({"event": "drift_out_of_band" if out else "drift_back_in_band",
                                  "prompt_perplexity": round(ppl, 3), "validation_perplexity": round(self.val_ppl, 3),
                                  "band": self.band, "tokens": self._count})

    def rebase(self, val_ppl: float | None) -> None:
        """New weights: their validation perplexity is the new reference."""
        with self._lock:
            self.val_ppl = val_ppl
            if val_ppl is not None:
                self.metrics.val_ppl.set(val_ppl)
