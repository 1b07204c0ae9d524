"""Who may make a request, and how much: keys, scopes, CORS and per-key limits.

The request pipeline asks, in order: is the origin allowed (CORS), which key is this and
may it use this path (401/403), is it within its request rate and concurrency (429),
and, once the body is known, is the key still valid, may it use the model (404, as if the
model did not exist), and can the request's tokens be reserved in its minute window and
its daily and monthly quotas (429). Each "no" is raised as a Refusal carrying the headers
an SDK needs to react to it; the pipeline writes it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .config import Config
from .http11 import RequestHead
from .keys import ApiKey, KeyRing, KeySource
from .ledger import LEDGER_NAME, charges
from .limits import (
    DAY,
    MONTH,
    CalendarQuota,
    KeyLimits,
    QuotaHold,
    Reservation,
    period_end,
    period_of,
    stamp,
)
from .refusals import Refusal, retry_headers
from .responses import Responder
from .routes import Route
from .shared_limits import SharedLimits

log = logging.getLogger("gateway")

# llama-server's own --cors-methods default.
CORS_ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_ALLOW_HEADERS = "*, Authorization"
CORS_EXPOSE = (
    "X-Request-ID, Retry-After, retry-after-ms, x-should-retry, "
    "x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-reset-requests, "
    "x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens, "
    "x-ratelimit-limit-tokens-day, x-ratelimit-remaining-tokens-day, "
    "x-ratelimit-reset-tokens-day, x-ratelimit-limit-tokens-month, "
    "x-ratelimit-remaining-tokens-month, x-ratelimit-reset-tokens-month"
)


class AccessControl:
    def __init__(
        self,
        config: Config,
        keys: KeySource,
        shared: SharedLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.keys = keys
        self.shared = shared  # REDIS_URL: limits shared by every replica
        self.key_limits: dict[str, KeyLimits] = {}
        self.clock = clock  # wall time, for the calendar quotas
        # What the usage ledger says each key was charged today and this month: read in a
        # thread (a large ledger takes a second or more), started at start when a key has
        # a quota; keys with a quota wait for it once, before their first reservation.
        self._charges: tuple[str, str, dict[str, tuple[int, int]]] | None = None
        self._reading: asyncio.Future[tuple[str, str, dict[str, tuple[int, int]]]] | None = None
        self._unseeded: set[str] = set()  # key ids whose quotas the ledger has not seeded

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

    def admin_presented(self, head: RequestHead) -> bool:
        """Whether the request carries a valid, unexpired admin key (no refusal if not).

        For routes open to all, where an admin key shows more (/metrics' per-key series).
        """
        ring = self.keys.current()
        for token in _presented(head):
            key = ring.match(token)
            if key is not None:
                return "admin" in key.scopes and not key.expired()
        return False

    def authenticate(self, head: RequestHead, route: Route, out: Responder) -> ApiKey:
        """The request's key; raises the 401/403 Refusal otherwise."""
        tokens = _presented(head)
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
        fields = (
            key.rpm or self.config.max_requests_per_minute,
            key.tpm,
            key.concurrency,
            key.daily_tokens,
            key.monthly_tokens,
        )
        limits = self.key_limits.get(key.key_id)
        if limits is None:
            limits = self.key_limits[key.key_id] = KeyLimits(*fields)
            if limits.quotas:
                self._unseeded.add(key.key_id)
        elif limits.fields() != fields:
            quotas = set(limits.quotas)
            limits.update(*fields)
            if set(limits.quotas) - quotas:
                # A reload gave the key a quota: what it spent since the ledger was last
                # read counts too.
                self._charges = None
                self._unseeded.add(key.key_id)
        return limits

    def read_ledger(self) -> None:
        """Start reading the ledger's charges in a thread, if a key has a quota (at start)."""
        if self._reading is None and any(k.has_quota for k in self.keys.current().keys):
            path, wall = self.config.log_dir / LEDGER_NAME, self.clock()
            self._reading = asyncio.ensure_future(asyncio.to_thread(charges, path, wall))

    async def _seed(self, key_id: str, limits: KeyLimits) -> None:
        """Start a key's quotas from what the ledger says it was charged (restarts)."""
        if self._charges is None:
            if self._reading is None:
                path, wall = self.config.log_dir / LEDGER_NAME, self.clock()
                self._reading = asyncio.ensure_future(asyncio.to_thread(charges, path, wall))
            reading = self._reading
            try:
                got = await asyncio.shield(reading)
            except Exception as exc:  # noqa: BLE001 - a ledger we cannot read is no history
                log.error("quotas: cannot read the usage ledger (%s): counting from zero", exc)
                got = (period_of(DAY, self.clock()), period_of(MONTH, self.clock()), {})
            if self._reading is reading:
                self._charges, self._reading = got, None
                log.info(
                    "quotas: today's and this month's usage of %d key(s) read from the ledger",
                    len(got[2]),
                )
        if self._charges is None:
            return  # invalidated again meanwhile (a reload): the next request seeds
        self._unseeded.discard(key_id)
        wall = self.clock()
        day, month, totals = self._charges
        today, this_month = totals.get(key_id, (0, 0))
        for kind, quota in limits.quotas.items():
            quota.roll(wall)
            quota.seed(day if kind == DAY else month, today if kind == DAY else this_month)

    def check_model(
        self, key: ApiKey, model: str | None, served: Sequence[str], router: bool
    ) -> None:
        """A key limited to some models sees no other (404, as if it did not exist).

        In router mode the request names the model llama-server is to run (and load);
        with one model served llama-server ignores the name, so the served model decides.
        An unknown served model (not read yet) refuses too: never fail open.
        """
        if key.models is None:
            return
        if router:
            if model is not None and not key.may_use(model):
                raise _no_such_model(model)
        elif not any(key.may_use(name) for name in served):
            raise _no_such_model(model if model is not None else ",".join(served))

    async def enter(
        self, key: ApiKey, limits: KeyLimits, out: Responder, concurrent: bool = True
    ) -> Ticket:
        """Count the request against the key's rate and take a concurrent place, or refuse.

        Each place is taken at its check: locally with no await in between, in Redis by
        one atomic script. The caller gives them back with ``leave`` whatever happens.
        ``concurrent=False``: a request that acts on one the key is running (stop it,
        steer it, replay it) takes no place, or a key at its limit could not reach them.
        """
        if self._unseeded and key.key_id in self._unseeded:
            await self._seed(key.key_id, limits)
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
        out.ex.rate_headers = limits.headers(
            now,
            shared_requests=shared[1] if shared else None,
            wall=self.clock() if limits.quotas else None,
        )
        if wait:
            raise Refusal(
                429,
                f"rate limit: {limits.requests.limit} requests per minute for key '{key.key_id}'",
                "rate",
                headers=retry_headers(wait),
            )
        if not concurrent:
            return ticket
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
        """Reserve ``tokens`` (the request's upper bound) in the key's minute window and its
        day and month quotas, all or none, or refuse."""
        limits = ticket.limits
        now, wall = time.monotonic(), self.clock()
        shared_tokens: int | None = None
        if limits.tokens is not None:
            shared = (
                await self.shared.reserve(ticket.key_id, tokens, limits.tokens.limit)
                if self.shared
                else None
            )
            got: Reservation | float = (
                shared[1] if shared is not None and shared[0] is None else 0.0
            )
            if shared is not None:
                ticket.shared_reservation = shared[0]
                shared_tokens = shared[2]
            if not got:
                got = limits.tokens.try_reserve(tokens, now)
            if not isinstance(got, Reservation):
                out.ex.rate_headers = limits.headers(now, shared_tokens=shared_tokens, wall=wall)
                await self.shared_settle(ticket, 0)  # refused here after all: give it back
                raise self._over_tpm(ticket.key_id, limits, tokens, got)
            ticket.reservation = got
        if limits.quotas:
            refusal = await self._reserve_quota(ticket, tokens, wall)
            if refusal is not None:
                await self.settle(ticket, 0)  # the minute window's reservation goes back
                out.ex.rate_headers = limits.headers(now, shared_tokens=shared_tokens, wall=wall)
                raise refusal
        out.ex.rate_headers = limits.headers(now, shared_tokens=shared_tokens, wall=wall)

    @staticmethod
    def _over_tpm(key_id: str, limits: KeyLimits, tokens: int, wait: float) -> Refusal:
        assert limits.tokens is not None
        message = (
            f"this request could use up to {tokens} tokens, more than key '{key_id}' may use "
            f"per minute ({limits.tokens.limit}): lower max_tokens, n or the prompt"
            if math.isinf(wait)
            else f"token limit: {limits.tokens.limit} tokens per minute for key '{key_id}'"
        )
        return Refusal(429, message, "tokens", headers=retry_headers(wait), code="tokens_exceeded")

    async def _reserve_quota(self, ticket: Ticket, tokens: int, wall: float) -> Refusal | None:
        """Hold ``tokens`` in every quota of the key; the refusal when one cannot take them.

        With Redis the shared counters decide (every replica's spending); without an answer
        from it, this replica's own counters do.
        """
        limits = ticket.limits
        answer = None
        if self.shared is not None:
            for quota in limits.quotas.values():
                quota.roll(wall)
            answer = await self.shared.reserve_quota(
                ticket.key_id,
                tokens,
                {kind: (q.limit, q.used) for kind, q in limits.quotas.items()},
            )
        if answer is not None:
            reserved = answer.refused is None
            for kind, used in answer.used.items():
                if kind in limits.quotas:
                    limits.quotas[kind].shared = used - tokens if reserved else used
            if not reserved:
                quota = limits.quotas[answer.refused or DAY]
                wait = math.inf if answer.never else quota.reset_in(wall)
                return _over_quota(ticket.key_id, quota, tokens, wait, wall)
            ticket.shared_quota = answer.counters
        else:
            for quota in limits.quotas.values():
                quota.shared = None  # no shared figure now: this replica's own counts show
            over = limits.quota_refusal(tokens, wall)
            if over is not None:
                return _over_quota(ticket.key_id, over[0], tokens, over[1], wall)
        ticket.quota = limits.hold_quota(tokens, wall)
        return None

    async def settle(self, ticket: Ticket, tokens: int) -> None:
        """The request is over: its reservations hold what it really used."""
        if ticket.reservation is not None:
            ticket.reservation.tokens = tokens
        hold = ticket.quota
        if hold is not None:
            ticket.quota = None
            reserved = hold.tokens
            ticket.limits.settle_quota(hold, tokens)
            if ticket.shared_quota and self.shared is not None:
                counters, ticket.shared_quota = ticket.shared_quota, []
                await self.shared.settle_quota(counters, tokens - reserved)
        await self.shared_settle(ticket, tokens)

    async def shared_settle(self, ticket: Ticket, tokens: int) -> None:
        if ticket.shared_reservation is not None and self.shared is not None:
            await self.shared.settle(ticket.key_id, ticket.shared_reservation, tokens)
            ticket.shared_reservation = None

    def headers_for(self, key: ApiKey) -> list[tuple[str, str]]:
        """The key's rate headers as they stand, for a response that takes nothing."""
        limits = self.limits_for(key)
        return limits.headers(time.monotonic(), wall=self.clock() if limits.quotas else None)

    async def describe(self, key: ApiKey) -> dict[str, object]:
        """GET /v1/key: the key's settings, limits and usage against each, for its holder.

        With Redis the usage is every replica's (one script); else this replica's.
        """
        limits = self.limits_for(key)
        if key.key_id in self._unseeded:
            await self._seed(key.key_id, limits)
        now, wall = time.monotonic(), self.clock()
        requests = limits.requests.limit - limits.requests.remaining(now)
        tokens = limits.tokens.used(now) if limits.tokens is not None else None
        spent = {kind: quota.spent(wall) for kind, quota in limits.quotas.items()}
        shared = await self.shared.usage(key.key_id, list(limits.quotas)) if self.shared else None
        if shared is not None:
            requests = shared[0]
            tokens = shared[1] if tokens is not None else None
            spent = dict(zip(limits.quotas, shared[2:]))
        day, month = limits.quotas.get(DAY), limits.quotas.get(MONTH)

        def left(limit: int | None, used: int | None) -> int | None:
            return None if limit is None or used is None else max(0, limit - used)

        tpm = limits.tokens.limit if limits.tokens is not None else None
        return {
            "data": {
                "id": key.key_id,
                "scopes": sorted(key.scopes),
                "models": sorted(key.models) if key.models is not None else None,
                "priority": key.priority,
                "expires": stamp(key.expires.timestamp()) if key.expires else None,
                "limits": {
                    "requests_per_minute": limits.requests.limit,
                    "tokens_per_minute": tpm,
                    "concurrency": limits.concurrency,
                    "daily_tokens": day.limit if day else None,
                    "monthly_tokens": month.limit if month else None,
                },
                "usage": {
                    "requests_this_minute": requests,
                    "tokens_this_minute": tokens,
                    "concurrent": limits.active,
                    "tokens_today": spent.get(DAY),
                    "tokens_this_month": spent.get(MONTH),
                },
                "remaining": {
                    "requests_this_minute": left(limits.requests.limit, requests),
                    "tokens_this_minute": left(tpm, tokens),
                    "concurrency": left(limits.concurrency, limits.active),
                    "tokens_today": left(day.limit if day else None, spent.get(DAY)),
                    "tokens_this_month": left(month.limit if month else None, spent.get(MONTH)),
                },
                "resets": {
                    "day": stamp(period_end(DAY, wall)),
                    "month": stamp(period_end(MONTH, wall)),
                },
                "limiter": "memory" if self.shared is None else "redis" if shared else "local",
            }
        }


@dataclass(slots=True)
class Ticket:
    """What one request holds of its key's limits, to give back or settle when it ends."""

    key_id: str
    limits: KeyLimits
    local: bool = False  # a local concurrent place
    lease: str | None = None  # a concurrency lease in Redis
    reservation: Reservation | None = None
    shared_reservation: str | None = None
    quota: QuotaHold | None = None  # daily/monthly tokens held
    shared_quota: list[str] | None = None  # the Redis counters they are held in


def _over_quota(
    key_id: str, quota: CalendarQuota, tokens: int, wait: float, wall: float
) -> Refusal:
    per = "UTC day" if quota.kind == DAY else "UTC month"
    if math.isinf(wait):
        message = (
            f"this request could use up to {tokens} tokens, more than key '{key_id}' may use "
            f"per {per} ({quota.limit}): lower max_tokens, n or the prompt"
        )
    else:
        message = (
            f"token quota: key '{key_id}' has {quota.remaining(wall)} of its {quota.limit} "
            f"tokens per {per} left and this request could use up to {tokens}; the quota "
            f"resets at {stamp(period_end(quota.kind, wall))}"
        )
    return Refusal(429, message, "quota", headers=retry_headers(wait), code="insufficient_quota")


def _no_such_model(model: str) -> Refusal:
    return Refusal(
        404,
        f"The model '{model[:128]}' does not exist or you do not have access to it.",
        "model",
        code="model_not_found",
        param="model",
    )


def _is_localhost(origin: str) -> bool:
    try:
        host = urllib.parse.urlsplit(origin).hostname
    except ValueError:
        return False
    return host in ("localhost", "127.0.0.1", "::1")


def _presented(head: RequestHead) -> list[str]:
    """The keys a request presents, Bearer first, then X-API-Key.

    Behind a platform that puts its own credential in Authorization (RunPod's load
    balancer), clients send ours in X-API-Key.
    """
    tokens = []
    authorization = head.get("authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            tokens.append(value.strip())
    api_key_header = (head.get("x-api-key") or "").strip()
    if api_key_header:
        tokens.append(api_key_header)
    return tokens


def _unauthorized(message: str, code: str | None = None) -> Refusal:
    return Refusal(401, message, "auth", headers=[("WWW-Authenticate", "Bearer")], code=code)
