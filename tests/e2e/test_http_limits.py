"""Bounded request heads, bodies and connections (app/protocol.py), probed with raw sockets as a hostile
client would: a huge header, too many headers, a head sent a byte at a time, a body that stops, idle
connections, too many connections; and what must not be cut: a keep-alive connection, a slow but
steady upload, a stream longer than the timeout."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import API_KEY, Server, builtin_entry, start_server, stop_server

TIMEOUT_S = 1.0
MAX_CONNECTIONS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    models = "".join(map(builtin_entry, ("genserve-gan", "genserve-diffusion")))
    registry = "include_defaults: false\nmodels:\n" + models
    srv = start_server(tmp_path_factory.mktemp("limits"), "http-limits", registry, {
        "GENSERVE_HEADER_TIMEOUT_S": str(TIMEOUT_S), "GENSERVE_BODY_TIMEOUT_S": str(TIMEOUT_S),
        "GENSERVE_MAX_CONNECTIONS": str(MAX_CONNECTIONS)})
    yield srv
    stop_server(srv)


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.settimeout(10)
    return s


def read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def refused(data: bytes, status: int, code: str) -> None:
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()) and b"connection: close" in head, data[:300]
    assert json.loads(body)["error"]["code"] == code


GET = b"GET /health/live HTTP/1.1\r\nHost: genserve\r\n"


@pytest.mark.parametrize("head", [
    GET + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n",  # one header of 100 KB (httptools buffered any size)
    # 1 MB: refused at 64 KiB while most of it is still on its way; the 431 must arrive all the same (a
    # connection closed with unread bytes is reset by the kernel, and the client can lose the answer)
    GET + b"X-Big: " + b"a" * 1_000_000 + b"\r\n\r\n",
    GET + b"".join(b"X-Many-%d: %s\r\n" % (i, b"b" * 1000) for i in range(80)) + b"\r\n",  # 80 KB in many
    GET + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n",  # 150 headers
], ids=["one-huge-header", "a-megabyte-header", "large-in-total", "too-many-headers"])
def test_heads_beyond_the_limits_are_431_before_the_app_sees_them(server: Server, head: bytes) -> None:
    s = connect(server)
    s.sendall(head)
    refused(read_all(s), 431, "request_header_fields_too_large")


def test_heads_within_the_limits_pass(server: Server) -> None:
    s = connect(server)
    s.sendall(GET + b"".join(b"X-H%d: %s\r\n" % (i, b"c" * 500) for i in range(98)) + b"Connection: close\r\n\r\n")
    assert read_all(s).startswith(b"HTTP/1.1 200 ")


def test_a_head_sent_a_byte_at_a_time_is_cut_at_the_timeout(server: Server) -> None:
    s = connect(server)
    started = time.monotonic()
    s.sendall(GET + b"X-Slow: ")
    data = b""
    while not data and time.monotonic() - started < TIMEOUT_S + 3:
        if select.select([s], [], [], 0.2)[0]:
            data = read_all(s)
        else:  # slowloris: a byte now and then kept uvicorn's keep-alive timer off for ever
            with contextlib.suppress(OSError):
                s.sendall(b"x")
    assert TIMEOUT_S - 0.1 <= time.monotonic() - started < TIMEOUT_S + 1.5  # timed from the connection
    refused(data, 408, "request_timeout")


def test_an_idle_connection_is_closed_without_a_reply(server: Server) -> None:
    s = connect(server)
    started = time.monotonic()
    assert read_all(s) == b""  # no 408 that a client could take for its next request's answer
    assert TIMEOUT_S - 0.1 <= time.monotonic() - started < TIMEOUT_S + 1.0


def test_keep_alive_and_a_stream_longer_than_the_timeout_are_not_cut(server: Server) -> None:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        assert c.get("/health/live").status_code == 200
        time.sleep(TIMEOUT_S / 2)
        assert c.get("/health/live").status_code == 200  # the same connection, reused
        started = time.monotonic()
        r = c.post("/v1/images/generations", json={"model": "genserve-diffusion", "prompt": "red apple",
                                                   "num_inference_steps": 80, "size": "64x64", "stream": True,
                                                   "stream_progress": True})
        assert r.status_code == 200 and time.monotonic() - started > TIMEOUT_S
        assert r.text.count("image_generation.progress") == 80 and "image_generation.completed" in r.text


def test_connections_beyond_the_limit_get_503(server: Server) -> None:
    held = [connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        r = httpx.get(f"{server.url}/health/live", timeout=10)
        assert r.status_code == 503
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert httpx.get(f"{server.url}/health/live", timeout=10).status_code == 200


def post_head(length: int) -> bytes:
    return (f"POST /v1/provenance/verify HTTP/1.1\r\nHost: genserve\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n").encode()


def test_a_body_that_stops_is_cut_at_the_timeout(server: Server) -> None:
    s = connect(server)
    s.sendall(post_head(1000) + b'{"text": "')
    started = time.monotonic()
    data = read_all(s)
    assert TIMEOUT_S - 0.1 <= time.monotonic() - started < TIMEOUT_S + 1.0
    refused(data, 408, "request_timeout")


def test_a_slow_but_steady_body_is_not_cut(server: Server) -> None:
    body = json.dumps({"text": "word " * 200}).encode()
    s = connect(server)
    s.sendall(post_head(len(body)))
    pieces = [body[i:i + len(body) // 8 + 1] for i in range(0, len(body), len(body) // 8 + 1)]
    for piece in pieces:  # 3 s in all, longer than the timeout, no pause as long
        time.sleep(TIMEOUT_S * 0.4)
        s.sendall(piece)
    data = read_all(s)
    assert data.startswith(b"HTTP/1.1 400 "), data[:200]  # the app's answer (this server has no text model)
    assert b"watermarked text model" in data
