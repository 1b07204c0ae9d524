"""What the gateway answers itself: readiness, health and metrics.

/ping, /readyz and /health/ready say whether a request would be served now; /healthz and
/health/live whether the process is alive; /health gives the detail an operator needs at
a cold start; /metrics is Prometheus text (or JSON) with each llama-server's own series
appended (labelled ``backend``), fetched at most every BACKEND_METRICS_TTL seconds so
scrapes never load it, and never waited on for long.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

from . import cache_counters
from .backend import BackendUnavailable, simple_get
from .backends import Backend
from .config import VERSION, Config
from .http11 import RequestHead
from .limits import Admission
from .metrics import Metrics, merge_backend_series
from .readiness import FAILED, PROBE_STATUS, READY, Readiness
from .startup import finished
from .responses import Responder
from .routes import Route
from .shared_limits import SharedLimits

BACKEND_METRICS_TTL = 2.0
BACKEND_METRICS_WAIT = 0.5
BACKEND_METRICS_TIMEOUT = 2.0


class LocalEndpoints:
    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        readiness: Readiness,
        admission: Callable[[], Admission | None],
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.readiness = readiness
        self.admission = admission
        # The shared limiter (REDIS_URL), set by the gateway; None: limits in memory.
        self.limiter: Callable[[], SharedLimits | None] = lambda: None
        self._backend_metrics_at = -BACKEND_METRICS_TTL
        self._backend_metrics_text = ""
        self._backend_fetch: asyncio.Future[None] | None = None
        self._started_unix = str(int(time.time()))

    def probe(self, out: Responder, head: RequestHead) -> bool:
        """The platform probe contract, in single-port mode: 204 starting, 200, 503."""
        state = self.readiness.status
        status = PROBE_STATUS.get(state, 503)
        body = b"" if status == 204 else json.dumps({"status": state}).encode()
        return out.send(status, body, keep_alive=head.keep_alive, head_only=head.method == "HEAD")

    async def answer(self, out: Responder, head: RequestHead, route: Route) -> bool:
        head_only = head.method == "HEAD"
        keep = head.keep_alive
        path = route.path
        if path in ("/ping", "/readyz", "/health/ready"):
            ready = self.readiness.ready
            body = b'{"status":"ok"}' if ready else b'{"status":"unavailable"}'
            return out.send(200 if ready else 503, body, keep_alive=keep, head_only=head_only)
        if path in ("/healthz", "/health/live"):
            # Liveness: the gateway answers; a dead backend makes the supervisor exit.
            live = self.readiness.status != FAILED
            body = b'{"status":"alive"}' if live else b'{"status":"failed"}'
            return out.send(200 if live else 503, body, keep_alive=keep, head_only=head_only)
        if path == "/health":
            body = json.dumps(self.health()).encode()
            status = 200 if self.readiness.ready else 503
            return out.send(status, body, keep_alive=keep, head_only=head_only)
        self.metrics.backend_up = 1 if self.readiness.backend == READY else 0
        self.metrics.startup = finished(self.readiness.startup_events(), self.readiness.ready_at)
        self.metrics.backend_requests = {b.index: b.served for b in self.readiness.backends}
        shared = self.limiter()
        self.metrics.limiter_up = 1 if shared is not None and shared.up else 0
        self.metrics.queue_depth = admission.waiting if (admission := self.admission()) else 0
        # Per-key series only behind a key (METRICS_AUTH_ENABLED): metrics.py says why.
        per_key = route.scope is not None
        if "format=json" in head.query.split("&"):
            body = json.dumps(self.metrics.as_json(per_key=per_key)).encode()
            return out.send(200, body, keep_alive=keep, head_only=head_only)
        backend = await self.backend_metrics()
        if not per_key and not self.config.expose_prompt_cache:
            backend = cache_counters.without_cache_metrics(backend)
        text = self.metrics.render(per_key=per_key) + backend
        return out.send(
            200,
            text.encode(),
            content_type="text/plain; version=0.0.4; charset=utf-8",
            keep_alive=keep,
            head_only=head_only,
            # As llama-server's /metrics: when the counters started (the supervisor starts
            # the gateway and llama-server together).
            extra=[("Process-Start-Time-Unix", self._started_unix)],
        )

    async def backend_metrics(self) -> str:
        """llama-server's own llamacpp:* series (several backends: labelled with the index).

        Fetched at most every BACKEND_METRICS_TTL seconds, all backends at once. A scrape
        waits at most BACKEND_METRICS_WAIT for a fetch in progress, then answers with the
        last series it has, so a slow llama-server never holds up the gateway's own
        metrics; the fetch finishes (within BACKEND_METRICS_TIMEOUT) for the next scrape.
        """
        now = time.monotonic()
        if self._backend_fetch is None and now - self._backend_metrics_at >= BACKEND_METRICS_TTL:
            self._backend_metrics_at = now
            self._backend_fetch = asyncio.ensure_future(self._fetch_backend_metrics())
        if self._backend_fetch is not None:
            await asyncio.wait((self._backend_fetch,), timeout=BACKEND_METRICS_WAIT)
        return self._backend_metrics_text

    async def _fetch_backend_metrics(self) -> None:
        try:
            texts = await asyncio.gather(
                *(self._one_backend_metrics(b) for b in self.readiness.backends)
            )
            labelled = len(self.readiness.backends) > 1
            self._backend_metrics_text = merge_backend_series([t for t in texts if t], labelled)
        finally:
            self._backend_fetch = None

    async def _one_backend_metrics(self, backend: Backend) -> tuple[int, str] | None:
        if backend.state != READY:
            return None
        try:
            status, body = await simple_get(
                self.config.backend_host,
                backend.port,
                "/metrics",
                self.config.backend_api_key,
                timeout=BACKEND_METRICS_TIMEOUT,
            )
        except (BackendUnavailable, TimeoutError, OSError):
            return None
        # 501 when llama-server runs without --metrics, or in router mode.
        return (backend.index, body.decode("utf-8", "replace")) if status == 200 else None

    def _limiter_state(self) -> dict[str, object]:
        shared = self.limiter()
        if shared is None:
            return {"store": "memory", "shared": False}
        # Redis down: each replica limits on its own until it is back.
        return {"store": "redis", "shared": shared.up, "up": shared.up}

    def health(self) -> dict[str, object]:
        r = self.readiness
        admission = self.admission()
        health: dict[str, object] = {
            "status": r.status,
            "backend": r.backend,
            "models": r.models,
            "slots": {"total": r.slots, "in_use": admission.active if admission else 0},
            "queue_depth": admission.waiting if admission else 0,
            "in_flight": self.metrics.in_flight,
            "uptime_seconds": round(time.monotonic() - r.started, 1),
            "version": VERSION,
            "platform": self.config.platform,
            "limiter": self._limiter_state(),
            "backends": [
                {"index": b.index, "state": b.state, "slots": b.slots, "in_use": b.in_use}
                for b in r.backends
            ],
        }
        health["startup"] = r.startup()
        download = r.download()
        if download is not None:
            health["download"] = download
        return health
