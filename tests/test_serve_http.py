"""The HTTP defects of the old stdlib server, one test each, over raw sockets: JSON sent as
text/plain (a web page's "simple" request), a bad Content-Length, an over-size body left on
the connection, a port in use, local paths in errors; plus the queue limit (429), a stopped
engine (503), time limits (504), a streaming client that goes away, the API key, CORS and
the Host check of a loopback server."""

from __future__ import annotations

import json
import socket
import time

import pytest

from peftlab.cli import main
from peftlab.serve.engine import Engine
from peftlab.serve.server import make_app
from tests.live_server import live_server

CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _raw(url: str, data: bytes, read_until_close: bool = True, timeout: float = 60) -> bytes:
    """Send raw bytes; read what comes back until the server closes (or ``timeout``)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                part = s.recv(65536)
            except TimeoutError:
                break
            if not part:
                break
            out += part
            if not read_until_close and b"\r\n\r\n" in out:
                break
    return out


def _request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
             close: bool = True) -> bytes:
    head = {"Host": "127.0.0.1", "Content-Length": str(len(body)), **(headers or {})}
    if close:
        head["Connection"] = "close"
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def _json_of(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


@pytest.fixture(scope="module")
def engine(tiny_chat_model_dir):
    return Engine(str(tiny_chat_model_dir), base_name="base", max_tokens_limit=64)


@pytest.fixture(scope="module")
def url(engine):
    with live_server(make_app(engine, loopback_only=True, max_body=2048)) as base:
        yield base


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", None])
def test_json_sent_as_another_content_type_is_refused(url, engine, ctype):
    steps = engine.scheduler.steps
    headers = {"Content-Type": ctype} if ctype else {}
    out = _raw(url, _request("POST", "/v1/chat/completions", json.dumps(CHAT).encode(), headers))
    assert _status(out) == 415
    assert "application/json" in _json_of(out)["error"]["message"]
    assert engine.scheduler.steps == steps  # nothing was generated
    ok = _raw(url, _request("POST", "/v1/chat/completions", json.dumps(CHAT).encode(),
                            {"Content-Type": "application/json; charset=utf-8"}))
    assert _status(ok) == 200


@pytest.mark.parametrize("length", ["abc", "-5", "1e3", ""])
def test_a_bad_content_length_is_a_400_not_a_500(url, length):
    raw = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
           f"application/json\r\nContent-Length: {length}\r\n\r\n{json.dumps(CHAT)}").encode()
    out = _raw(url, raw)
    assert _status(out) == 400, out[:200]
    assert _status(_raw(url, _request("GET", "/health"))) == 200  # still serving


def test_an_over_size_body_is_refused_and_never_parsed_as_a_request(url):
    smuggled = _request("GET", "/v1/models", close=False)
    body = b'{"model": "' + b"x" * 3000 + b'"}'
    # Declared too large: answered before the body is read, then the connection closes.
    declared = _request("POST", "/v1/chat/completions", smuggled + body,
                        {"Content-Type": "application/json"}, close=False)
    out = _raw(url, declared)
    assert _status(out) == 413 and out.count(b"HTTP/1.1 ") == 1, out
    assert b"connection: close" in out.lower()
    assert _json_of(out)["error"]["message"] == "request body over 2048 bytes"
    # Chunked (no length up front): refused as soon as it passes the limit.
    chunks = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n"
                      for c in (body[:1500], body[1500:])) + b"0\r\n\r\n"
    raw = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
           b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n") + chunks + smuggled
    out = _raw(url, raw)
    assert _status(out) == 413 and out.count(b"HTTP/1.1 ") == 1, out


def test_keep_alive_still_serves_requests_one_after_another(url):
    two = _request("GET", "/health", close=False) + _request("GET", "/v1/models")
    out = _raw(url, two)
    assert out.count(b"HTTP/1.1 200") == 2


def test_a_port_in_use_is_one_line_before_the_model_loads(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        # the model does not exist: had it been loaded first, the error would be about it
        assert main(["serve", "--model", "no/such-model-anywhere", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _slow(engine: Engine, seconds: float):
    return engine.model.register_forward_pre_hook(lambda *_: time.sleep(seconds))


def test_full_queue_429_stopped_engine_503(tiny_chat_model_dir):
    engine = Engine(str(tiny_chat_model_dir), base_name="base", max_batch=1, max_queue=1,
                    max_tokens_limit=64)
    _slow(engine, 0.05)
    payload = json.dumps(dict(CHAT, max_tokens=64, stream=True)).encode()
    post = _request("POST", "/v1/chat/completions", payload, {"Content-Type": "application/json"})
    with live_server(make_app(engine)) as base:
        host, port = base.removeprefix("http://").split(":")
        running = socket.create_connection((host, int(port)), timeout=60)
        running.sendall(post)
        assert b" 200 " in running.recv(4096)  # decoding: holds the only batch slot
        waiting = socket.create_connection((host, int(port)), timeout=60)
        waiting.sendall(post)
        deadline = time.monotonic() + 30
        while engine.scheduler.stats()["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        out = _raw(base, post)
        assert _status(out) == 429 and b"retry-after: 1" in out.lower()
        assert _json_of(out)["error"]["type"] == "rate_limit_error"
        running.close()
        waiting.close()
        engine.close()  # the engine stops, the HTTP server still answers
        out = _raw(base, post)
        assert _status(out) == 503
        assert _status(_raw(base, _request("GET", "/health"))) == 503


def test_time_limit_504_and_a_gone_streaming_client_frees_its_row(tiny_chat_model_dir):
    engine = Engine(str(tiny_chat_model_dir), base_name="base", max_tokens_limit=64,
                    request_timeout=0.3)
    _slow(engine, 0.05)
    with live_server(make_app(engine)) as base:
        slow = json.dumps(dict(CHAT, max_tokens=64)).encode()
        out = _raw(base, _request("POST", "/v1/chat/completions", slow,
                                  {"Content-Type": "application/json"}))
        assert _status(out) == 504 and _json_of(out)["error"]["type"] == "timeout_error"
        streamed = _raw(base, _request("POST", "/v1/chat/completions", json.dumps(
            dict(CHAT, max_tokens=64, stream=True)).encode(), {"Content-Type": "application/json"}))
        assert _status(streamed) == 200 and b'"timeout_error"' in streamed
        assert b"[DONE]" not in streamed

        engine.request_timeout = 600
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as client:
            client.sendall(_request("POST", "/v1/chat/completions", json.dumps(
                dict(CHAT, max_tokens=64, stream=True)).encode(),
                {"Content-Type": "application/json"}))
            seen = b""
            while b"data: " not in seen:  # headers and events may come in separate reads
                part = client.recv(4096)
                assert part, seen
                seen += part
            deadline = time.monotonic() + 20
            while engine.scheduler.stats()["running"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine.scheduler.stats()["running"] == 1  # decoding when the client leaves
            steps = engine.scheduler.steps
        deadline = time.monotonic() + 20  # the client is gone: its row must leave soon
        while engine.scheduler.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.scheduler.stats()["running"] == 0
        assert engine.scheduler.steps - steps < 40  # well before its 64 tokens


def test_api_key_cors_and_host(tiny_chat_model_dir):
    engine = Engine(str(tiny_chat_model_dir), base_name="base", max_tokens_limit=64)
    ctype = {"Content-Type": "application/json"}
    body = json.dumps(CHAT).encode()
    with live_server(make_app(engine, api_key="s3cret", loopback_only=True)) as base:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            out = _raw(base, _request("POST", "/v1/chat/completions", body, {**ctype, **headers}))
            assert _status(out) == 401 and _json_of(out)["error"]["code"] == "invalid_api_key"
        assert _status(_raw(base, _request("GET", "/v1/models"))) == 401
        good = {**ctype, "Authorization": "Bearer s3cret"}
        assert _status(_raw(base, _request("POST", "/v1/chat/completions", body, good))) == 200
        assert _status(_raw(base, _request("GET", "/health"))) == 200  # no secret there
        # CORS is off: a browser gets no permission for another origin
        preflight = _request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert b"access-control-allow-origin" not in _raw(base, preflight).lower()
        # DNS rebinding: a loopback server answers only to loopback host names
        rebound = _request("GET", "/health", headers={"Host": "evil.example"})
        assert _status(_raw(base, rebound)) == 400
        for host in ("localhost:80", "[::1]:8000", "127.0.0.1"):
            ok = _request("GET", "/health").replace(b"Host: 127.0.0.1", f"Host: {host}".encode())
            assert _status(_raw(base, ok)) == 200, host
    with live_server(make_app(engine, cors_origins=["http://ui.example"])) as base:
        preflight = _request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": "http://ui.example", "Access-Control-Request-Method": "POST"})
        out = _raw(base, preflight).lower()
        assert _status(out) == 200 and b"access-control-allow-origin: http://ui.example" in out
        other = _raw(base, preflight.replace(b"ui.example", b"evil.example")).lower()
        assert b"access-control-allow-origin" not in other
