"""Refusals: every "no" the gateway says before a response byte has gone out.

A refusal is raised where it is decided (access control, limits, admission, the body
checks, the relay before the backend answered) and caught in one place, the request
pipeline, which writes the OpenAI-shaped error and counts it under ``reason`` in
``gateway_rejections_total`` (or ``gateway_backend_errors_total`` for backend failures).
Once a stream has been committed to the client a failure can no longer be a status code:
the relay ends it with an SSE ``error`` event instead (proxy.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# The OpenAI SDKs give up on waits longer than this; tell them not to retry at all.
MAX_SDK_RETRY_WAIT = 120.0


class Refusal(Exception):
    """A request answered with an error status instead of being served.

    ``close``: the connection cannot be trusted or reused afterwards (bad framing, a body
    left unread on the wire). ``backend``: a failure of llama-server, counted as a backend
    error rather than as a rejection of the client.
    """

    def __init__(
        self,
        status: int,
        message: str,
        reason: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        code: str | None = None,
        param: str | None = None,
        close: bool = False,
        backend: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.headers = list(headers)
        self.code = code
        self.param = param
        self.close = close
        self.backend = backend


def retry_headers(wait: float) -> list[tuple[str, str]]:
    """Headers for a 429: when to retry, and whether an SDK should bother."""
    if math.isinf(wait):
        return [("x-should-retry", "false")]
    out = [
        ("Retry-After", str(max(1, math.ceil(wait)))),
        ("retry-after-ms", str(max(1, math.ceil(wait * 1000)))),
    ]
    if wait > MAX_SDK_RETRY_WAIT:
        out.append(("x-should-retry", "false"))
    return out


def unavailable(message: str, reason: str, retry_after: int = 2) -> Refusal:
    """503 with Retry-After: busy, loading or draining; the SDKs retry it."""
    return Refusal(503, message, reason, headers=[("Retry-After", str(retry_after))])


def bad_request(message: str, reason: str = "invalid", param: str | None = None) -> Refusal:
    return Refusal(400, message, reason, param=param)
