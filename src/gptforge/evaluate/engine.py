"""One generation engine with continuous batching: `sample`, `compare`, chat and the server all decode here.

The engine owns a fixed number of slots, each one row of a RowCache (its own keys and values, its own
position). Requests join and leave between steps. A step first prefills the requests that were admitted
(each alone, into its slot), then runs one forward of one token over every active slot, so concurrent
requests share the weights' reads; each row samples with its own temperature, top-k, top-p and seed.

A slot keeps its cache when its request ends. The next request placed there reuses the longest common
prefix of its prompt and the tokens already cached, and prefills only the rest: a chat that sends its
whole history every turn prefills only the new turn. A free slot is chosen by that prefix first.

Shapes: a decode step runs over rows [lo, hi) (from the lowest busy row to one past the highest) and
attends over the first `span` columns of the cache, span rounded up to a multiple of `span_multiple`; so
on a GPU the shapes take few distinct values and compile or CUDA graphs can be applied per (rows, span)
bucket.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from gptforge.model.gpt import GPT


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest along the last dim to -inf (ties with the k-th are kept)."""
    if k < 1:
        raise ValueError(f"top_k must be at least 1, got {k}")
    kth = torch.topk(logits, min(k, logits.size(-1)), dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches p.

    A token survives when the probability of the tokens ranked above it is still below p, so the most
    likely token always survives and the token that carries the total over p is kept too.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p == 1.0:  # keeps everything; skip it rather than trust a float cumsum to stay below 1
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (..., V)
    probs = torch.softmax(sorted_logits.float(), dim=-1)  # (..., V)
    mass_above = probs.cumsum(dim=-1) - probs  # (..., V) probability of the better-ranked tokens
    drop_sorted = mass_above >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_token(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> int:
    """Pick the next token id from logits (V,): argmax at temperature 0, else a draw from the filtered softmax."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature  # (V,)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)  # (V,)
    return int(torch.multinomial(probs, num_samples=1, generator=generator))


@dataclass
class Sampling:
    """How one request picks its tokens; temperature 0 is greedy. A seed draws from the request's own
    generator, so a seeded request gives the same tokens alone or batched with others."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def check(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(eq=False)
class Request:
    """One generation: up to max_new_tokens after `prompt`, ending after a token of stop_ids.

    on_token(token) and on_finish(reason) are called from the thread that runs the engine; reason is
    "stop" (a stop token, or a cancel asked with that reason), "length" (max_new_tokens) or "cancelled".
    `context_keep` chooses what happens when the slot's cache is full (see generate.stream). on_prompt
    hears (sum of the prompt tokens' negative log-likelihoods, their count) once the prompt is prefilled.
    """

    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop_ids: frozenset[int] = frozenset()
    context_keep: int | None = None
    on_token: Callable[[int], None] | None = None
    on_finish: Callable[[str], None] | None = None
    on_prompt: Callable[[float, int], None] | None = None
    tokens: list[int] = field(default_factory=list)  # generated so far
    finish_reason: str | None = None
    cached_prompt_tokens: int = 0  # prompt tokens found in the slot's cache, not prefilled again

    def __post_init__(self):
        self.done = threading.Event()
        self._cancel: str | None = None
        self._pending: int | None = None  # the last token sampled, not yet fed to the model
        self._generator: torch.Generator | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the engine to end this request before its next step (thread-safe); its slot is freed then."""
        self._cancel = reason


class RowCache:
    """Keys and values per slot: k[layer] is (n_rows, n_head, max_len, head_dim), each row its own sequence.

    The attention layers see it as they see a KVCache: update(layer, k, v) stores the new keys and returns
    those to attend over, and `pos` is 0 because the engine always hands attention a mask of its own (so
    the cache's length never decides causality). The engine selects the rows of the next forward first:
    `select_prefill(row, start)` for T new tokens of one row at [start, start + T), or
    `select_decode(lo, hi, cols, span)` for one token per row of [lo, hi), row lo + b writing at column
    cols[b] and attending over the first `span` columns. `attend_dtype`: the dtype keys and values are
    handed back in (None: the new keys' own), for attention to compute in.
    """

    pos = 0

    def __init__(self, n_rows: int, config, device: torch.device, dtype: torch.dtype,
                 attend_dtype: torch.dtype | None = None):
        self.n_rows, self.max_len = n_rows, config.block_size
        self.attend_dtype = attend_dtype
        shape = (config.n_layer, n_rows, config.n_head, config.block_size, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.doc = torch.zeros(n_rows, config.block_size, dtype=torch.long, device=device)  # document ids
        self.device = device
        self._row = 0
        self._start: int | torch.Tensor = 0  # prefill: an int; decode: cols, (hi,) long
        self._span = 0
        self._decode = False

    def select_prefill(self, row: int, start: int) -> None:
        self._row, self._start, self._decode, self.pos = row, start, False, 0

    def select_decode(self, lo: int, hi: int, cols: torch.Tensor, span: int, single: int | None = None) -> None:
        """One token per row of [lo, hi), row lo + b writing at column cols[b], attending over `span` columns.
        `single`: rows [lo, lo + 1) only, at that column, with no mask: plain slices, and `pos` set to it so
        attention lets the one new query see every key returned (the single-stream fast path)."""
        self._lo, self._row, self._start, self._span, self._decode = lo, hi, cols, span, True
        self._single = single
        self.pos = 0 if single is None else single
        if single is None:
            self._index = torch.arange(lo, hi, device=self.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hd) of the selected rows; return what they attend over."""
        dtype = self.attend_dtype or k.dtype  # .to is a no-op where the cache already holds it
        if not self._decode:  # prefill: one row, a contiguous run of columns
            row, end = self._row, self._start + k.size(2)
            self.k[layer, row:row + 1, :, self._start:end] = k
            self.v[layer, row:row + 1, :, self._start:end] = v
            return (self.k[layer, row:row + 1, :, :end].to(dtype),
                    self.v[layer, row:row + 1, :, :end].to(dtype))  # (1, nh, end, hd)
        lo = self._lo
        if self._single is not None:  # one row at one column: slices, no index tensors
            col = self._single
            self.k[layer, lo, :, col] = k[0, :, 0]
            self.v[layer, lo, :, col] = v[0, :, 0]
            return (self.k[layer, lo:lo + 1, :, :col + 1].to(dtype),
                    self.v[layer, lo:lo + 1, :, :col + 1].to(dtype))  # (1, nh, col + 1, hd)
        # decode: row lo + b's one new key goes to column cols[b]; indexing (row, :, col) picks (B, nh, hd)
        self.k[layer, self._index, :, self._start] = k[:, :, 0].to(self.k.dtype)
        self.v[layer, self._index, :, self._start] = v[:, :, 0].to(self.v.dtype)
        hi, span = self._row, self._span
        return self.k[layer, lo:hi, :, :span].to(dtype), self.v[layer, lo:hi, :, :span].to(dtype)  # (B, nh, span, hd)


@dataclass(eq=False)
class Slot:
    row: int
    tokens: list[int] = field(default_factory=list)  # the tokens whose keys fill columns [0, len)
    docs: list[int] = field(default_factory=list)  # each token's document id (document masking)
    starts: list[int] = field(default_factory=list)  # the column its document starts at
    request: Request | None = None

    def keep(self, n: int) -> None:
        del self.tokens[n:], self.docs[n:], self.starts[n:]

    def extend(self, tokens: list[int], doc_token: int) -> None:
        """Append tokens; each doc_token starts a new document that it belongs to, as GPT.forward counts them."""
        doc = self.docs[-1] if self.docs else 0
        start = self.starts[-1] if self.starts else 0
        for token in tokens:
            if token == doc_token:
                doc, start = doc + 1, len(self.tokens)
            self.tokens.append(token)
            self.docs.append(doc)
            self.starts.append(start)


def encode_positions(model: GPT, x: torch.Tensor, absolute: torch.Tensor, in_doc: torch.Tensor):
    """model.positions for rows at positions of their own: absolute (B, T), and in_doc (B, T), each token's
    position in its document, which learned positions use under document masking (as GPT.forward does)."""
    if model.config.pos == "learned":
        return x + model.transformer.wpe(in_doc), None
    if model.config.pos == "rope":  # rotary tables per row, (B, 1, T, hd/2), broadcast over heads
        return x, (model.rope_cos[absolute][:, None], model.rope_sin[absolute][:, None])
    raise ValueError(f"the engine cannot place positions of model.pos={model.config.pos!r}")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Engine:
    """Continuous batching over `slots` KV-cache rows of one model (in eval mode, under torch.no_grad).

    submit() is thread-safe; step() and run() belong to one thread. `autocast` is a context manager
    factory for the forwards (a Precision's autocast), `cache_dtype` the dtype of the cache (default: the
    model's parameters'). `attention_dtype`: keep the cache in this dtype and attend in it, whatever the
    weights'; by default fp32 on a CPU whose weights are bf16 or fp16 (a CPU computes attention over one query
    per row several times faster in fp32 than in bf16: BENCHMARKS.md, Serving), else the weights' own.
    """

    def __init__(self, model: GPT, slots: int = 8, *, autocast: Callable | None = None,
                 cache_dtype: torch.dtype | None = None, attention_dtype: torch.dtype | None = None,
                 span_multiple: int = 32):
        if slots < 1:
            raise ValueError(f"an engine needs at least one slot, got {slots}")
        self.model = model
        self.block_size = model.config.block_size
        param = next(model.parameters())
        self.device = param.device
        if attention_dtype is None and self.device.type == "cpu" and param.dtype in (torch.bfloat16, torch.float16):
            attention_dtype = torch.float32
        self.cache = RowCache(slots, model.config, self.device, attention_dtype or cache_dtype or param.dtype,
                              attend_dtype=attention_dtype)
        self.slots = [Slot(i) for i in range(slots)]
        self.autocast = autocast
        self.doc_token = model.config.doc_token  # >= 0: attention stays within documents
        self.span_multiple = span_multiple
        self._waiting: deque[Request] = deque()
        self._lock = threading.Condition()
        self.steps = 0  # decode forwards run, for tests and metrics

    # ------------------------------------------------------------------ the public side

    def submit(self, request: Request) -> Request:
        if not request.prompt:
            raise ValueError("the prompt needs at least one token; for unconditional sampling pass [eot_id]")
        keep = request.context_keep
        if keep is not None and not 1 <= keep < self.block_size:
            raise ValueError(f"context_keep must be in [1, block_size={self.block_size}), got {keep}")
        request.sampling.check()
        seed = request.sampling.seed
        if seed is not None:
            request._generator = torch.Generator(device=self.device).manual_seed(seed)
        with self._lock:
            self._waiting.append(request)
            self._lock.notify()
        return request

    @property
    def active(self) -> int:
        return sum(s.request is not None for s in self.slots)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def idle(self) -> bool:
        return not self._waiting and self.active == 0

    def run(self, stop: threading.Event, idle_wait: float = 0.05, report: Callable[[str], None] = print) -> None:
        """Step until `stop` is set; sleep on the queue while there is nothing to do. A step that raises
        ends every request it held with finish reason "error" (none is left waiting forever) and the
        engine goes on with the next ones."""
        while not stop.is_set():
            if self.idle():
                with self._lock:
                    if not self._waiting:
                        self._lock.wait(idle_wait)
                continue
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - reported, and the requests told
                report(f"generation step failed: {type(e).__name__}: {e}")
                self.fail_all()

    def fail_all(self, reason: str = "error") -> None:
        """End every request, running or waiting, with `reason`; the slots forget their caches."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for slot in self.slots:
            slot.keep(0)
            if slot.request is not None:
                self._finish(slot, reason)
        for request in waiting:
            request.finish_reason = reason
            self._notify_finish(request)

    def wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def iterate(self, request: Request) -> Iterator[int]:
        """Run the engine in this thread until `request` ends, yielding its tokens as they come."""
        self.submit(request)
        seen = 0
        try:
            while True:
                while seen < len(request.tokens):
                    seen += 1
                    yield request.tokens[seen - 1]
                if request.done.is_set():
                    return
                self.step()
        finally:
            if not request.done.is_set():  # the caller stopped early (Ctrl-C, or it closed the generator)
                self._abandon(request)

    def _abandon(self, request: Request) -> None:
        """End `request` now, from the thread that runs the engine. Its slot forgets what it cached: a step
        cut short (KeyboardInterrupt inside a forward) may have left its cache half written."""
        with self._lock:
            if request in self._waiting:
                self._waiting.remove(request)
        for slot in self.slots:
            if slot.request is request:
                self._finish(slot, "cancelled")
                slot.keep(0)
                return
        request.finish_reason = "cancelled"
        self._notify_finish(request)

    @torch.no_grad()
    def step(self) -> None:
        """Retire cancelled requests, admit waiting ones (prefill), then decode one token for every slot."""
        for slot in self.slots:
            if slot.request is not None and slot.request._cancel is not None:
                self._finish(slot, slot.request._cancel)
        with self._lock:
            gone = [r for r in self._waiting if r._cancel is not None]
            for request in gone:
                self._waiting.remove(request)
        for request in gone:  # cancelled while queued: finished without ever taking a slot
            request.finish_reason = request._cancel
            self._notify_finish(request)
        self._admit()
        busy = [s for s in self.slots if s.request is not None and s.request._pending is not None]
        full = [s for s in busy if len(s.tokens) >= self.block_size]
        for slot in full:  # the window is full: re-read its tail (see generate.stream) instead of a decode
            request = slot.request
            keep = request.context_keep or self.block_size
            context = (slot.tokens + [request._pending])[-keep:]
            slot.keep(0)
            self._prefill(slot, context)
        decoding = [s for s in busy if s not in full]
        if decoding:
            self._decode(decoding)

    # ------------------------------------------------------------------ inside a step

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    return
                free = [s for s in self.slots if s.request is None]
                if not free:
                    return
                request = self._waiting.popleft()
            if request._cancel is not None or request.max_new_tokens <= 0:
                request.finish_reason = request._cancel or "length"
                self._notify_finish(request)
                continue
            window = request.prompt[-self.block_size:]
            slot = max(free, key=lambda s: (min(common_prefix(s.tokens, window), len(window) - 1), -s.row))
            slot.request = request
            self._prefill(slot, window, score=True)

    def _forward(self, idx: torch.Tensor, absolute: torch.Tensor, in_doc: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
        """GPT.forward for rows at positions of their own: token ids idx (B, T) -> logits (B, T, V). The
        model's own modules run in its order; the engine supplies positions and the attention mask."""
        model = self.model
        with self.autocast() if self.autocast is not None else contextlib.nullcontext():
            x, rope = encode_positions(model, model.transformer.wte(idx), absolute, in_doc)  # (B, T, C)
            x = model.run_blocks(x, rope, self.cache, mask)  # (B, T, C)
            return model.logits(model.transformer.ln_f(x))  # (B, T, V)

    def _prefill(self, slot: Slot, context: list[int], score: bool = False) -> None:
        """Feed the part of `context` the slot has not cached, then sample the request's next token."""
        request = slot.request
        reuse = min(common_prefix(slot.tokens, context), len(context) - 1)
        if score:
            request.cached_prompt_tokens = reuse
        new = context[reuse:]
        slot.keep(reuse)
        slot.extend(new, self.doc_token)
        S = len(context)
        dev = self.device
        idx = torch.tensor([new], dtype=torch.long, device=dev)  # (1, T)
        absolute = torch.arange(reuse, S, device=dev)[None]  # (1, T)
        in_doc = absolute - torch.tensor([slot.starts[reuse:]], device=dev)  # (1, T)
        mask = None  # from column 0 in one document: plain causal attention
        if reuse or self.doc_token >= 0:
            visible = torch.arange(S, device=dev)[None, :] <= absolute[0, :, None]  # (T, S)
            if self.doc_token >= 0:
                docs = torch.tensor(slot.docs, device=dev)  # (S,)
                self.cache.doc[slot.row, :S] = docs
                visible &= docs[None, :] == docs[reuse:, None]
            mask = visible[None, None]  # (1, 1, T, S)
        self.cache.select_prefill(slot.row, reuse)
        logits = self._forward(idx, absolute, in_doc, mask)[0]  # (T, V)
        if score and request.on_prompt is not None and len(new) > 1:
            # logits at position i predict token i + 1: the prompt's own tokens after the reused part
            nll = torch.nn.functional.cross_entropy(logits[:-1].float(), idx[0, 1:], reduction="sum")
            request.on_prompt(float(nll), len(new) - 1)
        self._emit(slot, self._sample(request, logits[-1]))

    def _decode(self, slots: list[Slot]) -> None:
        """One token for each of `slots`: one forward over the rows [lo, hi) that span them."""
        lo, hi = min(s.row for s in slots), max(s.row for s in slots) + 1
        rows = self.slots[lo:hi]
        feed, cols = [0] * len(rows), [0] * len(rows)
        for b, slot in enumerate(rows):
            if slot.request is not None and slot in slots:
                feed[b], cols[b] = slot.request._pending, len(slot.tokens)
            else:  # an idle row computes a throwaway token; its write lands past what it may reuse
                col = min(len(slot.tokens), self.block_size - 1)
                slot.keep(col)
                cols[b] = col
        span = min(self.block_size, -(-(max(cols) + 1) // self.span_multiple) * self.span_multiple)
        dev = self.device
        cols_t = torch.tensor(cols, dtype=torch.long, device=dev)  # (B,)
        in_doc = cols_t
        mask = None
        single = cols[0] if len(rows) == 1 and cols[0] > 0 else None
        if self.doc_token >= 0:  # the new token's document id and start, as Slot.extend will count them
            docs, starts = [], []
            for slot, token, col in zip(rows, feed, cols):
                doc = slot.docs[col - 1] if col else 0
                start = slot.starts[col - 1] if col else 0
                docs.append(doc + (token == self.doc_token))
                starts.append(col if token == self.doc_token else start)
            docs_t = torch.tensor(docs, device=dev)
            self.cache.doc[torch.arange(lo, hi, device=dev), cols_t] = docs_t
            in_doc = cols_t - torch.tensor(starts, device=dev)
            if single is not None and rows[0].docs[0] != docs[0]:
                single = None  # the row holds several documents: the new token sees its own only
            if single is None:
                mask = self.cache.doc[lo:hi, :span] == docs_t[:, None]  # (B, span)
        if single is None:
            visible = torch.arange(span, device=dev)[None, :] <= cols_t[:, None]  # (B, span)
            mask = (visible if mask is None else visible & mask)[:, None, None]  # (B, 1, 1, span)
        self.cache.select_decode(lo, hi, cols_t, span, single)
        idx = torch.tensor(feed, dtype=torch.long, device=dev)[:, None]  # (B, 1)
        logits = self._forward(idx, cols_t[:, None], in_doc[:, None], mask)[:, -1]  # (B, V)
        self.steps += 1
        greedy = [s for s in slots if s.request.sampling.temperature == 0]
        if greedy:
            picks = logits[torch.tensor([s.row - lo for s in greedy], device=dev)].argmax(dim=-1).tolist()
        for slot in slots:
            slot.extend([slot.request._pending], self.doc_token)
        for slot, token in zip(greedy, picks if greedy else []):
            self._emit(slot, token)
        for slot in slots:
            if slot not in greedy:
                self._emit(slot, self._sample(slot.request, logits[slot.row - lo]))

    def _sample(self, request: Request, logits: torch.Tensor) -> int:
        s = request.sampling
        return sample_token(logits, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                            generator=request._generator)

    def _emit(self, slot: Slot, token: int) -> None:
        request = slot.request
        request.tokens.append(token)
        request._pending = token
        if request.on_token is not None:
            request.on_token(token)
        if token in request.stop_ids:
            self._finish(slot, "stop")
        elif len(request.tokens) >= request.max_new_tokens:
            self._finish(slot, "length")
        elif request._cancel is not None:
            self._finish(slot, request._cancel)

    def _finish(self, slot: Slot, reason: str) -> None:
        request, slot.request = slot.request, None
        request.finish_reason = reason
        request._pending = None
        self._notify_finish(request)

    @staticmethod
    def _notify_finish(request: Request) -> None:
        if request.on_finish is not None:
            request.on_finish(request.finish_reason)
        request.done.set()
