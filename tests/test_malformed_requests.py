"""Malformed and hostile requests against the running gateway: exact status, then close."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from conftest import ALICE, GatewayHandle
from support.procs import http_get
from support.rawhttp import exchange, one_response, status_of

AUTH = f"Authorization: Bearer {ALICE}\r\n".encode()
CHAT = b"/v1/chat/completions"


def post(extra_headers: bytes, body: bytes = b"", target: bytes = CHAT) -> bytes:
    return b"POST " + target + b" HTTP/1.1\r\nHost: g\r\n" + AUTH + extra_headers + b"\r\n" + body


CORPUS = json.loads((Path(__file__).parent / "data" / "hostile_requests.json").read_text())["cases"]


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in CORPUS])
def test_hostile_request_gets_its_exact_status(
    gateway: GatewayHandle, case: dict[str, object]
) -> None:
    raw = str(case["request"]).encode("latin-1")
    if case["closes"]:
        response, closed = exchange(gateway.port, raw)
        assert closed, "the connection must be closed after a framing error"
    else:
        response = one_response(gateway.port, raw)
    assert status_of(response) == case["status"], response[:300]
    head, _, body = response.partition(b"\r\n\r\n")
    assert json.loads(body)["error"]["message"]
    assert b"set-cookie" not in head.lower()
    # ...and the gateway keeps serving.
    assert http_get(gateway.port, "/v1/models", {"Authorization": f"Bearer {ALICE}"})[0] == 200


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
