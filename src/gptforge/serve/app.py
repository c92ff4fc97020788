"""The FastAPI application: OpenAI-compatible routes, keys, limits, health, metrics and the chat page.

Every error is answered as OpenAI's are, {"error": {"message", "type", "param", "code"}}, with no stack
trace: a bad body is a 400 naming the field, a missing or revoked key a 401, a key over its limits a 429
with Retry-After, an unknown model a 404, a body over the size cap a 413. Anything unexpected is a 500
with a request id; the traceback goes to the server's log, never to the client.
"""


import html
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from gptforge.evaluate.engine import Sampling
from gptforge.serve.api import APIError, ChatBody, CompletionBody, validation_message
from gptforge.serve.respond import Job, respond_stream, respond_whole

log = logging.getLogger("gptforge.serve")

PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass
class Limits:
    max_tokens: int = 512  # the most tokens one request may ask for
    body_bytes: int = 1 << 20  # the largest request body read


class Server:
    """What the routes share: the host of the weights, keys, limits, filter, metrics, audit and drift."""

    def __init__(self, host, *, model_name: str, keys, limiter, safety, metrics, audit, drift, limits: Limits):
        self.host, self.model_name, self.keys, self.limiter = host, model_name, keys, limiter
        self.safety, self.metrics, self.audit, self.drift, self.limits = safety, metrics, audit, drift, limits


class BodyLimit:
    """ASGI middleware: refuse a body over `limit` bytes (413) by its Content-Length, or once it has read
    that much of a chunked one."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_error(send, APIError(413, f"request body over {self.limit} bytes", code="body_too_large"))
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise APIError(413, f"request body over {self.limit} bytes", code="body_too_large")
            return message

        await self.app(scope, limited, send)


async def _send_error(send, error: APIError) -> None:
    import json

    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(server: Server):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from pydantic import ValidationError

    app = FastAPI(title="gptforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    def error_response(e: APIError) -> JSONResponse:
        server.metrics.rejected.labels(e.code or e.type).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e):
        message, param = validation_message(e.errors())
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(404)
    async def _not_found(request, e):
        return error_response(APIError(404, f"no route {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def _bad_method(request, e):
        return error_response(APIError(405, f"{request.method} is not allowed on {request.url.path}"))

    @app.exception_handler(Exception)
    async def _crash(request, e):
        log.exception("internal error on %s", request.url.path)
        return error_response(APIError(500, "internal server error (see the server's log)", type="server_error"))

    def authenticate(request: Request):
        """The key's entry, or None when the server runs without keys; 401 otherwise."""
        if server.keys is None:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        entry = server.keys.check(token.strip()) if scheme.lower() == "bearer" else None
        if entry is None:
            raise APIError(401, "invalid, revoked or missing API key (send Authorization: Bearer KEY)",
                           type="authentication_error", code="invalid_api_key")
        return entry

    async def read_body(request: Request, model):
        raw = await request.body()
        try:
            return model.model_validate_json(raw or b"{}")
        except ValidationError as e:
            message, param = validation_message(e.errors())
            raise APIError(400, message, param=param) from None

    def admit(request: Request, model_cls):
        entry = authenticate(request)
        name = None if entry is None else entry.name
        if entry is not None:
            wait = server.limiter.admit(entry.name, entry.rpm, entry.tpm)
            if wait is not None:
                raise APIError(429, f"rate limit reached for key {entry.name!r}; retry in {wait} s",
                               type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": str(wait)})
        return entry, name

    def job_for(body, endpoint: str, prompt: list[int], served, stop_ids, entry, max_tokens) -> Job:
        if body.model != server.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server has {server.model_name!r}",
                           param="model", code="model_not_found")
        cap = server.limits.max_tokens
        if max_tokens > cap:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {cap}", param="max_tokens")
        if len(prompt) >= served.block_size:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; this model's context is {served.block_size} "
                           "tokens and the answer needs at least one", param="prompt", code="context_length_exceeded")
        sampling = Sampling(temperature=body.temperature, top_k=body.top_k,
                            top_p=None if body.top_p == 1.0 else body.top_p, seed=body.seed)
        include_usage = bool(body.stream_options and body.stream_options.get("include_usage"))
        return Job(endpoint, body.model, served, prompt, max_tokens, sampling, frozenset(stop_ids), body.stop,
                   body.stream, include_usage, None if entry is None else entry.name,
                   (None, None) if entry is None else (entry.rpm, entry.tpm))

    async def answer(job: Job, request: Request):
        if job.stream:
            return StreamingResponse(respond_stream(job, server, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await respond_whole(job, server, request))

    @app.post("/v1/completions")
    async def completions(request: Request):
        entry, _ = admit(request, CompletionBody)
        body = await read_body(request, CompletionBody)
        served = server.host.current
        tok = served.tokenizer
        prompt = [tok.eot_id, *tok.encode(body.prompt)]
        job = job_for(body, "completions", prompt, served, [tok.eot_id], entry, body.max_tokens)
        return await answer(job, request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        entry, _ = admit(request, ChatBody)
        body = await read_body(request, ChatBody)
        served = server.host.current
        if served.template is None:
            raise APIError(400, f"the model {server.model_name!r} has no chat template (its tokenizer has no chat "
                           "tokens); use /v1/completions, or fine-tune it for chat first", code="no_chat_template")
        prompt = served.template.prompt_ids([{"role": m.role, "content": m.content} for m in body.messages])
        stop_ids = [served.template.end_id, served.tokenizer.eot_id]
        job = job_for(body, "chat", prompt, served, stop_ids, entry, body.limit() or server.limits.max_tokens)
        return await answer(job, request)

    @app.get("/v1/models")
    async def models(request: Request):
        authenticate(request)
        served = server.host.current
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "gptforge", "context_length": served.block_size,
                                            "step": served.step, "chat": served.template is not None}]}

    @app.get("/healthz")
    async def healthz():
        served = server.host.current
        return {"status": "ok", "model": server.model_name, "step": served.step, "slots": len(served.engine.slots),
                "active": served.engine.active, "queued": served.engine.queued}

    @app.get("/metrics")
    async def metrics(request: Request):
        authenticate(request)
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    page = resources.files("gptforge.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/")
    async def index():
        return HTMLResponse(page.replace("{{MODEL}}", html.escape(server.model_name)),
                            headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff"})

    app.add_middleware(BodyLimit, limit=server.limits.body_bytes)
    return app


def default_model_name(run: str | Path) -> str:
    path = Path(run).resolve()
    return path.parent.parent.name if (path / "state.json").is_file() and path.parent.name == "checkpoints" \
        else path.name
