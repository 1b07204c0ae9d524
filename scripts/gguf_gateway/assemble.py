"""Turn a llama-server SSE stream back into the non-streaming JSON response.

The gateway runs non-streaming chat and text completions as streams on the backend: a
client that goes away then closes the stream, and llama-server stops generating at once
(it keeps going on a non-streaming request whose client has gone). The client still gets
the response llama-server would have sent: the same fields, content joined from the
deltas, tool calls merged by index, logprobs concatenated, usage and timings from the
final chunk of each task. With several choices llama-server itself reports the first
task's usage only; the assembled response reports the sum over all of them, as they were
all generated.
"""

from __future__ import annotations

import json
from typing import Any

from .sse import UsageTally


class _Choice:
    def __init__(self, index: int) -> None:
        self.index = index
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.logprobs: list[Any] | None = None
        self.finish_reason: str | None = None

    def add_logprobs(self, logprobs: Any) -> None:
        if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
            self.logprobs = (self.logprobs or []) + logprobs["content"]

    def add_tool_calls(self, deltas: list[dict[str, Any]]) -> None:
        for delta in deltas:
            call = self.tool_calls.setdefault(
                int(delta.get("index", len(self.tool_calls))),
                {"type": "function", "function": {"name": "", "arguments": ""}},
            )
            if delta.get("id"):
                call["id"] = delta["id"]
            if delta.get("type"):
                call["type"] = delta["type"]
            function = delta.get("function") or {}
            if function.get("name"):
                call["function"]["name"] += function["name"]
            if function.get("arguments"):
                call["function"]["arguments"] += function["arguments"]


class Assembler:
    """Accumulates stream chunks for ``/v1/chat/completions`` or ``/v1/completions``."""

    def __init__(self, path: str, tally: UsageTally) -> None:
        self.chat = path == "/v1/chat/completions"
        self.meta: dict[str, Any] = {}
        self.tally = tally
        self.usage: Any = None  # the one task's usage as llama-server wrote it
        self.usage_events = 0
        self.timings: Any = None
        self.choices: dict[int, _Choice] = {}
        self.finished = False
        self.error: tuple[int, dict[str, Any]] | None = None

    def add(self, payload: bytes) -> None:
        if payload == b"[DONE]":
            self.finished = True
            return
        chunk = json.loads(payload)
        if not isinstance(chunk, dict):
            raise ValueError("stream chunk is not a JSON object")
        if "error" in chunk:
            error = chunk["error"]
            code = error.get("code") if isinstance(error, dict) else None
            status = code if isinstance(code, int) and 400 <= code < 600 else 500
            self.error = (status, chunk)
            self.finished = True
            return
        for field in ("id", "created", "model", "system_fingerprint"):
            if field in chunk and field not in self.meta:
                self.meta[field] = chunk[field]
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
            self.usage_events += 1
            self.tally.add(self.usage)
        if chunk.get("timings") is not None:
            self.timings = chunk["timings"]
        for raw in chunk.get("choices") or ():
            index = int(raw.get("index", 0))
            choice = self.choices.get(index)
            if choice is None:
                choice = self.choices[index] = _Choice(index)
            if raw.get("finish_reason") is not None:
                choice.finish_reason = raw["finish_reason"]
            if raw.get("logprobs") is not None:
                choice.add_logprobs(raw["logprobs"])
            if self.chat:
                delta = raw.get("delta") or {}
                if delta.get("content"):
                    choice.content.append(delta["content"])
                if delta.get("reasoning_content"):
                    choice.reasoning.append(delta["reasoning_content"])
                if delta.get("tool_calls"):
                    choice.add_tool_calls(delta["tool_calls"])
            elif raw.get("text"):
                choice.content.append(raw["text"])

    def _chat_choice(self, choice: _Choice) -> dict[str, Any]:
        content = "".join(choice.content)
        message: dict[str, Any] = {"role": "assistant"}
        # llama-server sends null content beside tool calls when there is no text.
        message["content"] = content if content or not choice.tool_calls else None
        if choice.reasoning:
            message["reasoning_content"] = "".join(choice.reasoning)
        if choice.tool_calls:
            message["tool_calls"] = [choice.tool_calls[i] for i in sorted(choice.tool_calls)]
        out: dict[str, Any] = {
            "finish_reason": choice.finish_reason,
            "index": choice.index,
            "message": message,
        }
        if choice.logprobs is not None:
            out["logprobs"] = {"content": choice.logprobs}
        return out

    def _text_choice(self, choice: _Choice) -> dict[str, Any]:
        return {
            "text": "".join(choice.content),
            "index": choice.index,
            "logprobs": {"content": choice.logprobs} if choice.logprobs is not None else None,
            "finish_reason": choice.finish_reason,
        }

    def result(self) -> dict[str, Any]:
        build = self._chat_choice if self.chat else self._text_choice
        response: dict[str, Any] = {
            "choices": [build(self.choices[i]) for i in sorted(self.choices)],
        }
        for field in ("created", "model", "system_fingerprint"):
            if field in self.meta:
                response[field] = self.meta[field]
        response["object"] = "chat.completion" if self.chat else "text_completion"
        if self.usage_events == 1:
            response["usage"] = self.usage
        elif self.usage_events:
            response["usage"] = self.tally.as_openai()
        if "id" in self.meta:
            response["id"] = self.meta["id"]
        if self.timings is not None:
            response["timings"] = self.timings
        return response
