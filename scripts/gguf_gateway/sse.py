"""Server-sent events from llama-server: splitting them, and reading the usage they carry.

llama-server puts ``"usage":`` only in the final event of each task (one per choice and
per prompt): the usage-only chunk of an OpenAI chat stream, the last chunk of a text
completion, ``response.completed`` on /v1/responses, ``message_start`` and
``message_delta`` on /v1/messages. JSON escaping keeps the marker out of token text, so
the relay looks for it with one substring search per read and parses only those reads.
"""

from __future__ import annotations

import json
from typing import Any

from . import cache_counters
from .cache_counters import CACHE_MARK

USAGE_MARK = b'"usage":'
# llama.cpp's native completion format has no usage object: a task's final event
# (``"stop":true``; every other event says false) carries its token counts.
NATIVE_MARK = b'"stop":true'
# Vertex AI's predictions: one whole reply per instance, each with its own counts.
PREDICTIONS_MARK = b'"predictions":'
# The extra chunk stream_options.include_usage adds: no choices, only usage.
USAGE_ONLY = b'"choices":[]'


class SseEvents:
    """Split decoded SSE bytes into the ``data`` payload of each complete event."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        if not data:
            return []
        self._buf += data
        payloads: list[bytes] = []
        while True:
            end = self._buf.find(b"\n\n")
            if end < 0:
                return payloads
            event = bytes(self._buf[:end])
            del self._buf[: end + 2]
            if b"data:" in event:
                payloads.append(data_of(event))


def data_of(event: bytes) -> bytes:
    """The ``data`` of one SSE event (its data lines joined, as the SSE spec says)."""
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines)


def with_data(event: bytes, data: bytes) -> bytes:
    """``event`` with its data lines replaced by one line holding ``data`` (one JSON line)."""
    lines = [line for line in event.split(b"\n") if not line.startswith(b"data:")]
    return b"\n".join([*lines, b"data: " + data])


def usage_of(message: object) -> dict[str, Any] | None:
    """The usage object of one parsed event or response body, wherever its format puts it."""
    if not isinstance(message, dict):
        return None
    if message.get("stop") is True and "tokens_evaluated" in message:
        return _native_usage(message)
    usage = message.get("usage")
    if isinstance(usage, dict):
        return usage
    # /v1/responses: response.completed; /v1/messages: message_start.
    for holder in ("response", "message"):
        inner = message.get(holder)
        if isinstance(inner, dict) and isinstance(inner.get("usage"), dict):
            return inner["usage"]  # type: ignore[no-any-return]
    return None


def _native_usage(final: dict[str, Any]) -> dict[str, Any]:
    """A native final event's counts, in OpenAI's names (cache hits from its timings)."""
    usage: dict[str, Any] = {
        "prompt_tokens": final.get("tokens_evaluated"),
        "completion_tokens": final.get("tokens_predicted"),
    }
    timings = final.get("timings")
    if isinstance(timings, dict) and isinstance(timings.get("cache_n"), int):
        usage["prompt_tokens_details"] = {"cached_tokens": timings["cache_n"]}
    return usage


def _int(usage: dict[str, Any], name: str) -> int | None:
    value = usage.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class UsageTally:
    """The tokens llama-server reports for one request, summed over all its tasks.

    ``mark``: the bytes that only the events carrying usage contain, in the request's
    format (USAGE_MARK, or NATIVE_MARK for llama.cpp's native completions).
    """

    __slots__ = ("prompt", "completion", "cached", "mark")

    def __init__(self) -> None:
        self.prompt: int | None = None
        self.completion: int | None = None
        self.cached: int | None = None
        self.mark = USAGE_MARK

    def add(self, usage: dict[str, Any]) -> None:
        # OpenAI names, then Responses/Anthropic ones. Anthropic counts cache reads
        # apart from input_tokens; both were prompt tokens llama-server processed.
        prompt = _int(usage, "prompt_tokens")
        if prompt is None:
            prompt = _int(usage, "input_tokens")
            read = _int(usage, "cache_read_input_tokens")
            if prompt is not None and read:
                prompt += read
        completion = _int(usage, "completion_tokens")
        if completion is None:
            completion = _int(usage, "output_tokens")
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
        cached = _int(details, "cached_tokens") if isinstance(details, dict) else None
        if cached is None:
            cached = _int(usage, "cache_read_input_tokens")
        if prompt is not None:
            self.prompt = (self.prompt or 0) + prompt
        if completion is not None:
            self.completion = (self.completion or 0) + completion
        if cached is not None:
            self.cached = (self.cached or 0) + cached

    @property
    def known(self) -> bool:
        return self.prompt is not None or self.completion is not None

    def add_body(self, body: bytes) -> None:
        """Usage from a whole JSON response body, if it has any."""
        if self.mark not in body:
            return
        try:
            message = json.loads(body)
        except ValueError:
            return
        predictions = message.get("predictions") if isinstance(message, dict) else None
        for item in predictions if isinstance(predictions, list) else (message,):
            usage = usage_of(item)
            if usage is not None:
                self.add(usage)

    def add_events(self, payload: bytes, drop_usage_only: bool, conceal: bool = False) -> bytes:
        """Tally the usage in complete SSE events; returns them, less unwanted usage chunks.

        ``payload`` is decoded SSE text made of whole events. ``conceal``: events with
        prompt-cache counters are rewritten to read "nothing cached" (cache_counters.py),
        after the tally has the real figures.
        """
        events = payload.split(b"\n\n")
        kept: list[bytes] = []
        for event in events:
            hidden = conceal and CACHE_MARK in event
            if self.mark in event or hidden:
                try:
                    message = json.loads(data_of(event))
                except ValueError:
                    message = None
                usage = usage_of(message)
                if usage is not None:
                    self.add(usage)
                    if drop_usage_only and USAGE_ONLY in event:
                        continue
                if hidden and cache_counters.conceal(message):
                    compact = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
                    event = with_data(event, compact.encode())
            kept.append(event)
        return b"\n\n".join(kept)

    def as_openai(self) -> dict[str, Any]:
        prompt, completion = self.prompt or 0, self.completion or 0
        usage: dict[str, Any] = {
            "completion_tokens": completion,
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
        }
        if self.cached is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached}
        return usage
