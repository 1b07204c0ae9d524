"""Metrics, access log, usage ledger and health aliases, measured against real usage."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
from prometheus_client.parser import text_string_to_metric_families

from conftest import ALICE, OPS, GatewayFactory, GatewayHandle
from support.procs import ROOT, http_get, wait_until


def tokens(gateway: GatewayHandle, key_id: str) -> dict[str, float]:
    # Per-key series need a key: an admin one shows them on the open /metrics.
    _, body = http_get(gateway.port, "/metrics", {"Authorization": f"Bearer {OPS}"})
    out = {"prompt": 0.0, "completion": 0.0}
    for family in text_string_to_metric_families(body.decode()):
        if family.name == "gateway_tokens":
            for sample in family.samples:
                if sample.labels["key_id"] == key_id and sample.name == "gateway_tokens_total":
                    out[sample.labels["kind"]] = sample.value
    return out


def test_token_metrics_equal_the_usage_llama_server_reported(gateway: GatewayHandle) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=ALICE, max_retries=0)
    before = tokens(gateway, "alice")
    plain = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "count me"}],
        max_tokens=7,
        extra_body={"ignore_eos": True},
    )
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "and me"}],
            max_tokens=11,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    streamed = chunks[-1].usage
    assert plain.usage is not None and streamed is not None
    # A stream whose client did not ask for usage is counted too.
    list(
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], max_tokens=5, stream=True,
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    after = tokens(gateway, "alice")
    assert after["completion"] - before["completion"] == 7 + 11 + 5
    assert (
        after["prompt"] - before["prompt"] >= plain.usage.prompt_tokens + streamed.prompt_tokens + 1
    )


def test_metrics_include_llama_server_series_and_sane_buckets(gateway: GatewayHandle) -> None:
    http_get(gateway.port, "/v1/models", {"Authorization": f"Bearer {ALICE}"})
    _, body = http_get(gateway.port, "/metrics")
    open_families = {f.name for f in text_string_to_metric_families(body.decode())}
    # Open: llama-server's series less its prompt-token counters (what a cache probe
    # would read before and after; EXPOSE_PROMPT_CACHE keeps them).
    assert "llamacpp:tokens_predicted" in open_families
    assert not {"llamacpp:prompt_tokens", "llamacpp:prompt_tokens_cached"} & open_families
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {OPS}"})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    # As llama-server's own /metrics answer says when its counters started.
    assert abs(int(response.getheader("Process-Start-Time-Unix") or 0) - time.time()) < 86400
    assert "llamacpp:" in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # llama-server's own series, as it writes them (one backend: no label added).
    prompt = families["llamacpp:prompt_tokens"]
    assert prompt.type == "counter" and prompt.samples
    assert all(s.labels == {} for s in prompt.samples)
    assert "llamacpp:prompt_tokens_total " in text
    ttfb = {s.labels.get("le") for s in families["gateway_time_to_first_byte_seconds"].samples}
    duration = {s.labels.get("le") for s in families["gateway_request_duration_seconds"].samples}
    assert {"0.005", "1.0", "60.0", "600.0", "+Inf"} <= ttfb
    assert {"0.01", "10.0", "300.0", "3600.0", "+Inf"} <= duration


def test_health_aliases(gateway: GatewayHandle) -> None:
    for path in ("/healthz", "/health/live", "/readyz", "/health/ready"):
        assert http_get(gateway.port, path)[0] == 200, path


def test_access_log_and_ledger_record_real_statuses_without_secrets(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    gw = make_gateway(LOG_FORMAT="json", LOG_DIR=str(logs))
    auth = {"Authorization": f"Bearer {ALICE}"}
    assert http_get(gw.port, "/v1/models", auth)[0] == 200
    assert http_get(gw.port, "/v1/models", {"Authorization": "Bearer sk-wrong-secret"})[0] == 401
    # A client that leaves mid-generation: logged as 499 and disconnected.
    body = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16000, "ignore_eos": True}
    )
    sock = socket.create_connection(("127.0.0.1", gw.port))
    sock.sendall(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {ALICE}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    wait_until(lambda: gw.backend.busy_slots() == 1, 10, "the generation to start")
    sock.close()

    def access() -> list[dict[str, object]]:
        lines = [json.loads(line) for line in gw.proc.log().splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("logger") == "gateway.access"]

    wait_until(lambda: any(a["status"] == 499 for a in access()), 10, "the 499 line")
    statuses = [(a["path"], a["status"]) for a in access()]
    assert ("/v1/models", 200) in statuses and ("/v1/models", 401) in statuses
    gone = [a for a in access() if a["status"] == 499][0]
    assert gone["disconnected"] is True and gone["key_id"] == "alice"
    assert "sk-wrong-secret" not in gw.proc.log() and ALICE not in gw.proc.log()

    def ledger_entries() -> list[dict[str, object]]:
        path = logs / "usage.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    # The ledger is written in batches, at most a second apart.
    wait_until(lambda: any(e["status"] == 499 for e in ledger_entries()), 5, "the ledger")
    ledger = (logs / "usage.jsonl").read_text()
    entries = ledger_entries()
    assert {e["status"] for e in entries} >= {200, 401, 499}
    assert all(
        {"ts", "request_id", "key_id", "path", "duration_ms", "worker_id"} <= set(e)
        for e in entries
    )
    assert "sk-" not in ledger

    report = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "usage_report.py"),
            "--ledger",
            str(logs / "usage.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert report.returncode == 0 and "alice" in report.stdout
