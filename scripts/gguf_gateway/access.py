"""Who may make a request, and how much: keys, scopes, CORS and per-key limits.

The request pipeline asks, in order: is the origin allowed (CORS), which key is this and
may it use this path (401/403), is it within its request rate and concurrency (429),
and, once the body is known, is the key still valid and can the request's tokens be
reserved (429). Each "no" is raised as a Refusal carrying the headers an SDK needs to
react to it; the pipeline writes it.
"""

from __future__ import annotations

import math
import time
import urllib.parse
from dataclasses import dataclass

from .config import Config
from .http11 import RequestHead
from .keys import ApiKey, KeyRing, KeySource
from .limits import KeyLimits, Reservation
from .refusals import Refusal, retry_headers
from .responses import Responder
from .routes import Route
from .shared_limits import SharedLimits

# llama-server's own --cors-methods default.
CORS_ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_ALLOW_HEADERS = "*, Authorization"
CORS_EXPOSE = (
    "X-Request-ID, Retry-After, retry-after-ms, x-should-retry, "
    "x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-reset-requests, "
    "x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens"
)


class AccessControl:
    def __init__(self, config: Config, keys: KeySource, shared: SharedLimits | None = None) -> None:
        self.config = config
        self.keys = keys
        self.shared = shared  # REDIS_URL: limits shared by every replica
        self.key_limits: dict[str, KeyLimits] = {}

    def cors_headers(self, origin: str | None) -> list[tuple[str, str]]:
        """Headers for an allowed browser origin; none for others (or without CORS_ORIGINS)."""
        if origin is None or not self.cors_allows(origin):
            return []
        return [
            ("Access-Control-Allow-Origin", origin),
            ("Vary", "Origin"),
            ("Access-Control-Expose-Headers", CORS_EXPOSE),
        ]

    def preflight_headers(self, origin: str) -> list[tuple[str, str]]:
        """A preflight's answer, as llama-server (b11434) gives it for an allowed origin.

        The same methods for every path, credentials allowed, no max-age (browsers keep
        it 5 s). One deliberate difference: llama-server allows headers with a bare
        ``*``, which under the Fetch standard never covers ``Authorization``, so a page
        on another origin could not send its key; the gateway names it beside ``*``.
        """
        return [
            ("Access-Control-Allow-Origin", origin),
            ("Vary", "Origin"),
            ("Access-Control-Allow-Credentials", "true"),
            ("Access-Control-Allow-Methods", CORS_ALLOW_METHODS),
            ("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS),
        ]

    def cors_allows(self, origin: str) -> bool:
        allowed = self.config.cors_origins
        if not allowed:
            return False
        if "*" in allowed or origin in allowed:
            return True
        # llama-server's special value: any origin on this machine, whatever its port.
        return "localhost" in allowed and _is_localhost(origin)

    def authenticate(self, head: RequestHead, route: Route, out: Responder) -> ApiKey:
        """The request's key; raises the 401/403 Refusal otherwise."""
        # Bearer first, then X-API-Key: behind a platform that puts its own credential
        # in Authorization (RunPod's load balancer), clients send ours in X-API-Key.
        tokens = []
        authorization = head.get("authorization")
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                tokens.append(value.strip())
        api_key_header = (head.get("x-api-key") or "").strip()
        if api_key_header:
            tokens.append(api_key_header)
        if not tokens:
            raise _unauthorized("missing API key: send Authorization: Bearer <key>")
        ring = self.keys.current()
        key = None
        for token in tokens:
            key = ring.match(token)
            if key is not None:
                break
        if key is None:
            raise _unauthorized("invalid API key")
        out.ex.key_id = key.key_id
        if key.expired():
            raise _unauthorized("API key has expired", code="expired_api_key")
        if route.scope not in key.scopes:
            raise Refusal(
                403, f"this key lacks the '{route.scope}' scope for {route.path}", "scope"
            )
        return key

    def still_valid(self, key: ApiKey, ring: KeyRing) -> None:
        """After the body: a key revoked or expired meanwhile cannot start the request.

        ``ring`` is the key ring the key was found in; while it is still the current one
        (no reload since), nothing needs checking again.
        """
        current = self.keys.current()
        if (current is not ring and not current.holds(key)) or key.expired():
            raise _unauthorized("API key was revoked or has expired", code="revoked_api_key")

    def limits_for(self, key: ApiKey) -> KeyLimits:
        rpm = key.rpm or self.config.max_requests_per_minute
        limits = self.key_limits.get(key.key_id)
        if limits is None:
            limits = self.key_limits[key.key_id] = KeyLimits(rpm, key.tpm, key.concurrency)
        elif (
            limits.requests.limit,
            limits.tokens.limit if limits.tokens else None,
            limits.concurrency,
        ) != (
            rpm,
            key.tpm,
            key.concurrency,
        ):
            limits.update(rpm, key.tpm, key.concurrency)
        return limits

    async def enter(self, key: ApiKey, limits: KeyLimits, out: Responder) -> Ticket:
        """Count the request against the key's rate and take a concurrent place, or refuse.

        Each place is taken at its check: locally with no await in between, in Redis by
        one atomic script. The caller gives them back with ``leave`` whatever happens.
        """
        ticket = Ticket(key.key_id, limits)
        now = time.monotonic()
        shared = (
            await self.shared.take_request(key.key_id, limits.requests.limit)
            if self.shared
            else None
        )
        wait = shared[0] if shared is not None else 0.0
        if not wait:
            wait = limits.requests.try_take(now)  # kept locally too: a warm fallback
        out.ex.rate_headers = limits.headers(now, shared_requests=shared[1] if shared else None)
        if wait:
            raise Refusal(
                429,
                f"rate limit: {limits.requests.limit} requests per minute for key '{key.key_id}'",
                "rate",
                headers=retry_headers(wait),
            )
        if limits.concurrency is not None and self.shared is not None:
            lease = await self.shared.enter(key.key_id, limits.concurrency)
            if lease is False:
                raise self._busy(key, limits)
            ticket.lease = lease if isinstance(lease, str) else None
        if not limits.enter():
            await self.leave(ticket)
            raise self._busy(key, limits)
        ticket.local = True
        return ticket

    async def leave(self, ticket: Ticket) -> None:
        if ticket.local:
            ticket.limits.leave()
            ticket.local = False
        if ticket.lease is not None and self.shared is not None:
            await self.shared.leave(ticket.lease)
            ticket.lease = None

    @staticmethod
    def _busy(key: ApiKey, limits: KeyLimits) -> Refusal:
        return Refusal(
            429,
            f"key '{key.key_id}' already has {limits.concurrency} request(s) running",
            "concurrency",
            headers=retry_headers(1.0),
            code="concurrency_limit_exceeded",
        )

    async def reserve_tokens(self, ticket: Ticket, tokens: int, out: Responder) -> None:
        """Reserve ``tokens`` (the request's upper bound) in the key's window, or refuse."""
        limits = ticket.limits
        if limits.tokens is None:
            return
        now = time.monotonic()
        shared = (
            await self.shared.reserve(ticket.key_id, tokens, limits.tokens.limit)
            if self.shared
            else None
        )
        got: Reservation | float = shared[1] if shared is not None and shared[0] is None else 0.0
        if shared is not None:
            ticket.shared_reservation = shared[0]
        if not got:
            got = limits.tokens.try_reserve(tokens, now)
        out.ex.rate_headers = limits.headers(now, shared_tokens=shared[2] if shared else None)
        if isinstance(got, Reservation):
            ticket.reservation = got
            return
        await self.shared_settle(ticket, 0)  # refused here after all: give the shared place back
        key_id = ticket.key_id
        message = (
            f"this request could use up to {tokens} tokens, more than key '{key_id}' may use "
            f"per minute ({limits.tokens.limit}): lower max_tokens, n or the prompt"
            if math.isinf(got)
            else f"token limit: {limits.tokens.limit} tokens per minute for key '{key_id}'"
        )
        raise Refusal(429, message, "tokens", headers=retry_headers(got), code="tokens_exceeded")

    async def settle(self, ticket: Ticket, tokens: int) -> None:
        """The request is over: its reservation holds what it really used."""
        if ticket.reservation is not None:
            ticket.reservation.tokens = tokens
        await self.shared_settle(ticket, tokens)

    async def shared_settle(self, ticket: Ticket, tokens: int) -> None:
        if ticket.shared_reservation is not None and self.shared is not None:
            await self.shared.settle(ticket.key_id, ticket.shared_reservation, tokens)
            ticket.shared_reservation = None


@dataclass(slots=True)
class Ticket:
    """What one request holds of its key's limits, to give back or settle when it ends."""

    key_id: str
    limits: KeyLimits
    local: bool = False  # a local concurrent place
    lease: str | None = None  # a concurrency lease in Redis
    reservation: Reservation | None = None
    shared_reservation: str | None = None


def _is_localhost(origin: str) -> bool:
    try:
        host = urllib.parse.urlsplit(origin).hostname
    except ValueError:
        return False
    return host in ("localhost", "127.0.0.1", "::1")


def _unauthorized(message: str, code: str | None = None) -> Refusal:
    return Refusal(401, message, "auth", headers=[("WWW-Authenticate", "Bearer")], code=code)
