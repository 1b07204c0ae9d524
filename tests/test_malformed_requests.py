"""Malformed and hostile requests against the running gateway: exact status, then close."""

from __future__ import annotations

import socket

import pytest

from conftest import ALICE, GatewayHandle
from support.procs import http_get
from support.rawhttp import exchange, status_of

AUTH = f"Authorization: Bearer {ALICE}\r\n".encode()
CHAT = b"/v1/chat/completions"


def post(extra_headers: bytes, body: bytes = b"", target: bytes = CHAT) -> bytes:
    return b"POST " + target + b" HTTP/1.1\r\nHost: g\r\n" + AUTH + extra_headers + b"\r\n" + body


CASES = [
    pytest.param(b"GET /v1/models\r\nHost: g\r\n\r\n", 400, id="no-version"),
    pytest.param(b"GET  /v1/models HTTP/1.1\r\nHost: g\r\n\r\n", 400, id="double-space"),
    pytest.param(b"GET /v1/models HTTP/2.0\r\nHost: g\r\n\r\n", 505, id="http2"),
    pytest.param(b"GET /v1/models HTTP/1.1\nHost: g\n\n", 400, id="bare-lf"),
    pytest.param(
        b"GET /v1/models HTTP/1.1\r\nHost: g\r\nX: a\rb\r\n\r\n", 400, id="bare-cr-in-value"
    ),
    pytest.param(
        b"GET /v1/models HTTP/1.1\r\nHost: g\r\nX: a\x00b\r\n\r\n", 400, id="nul-in-value"
    ),
    pytest.param(
        b"GET /v1/models HTTP/1.1\r\nHost: g\r\nX: a\r\n folded\r\n\r\n", 400, id="obs-fold"
    ),
    pytest.param(
        b"GET /v1/models HTTP/1.1\r\nHost: g\r\nBad Name: a\r\n\r\n", 400, id="space-in-name"
    ),
    pytest.param(
        b"GET /v1/models HTTP/1.1\r\nHost: g\r\nX-A : a\r\n\r\n", 400, id="space-before-colon"
    ),
    pytest.param(b"GET /v1/models HTTP/1.1\r\n\r\n", 400, id="missing-host"),
    pytest.param(
        b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, id="duplicate-host"
    ),
    pytest.param(
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: g\r\n\r\n", 414, id="request-line-too-long"
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: g\r\nX: " + b"a" * 17000 + b"\r\n\r\n", 431, id="header-too-large"
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: g\r\n" + b"X-H: 1\r\n" * 101 + b"\r\n", 431, id="too-many-headers"
    ),
    pytest.param(
        post(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
        400,
        id="cl-and-te",
    ),
    pytest.param(
        post(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
        400,
        id="te-and-cl",
    ),
    pytest.param(post(b"Content-Length: -1\r\n"), 400, id="cl-negative"),
    pytest.param(post(b"Content-Length: 1e3\r\n"), 400, id="cl-exponent"),
    pytest.param(
        post(b"Content-Length: 2\r\nContent-Length: 3\r\n", b"{}"), 400, id="cl-conflicting"
    ),
    pytest.param(post(b"Content-Length: 2, 2\r\n", b"{}"), 400, id="cl-list"),
    pytest.param(post(b"Content-Length: 99999999999\r\n"), 413, id="cl-too-large"),
    pytest.param(post(b"Transfer-Encoding: gzip\r\n"), 501, id="te-gzip"),
    pytest.param(post(b"Transfer-Encoding: chunked, gzip\r\n"), 501, id="te-chunked-gzip"),
    pytest.param(post(b"Transfer-Encoding: identity\r\n"), 501, id="te-identity"),
    pytest.param(post(b"Transfer-Encoding:\tchunked\x0b\r\n"), 400, id="te-vertical-tab"),
    pytest.param(
        post(b"Transfer-Encoding: chunked\r\n", b"5 \r\nhello\r\n0\r\n\r\n"),
        400,
        id="chunk-size-space",
    ),
    pytest.param(
        post(b"Transfer-Encoding: chunked\r\n", b"0x5\r\nhello\r\n0\r\n\r\n"),
        400,
        id="chunk-size-0x",
    ),
    pytest.param(
        post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhelloXX0\r\n\r\n"),
        400,
        id="chunk-missing-crlf",
    ),
    pytest.param(post(b"Transfer-Encoding: chunked\r\n", b"g\r\n"), 400, id="chunk-size-not-hex"),
    pytest.param(
        post(b"Transfer-Encoding: chunked\r\n", b"1" * 40 + b"\r\n"), 400, id="chunk-size-too-long"
    ),
    pytest.param(
        post(b"Transfer-Encoding: chunked\r\n", b"a00001\r\n" + b"x" * 100),
        413,
        id="chunked-over-limit",
    ),
    pytest.param(
        b"POST /v1/chat/completions HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        id="te-http10",
    ),
    pytest.param(post(b"Expect: 200-ok\r\nContent-Length: 2\r\n", b"{}"), 417, id="bad-expect"),
    pytest.param(
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 400, id="tls-client-hello"
    ),
    pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, id="h2-preface"),
]


@pytest.mark.parametrize("raw, status", CASES)
def test_malformed_request_gets_exact_status_and_connection_closes(
    gateway: GatewayHandle, raw: bytes, status: int
) -> None:
    response, closed = exchange(gateway.port, raw)
    assert status_of(response) == status, response[:300]
    assert b'"error"' in response
    assert closed, "the connection must be closed after a framing error"
    # ...and the gateway keeps serving.
    assert http_get(gateway.port, "/v1/models", {"Authorization": f"Bearer {ALICE}"})[0] == 200


def test_auth_only_in_a_trailer_is_not_auth(gateway: GatewayHandle) -> None:
    raw = (
        b"POST /tokenize HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\nAuthorization: Bearer " + ALICE.encode() + b"\r\n\r\n"
    )
    response, _ = exchange(gateway.port, raw)
    assert status_of(response) == 401


def test_smuggled_second_request_in_body_is_just_body(gateway: GatewayHandle) -> None:
    smuggled = b"GET /slots HTTP/1.1\r\nHost: g\r\n\r\n"
    body = b'{"content": "hi"}'
    raw = (
        b"POST /tokenize HTTP/1.1\r\nHost: g\r\n" + AUTH
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body + smuggled
    )  # fmt: skip
    response, _ = exchange(gateway.port, raw)
    # One response to the tokenize request; the trailing bytes are never sent to the backend.
    assert status_of(response) == 200
    assert response.count(b"HTTP/1.1 ") == 1


def test_header_timeout_answers_408_and_closes(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(CLIENT_HEADER_TIMEOUT="0.5")
    response, closed = exchange(gw.port, b"GET /v1/models HTTP/1.1\r\nHost: g\r\n", timeout=5)
    assert status_of(response) == 408 and closed
    response, closed = exchange(gw.port, b"", timeout=5)
    assert status_of(response) == 408 and closed


def test_chunked_request_body_is_reframed_with_content_length(gateway: GatewayHandle) -> None:
    body = b'{"content": "hello world"}'
    raw = (
        b"POST /tokenize HTTP/1.1\r\nHost: g\r\n" + AUTH + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    )  # fmt: skip
    response, _ = exchange(gateway.port, raw)
    assert status_of(response) == 200
    assert b'"tokens"' in response


def test_expect_100_continue_gets_interim_response(gateway: GatewayHandle) -> None:
    body = b'{"content": "hello"}'
    head = post(
        b"Expect: 100-continue\r\nContent-Length: %d\r\nConnection: close\r\n" % len(body),
        target=b"/tokenize",
    )
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(head)
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert sock.recv(100).startswith(b"HTTP/1.1 200 OK")


def test_rejected_expect_100_request_gets_no_interim_response(gateway: GatewayHandle) -> None:
    head = (
        b"POST /tokenize HTTP/1.1\r\nHost: g\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    )
    response, closed = exchange(gateway.port, head)
    assert status_of(response) == 401 and closed
