"""Slow and idle clients, many connections, and a bounded mixed soak, on the real stack."""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from pathlib import Path

from conftest import ALICE, GatewayFactory, GatewayHandle
from support.procs import http_get, wait_until
from support.rawhttp import exchange, status_of

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "8"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_trickled_headers_are_cut_at_the_header_timeout(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(CLIENT_HEADER_TIMEOUT="1")
    request = b"GET /v1/models HTTP/1.1\r\nHost: g\r\nX-Slow: " + b"a" * 100
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        started = time.monotonic()
        sock.settimeout(0.15)
        answer = b""
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
                answer += sock.recv(4096)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if answer:
                break
        elapsed = time.monotonic() - started
    assert status_of(answer) == 408
    assert elapsed < 3.0  # still sending bytes, but the head as a whole took too long


def test_stalled_body_upload_is_408_and_closed(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(CLIENT_BODY_TIMEOUT="0.5")
    head = (
        b"POST /tokenize HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer " + ALICE.encode() + b"\r\n"
        b'Content-Length: 100\r\n\r\n{"content":'
    )
    response, closed = exchange(gw.port, head, timeout=5)
    assert status_of(response) == 408 and closed
    assert b"CLIENT_BODY_TIMEOUT" in response


def test_trickled_body_is_408_at_the_whole_body_deadline(make_gateway: GatewayFactory) -> None:
    """Bytes that keep coming do not extend CLIENT_BODY_TIMEOUT: it covers the whole body."""
    gw = make_gateway(CLIENT_BODY_TIMEOUT="1")
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer "
        + ALICE.encode()
        + b"\r\nContent-Length: 100000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", gw.port), timeout=0.2) as sock:
        sock.sendall(head)
        started = time.monotonic()
        answer = b""
        while time.monotonic() - started < 6 and not answer:
            try:
                sock.sendall(b" ")
                answer = sock.recv(4096)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        elapsed = time.monotonic() - started
    assert status_of(answer) == 408
    assert elapsed < 4.0


def test_idle_keep_alive_connection_is_closed(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(CLIENT_IDLE_TIMEOUT="0.5")
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: g\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert sock.recv(4096) == b""  # closed by the server, silently
        assert 0.3 < time.monotonic() - started < 3


def test_many_idle_connections_are_cheap_and_new_requests_still_answered(
    gateway: GatewayHandle,
) -> None:
    count = 400
    pid = gateway.proc.pid
    before = rss_kib(pid)
    held = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
            sock.sendall(b"GET /ping HTTP/1.1\r\nHost: g\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            held.append(sock)
        per_connection = (rss_kib(pid) - before) * 1024 / count
        assert per_connection < 16 * 1024, per_connection
        started = time.monotonic()
        assert http_get(gateway.port, "/v1/models", {"Authorization": f"Bearer {ALICE}"})[0] == 200
        assert time.monotonic() - started < 1.0
    finally:
        for sock in held:
            sock.close()


def test_connections_beyond_the_cap_get_a_clear_503(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(MAX_CONNECTIONS="5")
    held = [socket.create_connection(("127.0.0.1", gw.port), timeout=5) for _ in range(5)]
    try:
        wait_until(lambda: _gateway_connections(gw) >= 5, 5, "the gateway to hold 5 connections")
        response, closed = exchange(gw.port, b"GET /ping HTTP/1.1\r\nHost: g\r\n\r\n")
        assert status_of(response) == 503 and b"too many connections" in response and closed
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: http_get(gw.port, "/ping")[0] == 200, 5, "room again after the close")


def _gateway_connections(gw: GatewayHandle) -> int:
    # Sockets the gateway holds on its port, read from the kernel's table.
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "01" and int(local.split(":")[1], 16) == gw.port:
            count += 1
    return count


def _soak_worker(
    port: int, deadline: float, seed: int, errors: list[str], counts: dict[str, int]
) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        kind = rng.choice(["stream", "plain", "bad-key", "malformed", "disconnect", "models"])
        counts[kind] = counts.get(kind, 0) + 1
        try:
            if kind == "malformed":
                response, _ = exchange(
                    port,
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Length: x\r\n\r\n",
                )
                expected = {400}
            elif kind == "disconnect":
                body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000, "stream": True,
                                   "ignore_eos": True}).encode()  # fmt: skip
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    sock.sendall(
                        b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer "
                        + ALICE.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                    )  # fmt: skip
                    sock.recv(1024)
                continue
            else:
                if kind == "models":
                    raw = b"GET /v1/models HTTP/1.1\r\nHost: g\r\n"
                    key = ALICE
                else:
                    payload = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
                               "ignore_eos": True, "stream": kind == "stream"}  # fmt: skip
                    body = json.dumps(payload).encode()
                    raw = (
                        b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Length: %d\r\n"
                        % len(body)
                    )
                    key = "sk-wrong" if kind == "bad-key" else ALICE
                raw += b"Authorization: Bearer " + key.encode() + b"\r\nConnection: close\r\n\r\n"
                if kind not in ("models",):
                    raw += body
                response, _ = exchange(port, raw, timeout=30)
                expected = {401} if kind == "bad-key" else {200, 503}
            status = status_of(response)
            if status not in expected:
                errors.append(f"{kind}: {status} {response[:200]!r}")
            elif kind == "stream" and status == 200 and not response.endswith(b"0\r\n\r\n"):
                errors.append(f"stream did not end cleanly: {response[-100:]!r}")
        except Exception as exc:  # noqa: BLE001 - every surprise is a finding
            errors.append(f"{kind}: {exc!r}")


def test_bounded_mixed_soak_loses_nothing(make_gateway: GatewayFactory) -> None:
    gateway = make_gateway(MAX_REQUESTS_PER_MINUTE="1000000")
    pid = gateway.proc.pid
    # Warm up, then take the baseline.
    _soak_worker(gateway.port, time.monotonic() + 1, 0, [], {})
    wait_until(lambda: gateway.backend.busy_slots() == 0, 30, "idle slots before the soak")
    rss_before, fds_before = rss_kib(pid), open_fds(pid)
    errors: list[str] = []
    counts: dict[str, int] = {}
    deadline = time.monotonic() + SOAK_SECONDS
    threads = [
        threading.Thread(target=_soak_worker, args=(gateway.port, deadline, seed, errors, counts))
        for seed in range(1, 7)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SOAK_SECONDS + 60)
    assert not errors, errors[:5]
    assert sum(counts.values()) > 20
    wait_until(lambda: gateway.backend.busy_slots() == 0, 10, "all slots idle after the soak")
    wait_until(lambda: open_fds(pid) <= fds_before + 8, 10, "connections to be released")
    assert rss_kib(pid) - rss_before < 20 * 1024, "RSS grew by more than 20 MiB"
