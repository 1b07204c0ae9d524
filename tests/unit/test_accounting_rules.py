"""Token plans, body checks, usage tallies and admission: the pure rules behind the limits."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gguf_gateway import bodies, tokens
from gguf_gateway.limits import Admission, QueueFull, TokenWindow
from gguf_gateway.refusals import Refusal
from gguf_gateway.routes import ROUTES, Form
from gguf_gateway.sse import UsageTally

CTX = 1000
CHAT = "/v1/chat/completions"


def form_of(path: str) -> Form:
    """The body format the route table gives ``path``."""
    route = ROUTES.route(path, "POST")
    assert route is not None
    return route.form


@pytest.mark.parametrize(
    "path, payload, expected",
    [
        pytest.param(CHAT, {"max_tokens": 1, "n_predict": 200}, (1, 300), id="n_predict-wins"),
        pytest.param(
            CHAT, {"max_tokens": 500, "max_completion_tokens": 5}, (1, 105), id="mct-over-mt"
        ),
        pytest.param(CHAT, {}, (1, CTX), id="no-cap-is-the-slot-context"),
        pytest.param(CHAT, {"max_tokens": -1}, (1, CTX), id="minus-one-is-the-context"),
        pytest.param(CHAT, {"max_tokens": 5000}, (1, CTX), id="capped-by-the-context"),
        pytest.param(CHAT, {"max_tokens": 10, "n": 3}, (3, 330), id="choices"),
        pytest.param(CHAT, {"max_tokens": 10, "n_cmpl": 2, "n": 4}, (2, 220), id="n_cmpl-wins"),
        pytest.param(
            "/v1/completions",
            {"prompt": ["a", "b", "c"], "max_tokens": 10, "n": 2},
            (6, 660),
            id="prompts-times-choices",
        ),
        pytest.param(
            "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 10}, (1, 110), id="token-prompt"
        ),
        pytest.param(
            "/v1/responses",
            {"max_output_tokens": 7, "max_tokens": 900},
            (1, 107),
            id="max_output_tokens-replaces-max_tokens",
        ),
        pytest.param("/v1/messages", {"n_predict": 900, "max_tokens": 3}, (1, 103), id="messages"),
        pytest.param("/v1/messages", {}, (1, CTX), id="messages-default-4096-capped"),
        pytest.param(
            "/v1/embeddings", {"input": ["a", "b", "c", "d"]}, (4, 116), id="embedding-batch"
        ),
        pytest.param("/v1/rerank", {"documents": ["a", "b"]}, (2, 208), id="rerank"),
        pytest.param("/rerank", {"texts": ["a", "b", "c"]}, (3, 312), id="rerank-tei-texts"),
        pytest.param(
            "/completion",
            {"prompt": ["a", "b"], "n_predict": 10, "n_cmpl": 2},
            (4, 440),
            id="native-prompts-times-n_cmpl",
        ),
        pytest.param("/completions", {"n_predict": -1}, (1, CTX), id="native-no-cap"),
        pytest.param(
            "/infill",
            {"input_prefix": "a", "input_suffix": "b", "max_tokens": 3},
            (1, 103),
            id="infill",
        ),
        pytest.param("/chat/completions", {"max_tokens": 9, "n": 2}, (2, 218), id="chat-no-v1"),
        pytest.param("/responses", {"max_output_tokens": 1}, (1, 101), id="responses-no-v1"),
        pytest.param("/embedding", {"content": ["a", "b"]}, (2, 108), id="native-content-batch"),
        pytest.param("/embeddings", {"input": "a", "content": ["x", "y"]}, (1, 104), id="input"),
    ],
)
def test_plan_follows_llama_servers_reading_of_the_body(
    path: str, payload: dict[str, Any], expected: tuple[int, int]
) -> None:
    plan = tokens.plan(form_of(path), payload, 100, CTX)
    assert (plan.tasks, plan.tokens) == expected


@pytest.mark.parametrize(
    "payload, param",
    [
        ({"max_tokens": "200"}, "max_tokens"),
        ({"n_predict": True}, "n_predict"),
        ({"n": 0}, "n"),
        ({"n": 1000}, "n"),
        ({"max_tokens": 1.5}, "max_tokens"),
    ],
)
def test_wrongly_typed_lengths_are_refused_naming_the_field(
    payload: dict[str, Any], param: str
) -> None:
    with pytest.raises(Refusal) as caught:
        tokens.plan(Form.CHAT, payload, 10, CTX)
    assert caught.value.status == 400 and caught.value.param == param


BIG = 20000  # a slot context larger than /v1/messages' default length


@pytest.mark.parametrize(
    "path, payload, expected",
    [
        pytest.param(
            "/v1/responses",
            {"max_output_tokens": 7, "max_completion_tokens": 50},
            (1, 150),
            id="responses-max_completion_tokens-beats-max_output_tokens",
        ),
        pytest.param(
            "/v1/responses",
            {"max_output_tokens": None, "max_tokens": 5},
            (1, BIG),
            id="responses-null-max_output_tokens-replaces-max_tokens",
        ),
        pytest.param("/v1/messages", {"max_tokens": -1}, (1, BIG), id="messages-minus-one"),
        pytest.param("/v1/messages", {"max_tokens": None}, (1, BIG), id="messages-null"),
        pytest.param("/v1/messages", {}, (1, 4196), id="messages-absent-is-4096"),
        pytest.param(
            "/v1/messages", {"max_tokens": 2**32 - 1}, (1, BIG), id="messages-wrapping-int32"
        ),
        pytest.param(
            "/v1/embeddings", {"content": ["a", "b", "c"]}, (3, 112), id="embeddings-content"
        ),
        pytest.param(
            "/v1/embeddings",
            {"input": "a", "content": ["a", "b", "c"]},
            (1, 104),
            id="embeddings-input-wins",
        ),
        pytest.param(
            "/v1/embeddings", {"input": [1, "a", 2]}, (1, 104), id="embeddings-mixed-token-prompt"
        ),
        pytest.param("/embedding", {"content": ["a", "b"]}, (2, 108), id="native-embedding"),
        pytest.param("/v1/rerank", {"texts": ["a", "b", "c"]}, (3, 312), id="rerank-texts"),
        pytest.param(
            "/v1/rerank",
            {"documents": "not a list", "texts": ["a", "b"]},
            (2, 208),
            id="rerank-bad-documents-fall-back-to-texts",
        ),
        pytest.param("/reranking", {"documents": ["a", "b"]}, (2, 208), id="native-reranking"),
        pytest.param(
            "/completion", {"prompt": ["a", "b"], "n_predict": 10}, (2, 220), id="native-batch"
        ),
    ],
)
def test_plan_follows_aliases_and_replacements(
    path: str, payload: dict[str, Any], expected: tuple[int, int]
) -> None:
    plan = tokens.plan(form_of(path), payload, 100, BIG)
    assert (plan.tasks, plan.tokens) == expected


@pytest.mark.parametrize(
    "path, payload, param",
    [
        ("/v1/messages", {"max_tokens": -2}, "max_tokens"),
        ("/v1/responses", {"max_output_tokens": -5}, "max_output_tokens"),
        (CHAT, {"n_predict": -100}, "n_predict"),
        ("/v1/rerank", {"documents": ["a"], "top_n": -1}, "top_n"),
        ("/v1/rerank", {"documents": ["a"], "top_n": 2**32 - 1}, "top_n"),
    ],
)
def test_values_llama_server_cannot_take_are_refused(
    path: str, payload: dict[str, Any], param: str
) -> None:
    with pytest.raises(Refusal) as caught:
        tokens.plan(form_of(path), payload, 10, CTX)
    assert caught.value.status == 400 and caught.value.param == param


def test_id_slot_is_dropped() -> None:
    payload = {"id_slot": 2, "messages": []}
    assert tokens.strip_server_fields(payload) and "id_slot" not in payload


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"[" * 100_000, "nests deeper"),
        (b"[1, 2]", "JSON object"),
        (b"\xff\xfe", "UTF-8"),
        (b'{"a": ', "not valid JSON"),
        (json.dumps({"a": [[[[{"b": [1]}]]]] * 1}).encode(), None),
    ],
)
def test_bodies_that_cannot_be_served_get_a_400(body: bytes, fragment: str | None) -> None:
    if fragment is None:
        bodies.inspect(bodies.parse_object(body), allow_remote_media=False)
        return
    with pytest.raises(Refusal) as caught:
        bodies.inspect(bodies.parse_object(body), allow_remote_media=False)
    assert caught.value.status == 400 and fragment in caught.value.message


def test_nesting_beyond_the_limit_is_refused_even_when_python_parses_it() -> None:
    deep: object = 1
    for _ in range(bodies.MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(Refusal, match="nests deeper"):
        bodies.inspect({"x": deep}, allow_remote_media=True)


def image(url: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
        ]
    }


@pytest.mark.parametrize(
    "payload",
    [
        image("http://169.254.169.254/latest/meta-data"),
        image("file:///etc/passwd"),
        {"input": [{"type": "input_image", "image_url": "https://example.com/x.png"}]},
        {"input": [{"type": "input_file", "file_url": "https://example.com/x.pdf"}]},
        {"messages": [{"content": [{"source": {"type": "url", "url": "http://x/y.png"}}]}]},
        {"messages": [{"content": [{"input_audio": {"url": "http://x/a.wav"}}]}]},
    ],
)
def test_remote_media_is_refused(payload: dict[str, Any]) -> None:
    with pytest.raises(Refusal) as caught:
        bodies.inspect(payload, allow_remote_media=False)
    assert caught.value.status == 400 and "ALLOW_REMOTE_MEDIA" in caught.value.message
    bodies.inspect(payload, allow_remote_media=True)


def test_inline_media_passes() -> None:
    bodies.inspect(image("data:image/png;base64,iVBORw0KGgo="), allow_remote_media=False)
    bodies.inspect(
        {"messages": [{"content": [{"input_audio": {"data": "UklGR", "format": "wav"}}]}]},
        allow_remote_media=False,
    )


def sse(*events: dict[str, Any]) -> bytes:
    # Compact, as llama-server writes it.
    return b"".join(
        b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events
    )


def test_usage_is_summed_over_every_task_and_unwanted_usage_chunks_dropped() -> None:
    usage = {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    payload = sse(
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
        {"choices": [], "usage": usage},
        {"choices": [{"index": 1, "delta": {}, "finish_reason": "length"}]},
        {"choices": [], "usage": usage},
    )
    tally = UsageTally()
    kept = tally.add_events(payload, drop_usage_only=True)
    assert (tally.prompt, tally.completion) == (8, 10)
    assert b'"usage"' not in kept and kept.count(b"data: ") == 2 and kept.endswith(b"\n\n")


def test_usage_in_every_format() -> None:
    tally = UsageTally()
    # A text completion's last chunk still has choices; it is kept.
    kept = tally.add_events(
        sse({"choices": [{"text": "x"}], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}),
        drop_usage_only=True,
    )
    assert b"usage" in kept
    tally.add_events(
        b"event: response.completed\ndata: "
        + json.dumps({"response": {"usage": {"input_tokens": 5, "output_tokens": 6}}}).encode()
        + b"\n\n",
        drop_usage_only=False,
    )
    tally.add_events(
        sse(
            {"message": {"usage": {"input_tokens": 1, "cache_read_input_tokens": 2}}},
            {"type": "message_delta", "usage": {"output_tokens": 4}},
        ),
        drop_usage_only=False,
    )
    tally.add_body(json.dumps({"usage": {"prompt_tokens": 7, "total_tokens": 7}}).encode())
    assert (tally.prompt, tally.completion) == (3 + 5 + 3 + 7, 2 + 6 + 4)


def test_token_window_settles_and_refuses_what_can_never_fit() -> None:
    window = TokenWindow(100)
    first = window.try_reserve(80, now=0.0)
    assert not isinstance(first, float)
    assert window.try_reserve(30, now=1.0) == pytest.approx(59.0)
    first.tokens = 10  # settled to real usage
    assert not isinstance(window.try_reserve(30, now=1.0), float)
    assert window.try_reserve(101, now=2.0) == float("inf")


def test_admission_counts_slots_and_keeps_queue_places_per_key() -> None:
    async def scenario() -> list[str]:
        gate = Admission(limit=4, queue_size=4, timeout=5, per_key=2)
        order: list[str] = []
        await gate.acquire("big", 3)
        assert gate.active == 3

        async def waiter(key: str, slots: int) -> None:
            await gate.acquire(key, slots)
            order.append(key)

        tasks = [
            asyncio.create_task(waiter("flood", 3)),
            asyncio.create_task(waiter("flood", 1)),
        ]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as full:
            await gate.acquire("flood", 1)
        assert full.value.per_key
        tasks.append(asyncio.create_task(waiter("quiet", 1)))
        await asyncio.sleep(0)
        assert gate.waiting == 3
        gate.release(3)  # flood's 3, then quiet's 1 in turn, then flood's 1 does not fit
        await asyncio.sleep(0)
        assert order == ["flood", "quiet"] and gate.active == 4
        gate.release(3)
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == ["flood", "quiet", "flood"]
