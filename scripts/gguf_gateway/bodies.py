"""Request bodies: parsed once, checked for what must never reach llama-server.

Pure functions; a body that cannot be served raises a 400 :class:`Refusal` naming why:

* not UTF-8, not JSON, or not a JSON object (every route llama-server serves here takes
  an object);
* nested deeper than MAX_DEPTH: Python's parser would fail with a RecursionError, and
  llama-server's JSON library frees nested values recursively;
* media by remote URL (``image_url``, audio, files) while ALLOW_REMOTE_MEDIA is off:
  with a multimodal projector loaded llama-server fetches such URLs itself, from inside
  the container (request forgery). ``data:`` URIs carry the bytes and pass. Only media
  parts are looked at: the parts of a message's content (and the content inside those,
  as in a tool result), never tool arguments, tool schemas or other fields that happen
  to be named ``file``;
* grammars and schemas past the bounds of grammars.py (llama-server's parsers recurse
  without a limit and crash the whole server);
* more token alternatives per generated token than MAX_TOP_LOGPROBS, or fewer than none
  (a negative count wraps to a large one in llama-server's C int): llama-server has
  no cap but the vocabulary, and every generated token then carries that many entries
  (a ~130-byte request made megabytes per token with a real vocabulary).
"""

from __future__ import annotations

import json
from typing import Any

from . import grammars
from .refusals import bad_request

MAX_DEPTH = 64
# OpenAI's own cap on top_logprobs, and what llama-server gives for "logprobs": true.
MAX_TOP_LOGPROBS = 20
# llama-server's n_probs and the fields it reads as n_probs (logprobs on completions,
# top_logprobs with "logprobs": true on chat).
_PROBS_FIELDS = ("n_probs", "top_logprobs", "logprobs")
# Keys under which OpenAI-, Responses- and Anthropic-style content parts carry media.
_MEDIA_KEYS = ("image_url", "input_audio", "audio_url", "video_url", "file", "file_url")
# Where a body holds content: chat messages, Responses input, Anthropic system blocks,
# llama.cpp's multimodal embeddings and prompts.
_CONTENT_HOLDERS = ("messages", "input", "system", "content", "prompt")
# Inside a message or a part, what holds more content (a tool result's, an image's source).
_NESTED_CONTENT = ("content", "source")


def parse_object(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("request body is not valid UTF-8", "body") from None
    try:
        payload = json.loads(text)
    except RecursionError:
        raise bad_request(f"request body nests deeper than {MAX_DEPTH} levels", "body") from None
    except ValueError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", "body") from None
    if not isinstance(payload, dict):
        raise bad_request("request body must be a JSON object", "body")
    return payload


def _url_of(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for name in ("url", "file_url"):
            url = value.get(name)
            if isinstance(url, str):
                return url
    return None


def _remote(url: str | None) -> bool:
    return url is not None and not url.lstrip()[:5].lower() == "data:"


def inspect(payload: dict[str, Any], allow_remote_media: bool) -> None:
    """Refuse too-deep nesting, unbounded grammars and token alternatives and, unless
    allowed, media given by remote URL."""
    stack: list[tuple[object, int]] = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise bad_request(f"request body nests deeper than {MAX_DEPTH} levels", "body")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values() if isinstance(v, (dict, list)))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value if isinstance(v, (dict, list)))
    if not allow_remote_media:
        for part in _content_parts(payload):
            _check_media(part)
    grammars.check(payload)
    check_probs(payload)


def _content_parts(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Every message and content part of a body (media parts among them), nothing else."""
    parts: list[dict[str, Any]] = []
    stack: list[object] = [payload.get(name) for name in _CONTENT_HOLDERS]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            parts.append(value)
            stack.extend(value.get(name) for name in _NESTED_CONTENT)
    return parts


def check_probs(payload: dict[str, Any]) -> None:
    """Bound the token alternatives asked for per generated token."""
    for name in _PROBS_FIELDS:
        value = payload.get(name)
        # "logprobs": true on chat is a switch, not a count.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        # Below 0 too: llama-server reads the count as a C int, and 5000 - 2**32 wraps to
        # 5000 alternatives per token there.
        if not 0 <= value <= MAX_TOP_LOGPROBS:
            raise bad_request(
                f"'{name}' must be between 0 and {MAX_TOP_LOGPROBS}", "logprobs", param=name
            )


def _check_media(part: dict[str, Any]) -> None:
    found = [(key, _url_of(part[key])) for key in _MEDIA_KEYS if key in part]
    # Anthropic-style: {"type": "image", "source": {"type": "url", "url": ...}}.
    if part.get("type") == "url":
        found.append(("source.url", _url_of(part)))
    for key, url in found:
        if _remote(url):
            raise bad_request(
                f"media by remote URL ({key}) is not allowed: send it inline as a data: URI "
                "(the operator can set ALLOW_REMOTE_MEDIA=true)",
                "remote_media",
                param=key,
            )
