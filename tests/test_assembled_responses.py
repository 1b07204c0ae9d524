"""Non-streaming generation runs as a stream on the backend; the client cannot tell."""

from __future__ import annotations

import json
from typing import Any

import pytest

from conftest import ALICE, GatewayHandle

import http.client

# Random weights emit arbitrary bytes; a grammar keeps the text valid ASCII so that the
# comparison is about assembly, not about how partial UTF-8 is rendered.
GRAMMAR = "root ::= [a-z ]+"


def post(port: int, path: str, payload: dict[str, Any], key: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            "POST", path, body=json.dumps(payload), headers={"Authorization": f"Bearer {key}"}
        )
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, body
        return dict(json.loads(body))
    finally:
        conn.close()


def comparable(response: dict[str, Any]) -> dict[str, Any]:
    out = dict(response)
    for volatile in ("id", "created", "timings"):
        out.pop(volatile, None)
    usage = dict(out.get("usage") or {})
    usage.pop("prompt_tokens_details", None)  # cache hits differ between two runs
    out["usage"] = usage
    return out


CASES = [
    pytest.param(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 24},
        id="chat",
    ),
    pytest.param(
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 6,
            "logprobs": True,
            "top_logprobs": 2,
        },
        id="chat-logprobs",
    ),
    pytest.param("/v1/completions", {"prompt": "the llama", "max_tokens": 20}, id="text"),
]


@pytest.mark.parametrize("path, payload", CASES)
def test_assembled_response_matches_llama_server_non_streaming(
    gateway: GatewayHandle, path: str, payload: dict[str, Any]
) -> None:
    payload = {**payload, "temperature": 0, "seed": 1, "grammar": GRAMMAR, "ignore_eos": True}
    backend = gateway.backend
    direct = post(backend.port, path, payload, backend.key)
    through = post(gateway.port, path, payload, ALICE)
    assert comparable(through) == comparable(direct)
    assert through["usage"]["completion_tokens"] == payload["max_tokens"]
    assert "timings" in through


def test_stream_false_explicitly_is_still_json(gateway: GatewayHandle) -> None:
    result = post(
        gateway.port,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": False},
        ALICE,
    )
    assert result["object"] == "chat.completion"
