"""One key or a stranger cannot stall or starve the gateway: slow readers, tokenizer work,
tiny chunks, odd text with several backends, and a backend that hangs.

Against the real gateway and llama-server; a stand-in backend only where a hang is needed.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from conftest import ALICE, BACKEND_KEY, OPS, Backend, GatewayFactory, GatewayHandle
from support.fake_backend import FakeBackend
from support.procs import Process, free_ports, http_get, start_llama_server, wait_until
from support.rawhttp import exchange, status_of
from test_keys_and_limits import limited_gateway

# ------------------------------------------------------------------ helpers


def post(
    port: int,
    path: str,
    key: str,
    payload: Any,
    timeout: float = 60.0,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        sent = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        sent.update(headers or {})
        conn.request("POST", path, body=body, headers=sent)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def chat(user: str, tokens: int, system: str = "You are brief.", **extra: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": tokens,
        "ignore_eos": True,
        **extra,
    }


def big_stream(tokens: int) -> dict[str, Any]:
    """A stream of about 2.5 KB per token (20 alternatives each): its output outgrows the
    socket buffers (loopback's grow to about 3 MB) in a few thousand tokens."""
    payload = chat("tell me everything", tokens, stream=True, logprobs=True, top_logprobs=20)
    payload["stream_options"] = {"include_usage": True}
    return payload


def slow_reader(port: int, key: str, payload: dict[str, Any]) -> socket.socket:
    """A raw client that sends a request and then reads nothing: a tiny receive window."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    body = json.dumps(payload).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def read_all(sock: socket.socket, timeout: float = 120.0) -> bytes:
    sock.settimeout(timeout)
    got = bytearray()
    while True:
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:
            break
        if not piece or got.endswith(b"0\r\n\r\n"):
            got += piece
            break
        got += piece
        if got.endswith(b"0\r\n\r\n"):
            break
    return bytes(got)


def health(gw: GatewayHandle) -> dict[str, Any]:
    _, body = http_get(gw.port, "/health")
    return json.loads(body)  # type: ignore[no-any-return]


# ------------------------------------------------------------------ slow readers


def test_a_reader_at_a_trickle_does_not_hold_its_slot_once_generation_is_done(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """One slot. A key reads nothing of a finished stream: another key is served anyway,
    and the slow one still gets its whole stream afterwards (it was buffered)."""
    gw = make_gateway(
        MAX_CONCURRENT_REQUESTS="1",
        QUEUE_TIMEOUT="120",
        STREAM_IDLE_TIMEOUT="600",
        SLOW_CLIENT_TIMEOUT="600",
        RESPONSE_BUFFER_SIZE=str(16 << 20),
    )
    tokens = 2500  # some 6 MB: more than the socket buffers hold, less than the gateway's
    sock = slow_reader(gw.port, ALICE, big_stream(tokens))
    try:
        # The stream is under way (its slot taken) before the other key asks.
        wait_until(lambda: health(gw)["slots"]["in_use"] == 1, 30, "the stream to start", 0.05)
        status, body = post(gw.port, "/v1/chat/completions", OPS, chat("hi", 5), timeout=100)
        assert status == 200, body
        assert json.loads(body)["usage"]["completion_tokens"] == 5
        got = read_all(sock)
    finally:
        sock.close()
    events = [line for line in got.split(b"\n") if line.startswith(b"data: {")]
    assert b"data: [DONE]" in got, got[-300:]
    usage = [
        event["usage"] for event in map(json.loads, (e[6:] for e in events)) if "usage" in event
    ]
    assert usage and usage[-1]["completion_tokens"] == tokens  # all of it, kept for it


def test_a_client_that_cannot_take_a_stream_is_cut_and_its_slot_freed(
    make_gateway: GatewayFactory,
) -> None:
    """A client more than RESPONSE_BUFFER_SIZE behind gets SLOW_CLIENT_TIMEOUT in all."""
    gw = make_gateway(
        MAX_CONCURRENT_REQUESTS="1",
        QUEUE_TIMEOUT="120",
        STREAM_IDLE_TIMEOUT="600",
        RESPONSE_BUFFER_SIZE="65536",
        SLOW_CLIENT_TIMEOUT="2",
    )
    sock = slow_reader(gw.port, ALICE, big_stream(6000))
    try:
        wait_until(lambda: health(gw)["slots"]["in_use"] == 1, 30, "the stream to start", 0.05)
        status, body = post(gw.port, "/v1/chat/completions", OPS, chat("hi", 5), timeout=100)
        assert status == 200, body
        got = read_all(sock)
    finally:
        sock.close()
    assert b"data: [DONE]" not in got  # cut, not served to the end
    _, metrics = http_get(gw.port, "/metrics")
    assert b'gateway_rejections_total{reason="slow_client"} 1' in metrics


def test_a_finished_answer_not_taken_in_time_is_cut(make_gateway: GatewayFactory) -> None:
    """A non-streaming answer is out of llama-server at once (its slot free); a client that
    leaves it unread for SLOW_CLIENT_TIMEOUT loses its connection, and its buffer with it."""
    gw = make_gateway(
        MAX_CONCURRENT_REQUESTS="1", SLOW_CLIENT_TIMEOUT="2", RESPONSE_BUFFER_SIZE="65536"
    )
    payload = big_stream(5000)  # some 5.5 MB as one JSON answer: more than sockets hold
    payload["stream"] = False
    del payload["stream_options"]
    sock = slow_reader(gw.port, ALICE, payload)
    try:
        wait_until(lambda: health(gw)["slots"]["in_use"] == 1, 30, "the answer to start", 0.05)
        status, body = post(gw.port, "/v1/chat/completions", OPS, chat("hi", 5), timeout=100)
        assert status == 200, body
        # Long past SLOW_CLIENT_TIMEOUT: the gateway has given up on this client.
        wait_until(lambda: b'reason="slow_client"' in http_get(gw.port, "/metrics")[1], 60, "cut")
        got = read_all(sock)
    finally:
        sock.close()
    head, _, body = got.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    assert length > 3 << 20 and len(body) < length


# ------------------------------------------------------------------ no-slot routes


def test_tokenizer_routes_have_a_small_body_cap_and_count_against_the_rate(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = limited_gateway(make_gateway, tmp_path, "t:sk-tokenizer-key rpm=3\n")
    big = {"content": "a" * 300000}
    status, body = post(gw.port, "/tokenize", "sk-tokenizer-key", big)
    assert status == 413 and b"MAX_TOKENIZE_BODY_SIZE" in body
    # Chunked, the cap holds as the body arrives.
    data = json.dumps(big).encode()
    cap = 262144
    chunked = b"".join(b"%x\r\n%s\r\n" % (4096, data[i : i + 4096]) for i in range(0, cap, 4096))
    response, closed = exchange(
        gw.port,
        b"POST /tokenize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-tokenizer-key\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunked + b"1000\r\n" + b"a" * 4096 + b"\r\n",
    )
    assert status_of(response) == 413 and closed
    status, body = post(gw.port, "/tokenize", "sk-tokenizer-key", {"content": "hello"})
    assert status == 200 and json.loads(body)["tokens"]
    # Three requests this minute (the two refused ones counted): the next is 429.
    status, body = post(gw.port, "/detokenize", "sk-tokenizer-key", {"tokens": [5, 6]})
    assert status == 429, body


def test_tokenizer_work_waits_for_its_own_places_not_for_slots(tmp_path: Path) -> None:
    """A stuck tokenizer (a stand-in: the real one is slow only on some texts) holds one
    of MAX_CONCURRENT_TOKENIZE places; the next waits its turn, then gets 503."""
    from conftest import gateway_env
    from support.procs import start_gateway

    keys = tmp_path / "keys.txt"
    keys.write_text(f"alice:{ALICE}\n")
    fake = FakeBackend("hang")
    env = gateway_env(fake.port, keys)
    env.update(MAX_CONCURRENT_TOKENIZE="1", QUEUE_TIMEOUT="1")
    proc, port = start_gateway(env, tmp_path / "gateway.log")
    try:
        with ThreadPoolExecutor(1) as pool:
            stuck = pool.submit(post, port, "/tokenize", ALICE, {"content": "x"}, 10.0)
            wait_until(lambda: fake.generation_requests == 1, 10, "the first to reach it")
            status, body = post(port, "/tokenize", ALICE, {"content": "y"})
            assert status == 503 and b"tokenizer place" in body
            assert fake.generation_requests == 1  # never sent on
            with pytest.raises(TimeoutError):
                stuck.result()
    finally:
        proc.stop()
        fake.close()


# ------------------------------------------------------------------ tiny chunks


def test_a_body_in_one_byte_chunks_is_refused_and_closed(gateway: GatewayHandle) -> None:
    # A request that would be served, sent a byte per chunk.
    body = json.dumps(chat("hi", 2)).encode() + b" " * 2000
    chunks = b"".join(b"1\r\n%c\r\n" % c for c in body) + b"0\r\n\r\n"
    response, closed = exchange(
        gateway.port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {ALICE}\r\n".encode()
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + chunks,
        timeout=30,
    )
    assert status_of(response) == 400 and closed
    assert b"too many small chunks" in response


# ------------------------------------------------------------------ several backends


@pytest.fixture
def two_ports() -> int:
    return free_ports(2)


def start_backend_at(port: int, model: Path, log: Path) -> Process:
    proc, _ = start_llama_server(model, log, api_key=BACKEND_KEY, parallel=2, port=port)
    return proc


@pytest.fixture
def real_pair(backend: Backend, two_ports: int, tmp_path: Path) -> Iterator[int]:
    """Two real llama-servers on consecutive ports; yields the first port."""
    procs = [
        start_backend_at(two_ports + i, backend.model, tmp_path / f"llama-{i}.log") for i in (0, 1)
    ]
    try:
        yield two_ports
    finally:
        for proc in procs:
            proc.stop()


LONE_SURROGATE = (
    b'{"messages":[{"role":"user","content":"' + b"a" * 600 + b'\\ud800"}],"max_tokens":2}'
)


def test_a_lone_surrogate_gets_the_same_400_with_two_backends_as_with_one(
    gateway: GatewayHandle, make_gateway: GatewayFactory, real_pair: int
) -> None:
    one_status, one_body = post(gateway.port, "/v1/chat/completions", ALICE, LONE_SURROGATE)
    two = make_gateway(backend_port=real_pair, BACKENDS="2")
    status, body = post(two.port, "/v1/chat/completions", ALICE, LONE_SURROGATE, timeout=30)
    assert one_status == 400, one_body
    assert (status, json.loads(body)["error"]["type"]) == (
        400,
        json.loads(one_body)["error"]["type"],
    )


def test_a_backend_that_stops_answering_health_is_routed_around(
    backend: Backend, make_gateway: GatewayFactory, two_ports: int, tmp_path: Path
) -> None:
    real = start_backend_at(two_ports, backend.model, tmp_path / "llama.log")
    fake = FakeBackend("hang", port=two_ports + 1)  # alive, answers health, hangs requests
    try:
        gw = make_gateway(backend_port=two_ports, BACKENDS="2", FIRST_BYTE_TIMEOUT="600")
        assert [b["state"] for b in health(gw)["backends"]] == ["ready", "ready"]
        fake.health_hangs.set()  # now it accepts, reads, and never answers
        wait_until(
            lambda: health(gw)["backends"][1]["state"] == "unresponsive", 60, "it to be noticed"
        )
        assert health(gw)["status"] == "ready"
        with ThreadPoolExecutor(4) as pool:
            results = list(
                pool.map(
                    lambda i: post(gw.port, "/v1/chat/completions", ALICE, chat(f"q{i}", 3)),
                    range(6),
                )
            )
        assert [status for status, _ in results] == [200] * 6
        assert fake.generation_requests == 0
        # Answering again, it is back in routing.
        fake.health_hangs.clear()
        wait_until(lambda: health(gw)["backends"][1]["state"] == "ready", 60, "it to be back")
    finally:
        fake.close()
        real.stop()


# ------------------------------------------------------------------ metrics


def key_ids_in(port: int, headers: dict[str, str] | None = None) -> set[str]:
    _, text = http_get(port, "/metrics", headers)
    _, data = http_get(port, "/metrics?format=json", headers)
    rows = json.loads(data)["tokens_total"]
    from_json = {row["key_id"] for row in rows if "key_id" in row}
    from_text = {
        line.split(b'key_id="')[1].split(b'"')[0].decode()
        for line in text.splitlines()
        if b'key_id="' in line
    }
    assert from_json == from_text
    return from_text


def test_an_open_metrics_names_no_key(gateway: GatewayHandle, make_gateway: GatewayFactory) -> None:
    status, _ = post(gateway.port, "/v1/chat/completions", ALICE, chat("count me", 2))
    assert status == 200
    assert key_ids_in(gateway.port) == set()
    assert key_ids_in(gateway.port, {"Authorization": f"Bearer {ALICE}"}) == set()  # not admin
    assert "alice" in key_ids_in(gateway.port, {"Authorization": f"Bearer {OPS}"})
    _, text = http_get(gateway.port, "/metrics")
    assert b'gateway_tokens_total{kind="completion"}' in text
    closed = make_gateway(METRICS_AUTH_ENABLED="true")
    assert http_get(closed.port, "/metrics")[0] == 401
    status, _ = post(closed.port, "/v1/chat/completions", ALICE, chat("count me", 2))
    assert "alice" in key_ids_in(closed.port, {"Authorization": f"Bearer {OPS}"})
