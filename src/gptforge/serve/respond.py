"""One request's generation, from the engine thread to the client: whole, or streamed as server-sent events.

The engine calls back from its own thread; the callbacks hand each event to the request's asyncio queue
with call_soon_threadsafe. A watcher waits on the connection: when the client goes away, the request is
cancelled and its slot is free at the engine's next step, streamed or not.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, field

from gptforge.evaluate.engine import Request, Sampling
from gptforge.serve.text import TextStream


@dataclass
class Job:
    """What a handler has checked and prepared; respond() runs it."""

    endpoint: str  # "completions" or "chat"
    model: str
    served: object  # host.Served
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stop_ids: frozenset[int]
    stop: list[str]
    stream: bool
    include_usage: bool
    key_name: str | None
    key_limits: tuple[int | None, int | None] = (None, None)
    started: float = field(default_factory=time.perf_counter)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])


class Dispatcher:
    """Carries engine events to the event loop with one wake-up per batch, not one per token: the engine
    thread appends (queue, event) pairs, and the first append since the last drain schedules the drain.
    (A wake-up per token per request costs the engine thread the GIL once each, many times a step.)"""

    def __init__(self, loop):
        self.loop = loop
        self._pending: list = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, queue: asyncio.Queue, event) -> None:
        with self._lock:
            self._pending.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        for queue, event in pending:
            queue.put_nowait(event)


def dispatcher(server) -> Dispatcher:
    loop = asyncio.get_running_loop()
    current = getattr(server, "_dispatcher", None)
    if current is None or current.loop is not loop:
        current = server._dispatcher = Dispatcher(loop)
    return current


class Run:
    """A Job in flight: the engine request, its events, its text and its figures."""

    def __init__(self, job: Job, server, http_request):
        self.job, self.server, self.http = job, server, http_request
        post = dispatcher(server).post
        self.events: asyncio.Queue = asyncio.Queue()
        self.first_token: float | None = None
        served = job.served
        self.text = TextStream(served.tokenizer, job.stop, server.safety if job.stream else None)
        self.request = Request(job.prompt, job.max_tokens, job.sampling, job.stop_ids,
                               context_keep=max(1, served.block_size // 2),
                               on_token=lambda t: post(self.events, ("token", t)),
                               on_finish=lambda r: post(self.events, ("end", r)),
                               on_prompt=server.drift.observe)
        self.finish_reason = None
        self.verdict = None
        self.created = int(time.time())

    async def _watch_disconnect(self) -> None:
        while True:
            message = await self.http.receive()
            if message["type"] == "http.disconnect":
                self.request.cancel()
                return

    async def tokens(self):
        """(piece of text, done) as the engine produces them; ends the request on a stop string."""
        watcher = asyncio.create_task(self._watch_disconnect())
        self.job.served.engine.submit(self.request)
        try:
            while True:
                # Everything queued since the last wake-up goes out as one piece: under load, fewer events
                events = [await self.events.get()]
                while not self.events.empty():
                    events.append(self.events.get_nowait())
                pieces = []
                for kind, value in events:
                    if kind == "end":
                        self.finish_reason = self.finish_reason or value
                        yield "".join(pieces) + self.text.finish(), True
                        return
                    pieces.append(self._token(value))
                if any(pieces):
                    yield "".join(pieces), False
        finally:
            watcher.cancel()
            if not self.request.done.is_set():
                self.request.cancel()

    def _token(self, token: int) -> str:
        if self.first_token is None:
            self.first_token = time.perf_counter()
            self.server.metrics.ttft.labels(self.job.endpoint).observe(self.first_token - self.job.started)
        self.server.metrics.generated()
        if token in self.job.stop_ids:
            return ""
        piece = self.text.push(token)
        if self.text.stopped and self.finish_reason is None:
            self.finish_reason = "content_filter" if self.text.blocked else "stop"
            self.request.cancel("stop")
        return piece

    def finish(self, status: int) -> str:
        """Safety counts, limits, metrics and the audit line, once the response is complete (or abandoned);
        returns the text to show, filtered."""
        job, server = self.job, self.server
        shown = raw = self.text.text
        verdict = None
        if server.safety is not None:
            shown, verdict = server.safety.apply(raw)
            if verdict.blocked and self.finish_reason in (None, "stop", "length"):
                self.finish_reason = "content_filter"
            if verdict.blocked:
                server.metrics.safety.labels("blocked").inc()
            elif verdict.spans:
                server.metrics.safety.labels("masked").inc()
        self.verdict = verdict
        n_out = len(self.request.tokens)
        if job.key_name is not None:
            server.limiter.charge(job.key_name, n_out, job.key_limits[1])
        elapsed = time.perf_counter() - job.started
        server.metrics.requests.labels(job.endpoint, str(status)).inc()
        server.metrics.latency.labels(job.endpoint).observe(elapsed)
        server.metrics.prompt_tokens.inc(len(job.prompt))
        server.metrics.cached_tokens.inc(self.request.cached_prompt_tokens)
        server.audit.write({
            "endpoint": job.endpoint, "id": job.id, "key": job.key_name, "model": job.model, "step": job.served.step,
            "status": status, "stream": job.stream, "prompt_tokens": len(job.prompt), "completion_tokens": n_out,
            "cached_prompt_tokens": self.request.cached_prompt_tokens, "latency_s": round(elapsed, 4),
            "ttft_s": None if self.first_token is None else round(self.first_token - job.started, 4),
            "finish_reason": self.finish_reason or self.request.finish_reason,
            "safety": None if verdict is None else {"categories": sorted(verdict.categories), "blocked": verdict.blocked,
                                                    "masked": len(verdict.spans)},
        })
        return shown

    def usage(self) -> dict:
        n_in, n_out = len(self.job.prompt), len(self.request.tokens)
        return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}

    def reason(self) -> str:
        reason = self.finish_reason or self.request.finish_reason
        return {"cancelled": "stop"}.get(reason, reason)


def _choice(job: Job, text: str | None, reason: str | None, delta: bool, first: bool = False) -> dict:
    if job.endpoint == "completions":
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
    if not delta:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
    content = {} if text is None else {"content": text}
    return {"index": 0, "delta": ({"role": "assistant", "content": ""} if first else content), "finish_reason": reason}


def _envelope(run: Run, choices: list[dict], chunk: bool) -> dict:
    job = run.job
    prefix, obj = ("cmpl-", "text_completion") if job.endpoint == "completions" else ("chatcmpl-", "chat.completion")
    if chunk and job.endpoint == "chat":
        obj += ".chunk"
    return {"id": prefix + job.id, "object": obj, "created": run.created, "model": job.model, "choices": choices,
            "system_fingerprint": f"gptforge-step-{job.served.step}"}


async def respond_whole(job: Job, server, http_request) -> dict:
    run = Run(job, server, http_request)
    try:
        async for _ in run.tokens():
            pass
    except BaseException:
        run.finish(499)
        raise
    if run.request.finish_reason == "error":
        run.finish(500)
        from gptforge.serve.api import APIError

        raise APIError(500, "generation failed (see the server's log)", type="server_error")
    text = run.finish(200)
    body = _envelope(run, [_choice(job, text, run.reason(), delta=False)], chunk=False)
    body["usage"] = run.usage()
    return body


def sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


async def respond_stream(job: Job, server, http_request):
    """The SSE body: a chunk per released piece of text, a last chunk with finish_reason, usage, [DONE]."""
    run = Run(job, server, http_request)
    status = 499  # until the last byte is handed over, the client has not had the whole answer
    try:
        if job.endpoint == "chat":
            yield sse(_envelope(run, [_choice(job, None, None, delta=True, first=True)], chunk=True))
        async for piece, done in run.tokens():
            if piece:
                yield sse(_envelope(run, [_choice(job, piece, None, delta=True)], chunk=True))
            if done:
                break
        if run.request.finish_reason == "error":
            status = 500
            yield sse({"error": {"message": "generation failed (see the server's log)", "type": "server_error",
                                 "param": None, "code": None}})
            return
        yield sse(_envelope(run, [_choice(job, None if job.endpoint == "chat" else "", run.reason(), delta=True)],
                            chunk=True))
        if job.include_usage:
            last = _envelope(run, [], chunk=True)
            last["usage"] = run.usage()
            yield sse(last)
        yield sse(b"[DONE]")
        status = 200
    finally:
        run.finish(status)
