"""llama-server's prompt-cache counters, and reading them as "nothing cached".

llama-server reuses the longest prefix any earlier prompt left in a slot, whoever sent it,
and says how much it reused: ``usage.prompt_tokens_details.cached_tokens`` (and
``input_tokens_details`` on /v1/responses, ``cache_read_input_tokens`` on /v1/messages),
``timings.cache_n`` with ``timings.prompt_n`` (tokens it did process), and the
``prompt_progress`` events of ``return_progress``. A key that can read them learns, token
by token, whether its guess at another key's prompt (a system prompt with a secret in it)
was right. Unless EXPOSE_PROMPT_CACHE says the deployment has one tenant, responses carry
them as if nothing had been cached: cached counts 0, every prompt token processed, rates
recomputed to match, and no progress events (their ``processed`` starts at the cached
count). Token totals, text and timings in milliseconds are unchanged; what those
milliseconds still say is docs/AUTHENTICATION.md's residual timing channel.

Pure functions over parsed JSON (sans-IO). The stream pipe parses only reads that carry
``CACHE_MARK``, which every one of these fields starts with (JSON escaping keeps a
token's text from producing it unescaped, and a false hit only costs a parse).
"""

from __future__ import annotations

import json
from typing import Any

CACHE_MARK = b'"cache'
# Request fields whose answers cannot be made to read "nothing cached".
PROGRESS_FIELDS = ("return_progress",)


# llama-server's own counters of prompt tokens processed and reused: read before and
# after a probe on an open /metrics, they answer the same question.
CACHE_METRICS = ("llamacpp:prompt_tokens_total", "llamacpp:prompt_tokens_cached_total")


def conceal(message: object) -> bool:
    """Make one parsed event or response body read as "nothing cached"; True if it changed.

    A list (a batch of prompts answered at once) has each of its results concealed.
    """
    if isinstance(message, list):
        return any([conceal(item) for item in message])
    if not isinstance(message, dict):
        return False
    changed = False
    for holder in (message, message.get("response"), message.get("message")):
        if isinstance(holder, dict):
            usage = holder.get("usage")
            if isinstance(usage, dict):
                changed |= _usage(usage)
    timings = message.get("timings")
    if isinstance(timings, dict):
        changed |= _timings(timings)
    if "prompt_progress" in message:
        del message["prompt_progress"]
        changed = True
    return changed


def conceal_payload(payload: bytes) -> tuple[bytes, int]:
    """One event's JSON text made to read "nothing cached", and the cached tokens it hid.

    For a reply assembled from events: each event is concealed before the assembler sees
    it, so that the whole reply (logprobs and all) is never parsed again for this.
    """
    try:
        message = json.loads(payload)
    except ValueError:
        return payload, 0
    if not isinstance(message, dict):
        return payload, 0
    hidden = 0
    for holder in (message, message.get("response"), message.get("message")):
        usage = holder.get("usage") if isinstance(holder, dict) else None
        if isinstance(usage, dict):
            details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
            found = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
            hidden += found or _count(usage.get("cache_read_input_tokens")) or 0
    if not conceal(message):
        return payload, 0
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode(), hidden


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _usage(usage: dict[str, Any]) -> bool:
    changed = False
    for name in ("prompt_tokens_details", "input_tokens_details"):
        details = usage.get(name)
        if isinstance(details, dict) and _count(details.get("cached_tokens")):
            details["cached_tokens"] = 0
            changed = True
    # /v1/messages counts cache reads apart from input_tokens: fold them back in.
    read = _count(usage.get("cache_read_input_tokens"))
    if read:
        usage["cache_read_input_tokens"] = 0
        usage["input_tokens"] = (_count(usage.get("input_tokens")) or 0) + read
        changed = True
    return changed


def _timings(timings: dict[str, Any]) -> bool:
    cached = _count(timings.get("cache_n"))
    if not cached:
        return False
    processed = (_count(timings.get("prompt_n")) or 0) + cached
    timings["cache_n"] = 0
    timings["prompt_n"] = processed
    # The rates llama-server derived from the real prompt_n would give it away.
    ms = timings.get("prompt_ms")
    if isinstance(ms, (int, float)) and ms > 0:
        timings["prompt_per_token_ms"] = ms / processed
        timings["prompt_per_second"] = processed * 1000.0 / ms
    return True


def without_cache_metrics(text: str) -> str:
    """Prometheus text less the CACHE_METRICS families (samples, HELP and TYPE lines)."""
    return "".join(
        line
        for line in text.splitlines(keepends=True)
        if not any(name in line for name in CACHE_METRICS)
    )
