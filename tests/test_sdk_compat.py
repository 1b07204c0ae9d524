"""OpenAI SDK compatibility beyond chat: Responses, Anthropic-style messages, error classes
and the SDK's own retry rules meeting our Retry-After / x-should-retry."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

import openai
import pytest

from conftest import ALICE, GatewayFactory, GatewayHandle
from support.fake_backend import FakeBackend
from support.procs import answers, free_port, http_get, wait_until


def client(url: str, key: str = ALICE, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=retries, timeout=30)


def test_responses_api_plain_and_stream(gateway: GatewayHandle) -> None:
    api = client(gateway.url)
    result = api.responses.create(model="m", input="hello", max_output_tokens=6)
    assert result.status == "completed" and isinstance(result.output_text, str)
    # llama-server writes response.created with its first token's event, and writes no event
    # for a token that ends inside a UTF-8 character: a sampled first byte token would leave
    # the stream without it. Greedy, this model's first token after "hello" is a letter.
    stream = api.responses.create(
        model="m", input="hello", max_output_tokens=6, temperature=0, stream=True
    )
    events = [e.type for e in stream]
    assert events[0] == "response.created" and events[-1] == "response.completed"


def messages(port: int, payload: dict[str, object]) -> tuple[int, bytes, float, float]:
    """POST /v1/messages the way Anthropic clients do; returns status, body, first-byte and total time."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    started = time.monotonic()
    conn.request(
        "POST",
        "/v1/messages",
        body=json.dumps(payload),
        headers={
            "x-api-key": ALICE,
            "anthropic-version": "2023-06-01",
            "content-type": "application/json",
        },
    )
    response = conn.getresponse()
    pieces: list[bytes] = []
    first_at = 0.0
    while True:
        piece = response.read1(65536)
        if not piece:
            break
        if not pieces:
            first_at = time.monotonic() - started
        pieces.append(piece)
    conn.close()
    return response.status, b"".join(pieces), first_at, time.monotonic() - started


def test_anthropic_messages_plain_and_stream(gateway: GatewayHandle) -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    status, body, _, _ = messages(gateway.port, {**base, "max_tokens": 5})
    assert status == 200 and json.loads(body)["type"] == "message"
    status, body, _, _ = messages(gateway.port, {**base, "max_tokens": 50, "stream": True})
    assert status == 200 and body.endswith(
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )


def test_non_openai_stream_with_early_usage_is_not_held_back(make_gateway: GatewayFactory) -> None:
    # Usage in the first event must not make the relay wait for the end of the stream.
    fake = FakeBackend("usage_first_then_pause", delay=1.5)
    try:
        gw = make_gateway(backend_port=fake.port)
        status, body, first, total = messages(gw.port, {"model": "m", "max_tokens": 5, "stream": True,
                                                        "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    finally:
        fake.close()
    assert status == 200 and body.startswith(b"event: message_start") and b"message_stop" in body
    assert first < 0.5 and total >= 1.5


def test_503_is_an_api_status_error_with_retry_after(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(backend_port=free_port(), wait_ready=False)
    wait_until(lambda: answers(gw.port, "/ping", 503), 10, "the gateway")
    with pytest.raises(openai.APIStatusError) as caught:
        client(gw.url).models.list()
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"]


def test_sdk_retries_after_retry_after_and_then_succeeds(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    keys = tmp_path / "retry_keys.txt"
    keys.write_text("solo:sk-solo-key-000000000 concurrency=1\n")
    gw = make_gateway(AUTH_KEYS_FILE=str(keys))
    api = client(
        gw.url, "sk-solo-key-000000000", retries=8
    )  # Retry-After: 1 each time; a slow machine needs several
    busy = threading.Thread(
        target=lambda: api.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=1200,
            extra_body={"ignore_eos": True},
        )
    )
    busy.start()
    wait_until(lambda: _in_flight(gw) == 1, 10, "the first request to run")
    started = time.monotonic()
    result = api.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    busy.join()
    assert (
        result.choices and time.monotonic() - started >= 0.9
    )  # waited Retry-After: 1 at least once


def test_sdk_does_not_retry_when_told_not_to(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    keys = tmp_path / "tiny_keys.txt"
    keys.write_text("tiny:sk-tiny-budget-000000 tpm=50\n")
    gw = make_gateway(AUTH_KEYS_FILE=str(keys))
    before = _rejections(gw, "tokens")
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError):
        client(gw.url, "sk-tiny-budget-000000", retries=3).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=100
        )
    assert time.monotonic() - started < 2
    assert _rejections(gw, "tokens") == before + 1  # one request: no retries


def _in_flight(gw: GatewayHandle) -> int:
    _, body = http_get(gw.port, "/health")
    return int(json.loads(body)["slots"]["in_use"])


def _rejections(gw: GatewayHandle, reason: str) -> int:
    _, body = http_get(gw.port, "/metrics?format=json")
    return int(json.loads(body)["rejections_total"].get(reason, 0))
