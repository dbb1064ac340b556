"""An OpenAI-compatible HTTP API over :class:`~peftlab.serve.engine.Engine` (standard library
only): ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions`` (both
with ``"stream": true`` as server-sent events), ``GET /health``. The request's ``model``
picks the base model or one of the LoRA adapters, so OpenAI clients switch adapters by name.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with 4xx
statuses naming the offending field.
"""

from __future__ import annotations

import json
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from peftlab.serve.engine import Completion, Engine, RequestError, Sampling

MAX_BODY = 4 * 1024 * 1024
ROLES = ("system", "user", "assistant")


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server bound to (host, port); ``port=0`` picks a free port (``server.server_port``)."""

    class Handler(_Handler):
        pass

    Handler.engine = engine
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


class _Handler(BaseHTTPRequestHandler):
    engine: Engine
    protocol_version = "HTTP/1.1"

    # -- routing -------------------------------------------------------------------
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/v1/models":
            now = int(time.time())
            self._json(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": now, "owned_by": "peftlab"}
                for m in self.engine.model_ids()]})
        elif path == "/health":
            self._json(200, {"status": "ok", "models": self.engine.model_ids()})
        else:
            self._error(RequestError(f"no route GET {path or '/'}", status=404))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        routes = {"/v1/chat/completions": self._chat, "/v1/completions": self._completions}
        try:
            if path not in routes:
                raise RequestError(f"no route POST {path or '/'}", status=404)
            routes[path](self._body())
        except RequestError as exc:
            self._error(exc)
        except Exception as exc:  # noqa: BLE001 - the client gets a 500, the log the traceback
            self.log_error("internal error: %r", exc)
            self._error(RequestError(f"internal error: {type(exc).__name__}: {exc}", status=500))

    # -- endpoints -------------------------------------------------------------------
    def _chat(self, body: dict[str, Any]) -> None:
        model = _model(body, self.engine)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list", param="messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise RequestError(f"messages[{i}].role must be one of {list(ROLES)}",
                                   param=f"messages[{i}].role")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(c, dict) and c.get("type") == "text" for c in content):
                    raise RequestError(f"messages[{i}].content: only text parts are supported",
                                       param=f"messages[{i}].content")
                content = "".join(str(c.get("text", "")) for c in content)
            if not isinstance(content, str):
                raise RequestError(f"messages[{i}].content must be a string",
                                   param=f"messages[{i}].content")
            clean.append({"role": m["role"], "content": content})
        ids = self.engine.encode_chat(clean)
        self._respond(body, model, ids, chat=True)

    def _completions(self, body: dict[str, Any]) -> None:
        model = _model(body, self.engine)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string (one prompt per request)", param="prompt")
        self._respond(body, model, self.engine.encode_text(prompt), chat=False)

    def _respond(self, body: dict[str, Any], model: str, ids: list[int], chat: bool) -> None:
        sampling = _sampling(body)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model}
        if body.get("stream"):
            self._stream(head, model, ids, sampling, chat)
            return
        done = self.engine.complete(model, ids, sampling)
        text = done.text.strip() if chat else done.text
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "finish_reason": done.finish_reason} if chat else
                  {"index": 0, "text": text, "finish_reason": done.finish_reason,
                   "logprobs": None})
        self._json(200, {**head, "choices": [choice], "usage": _usage(done)})

    def _stream(self, head: dict[str, Any], model: str, ids: list[int], sampling: Sampling,
                chat: bool) -> None:
        events = self.engine.stream(model, ids, sampling)  # validation errors raise before 200
        first = next(events)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def emit(choice: dict[str, Any], usage: dict[str, int] | None = None) -> None:
            chunk = {**head, "choices": [choice]}
            if usage is not None:
                chunk["usage"] = usage
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        def piece(text: str | None, finish: str | None) -> dict[str, Any]:
            if chat:
                delta = {} if text is None else {"content": text}
                return {"index": 0, "delta": delta, "finish_reason": finish}
            return {"index": 0, "text": text or "", "finish_reason": finish}

        try:
            if chat:
                emit({"index": 0, "delta": {"role": "assistant"}, "finish_reason": None})
            leading = chat  # chat answers are sent without their leading whitespace
            for item in _chain(first, events):
                if isinstance(item, Completion):
                    emit(piece(None, item.finish_reason), _usage(item))
                    break
                if leading:
                    item = item.lstrip()
                    leading = not item
                if item:
                    emit(piece(item, None))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            events.close()  # stops generation if the client went away

    # -- plumbing ---------------------------------------------------------------------
    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise RequestError(f"request body over {MAX_BODY} bytes", status=413)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise RequestError("body must be a JSON object")
        return body

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, exc: RequestError) -> None:
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        code = "model_not_found" if exc.param == "model" and exc.status == 404 else None
        self._json(exc.status, {"error": {"message": str(exc), "type": kind, "param": exc.param,
                                          "code": code}})


def _chain(first, rest):
    yield first
    yield from rest


def _model(body: dict[str, Any], engine: Engine) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(f"model is required; available: {engine.model_ids()}", param="model")
    if model not in engine.model_ids():
        raise RequestError(f"model {model!r} does not exist; available: {engine.model_ids()}",
                           param="model", status=404)
    return model


def _sampling(body: dict[str, Any]) -> Sampling:
    s = Sampling()
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", s.max_tokens))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise RequestError("max_tokens must be an integer", param="max_tokens")
    s.max_tokens = max_tokens
    for key, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
            raise RequestError(f"{key} must be a number in [{low}, {high}]", param=key)
        setattr(s, key, float(value))
    if s.top_p == 0.0:
        raise RequestError("top_p must be > 0", param="top_p")
    if body.get("n", 1) != 1:
        raise RequestError("n must be 1 (one choice per request)", param="n")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise RequestError("seed must be an integer", param="seed")
    s.seed = seed
    if body.get("stop"):
        raise RequestError("stop sequences are not supported; the model stops at its end-of-turn "
                           "token or max_tokens", param="stop")
    return s


def _usage(done: Completion) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}
