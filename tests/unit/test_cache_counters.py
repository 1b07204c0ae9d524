"""Prompt-cache counters read "nothing cached": in bodies, in events, split across reads."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gguf_gateway.cache_counters import conceal, conceal_payload, without_cache_metrics
from gguf_gateway.http11 import LAST_CHUNK, ChunkedDecoder, Limits, chunk
from gguf_gateway.pipe import PipeEvent
from gguf_gateway.sse import UsageTally
from support.loops import LOOPS, run
from test_pipe import client_channel, close_all, piped, received

# The final chunk of an OpenAI chat stream from llama-server b11434, 7 of 12 prompt
# tokens found in the cache.
FINAL = {
    "choices": [],
    "usage": {
        "completion_tokens": 3,
        "prompt_tokens": 12,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 7},
    },
    "timings": {
        "cache_n": 7,
        "prompt_n": 5,
        "prompt_ms": 10.0,
        "prompt_per_token_ms": 2.0,
        "prompt_per_second": 500.0,
        "predicted_n": 3,
        "predicted_ms": 3.0,
    },
}


def test_openai_usage_and_timings_read_as_nothing_cached() -> None:
    message: dict[str, Any] = json.loads(json.dumps(FINAL))
    assert conceal(message)
    assert message["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert message["usage"]["prompt_tokens"] == 12  # totals are the same either way
    timings = message["timings"]
    assert (timings["cache_n"], timings["prompt_n"]) == (0, 12)
    # Rates follow the reported count, so they cannot be divided back into the real one.
    assert timings["prompt_per_token_ms"] == pytest.approx(10.0 / 12)
    assert timings["prompt_per_second"] == pytest.approx(1200.0)
    assert (timings["predicted_n"], timings["predicted_ms"]) == (3, 3.0)
    assert not conceal(message)  # nothing left to hide: the body stays as it is


@pytest.mark.parametrize(
    "message, expected",
    [
        pytest.param(
            {"type": "message_start", "message": {"usage": {"input_tokens": 5, "cache_read_input_tokens": 7}}},
            {"type": "message_start", "message": {"usage": {"input_tokens": 12, "cache_read_input_tokens": 0}}},
            id="anthropic",
        ),
        pytest.param(
            {"type": "response.completed", "response": {"usage": {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 7}}}},
            {"type": "response.completed", "response": {"usage": {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0}}}},
            id="responses",
        ),
        pytest.param(
            [{"content": "a", "timings": {"cache_n": 7, "prompt_n": 5}}, {"content": "b"}],
            [{"content": "a", "timings": {"cache_n": 0, "prompt_n": 12}}, {"content": "b"}],
            id="native-batch",
        ),
        pytest.param(
            {"choices": [], "prompt_progress": {"total": 12, "cache": 7, "processed": 7}},
            {"choices": []},
            id="progress",
        ),
    ],
)  # fmt: skip
def test_every_format_reads_as_nothing_cached(message: object, expected: object) -> None:
    assert conceal(message)
    assert message == expected


def test_events_are_tallied_with_the_real_counts_then_concealed() -> None:
    tally = UsageTally()
    content = b'data: {"choices":[{"delta":{"content":"\\"cache it"}}]}'
    final = b"data: " + json.dumps(FINAL).encode()
    out = tally.add_events(content + b"\n\n" + final + b"\n\n", False, conceal=True)
    events = out.split(b"\n\n")
    assert events[0] == content  # a false hit in the text is parsed, and left as it was
    assert json.loads(events[1][6:])["timings"]["cache_n"] == 0
    assert (tally.prompt, tally.cached) == (12, 7)  # the ledger keeps what happened


def test_open_metrics_lose_llama_servers_cache_counters() -> None:
    text = (
        "# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed\n"
        "# TYPE llamacpp:prompt_tokens_total counter\n"
        "llamacpp:prompt_tokens_total 42\n"
        "llamacpp:prompt_tokens_cached_total 7\n"
        "llamacpp:tokens_predicted_total 9\n"
    )
    assert without_cache_metrics(text) == "llamacpp:tokens_predicted_total 9\n"


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_counter_in_the_second_half_of_a_split_chunk_is_still_concealed(
    loop_name: str,
) -> None:
    """A read that ends inside a chunk is held: the half with ``"cache_n"`` in it would
    otherwise start mid-chunk, where nothing can be rewritten."""

    async def body() -> None:
        client, reader = await client_channel()
        pipe, llama = await piped(client, conceal=True)
        first = chunk(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n')
        final = chunk(b"data: " + json.dumps(FINAL).encode() + b"\n\n")
        cut = final.index(b'"usage"') - 3  # before any mark
        llama.sendall(first + final[:cut])
        await asyncio.sleep(0.05)
        llama.sendall(final[cut:] + LAST_CHUNK)
        assert await pipe.next_event() is PipeEvent.DONE
        decoder = ChunkedDecoder(Limits())
        events = decoder.feed(bytearray(received(reader, pipe.sent))).split(b"\n\n")
        assert decoder.done and events[0] == b'data: {"choices":[{"delta":{"content":"hi"}}]}'
        final_event = json.loads(events[1][6:])
        assert final_event["timings"]["cache_n"] == 0
        assert final_event["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        close_all(pipe, client, reader, llama)

    run(loop_name, body)


def test_an_event_for_the_assembler_is_concealed_and_says_what_it_hid() -> None:
    payload = json.dumps(FINAL).encode()
    concealed, hidden = conceal_payload(payload)
    assert hidden == 7 and json.loads(concealed)["timings"]["cache_n"] == 0
    assert conceal_payload(concealed) == (concealed, 0)  # nothing left to hide
    assert conceal_payload(b"[DONE]") == (b"[DONE]", 0)
