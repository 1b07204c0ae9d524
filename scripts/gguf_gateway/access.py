"""Who may make a request, and how much: keys, scopes, CORS and per-key limits.

The request pipeline (server.py) asks, in order: is the origin allowed (CORS), which key
is this and may it use this path (401/403), is it within its request rate and
concurrency (429), and, once the body is known, can its tokens be reserved (429).
Key, scope and request-limit refusals are written here, with the headers an SDK needs
to react to them; a token reservation that does not fit is answered by the pipeline.
"""

from __future__ import annotations

import time

from .config import Config
from .http11 import RequestHead
from .keys import ApiKey, KeySource
from .limits import KeyLimits, Reservation, retry_headers
from .metrics import Metrics
from .readiness import Readiness
from .responses import Responder
from .routes import Route

CORS_ALLOW_HEADERS = (
    "Authorization, Content-Type, X-API-Key, X-Request-ID, OpenAI-Organization, OpenAI-Project"
)
CORS_EXPOSE = (
    "X-Request-ID, Retry-After, retry-after-ms, x-should-retry, "
    "x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-reset-requests, "
    "x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens"
)


class AccessControl:
    def __init__(
        self, config: Config, keys: KeySource, metrics: Metrics, readiness: Readiness
    ) -> None:
        self.config = config
        self.keys = keys
        self.metrics = metrics
        self.readiness = readiness
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

    def preflight_headers(self, route: Route) -> list[tuple[str, str]]:
        return [
            ("Access-Control-Allow-Methods", ", ".join(sorted(route.methods))),
            ("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS),
            ("Access-Control-Max-Age", "600"),
        ]

    def cors_allows(self, origin: str) -> bool:
        allowed = self.config.cors_origins
        return bool(allowed) and ("*" in allowed or origin in allowed)

    def authenticate(self, head: RequestHead, route: Route, out: Responder) -> ApiKey | bool:
        """The request's key, or the refusal already sent (a bool: keep-alive)."""
        keep = head.keep_alive and not head.has_body
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
        challenge = [("WWW-Authenticate", "Bearer")]
        if not tokens:
            self.metrics.rejections["auth"] += 1
            return out.error(
                401,
                "missing API key: send Authorization: Bearer <key>",
                keep_alive=keep,
                extra=challenge,
            )
        ring = self.keys.current()
        key = None
        for token in tokens:
            key = ring.match(token)
            if key is not None:
                break
        if key is None:
            self.metrics.rejections["auth"] += 1
            return out.error(401, "invalid API key", keep_alive=keep, extra=challenge)
        out.ex.key_id = key.key_id
        if key.expired():
            self.metrics.rejections["auth"] += 1
            return out.error(
                401, "API key has expired", keep_alive=keep, extra=challenge, code="expired_api_key"
            )
        if route.scope not in key.scopes:
            self.metrics.rejections["scope"] += 1
            return out.error(
                403, f"this key lacks the '{route.scope}' scope for {route.path}", keep_alive=keep
            )
        return key

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

    def check_request_limits(
        self, key: ApiKey, limits: KeyLimits, out: Responder, keep: bool
    ) -> bool | None:
        now = time.monotonic()
        wait = limits.requests.try_take(now)
        out.ex.rate_headers = limits.headers(now)
        if wait:
            self.metrics.rejections["rate"] += 1
            return out.error(
                429,
                f"rate limit: {limits.requests.limit} requests per minute for key '{key.key_id}'",
                keep_alive=keep,
                extra=retry_headers(wait),
            )
        if limits.concurrency is not None and limits.active >= limits.concurrency:
            self.metrics.rejections["concurrency"] += 1
            return out.error(
                429,
                f"key '{key.key_id}' already has {limits.concurrency} request(s) running",
                keep_alive=keep,
                extra=retry_headers(1.0),
                code="concurrency_limit_exceeded",
            )
        return None

    def reserve_tokens(
        self, limits: KeyLimits, payload: object, body: bytes, out: Responder
    ) -> Reservation | float:
        """Reserve an upper bound of the tokens this request can use."""
        assert limits.tokens is not None
        max_tokens = None
        if isinstance(payload, dict):
            for name in ("max_completion_tokens", "max_tokens", "n_predict"):
                value = payload.get(name)
                if isinstance(value, int) and value >= 0:
                    max_tokens = value
                    break
        # A prompt never has more tokens than bytes of request body (every template and
        # byte-fallback tokenizer emits at least one byte per token).
        estimate = len(body) + (
            max_tokens if max_tokens is not None else (self.readiness.ctx or 4096)
        )
        now = time.monotonic()
        got = limits.tokens.try_reserve(estimate, now)
        out.ex.rate_headers = limits.headers(now)
        return got
