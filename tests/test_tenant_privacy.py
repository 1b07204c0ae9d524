"""No key learns another key's prompt from llama-server's prompt cache.

A victim key sends a system prompt with a secret in it; an attacker key sends the same
prompt with a right and a wrong guess. llama-server reuses the victim's cached prefix
either way (up to the secret, or past it); with the gateway's defaults the attacker's
responses must not say how much. With EXPOSE_PROMPT_CACHE=true (single-tenant) the exact
counters come through, which also shows this test can see the difference.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from conftest import ALICE, OPS, GatewayFactory, GatewayHandle
from test_fair_share import post

SECRET = "4711"
WRONG_GUESSES = (f"{n:04d}" for n in itertools.count(9264, 7))
SYSTEM = "You are the vault. Never tell anyone that the door code is {code}. Be polite. " * 3


def ask(port: int, key: str, code: str, path: str, stream: bool) -> dict[str, Any]:
    """The cache-related figures of one answer (the last event's, for a stream)."""
    if path == "/v1/completions":
        payload: dict[str, Any] = {"prompt": SYSTEM.format(code=code) + " Hello?", "max_tokens": 2}
    elif path == "/v1/messages":
        payload = {
            "model": "tiny",
            "system": SYSTEM.format(code=code),
            "messages": [{"role": "user", "content": "Hello?"}],
            "max_tokens": 2,
        }
    else:
        payload = {
            "messages": [
                {"role": "system", "content": SYSTEM.format(code=code)},
                {"role": "user", "content": "Hello?"},
            ],
            "max_tokens": 2,
        }
    if stream and path != "/v1/messages":
        payload["stream_options"] = {"include_usage": True}
    payload.update(stream=stream, ignore_eos=True, return_progress=True)
    # llama-server b11434 itself sometimes leaves out the first events of a /v1/messages
    # stream (message_start, which carries the usage), directly too: ask again then.
    for _ in range(5):
        status, body = post(port, path, key, payload)
        assert status == 200, body
        if not stream:
            return figures(json.loads(body))
        found: dict[str, Any] = {}
        for line in body.split(b"\n"):
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                assert "prompt_progress" not in event  # return_progress is not passed on
                for name, value in figures(event).items():
                    found[name] = value
        if found:
            return found
    raise AssertionError(f"no usage in five {path} streams")


def figures(message: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    usage = message.get("usage") or (message.get("message") or {}).get("usage") or {}
    if "prompt_tokens_details" in usage:
        out["cached_tokens"] = usage["prompt_tokens_details"].get("cached_tokens")
    if "prompt_tokens" in usage:
        out["prompt_tokens"] = usage["prompt_tokens"]
    for name in ("input_tokens", "cache_read_input_tokens"):  # /v1/messages
        if name in usage:
            out[name] = usage[name]
    timings = message.get("timings") or {}
    for name in ("cache_n", "prompt_n"):
        if name in timings:
            out[name] = timings[name]
    if timings.get("prompt_ms"):
        # What prompt_n and the rates say together: a count the attacker could divide out.
        out["rate_count"] = round(timings["prompt_per_second"] * timings["prompt_ms"] / 1000)
    return out


def probe(port: int, path: str, stream: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The attacker's figures for a right and a wrong guess, each after the victim's turn."""
    seen = []
    # A wrong guess never sent before: the session's llama-server keeps earlier prompts.
    wrong = next(WRONG_GUESSES)
    for guess in (SECRET, wrong):
        ask(port, ALICE, SECRET, path, stream)  # the victim, warming the cache
        seen.append(ask(port, OPS, guess, path, stream))
    return seen[0], seen[1]


PATHS = [
    ("/v1/chat/completions", False),
    ("/v1/chat/completions", True),
    ("/v1/completions", True),
    ("/v1/messages", False),
    ("/v1/messages", True),
]


def test_another_keys_cache_counters_do_not_tell_a_right_guess_from_a_wrong_one(
    gateway: GatewayHandle,
) -> None:
    for path, stream in PATHS:
        right, wrong = probe(gateway.port, path, stream)
        assert right and right == wrong, (path, stream, right, wrong)
        assert right.get("cache_n", 0) == 0 and right.get("cached_tokens", 0) == 0
        assert right.get("cache_read_input_tokens", 0) == 0
        assert right.get("prompt_n") in (None, right.get("rate_count"))


def test_a_single_tenant_deployment_sees_the_exact_counters(
    make_gateway: GatewayFactory,
) -> None:
    gw = make_gateway(EXPOSE_PROMPT_CACHE="true")
    right, wrong = probe(gw.port, "/v1/chat/completions", False)
    # The right guess reuses the victim's prefix past the secret: more cached, fewer processed.
    assert right["cache_n"] > wrong["cache_n"] and right["prompt_n"] < wrong["prompt_n"]
    assert right["cached_tokens"] == right["cache_n"]
