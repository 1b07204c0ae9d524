"""Assembling a non-streaming response from stream chunks, for what a random model cannot
produce on demand (tool calls, reasoning, several choices, errors mid-stream)."""

from __future__ import annotations

import json

import pytest

from gguf_gateway.assemble import MAX_ASSEMBLED_BYTES, Assembler, NativeAssembler, TooLarge
from gguf_gateway.routes import Form
from gguf_gateway.sse import SseEvents, UsageTally


def events(*chunks: dict[str, object]) -> list[bytes]:
    stream = (
        b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    )
    splitter = SseEvents()
    # Fed in awkward pieces: event boundaries must not depend on read sizes.
    out: list[bytes] = []
    for i in range(0, len(stream), 7):
        out += splitter.feed(stream[i : i + 7])
    return out


META = {
    "id": "chatcmpl-1",
    "created": 1,
    "model": "m",
    "system_fingerprint": "b1",
    "object": "chat.completion.chunk",
}


def test_tool_calls_reasoning_and_usage_are_merged() -> None:
    assembler = Assembler(Form.CHAT, UsageTally())
    for payload in events(
        {**META, "choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]},
        {**META, "choices": [{"index": 0, "delta": {"reasoning_content": "think "}}]},
        {**META, "choices": [{"index": 0, "delta": {"reasoning_content": "more"}}]},
        {**META, "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}}]},
        {**META, "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}}]},
        {**META, "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "\"Oslo\"}"}}]}}]},
        {**META, "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 1, "id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]}}]},
        {**META, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}], "timings": {"predicted_n": 9}},
        {**META, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}},
    ):  # fmt: skip
        assembler.add(payload)
    assert assembler.finished and assembler.error is None
    result = assembler.result()
    message = result["choices"][0]["message"]
    assert message["content"] is None
    assert message["reasoning_content"] == "think more"
    assert message["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
        },
        {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}},
    ]
    assert result["choices"][0]["finish_reason"] == "tool_calls"
    assert result["object"] == "chat.completion" and result["id"] == "chatcmpl-1"
    assert result["usage"]["total_tokens"] == 14 and result["timings"] == {"predicted_n": 9}


def test_several_choices_and_text_completions() -> None:
    assembler = Assembler(Form.TEXT, UsageTally())
    meta = {**META, "object": "text_completion"}
    for payload in events(
        {**meta, "choices": [{"index": 1, "text": "b", "finish_reason": None}]},
        {**meta, "choices": [{"index": 0, "text": "a", "finish_reason": None}]},
        {**meta, "choices": [{"index": 0, "text": "a", "finish_reason": "length"}]},
        {**meta, "choices": [{"index": 1, "text": "", "finish_reason": "stop"}]},
    ):
        assembler.add(payload)
    result = assembler.result()
    assert [(c["index"], c["text"], c["finish_reason"]) for c in result["choices"]] == [
        (0, "aa", "length"),
        (1, "b", "stop"),
    ]
    assert result["object"] == "text_completion"


def test_an_error_mid_stream_becomes_the_response() -> None:
    assembler = Assembler(Form.CHAT, UsageTally())
    for payload in events(
        {**META, "choices": [{"index": 0, "delta": {"content": "x"}}]},
        {"error": {"code": 400, "message": "context full", "type": "exceed_context_size_error"}},
    ):
        assembler.add(payload)
    assert assembler.finished
    assert assembler.error == (
        400,
        {"error": {"code": 400, "message": "context full", "type": "exceed_context_size_error"}},
    )


def logprob(token: str) -> dict[str, object]:
    entry = {"id": 7, "token": token, "bytes": [1], "logprob": -0.5}
    return {"content": [{**entry, "top_logprobs": [{**entry, "token": '"q'}]}]}


def test_logprobs_are_kept_as_text_and_spliced_per_choice() -> None:
    assembler = Assembler(Form.CHAT, UsageTally())
    for i in range(3):
        for index in (1, 0):
            # Generated text that looks like the splice marker must stay text.
            delta = {"content": f"\x00{index}-{i}"}
            chunk = {"index": index, "delta": delta, "logprobs": logprob(f"t{index}{i}")}
            assembler.add(json.dumps({**META, "choices": [chunk]}).encode())
    assembler.add(b"[DONE]")
    result = assembler.result()
    for index in (0, 1):
        choice = result["choices"][index]
        assert choice["message"]["content"] == "".join(f"\x00{index}-{i}" for i in range(3))
        assert [e["token"] for e in choice["logprobs"]["content"]] == [
            f"t{index}{i}" for i in range(3)
        ]
        assert choice["logprobs"]["content"][0]["top_logprobs"][0]["token"] == '"q'


def test_a_response_past_the_bound_is_refused_not_held() -> None:
    assembler = Assembler(Form.TEXT, UsageTally())
    piece = {"index": 0, "text": "x" * 1000, "logprobs": logprob("x" * 1000)}
    chunk = json.dumps({**META, "choices": [piece]}).encode()
    with pytest.raises(TooLarge, match='"stream": true'):
        for _ in range(MAX_ASSEMBLED_BYTES // 1000):
            assembler.add(chunk)
    assert MAX_ASSEMBLED_BYTES < assembler.budget.held < MAX_ASSEMBLED_BYTES + 4 * len(chunk)


def native_events(index: int, pieces: int, probs: bool) -> list[bytes]:
    out = []
    for i in range(pieces):
        event: dict[str, object] = {"index": index, "content": f"p{i}", "tokens": [300 + i]}
        if probs:
            entry = {"id": 300 + i, "token": f"p{i}", "bytes": [112], "logprob": -1.0}
            event["completion_probabilities"] = [{**entry, "top_logprobs": [entry]}]
        out.append(json.dumps({**event, "stop": False}).encode())
    final = {"index": index, "content": "", "tokens": [], "stop": True, "tokens_predicted": pieces}
    out.append(json.dumps(final).encode())
    return out


def test_native_probabilities_are_spliced_per_task() -> None:
    assembler = NativeAssembler(UsageTally(), return_tokens=True)
    for a, b in zip(native_events(0, 3, True), native_events(1, 3, False)):
        assembler.add(b)
        assembler.add(a)
    first, second = assembler.result()
    assert first["content"] == "p0p1p2" and first["tokens"] == [300, 301, 302]
    assert [p["token"] for p in first["completion_probabilities"]] == ["p0", "p1", "p2"]
    assert "completion_probabilities" not in second and second["tokens_predicted"] == 3


def test_a_native_reply_past_the_bound_is_refused_not_held() -> None:
    assembler = NativeAssembler(UsageTally())
    event = {"index": 0, "content": "x" * 1000, "tokens": [1] * 100, "stop": False}
    chunk = json.dumps(event).encode()
    with pytest.raises(TooLarge):
        for _ in range(MAX_ASSEMBLED_BYTES // 1000):
            assembler.add(chunk)


def test_a_responses_stream_is_rebuilt_from_its_completed_event() -> None:
    from gguf_gateway.assemble import ResponsesAssembler

    tally = UsageTally()
    assembler = ResponsesAssembler(tally)
    assembler.add(b'{"type":"response.output_text.delta","delta":"hi"}')
    with pytest.raises(ValueError):
        assembler.body()  # no response.completed: nothing to build the reply from
    usage = {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}
    completed = {
        "type": "response.completed",
        "response": {"id": "resp_1", "object": "response", "created_at": 9, "usage": usage},
    }
    assembler.add(json.dumps(completed).encode())
    assert assembler.finished and (tally.prompt, tally.completion) == (5, 2)
    whole = json.loads(assembler.body())
    assert list(whole) == sorted(whole) and whole["completed_at"] == 9
