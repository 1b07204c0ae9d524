"""CORS, metrics auth, security headers and the local endpoints, on the real gateway."""

from __future__ import annotations

import http.client
import json

import pytest

from prometheus_client.parser import text_string_to_metric_families

from conftest import ALICE, OPS, GatewayFactory, GatewayHandle
from support.procs import http_get


def request(
    port: int, method: str, path: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_cors_preflight_allowed_and_denied(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(CORS_ORIGINS="https://app.example, https://other.example")
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    status, headers, body = request(gw.port, "OPTIONS", "/v1/chat/completions", preflight)
    # As llama-server answers a preflight: 200, an empty body, the same methods for every
    # path, credentials allowed, no max-age; Authorization named beside "*", which alone
    # never covers it (Fetch standard).
    assert status == 200 and body == b"" and headers["content-length"] == "0"
    assert headers["access-control-allow-origin"] == "https://app.example"
    assert headers["access-control-allow-methods"] == "GET, POST, DELETE, OPTIONS"
    assert headers["access-control-allow-headers"] == "*, Authorization"
    assert headers["access-control-allow-credentials"] == "true"
    assert "access-control-max-age" not in headers

    # Another origin: 200 without a single Access-Control-* header (as llama-server), so
    # the browser refuses the request; counted as a CORS refusal.
    denied = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    status, headers, _ = request(gw.port, "OPTIONS", "/v1/chat/completions", denied)
    assert status == 200 and not any(h.startswith("access-control") for h in headers)
    metrics = http_get(gw.port, "/metrics")[1].decode()
    assert 'gateway_rejections_total{reason="cors"} 1' in metrics

    # CORS_ORIGINS=localhost (llama-server's special value): any port on this machine.
    local = make_gateway(CORS_ORIGINS="localhost")
    for origin, allowed in (
        ("http://localhost:5173", True),
        ("http://127.0.0.1", True),
        ("http://[::1]:3000", True),
        ("http://localhost.evil.example", False),
        ("http://notlocalhost", False),
    ):
        asked = {"Origin": origin, "Access-Control-Request-Method": "POST"}
        _, headers, _ = request(local.port, "OPTIONS", "/v1/chat/completions", asked)
        assert headers.get("access-control-allow-origin") == (origin if allowed else None), origin

    status, headers, _ = request(
        gw.port,
        "GET",
        "/v1/models",
        {"Origin": "https://app.example", "Authorization": f"Bearer {ALICE}"},
    )
    assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in headers["access-control-expose-headers"].lower()


def test_no_cors_headers_by_default_even_though_llama_server_sends_them(
    gateway: GatewayHandle,
) -> None:
    status, headers, _ = request(
        gateway.port,
        "GET",
        "/v1/models",
        {"Origin": "https://app.example", "Authorization": f"Bearer {ALICE}"},
    )
    assert status == 200 and not any(h.startswith("access-control") for h in headers)
    assert headers["x-content-type-options"] == "nosniff"
    assert "server" not in headers


def test_metrics_can_require_an_admin_key(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(METRICS_AUTH_ENABLED="true")
    assert http_get(gw.port, "/metrics")[0] == 401
    assert http_get(gw.port, "/metrics", {"Authorization": f"Bearer {ALICE}"})[0] == 403
    assert http_get(gw.port, "/metrics", {"Authorization": f"Bearer {OPS}"})[0] == 200


def test_metrics_parse_as_prometheus_and_count_requests(gateway: GatewayHandle) -> None:
    http_get(gateway.port, "/v1/models", {"Authorization": f"Bearer {ALICE}"})
    http_get(gateway.port, "/nope")
    status, body = http_get(gateway.port, "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name in (
        "gateway_requests",
        "gateway_requests_in_flight",
        "gateway_queue_depth",
        "gateway_request_duration_seconds",
        "gateway_time_to_first_byte_seconds",
        "gateway_rejections",
        "gateway_client_disconnects",
        "gateway_backend_up",
    ):
        assert name in families, name
    samples = {
        (s.labels.get("path"), s.labels.get("status")): s.value
        for s in families["gateway_requests"].samples
    }
    assert samples[("/v1/models", "200")] >= 1 and samples[("other", "404")] >= 1
    assert families["gateway_backend_up"].samples[0].value == 1
    status, body = http_get(gateway.port, "/metrics?format=json")
    assert status == 200 and json.loads(body)["backend_up"] == 1


def test_health_reports_backend_model_and_slots(gateway: GatewayHandle) -> None:
    status, body = http_get(gateway.port, "/health")
    health = json.loads(body)
    assert status == 200
    assert health["status"] == "ready" and health["backend"] == "ready"
    assert health["models"] == [str(gateway.backend.model)]
    assert health["slots"]["total"] == 4
    assert {"queue_depth", "uptime_seconds", "version", "in_flight"} <= set(health)
    status, headers, body = request(gateway.port, "HEAD", "/ping", {})
    assert status == 200 and body == b""


def test_wrong_method_is_405_with_allow(gateway: GatewayHandle) -> None:
    status, headers, body = request(
        gateway.port, "GET", "/v1/chat/completions", {"Authorization": f"Bearer {ALICE}"}
    )
    assert status == 405 and headers["allow"] == "POST"
    assert json.loads(body)["error"]["message"]


def test_http10_client_gets_a_plain_close_delimited_stream(gateway: GatewayHandle) -> None:
    from support.rawhttp import exchange

    body = json.dumps(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 20,
            "ignore_eos": True,
            "stream": True,
        }
    ).encode()
    raw = (
        b"POST /v1/chat/completions HTTP/1.0\r\nAuthorization: Bearer " + ALICE.encode()
        + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )  # fmt: skip
    response, closed = exchange(gateway.port, raw, timeout=10)
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head.lower()
    assert closed and payload.startswith(b"data: {") and payload.endswith(b"data: [DONE]\n\n")
    assert b'"choices":[]' not in payload  # usage was not asked for


@pytest.mark.parametrize(
    "choice, runs",
    [
        pytest.param("auto", "event loop: uvloop", id="default-takes-uvloop"),
        pytest.param("asyncio", "event loop: asyncio", id="stdlib-loop"),
    ],
)
def test_event_loops_serve_streams_and_plain_requests(
    make_gateway: GatewayFactory, choice: str, runs: str
) -> None:
    import openai

    gw = make_gateway(EVENT_LOOP=choice)
    assert runs in gw.proc.log()
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=ALICE, max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=30, stream=True,
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert chunks[-1].choices[0].finish_reason == "length"
    result = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        extra_body={"ignore_eos": True},
    )
    assert result.usage is not None and result.usage.completion_tokens == 5
