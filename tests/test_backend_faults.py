"""Backend faults a real llama-server cannot produce on demand, through the real gateway."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator

import pytest

from conftest import ALICE, GatewayFactory
from support.fake_backend import FakeBackend
from support.procs import answers, free_port, http_get, wait_until

STREAM_BODY = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True})
PLAIN_BODY = json.dumps({"messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture
def fake(request: pytest.FixtureRequest) -> Iterator[FakeBackend]:
    backend = FakeBackend(request.param)
    try:
        yield backend
    finally:
        backend.close()


def post(port: int, body: str, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=body,
            headers={"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"},
        )
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def assert_still_serving(port: int) -> None:
    assert http_get(port, "/health")[0] in (200, 503)
    assert http_get(port, "/v1/models", {"Authorization": f"Bearer {ALICE}"})[0] in (200, 502)


@pytest.mark.parametrize("fake", ["hang"], indirect=True)
def test_hang_before_first_byte_is_504(fake: FakeBackend, make_gateway: GatewayFactory) -> None:
    gw = make_gateway(backend_port=fake.port, FIRST_BYTE_TIMEOUT="1")
    started = time.monotonic()
    status, _, body = post(gw.port, PLAIN_BODY)
    assert status == 504 and json.loads(body)["error"]["type"] == "timeout_error"
    status, headers, _ = post(gw.port, STREAM_BODY)
    assert status == 504
    assert time.monotonic() - started < 8
    assert_still_serving(gw.port)
    wait_until(lambda: '"POST /v1/chat/completions" 504' in gw.proc.log(), 5, "the access line")


@pytest.mark.parametrize("fake", ["reset_mid_stream"], indirect=True)
def test_reset_mid_stream_ends_with_sse_error_and_no_done(
    fake: FakeBackend, make_gateway: GatewayFactory
) -> None:
    gw = make_gateway(backend_port=fake.port)
    status, headers, body = post(gw.port, STREAM_BODY)
    assert status == 200 and headers["content-type"] == "text/event-stream"
    assert body.count(b'"content":"x"') == 2
    assert b"event: error" in body and b"[DONE]" not in body
    assert_still_serving(gw.port)


@pytest.mark.parametrize("fake", ["silent_mid_stream"], indirect=True)
def test_silent_backend_mid_stream_gets_error_event_at_idle_timeout(
    fake: FakeBackend, make_gateway: GatewayFactory
) -> None:
    gw = make_gateway(backend_port=fake.port, STREAM_IDLE_TIMEOUT="1")
    started = time.monotonic()
    status, _, body = post(gw.port, STREAM_BODY)
    elapsed = time.monotonic() - started
    assert status == 200
    assert b'"content":"x"' in body and b"event: error" in body and b"[DONE]" not in body
    assert b"stopped sending tokens" in body
    assert elapsed < 8
    assert_still_serving(gw.port)


@pytest.mark.parametrize("fake", ["garbage", "close_before_head"], indirect=True)
def test_garbage_or_drop_before_response_is_502(
    fake: FakeBackend, make_gateway: GatewayFactory
) -> None:
    gw = make_gateway(backend_port=fake.port)
    for body in (PLAIN_BODY, STREAM_BODY):
        status, _, payload = post(gw.port, body)
        assert status == 502, payload
        assert json.loads(payload)["error"]["type"] == "server_error"
    assert_still_serving(gw.port)
    wait_until(lambda: '"POST /v1/chat/completions" 502' in gw.proc.log(), 5, "the access line")
    _, metrics = http_get(gw.port, "/metrics?format=json")
    assert sum(json.loads(metrics)["backend_errors_total"].values()) >= 2


@pytest.mark.parametrize("fake", ["slow_head"], indirect=True)
def test_keepalive_comments_flow_during_long_prefill(
    fake: FakeBackend, make_gateway: GatewayFactory
) -> None:
    fake.delay = 1.2
    gw = make_gateway(backend_port=fake.port, SSE_KEEPALIVE_INTERVAL="0.3")
    status, _, body = post(gw.port, STREAM_BODY)
    assert status == 200
    assert body.startswith(b": keepalive\n\n")
    assert body.count(b": keepalive") >= 2
    assert body.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("fake", ["hang"], indirect=True)
def test_first_byte_timeout_after_keepalives_is_an_sse_error(
    fake: FakeBackend, make_gateway: GatewayFactory
) -> None:
    gw = make_gateway(backend_port=fake.port, SSE_KEEPALIVE_INTERVAL="0.2", FIRST_BYTE_TIMEOUT="1")
    status, _, body = post(gw.port, STREAM_BODY)
    assert status == 200
    assert b": keepalive" in body and b"event: error" in body and b"[DONE]" not in body


@pytest.mark.parametrize("fake", ["slow_head"], indirect=True)
def test_backend_gone_after_ready_is_502_then_recovers_state(
    fake: FakeBackend, make_gateway: GatewayFactory
) -> None:
    gw = make_gateway(backend_port=fake.port)
    fake.close()
    status, _, body = post(gw.port, PLAIN_BODY)
    assert status == 502 and b"not reachable" in body
    # The readiness state follows, and the gateway keeps answering.
    wait_until(lambda: answers(gw.port, "/ping", 503), 5, "/ping to report the backend down")
    status, body = http_get(gw.port, "/health")
    assert status == 503 and json.loads(body)["status"] == "failed"


def test_backend_that_never_started_means_503_loading(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(backend_port=free_port(), wait_ready=False)
    wait_until(lambda: answers(gw.port, "/ping", 503), 10, "gateway to answer /ping")
    status, headers, body = post(gw.port, PLAIN_BODY)
    assert status == 503 and headers["retry-after"]
    assert json.loads(body)["error"]["type"] == "unavailable_error"


def test_metrics_answer_while_llama_servers_metrics_hang(make_gateway: GatewayFactory) -> None:
    # llama-server's /metrics never answers: the gateway's own series still come back
    # (its wait for them is bounded), without llama-server's.
    fake = FakeBackend("hang")
    try:
        gw = make_gateway(backend_port=fake.port)
        for _ in range(3):
            status, body = http_get(gw.port, "/metrics", timeout=30)
            assert status == 200
            assert "gateway_requests_total" in body.decode()
            assert "llamacpp:" not in body.decode()
        # It did ask llama-server (the fake counts requests it does not know as generation).
        wait_until(lambda: fake.generation_requests >= 1, 10, "the /metrics fetch")
    finally:
        fake.close()


@pytest.mark.parametrize("fake", ["oversized_answer"], indirect=True)
def test_a_whole_answer_past_the_buffer_bound_is_refused_unread(
    fake: FakeBackend, make_gateway: GatewayFactory
) -> None:
    gw = make_gateway(backend_port=fake.port)
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    try:
        conn.request(
            "POST",
            "/v1/embeddings",
            body=json.dumps({"input": "hi"}),
            headers={"Authorization": f"Bearer {ALICE}"},
        )
        response = conn.getresponse()
        status, body = response.status, response.read()
    finally:
        conn.close()
    assert status == 502, body
    assert (
        "larger than the 268435456 bytes the gateway buffers"
        in json.loads(body)["error"]["message"]
    )
    assert_still_serving(gw.port)
