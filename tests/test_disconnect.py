"""A client that goes away frees its llama-server slot at once, streaming or not."""

from __future__ import annotations

import json
import socket
import time

import pytest

from conftest import ALICE, GatewayHandle
from support.procs import http_get, wait_until

LONG = 16000  # tokens: seconds of generation on the tiny model (direct: ~5 s to finish)


def metric(gateway: GatewayHandle, name: str) -> float:
    _, body = http_get(gateway.port, "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_client_disconnect_frees_the_slot_quickly(gateway: GatewayHandle, stream: bool) -> None:
    wait_until(lambda: gateway.backend.busy_slots() == 0, 30, "idle slots before the test")
    disconnects = metric(gateway, "gateway_client_disconnects_total")
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": LONG,
            "ignore_eos": True,
            "stream": stream,
        }
    ).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer "
        + ALICE.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )
    sock = socket.create_connection(("127.0.0.1", gateway.port))
    try:
        sock.sendall(request)
        wait_until(lambda: gateway.backend.busy_slots() == 1, 10, "the request to occupy a slot")
    finally:
        sock.close()
    gone = time.monotonic()
    wait_until(
        lambda: gateway.backend.busy_slots() == 0, 2.0, "the slot to be freed after the disconnect"
    )
    freed_after = time.monotonic() - gone
    assert freed_after < 2.0
    wait_until(
        lambda: metric(gateway, "gateway_client_disconnects_total") == disconnects + 1,
        5,
        "the disconnect to be counted",
    )
