"""The OpenAI-compatible HTTP API of ``peftlab serve``: a FastAPI app run by uvicorn.

Routes: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/chat/completions`` and
``POST /v1/completions`` (both with ``"stream": true`` as server-sent events), ``POST
/v1/classify`` (classifiers, peftlab.serve.classify), ``GET /health``. The request's ``model``
picks the base model, one of the LoRA adapters or a classifier; all generation requests share
the engine's continuous batch. A server may hold classifiers only (no engine).

HTTP hygiene, each tested: a POST body must be ``application/json`` (415 otherwise, so a web
page cannot drive the server with a "simple" cross-origin form or text/plain post); a body
over ``max_body`` bytes is refused with 413 and the connection is closed, so its unread
rest is never parsed as a next request; a malformed request line or Content-Length is
uvicorn's (h11's) 400; a full queue is 429, a stopped engine 503, a request past its time
limit 504; an optional API key (``Authorization: Bearer``); CORS stays off unless origins
are given; on a loopback address only loopback Host names are served (DNS rebinding);
errors never show local paths or tracebacks to the client (the log has them).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from peftlab.serve import schemas
from peftlab.serve.classify import Classifiers
from peftlab.serve.engine import Completion, Engine, Reply, RequestError
from peftlab.serve.scheduler import Event, Job, JobTimeout, NotRunning, Sampling

MAX_BODY = 4 * 1024 * 1024
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
log = logging.getLogger("peftlab.serve")


def make_app(engine: Engine | None, api_key: str | None = None,
             cors_origins: list[str] | None = None, loopback_only: bool = False,
             max_body: int = MAX_BODY, classifiers: Classifiers | None = None) -> FastAPI:
    """The ASGI app over ``engine`` (started and stopped with the app's lifespan) and the
    ``classifiers``; either may be absent, not both."""
    if engine is None and not (classifiers and classifiers.names()):
        raise ValueError("nothing to serve: give a model, a classifier or both")
    classifiers = classifiers or Classifiers()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            engine.start()
        try:
            yield
        finally:
            if engine is not None:
                await asyncio.to_thread(engine.close)

    app = FastAPI(title="peftlab", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(_Guard, max_body=max_body, loopback_only=loopback_only)
    auth = [Depends(_bearer(api_key))] if api_key else []

    def model_ids() -> list[str]:
        return [*(engine.model_ids() if engine is not None else []), *classifiers.names()]

    def unknown(model_id: str) -> RequestError:
        return RequestError(f"model {model_id!r} does not exist; available: {model_ids()}",
                            param="model", status=404, code="model_not_found")

    def generator(model_id: str) -> Engine:
        """The engine, for a model it serves; a classifier's name gets a pointer instead."""
        if model_id in classifiers:
            raise RequestError(f"model {model_id!r} is a classifier: POST /v1/classify",
                               param="model", status=400, code="wrong_route")
        if engine is None:
            raise unknown(model_id)
        engine.check_model(model_id)
        return engine

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine is None:
            return JSONResponse({"status": "ok", "classifiers": len(classifiers.names())})
        up = engine.scheduler.running
        return JSONResponse({"status": "ok" if up else "unavailable", **engine.scheduler.stats()},
                            status_code=200 if up else 503)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> JSONResponse:
        now = int(time.time())
        return _json(schemas.ModelList(data=[schemas.ModelCard(id=m, created=now)
                                             for m in model_ids()]))

    @app.get("/v1/models/{model_id}", dependencies=auth)
    async def model(model_id: str) -> JSONResponse:
        if model_id not in model_ids():
            raise unknown(model_id)
        return _json(schemas.ModelCard(id=model_id, created=int(time.time())))

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(request: Request) -> Response:
        body = _parse(schemas.ChatRequest, await _json_body(request))
        lm = generator(body.model)
        ids = lm.encode_chat([m.plain() for m in body.messages])
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await _answer(lm, request, body, ids, _sampling(body, max_tokens), chat=True)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        body = _parse(schemas.CompletionRequest, await _json_body(request))
        lm = generator(body.model)
        ids = lm.encode_text(body.text())
        return await _answer(lm, request, body, ids, _sampling(body, body.max_tokens),
                             chat=False)

    @app.post("/v1/classify", dependencies=auth)
    async def classify(request: Request) -> JSONResponse:
        body = _parse(schemas.ClassifyRequest, await _json_body(request))
        if body.model not in classifiers:
            if body.model in model_ids():
                raise RequestError(f"model {body.model!r} generates text: POST "
                                   "/v1/chat/completions", param="model", code="wrong_route")
            raise unknown(body.model)
        out = await asyncio.to_thread(classifiers.classify, body.model, body.texts(),
                                      body.pairs())
        data = [schemas.Classification(index=i, label=label, probabilities=dict(
                    zip(out["classes"], (round(p, 6) for p in probs), strict=True)))
                for i, (label, probs) in enumerate(zip(out["labels"], out["probabilities"],
                                                       strict=True))]
        return _json(schemas.ClassifyResponse(model=body.model, data=data,
                                              threshold=out["threshold"],
                                              truncated=out["truncated"]))

    return app


# -- answering ---------------------------------------------------------------------------
async def _answer(engine: Engine, request: Request, body: schemas._Request, ids: list[int],
                  sampling: Sampling, chat: bool) -> Response:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    job = engine.submit(body.model, ids, sampling,  # 4xx/429/503 here, before any 200
                        lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
    reply = engine.reply(ids, body.stop_list())
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()), "model": body.model}
    if body.stream:
        return StreamingResponse(_sse(job, events, reply, head, chat, body.include_usage()),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        while reply.finish is None:
            try:
                event = await asyncio.wait_for(events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():  # nobody is waiting for the answer
                    return Response(status_code=408)
                continue
            reply.on(event)
    except (JobTimeout, NotRunning) as exc:
        raise _job_error(exc) from None
    finally:
        job.cancel()
    done = reply.completion()
    usage = _usage(done)
    if chat:
        return _json(schemas.ChatCompletion(**head, usage=usage, choices=[schemas.ChatChoice(
            message=schemas.AssistantMessage(content=done.text.strip()),
            finish_reason=done.finish_reason)]))
    return _json(schemas.TextCompletion(**head, usage=usage, choices=[schemas.TextChoice(
        text=done.text, finish_reason=done.finish_reason)]))


async def _sse(job: Job, events: asyncio.Queue[Event], reply: Reply, head: dict[str, Any],
               chat: bool, include_usage: bool) -> AsyncIterator[bytes]:
    """Server-sent events; a client that goes away cancels the job (``finally``)."""

    def chunk(text: str | None, finish: str | None = None, role: bool = False,
              usage: schemas.Usage | None = None, empty: bool = False) -> bytes:
        if chat:
            choices = [] if empty else [schemas.ChunkChoice(
                delta=schemas.Delta(role="assistant" if role else None, content=text),
                finish_reason=finish)]
            data = schemas.ChatCompletionChunk(**head, choices=choices, usage=usage).model_dump()
            for choice in data["choices"]:  # a delta carries only what changed
                choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        else:
            choices = [] if empty else [schemas.TextChoice(text=text or "",
                                                           finish_reason=finish)]
            data = schemas.TextCompletion(**head, choices=choices, usage=usage).model_dump()
        if data["usage"] is None:
            del data["usage"]
        return f"data: {json.dumps(data)}\n\n".encode()

    try:
        if chat:
            yield chunk(None, role=True)
        leading = chat  # chat answers are sent without their leading whitespace
        while reply.finish is None:
            try:
                piece = reply.on(await events.get())
            except (JobTimeout, NotRunning) as exc:
                yield _sse_error(_job_error(exc))
                return
            except Exception as exc:  # noqa: BLE001 - the status line is already sent
                log.error("request failed mid-stream", exc_info=exc)
                yield _sse_error(RequestError("internal server error", status=500))
                return
            if leading:
                piece = piece.lstrip()
                leading = not piece
            if piece:
                yield chunk(piece)
        done = reply.completion()
        if include_usage:
            yield chunk(None, done.finish_reason)
            yield chunk(None, usage=_usage(done), empty=True)
        else:
            yield chunk(None, done.finish_reason, usage=_usage(done))
        yield b"data: [DONE]\n\n"
    finally:
        job.cancel()


def _job_error(exc: Exception) -> RequestError:
    if isinstance(exc, JobTimeout):
        return RequestError(str(exc), status=504, kind="timeout_error")
    return RequestError(str(exc), status=503)


def _sse_error(exc: RequestError) -> bytes:
    return f"data: {json.dumps(_error_body(exc))}\n\n".encode()


def _usage(done: Completion) -> schemas.Usage:
    return schemas.Usage(prompt_tokens=done.prompt_tokens,
                         completion_tokens=done.completion_tokens,
                         total_tokens=done.prompt_tokens + done.completion_tokens)


def _sampling(body: schemas._Request, max_tokens: int | None) -> Sampling:
    s = Sampling(seed=body.seed)
    if max_tokens is not None:
        s.max_tokens = max_tokens
    if body.temperature is not None:
        s.temperature = body.temperature
    if body.top_p is not None:
        s.top_p = body.top_p
    return s


# -- request plumbing ----------------------------------------------------------------------
async def _json_body(request: Request) -> Any:
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise RequestError(f"Content-Type must be application/json, got {ctype or 'none'!r}",
                           status=415)
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"body is not valid JSON: {exc}") from None


def _parse(cls: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise RequestError("body must be a JSON object")
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = _param(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unrecognized request argument (not supported by peftlab serve)"
        raise RequestError(f"{param}: {msg}" if param else msg, param=param or None) from None


def _param(loc: tuple) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _bearer(api_key: str) -> Callable[[Request], None]:
    expected = f"Bearer {api_key}".encode()

    def check(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise RequestError("missing or wrong API key (send 'Authorization: Bearer KEY')",
                               status=401, code="invalid_api_key")
    return check


def _json(model: BaseModel, status: int = 200) -> JSONResponse:
    return JSONResponse(model.model_dump(), status_code=status)


def _error_body(exc: RequestError) -> dict[str, Any]:
    return schemas.ErrorResponse(error=schemas.ErrorBody(
        message=str(exc), type=exc.kind, param=exc.param, code=exc.code)).model_dump()


async def _request_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestError)
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return JSONResponse(_error_body(exc), status_code=exc.status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    what = {404: f"no route {request.method} {request.url.path}",
            405: f"method {request.method} is not allowed on {request.url.path}"}
    return await _request_error(request, RequestError(what.get(exc.status_code, str(exc.detail)),
                                                      status=exc.status_code))


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises after this response, so uvicorn logs the traceback (server side).
    return await _request_error(request, RequestError(
        "internal server error (the server log has the details)", status=500))


class _Guard:
    """Checks every request before the app sees it: the Host name (loopback servers only)
    and the body size, read here in full: over ``max_body`` bytes is a 413 that closes the
    connection. The app then reads the body from memory."""

    def __init__(self, app: ASGIApp, max_body: int, loopback_only: bool):
        self.app, self.max_body, self.loopback_only = app, max_body, loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.loopback_only and _host_name(headers.get("host", "")) not in LOOPBACK_NAMES \
                and not _host_name(headers.get("host", "")).endswith(".localhost"):
            await _send_error(send, RequestError("this server only answers on a loopback host "
                                                 "name (localhost, 127.0.0.1, [::1])"), close=True)
            return
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await _send_error(send, _too_large(self.max_body), close=True)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                await _send_error(send, _too_large(self.max_body), close=True)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _too_large(limit: int) -> RequestError:
    return RequestError(f"request body over {limit} bytes", status=413)


async def _send_error(send: Send, exc: RequestError, close: bool) -> None:
    data = json.dumps(_error_body(exc)).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(data)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


# -- running it ----------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port) (``port=0``: a free one), made before the model
    loads so a port in use is one error line, not a traceback after a long load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ValueError(f"--port {port}: cannot listen on {host}:{port}: "
                         f"{exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_NAMES or host.startswith("127.")


def make_server(app: FastAPI, log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server for ``app`` (h11, no access log); run it with
    ``server.run(sockets=[bind(host, port)])``."""
    config = uvicorn.Config(app, http="h11", lifespan="on", log_level=log_level,
                            access_log=False, timeout_keep_alive=5, server_header=False)
    return uvicorn.Server(config)
