"""One request's bookkeeping and the one place responses to the client are written.

Every response the gateway writes goes through :class:`Responder`, so each carries the
request id, the security headers and, for authenticated requests, the rate-limit headers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .channel import Channel
from .errors import error_body
from .http11 import response_head_bytes
from .refusals import Refusal
from .sse import UsageTally

SECURITY_HEADERS = [("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-store")]


@dataclass(slots=True)
class Exchange:
    """What is known about one request, for limits, metrics and the access log."""

    request_id: str
    method: str
    path: str  # the route's path, or "other": a bounded metrics label
    started: float
    key_id: str = "-"
    status: int = 0
    ttfb: float | None = None
    sent: int = 0
    disconnected: bool = False
    body_read: bool = False
    rate_headers: list[tuple[str, str]] = field(default_factory=list)
    cors_headers: list[tuple[str, str]] = field(default_factory=list)
    tally: UsageTally = field(default_factory=UsageTally)
    model: str | None = None
    # Tokens charged against the key's token limits and quotas (None: it has none).
    charged: int | None = None
    error: str | None = None
    # Why the gateway refused it (gateway_rejections_total), or what failed in
    # llama-server (gateway_backend_errors_total); None when served.
    refused: str | None = None
    backend_error: str | None = None


class Responder:
    __slots__ = ("channel", "ex")

    def __init__(self, channel: Channel, ex: Exchange) -> None:
        self.channel = channel
        self.ex = ex

    def headers(
        self, content_type: str, length: int | None, keep_alive: bool
    ) -> list[tuple[str, str]]:
        ex = self.ex
        headers = [("Content-Type", content_type)]
        if length is not None:
            headers.append(("Content-Length", str(length)))
        headers.append(("X-Request-ID", ex.request_id))
        headers.extend(SECURITY_HEADERS)
        headers.extend(ex.rate_headers)
        headers.extend(ex.cors_headers)
        if not keep_alive:
            headers.append(("Connection", "close"))
        return headers

    def send(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        keep_alive: bool = True,
        extra: list[tuple[str, str]] | None = None,
        head_only: bool = False,
    ) -> bool:
        """Write a whole response; returns whether the connection may be kept alive."""
        # RFC 9110 §8.6: no Content-Length on 204.
        headers = self.headers(content_type, None if status == 204 else len(body), keep_alive)
        if extra:
            headers.extend(extra)
        head = response_head_bytes(status, headers)
        self.channel.write(head if head_only else head + body)
        self.ex.status = status
        self.ex.sent += 0 if head_only else len(body)
        return keep_alive

    def send_static(
        self,
        status: int,
        body: bytes,
        backend_headers: list[tuple[str, str]],
        *,
        keep_alive: bool,
        head_only: bool,
    ) -> bool:
        """A web UI file as llama-server sent it: its own caching and coding headers.

        Not ``send``: that one adds ``Cache-Control: no-store``, which would make the
        browser fetch the UI's immutable bundles again on every load.
        """
        ex = self.ex
        headers = list(backend_headers)
        if status not in (204, 304):
            headers.append(("Content-Length", str(len(body))))
        headers.append(("X-Request-ID", ex.request_id))
        headers.append(("X-Content-Type-Options", "nosniff"))
        headers.extend(ex.cors_headers)
        if not keep_alive:
            headers.append(("Connection", "close"))
        head = response_head_bytes(status, headers)
        self.channel.write(head if head_only else head + body)
        ex.status = status
        ex.sent += 0 if head_only else len(body)
        return keep_alive

    def error(
        self,
        status: int,
        message: str,
        *,
        keep_alive: bool = True,
        extra: list[tuple[str, str]] | None = None,
        code: str | None = None,
        param: str | None = None,
    ) -> bool:
        self.ex.error = message
        return self.send(
            status, error_body(status, message, code, param), keep_alive=keep_alive, extra=extra
        )

    def refuse(self, refusal: Refusal, keep_alive: bool) -> bool:
        """Write a refusal; it closes the connection when the refusal says so."""
        if refusal.backend:
            self.ex.backend_error = refusal.reason
        else:
            self.ex.refused = refusal.reason
        return self.error(
            refusal.status,
            refusal.message,
            keep_alive=keep_alive and not refusal.close,
            extra=refusal.headers,
            code=refusal.code,
            param=refusal.param,
        )

    def stream_head(self, http11: bool) -> bytes:
        """The head of an SSE response; chunked for HTTP/1.1, close-delimited for 1.0."""
        headers = self.headers("text/event-stream", None, http11)
        # Cache-Control: no-store from SECURITY_HEADERS; proxies must not buffer either.
        headers.append(("X-Accel-Buffering", "no"))
        if http11:
            headers.append(("Transfer-Encoding", "chunked"))
        self.ex.status = 200
        return response_head_bytes(200, headers)
