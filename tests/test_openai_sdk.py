"""The OpenAI Python SDK against the gateway in front of a real llama-server."""

from __future__ import annotations

import json

import openai
import pytest

from conftest import ALICE, EXPIRED, HASHED, OPS, GatewayHandle
from support.procs import http_get


def client(gateway: GatewayHandle, key: str = ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=30)


def test_models_lists_the_served_model(gateway: GatewayHandle) -> None:
    models = client(gateway).models.list()
    assert [m.id for m in models.data] == [str(gateway.backend.model)]


def test_chat_completion(gateway: GatewayHandle) -> None:
    result = client(gateway).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=8,
        extra_body={"ignore_eos": True},
    )
    choice = result.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert result.usage is not None and result.usage.completion_tokens == 8
    assert result.object == "chat.completion"


def test_chat_completion_stream(gateway: GatewayHandle) -> None:
    stream = client(gateway).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16


def test_text_completion_plain_and_stream(gateway: GatewayHandle) -> None:
    api = client(gateway)
    result = api.completions.create(
        model="tiny", prompt="hello", max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 5
    pieces = list(
        api.completions.create(
            model="tiny", prompt="hello", max_tokens=5, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert pieces[-1].choices[0].finish_reason == "length"


def test_embeddings(gateway: GatewayHandle) -> None:
    result = client(gateway).embeddings.create(model="tiny", input=["hello world", "llama"])
    assert len(result.data) == 2
    assert len(result.data[0].embedding) == 64


def test_hashed_key_works(gateway: GatewayHandle) -> None:
    assert client(gateway, HASHED).models.list().data


@pytest.mark.parametrize("key", ["sk-wrong", EXPIRED], ids=["unknown-key", "expired-key"])
def test_bad_key_raises_authentication_error(gateway: GatewayHandle, key: str) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        client(gateway, key).models.list()
    assert caught.value.response.headers["www-authenticate"] == "Bearer"
    assert caught.value.response.headers["x-request-id"]


def test_admin_path_needs_admin_scope(gateway: GatewayHandle) -> None:
    with pytest.raises(openai.PermissionDeniedError):
        client(gateway).get("/../slots", cast_to=object)
    status, body = http_get(gateway.port, "/slots", {"Authorization": f"Bearer {OPS}"})
    assert status == 200 and isinstance(json.loads(body), list)


def test_unknown_path_is_404_json_and_never_forwarded(gateway: GatewayHandle) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client(gateway).get("/nope", cast_to=object)
    assert caught.value.response.json()["error"]["type"] == "not_found_error"
    # A path llama-server does not serve to clients (its own /v1/health) is not forwarded.
    status, body = http_get(gateway.port, "/v1/health", {"Authorization": f"Bearer {ALICE}"})
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"


def test_x_api_key_header_is_accepted(gateway: GatewayHandle) -> None:
    status, _ = http_get(gateway.port, "/v1/models", {"X-API-Key": ALICE})
    assert status == 200


def test_request_id_is_echoed_when_sane_and_replaced_when_not(gateway: GatewayHandle) -> None:
    api = client(gateway)
    raw = api.models.with_raw_response.list(extra_headers={"X-Request-ID": "trace-123"})
    assert raw.headers["x-request-id"] == "trace-123"
    raw = api.models.with_raw_response.list(extra_headers={"X-Request-ID": "bad id <script>"})
    assert raw.headers["x-request-id"] not in ("", "bad id <script>")


def test_invalid_json_body_is_400(gateway: GatewayHandle) -> None:
    with pytest.raises(openai.BadRequestError):
        client(gateway).post("/chat/completions", body="{not json", cast_to=object)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_backend_validation_error_passes_through_as_400(
    gateway: GatewayHandle, stream: bool
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(gateway).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=-5, stream=stream
        )
    assert "max_tokens" in caught.value.message


def test_x_api_key_works_beside_a_platform_bearer_token(gateway: GatewayHandle) -> None:
    # RunPod's load balancer takes its own key in Authorization; ours rides in X-API-Key.
    client = openai.OpenAI(
        base_url=f"{gateway.url}/v1",
        api_key="rp-platform-key-not-ours",
        default_headers={"X-API-Key": ALICE},
        max_retries=0,
    )
    assert client.models.list().data
