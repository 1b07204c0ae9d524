"""Turn a llama-server SSE stream back into the non-streaming JSON response.

The gateway runs non-streaming completions (OpenAI chat and text, llama.cpp's native
``/completion`` and ``/infill``) as streams on the backend: a client that goes away then
closes the stream, and llama-server stops generating at once. The client still gets the
response llama-server would have sent, in the route's own format (``assembler_for``
chooses by the route's body format). OpenAI formats: the same fields, content joined from the
deltas, tool calls merged by index, logprobs concatenated, usage and timings from the
final chunk of each task. With several choices llama-server itself reports the first
task's usage only; the assembled response reports the sum over all of them, as they were
all generated.

What it holds is bounded: MAX_ASSEMBLED_BYTES of text, tool calls and logprobs, counted
as they arrive. Logprobs are kept as the JSON text llama-server sent (parsed, they took
about six times the memory) and spliced into the response at the end. Past the bound
``add`` raises :class:`TooLarge`: the relay then stops the generation and refuses, and
the client can ask for the same thing as a stream, which is relayed without holding it.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from .routes import Form
from .sse import UsageTally, usage_of

# What one non-streaming response may hold while it is assembled. The whole body is
# built from it at the end, so the peak is a few times this.
MAX_ASSEMBLED_BYTES = 16 * 1024 * 1024
# What keeping one piece costs besides its characters (a str object and a list slot).
_PIECE_OVERHEAD = 64
# One token id kept in a list (an int object and a list slot).
_TOKEN_SIZE = 36


class TooLarge(Exception):
    """The response would hold more than MAX_ASSEMBLED_BYTES."""

    def __init__(self) -> None:
        super().__init__(
            f"the response outgrew the {MAX_ASSEMBLED_BYTES} bytes the gateway assembles "
            'for a non-streaming request: ask for it with "stream": true'
        )


def _error_status(event: dict[str, Any]) -> int:
    """The status to answer an error event with: its ``error.code`` when that is an HTTP
    error status, else 500."""
    error = event["error"]
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, int) and 400 <= code < 600 else 500


class Budget:
    """What one assembled response holds, counted as it arrives."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = 0

    def take(self, size: int) -> None:
        self.held += size
        if self.held > MAX_ASSEMBLED_BYTES:
            raise TooLarge()

    def keep(self, pieces: list[str], text: str) -> None:
        pieces.append(text)
        self.take(len(text) + _PIECE_OVERHEAD)


class JsonLists:
    """Lists kept as the JSON text they arrived as, one per key, spliced into the response.

    Parsed, token probabilities took about six times the memory of their text. The
    response is built with a marker string in each list's place; ``dumps`` then puts the
    list's text where the marker's JSON string is. A marker is a NUL (escaped in JSON)
    and a random nonce, which no generated text can hold.
    """

    __slots__ = ("budget", "lists", "_nonce")

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.lists: dict[int, list[str]] = {}
        self._nonce = ""

    def extend(self, key: int, items: list[Any]) -> None:
        pieces = self.lists.setdefault(key, [])
        if items:
            self.budget.keep(pieces, json.dumps(items, ensure_ascii=False)[1:-1])

    def marker(self, key: int) -> str | None:
        """What stands for list ``key`` in the response; None when there is no such list."""
        if key not in self.lists:
            return None
        if not self._nonce:
            self._nonce = secrets.token_hex(8)
        return f"\x00{self._nonce}-{key}"

    def dumps(self, response: Any) -> bytes:
        """``response`` as JSON bytes, each marker replaced by its list.

        The lists' text goes straight into the output piece by piece (no joined copy of
        it), so the peak is what is held plus the body once more.
        """
        text = json.dumps(response, ensure_ascii=False)
        if not self._nonce:
            return text.encode()
        mark = f'"\\u0000{self._nonce}-'
        out: list[bytes] = []
        start = 0
        while (at := text.find(mark, start)) >= 0:
            out.append(text[start:at].encode())
            end = text.index('"', at + len(mark))
            out.append(b"[")
            for i, piece in enumerate(self.lists[int(text[at + len(mark) : end])]):
                if i:
                    out.append(b", ")
                out.append(piece.encode())
            out.append(b"]")
            start = end + 1
        out.append(text[start:].encode())
        return b"".join(out)


class _Choice:
    def __init__(self, index: int) -> None:
        self.index = index
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None

    def add_tool_calls(self, deltas: list[dict[str, Any]]) -> int:
        held = 0
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
                held += len(function["name"])
            if function.get("arguments"):
                call["function"]["arguments"] += function["arguments"]
                held += len(function["arguments"])
        return held + _PIECE_OVERHEAD


class Assembler:
    """Accumulates OpenAI stream chunks: chat (``Form.CHAT``) or text completions."""

    def __init__(self, form: Form, tally: UsageTally) -> None:
        self.chat = form is Form.CHAT
        self.meta: dict[str, Any] = {}
        self.tally = tally
        self.usage: Any = None  # the one task's usage as llama-server wrote it
        self.usage_events = 0
        self.timings: Any = None
        self.choices: dict[int, _Choice] = {}
        self.finished = False
        self.error: tuple[int, dict[str, Any]] | None = None
        self.budget = Budget()
        # Each choice's logprob entries, by choice index.
        self.logprobs = JsonLists(self.budget)

    def add(self, payload: bytes) -> None:
        """Take one SSE payload; raises TooLarge once the response outgrows its bound."""
        if payload == b"[DONE]":
            self.finished = True
            return
        chunk = json.loads(payload)
        if not isinstance(chunk, dict):
            raise ValueError("stream chunk is not a JSON object")
        if "error" in chunk:
            self.error = (_error_status(chunk), chunk)
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
            logprobs = raw.get("logprobs")
            if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
                self.logprobs.extend(index, logprobs["content"])
            if self.chat:
                delta = raw.get("delta") or {}
                if delta.get("content"):
                    self.budget.keep(choice.content, delta["content"])
                if delta.get("reasoning_content"):
                    self.budget.keep(choice.reasoning, delta["reasoning_content"])
                if delta.get("tool_calls"):
                    self.budget.take(choice.add_tool_calls(delta["tool_calls"]))
            elif raw.get("text"):
                self.budget.keep(choice.content, raw["text"])

    def _logprobs(self, choice: _Choice) -> Any:
        marker = self.logprobs.marker(choice.index)
        return None if marker is None else {"content": marker}

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
        if choice.index in self.logprobs.lists:
            out["logprobs"] = self._logprobs(choice)
        return out

    def _text_choice(self, choice: _Choice) -> dict[str, Any]:
        return {
            "text": "".join(choice.content),
            "index": choice.index,
            "logprobs": self._logprobs(choice),
            "finish_reason": choice.finish_reason,
        }

    def result(self) -> dict[str, Any]:
        """The response as parsed JSON."""
        parsed: dict[str, Any] = json.loads(self.body())
        return parsed

    def body(self) -> bytes:
        """The response's JSON text, with each choice's logprobs spliced in."""
        return self.logprobs.dumps(self._response())

    def _response(self) -> dict[str, Any]:
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


class _NativeTask:
    """One task of a native completion: its pieces so far, and its final event."""

    __slots__ = ("content", "tokens", "final")

    def __init__(self) -> None:
        self.content: list[str] = []
        self.tokens: list[Any] = []
        self.final: dict[str, Any] | None = None


class NativeAssembler:
    """Accumulates llama.cpp's own completion stream (``/completion``, ``/infill``).

    Each event is one task's piece (``index``, ``content``, ``tokens``, ``stop: false``)
    until its final event (``stop: true``) carrying everything else: timings, token
    counts, generation_settings, stop_type... llama-server's non-streaming reply is that
    final event with the whole content in it, and the token probabilities as one list;
    one object for one task, a list ordered by index for several. Stream events always
    carry token ids; the whole reply has them only when the client asked
    (``return_tokens``).

    One difference remains, and no rebuild can remove it: a stream never sends a last
    token that ends inside a UTF-8 character (a length stop cutting one), which the whole
    reply shows as U+FFFD replacement characters (and its id and probabilities).
    """

    def __init__(self, tally: UsageTally, return_tokens: bool = False) -> None:
        self.tally = tally
        self.return_tokens = return_tokens
        self.tasks: dict[int, _NativeTask] = {}
        self.finished = False
        self.error: tuple[int, dict[str, Any]] | None = None
        self.budget = Budget()
        # Each task's completion_probabilities, by task index.
        self.probs = JsonLists(self.budget)

    def add(self, payload: bytes) -> None:
        if payload == b"[DONE]":  # not sent on native streams; harmless if it were
            self.finished = True
            return
        event = json.loads(payload)
        if event is None:
            return  # llama-server opens a stream of several tasks with "data: null"
        if not isinstance(event, dict):
            raise ValueError("stream event is not a JSON object")
        if "error" in event:
            self.error = (_error_status(event), event)
            self.finished = True
            return
        index = event.get("index", 0)
        key = index if isinstance(index, int) else 0
        task = self.tasks.get(key)
        if task is None:
            task = self.tasks[key] = _NativeTask()
        if isinstance(event.get("content"), str) and event["content"]:
            self.budget.keep(task.content, event["content"])
        if isinstance(event.get("tokens"), list):
            task.tokens.extend(event["tokens"])
            self.budget.take(_TOKEN_SIZE * len(event["tokens"]))
        probs = event.get("completion_probabilities")
        if isinstance(probs, list):
            self.probs.extend(key, probs)
        if event.get("stop") is True:
            task.final = event
            self.budget.take(len(payload))
            usage = usage_of(event)
            if usage is not None:
                self.tally.add(usage)

    def _task_result(self, key: int) -> dict[str, Any]:
        task = self.tasks[key]
        result = dict(task.final or {})
        result["content"] = "".join(task.content)
        result["tokens"] = task.tokens if self.return_tokens else []
        settings = result.get("generation_settings")
        if isinstance(settings, dict) and "stream" in settings:
            # The client asked for a whole reply: its settings say so, as direct.
            result["generation_settings"] = {**settings, "stream": False}
        marker = self.probs.marker(key)
        if marker is not None:
            result["completion_probabilities"] = marker
        return result

    def result(self) -> Any:
        """The reply as parsed JSON."""
        return json.loads(self.body())

    def body(self) -> bytes:
        """The reply's JSON text, with each task's probabilities spliced in."""
        results = [self._task_result(key) for key in sorted(self.tasks)]
        return self.probs.dumps(results[0] if len(results) == 1 else results)


class ResponsesAssembler:
    """Accumulates an OpenAI Responses stream (``/v1/responses``, ``/responses``).

    llama-server's ``response.completed`` event carries the whole response (output items,
    usage); the whole reply is that object with its ``completed_at`` (the stream's has
    none: it was completed when it was created), keys sorted as llama-server writes them.
    """

    def __init__(self, tally: UsageTally) -> None:
        self.tally = tally
        self.response: dict[str, Any] | None = None
        self.finished = False
        self.error: tuple[int, dict[str, Any]] | None = None

    def add(self, payload: bytes) -> None:
        if payload == b"[DONE]":
            self.finished = True
            return
        if b'"response.completed"' not in payload and b'"error"' not in payload:
            return  # the deltas: the completed event repeats all of them
        if len(payload) > MAX_ASSEMBLED_BYTES:
            raise TooLarge()
        event = json.loads(payload)
        if not isinstance(event, dict):
            raise ValueError("stream event is not a JSON object")
        if "error" in event:
            self.error = (_error_status(event), event)
            self.finished = True
            return
        response = event.get("response")
        if event.get("type") == "response.completed" and isinstance(response, dict):
            self.response = response
            if isinstance(response.get("usage"), dict):
                self.tally.add(response["usage"])
            self.finished = True

    def result(self) -> dict[str, Any]:
        if self.response is None:
            raise ValueError("the stream ended without response.completed")
        whole = {"completed_at": self.response.get("created_at"), **self.response}
        return dict(sorted(whole.items()))

    def body(self) -> bytes:
        return json.dumps(self.result(), ensure_ascii=False, separators=(",", ":")).encode()


def assembler_for(
    form: Form, tally: UsageTally, return_tokens: bool = False
) -> Assembler | NativeAssembler | ResponsesAssembler:
    """The assembler for a route's body format."""
    if form in (Form.NATIVE, Form.INFILL):
        return NativeAssembler(tally, return_tokens)
    if form is Form.RESPONSES:
        return ResponsesAssembler(tally)
    return Assembler(form, tally)
