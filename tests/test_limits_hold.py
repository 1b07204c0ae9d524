"""Limits against a key holder who reads llama-server's docs, and strangers, for real."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from conftest import ALICE, OPS, GatewayFactory, GatewayHandle
from support.procs import wait_until
from support.rawhttp import exchange, status_of
from test_keys_and_limits import limited_gateway


def post(
    port: int, path: str, key: str, payload: dict[str, Any] | bytes, timeout: float = 60
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        conn.request("POST", path, body=body, headers={"Authorization": f"Bearer {key}"})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def tokens_counted(gw: GatewayHandle, key_id: str) -> dict[str, int]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    # Per-key series need a key: an admin one shows them on the open /metrics.
    conn.request("GET", "/metrics?format=json", headers={"Authorization": f"Bearer {OPS}"})
    data = json.loads(conn.getresponse().read())
    conn.close()
    counted = {"prompt": 0, "completion": 0}
    for row in data["tokens_total"]:
        # A gateway whose key file has no admin key shows totals (its one key's).
        if row.get("key_id", key_id) == key_id:
            counted[row["kind"]] = row["value"]
    return counted


def sse_usage(body: bytes) -> list[dict[str, Any]]:
    found = []
    for line in body.split(b"\n"):
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            if isinstance(event.get("usage"), dict):
                found.append(event["usage"])
    return found


def test_n_predict_cannot_hide_behind_a_small_max_tokens(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = limited_gateway(make_gateway, tmp_path, "t:sk-tpm-npredict tpm=1200\n")
    payload = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1,
        "n_predict": 200,
        "ignore_eos": True,
    }
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(
                lambda _: post(gw.port, "/v1/chat/completions", "sk-tpm-npredict", payload),
                range(8),
            )
        )
    served = [json.loads(body) for status, _, body in results if status == 200]
    assert served and len(served) < 8
    assert all(r["usage"]["completion_tokens"] == 200 for r in served)
    counted = tokens_counted(gw, "t")
    assert counted["prompt"] + counted["completion"] <= 1200


def test_every_choice_is_counted_and_streamed(gateway: GatewayHandle) -> None:
    before = tokens_counted(gateway, "alice")["completion"]
    payload = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "n": 3,
        "ignore_eos": True,
    }
    status, _, body = post(gateway.port, "/v1/chat/completions", ALICE, payload)
    assert status == 200, body
    answer = json.loads(body)
    assert len(answer["choices"]) == 3 and answer["usage"]["completion_tokens"] == 15
    status, _, body = post(gateway.port, "/v1/chat/completions", ALICE, {**payload, "stream": True})
    assert status == 200
    # Every choice streams to its end; the usage chunks the client did not ask for go.
    finishes = [line for line in body.split(b"\n") if b'"finish_reason":"length"' in line]
    assert len(finishes) == 3 and not sse_usage(body) and body.rstrip().endswith(b"[DONE]")
    assert tokens_counted(gateway, "alice")["completion"] - before == 30


def test_more_generations_than_slots_are_refused(gateway: GatewayHandle) -> None:
    payload = {"prompt": ["a", "b", "c"], "max_tokens": 2, "n": 2}
    status, _, body = post(gateway.port, "/v1/completions", ALICE, payload)
    assert status == 400 and b"at most 4" in body, body


def test_streamed_text_completion_is_counted(gateway: GatewayHandle) -> None:
    before = tokens_counted(gateway, "alice")["completion"]
    payload = {"prompt": "hello", "max_tokens": 7, "ignore_eos": True, "stream": True}
    status, _, body = post(gateway.port, "/v1/completions", ALICE, payload)
    assert status == 200 and body.rstrip().endswith(b"[DONE]")
    # Its usage rides on the last chunk, which still has choices: kept for the client.
    assert [u["completion_tokens"] for u in sse_usage(body)] == [7]
    assert tokens_counted(gateway, "alice")["completion"] - before == 7


def test_embeddings_settle_to_their_input_tokens(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = limited_gateway(make_gateway, tmp_path, "e:sk-embed-tpm tpm=3000\n")
    for _ in range(12):
        status, _, body = post(gw.port, "/v1/embeddings", "sk-embed-tpm", {"input": "hello"})
        assert status == 200, body
    batch = {"input": ["one", "two", "three", "four", "five", "six"]}
    status, _, body = post(gw.port, "/v1/embeddings", "sk-embed-tpm", batch)
    assert status == 200 and len(json.loads(body)["data"]) == 6


def test_concurrency_is_taken_when_checked_not_after_the_body(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = limited_gateway(make_gateway, tmp_path, "c:sk-one-at-a-time concurrency=1\n")
    body = json.dumps(
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 300, "ignore_eos": True}
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\n"
        f"Authorization: Bearer sk-one-at-a-time\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    socks = [socket.create_connection(("127.0.0.1", gw.port), timeout=30) for _ in range(4)]
    try:
        for sock in socks:
            sock.sendall(head)  # four heads first...
        time.sleep(0.3)
        answers = []
        for sock in socks:
            try:
                sock.sendall(body)  # ...then the bodies
            except OSError:
                pass
        for sock in socks:
            received = b""
            while b"\r\n" not in received:
                piece = sock.recv(4096)
                if not piece:
                    break
                received += piece
            answers.append(status_of(received))
    finally:
        for sock in socks:
            sock.close()
    assert sorted(answers) == [200, 429, 429, 429]


def test_a_stranger_announcing_a_body_on_ping_is_answered_at_once(
    gateway: GatewayHandle,
) -> None:
    started = time.monotonic()
    response, closed = exchange(
        gateway.port, b"GET /ping HTTP/1.1\r\nHost: g\r\nContent-Length: 10485760\r\n\r\n", 5
    )
    assert status_of(response) == 400 and closed and time.monotonic() - started < 4


def test_deeply_nested_or_non_object_bodies_are_400(gateway: GatewayHandle) -> None:
    for body in (b"[" * 100_000, b'"just a string"', b"\xff\xfe\xfd"):
        status, _, answer = post(gateway.port, "/v1/chat/completions", ALICE, body)
        assert status == 400, answer
        assert json.loads(answer)["error"]["type"] == "invalid_request_error"


def test_remote_media_is_refused_before_llama_server_sees_it(gateway: GatewayHandle) -> None:
    image = {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}}
    payload = {"messages": [{"role": "user", "content": [image]}], "max_tokens": 2}
    status, _, body = post(gateway.port, "/v1/chat/completions", ALICE, payload)
    assert status == 400 and b"ALLOW_REMOTE_MEDIA" in body


def test_refusals_with_an_unread_body_are_seen_not_reset(gateway: GatewayHandle) -> None:
    """A 401 for a request whose large body is still coming reaches the client intact."""
    body = b"x" * (4 * 1024 * 1024)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer wrong\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(head)
        try:
            sock.sendall(body)
        except OSError:
            pass
        received = b""
        while True:
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                break
            if not piece:
                break
            received += piece
    assert status_of(received) == 401


def test_ledger_fields_are_bounded(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    logs = tmp_path / "ledger-logs"
    gw = make_gateway(LOG_DIR=str(logs))
    payload = {"model": "m" * 200_000, "messages": [{"role": "user", "content": "x"}]}
    post(gw.port, "/v1/chat/completions", ALICE, {**payload, "max_tokens": 1})
    gw.proc.stop()
    line = (logs / "usage.jsonl").read_text().splitlines()[-1]
    assert len(line) < 1000 and json.loads(line)["model"] == "m" * 128


def test_a_key_revoked_while_its_body_uploads_cannot_start_the_request(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = limited_gateway(make_gateway, tmp_path, "slow:sk-slow-uploader-0\n")
    body = json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\n"
        f"Authorization: Bearer sk-slow-uploader-0\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(head + body[:10])
        time.sleep(0.3)  # the gateway has authenticated the head and waits for the body
        (tmp_path / "limited_keys.txt").write_text("other:sk-someone-else-00\n")
        gw.proc.signal(signal.SIGHUP)
        wait_until(lambda: "keys reloaded" in gw.proc.log(), 5, "the reload")
        sock.sendall(body[10:])
        answer = sock.recv(65536)
    assert status_of(answer) == 401 and b"revoked" in answer
