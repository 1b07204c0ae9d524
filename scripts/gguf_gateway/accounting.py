"""After a response: metrics, the usage ledger and the access log, from one Exchange.

Runs once per request, after the last byte was handed to the client, so none of it
delays a response. Probe traffic and unknown paths go to metrics and the access log
only; every request to an authenticated route is in the ledger, refused ones included.
"""

from __future__ import annotations

import logging
import time

from .config import Config
from .ledger import LEDGER_NAME, UsageLedger, bounded
from .metrics import Metrics
from .responses import Exchange

access_log = logging.getLogger("gateway.access")

# Probes arrive every few seconds; their access lines go to DEBUG.
QUIET_PATHS = frozenset(
    {"/ping", "/health", "/metrics", "/healthz", "/readyz", "/health/live", "/health/ready"}
)
# The usage ledger holds authenticated requests: not probes, unknown paths (404), nor
# the web UI's files (counted under "/"), which need no key.
NOT_LEDGERED = QUIET_PATHS | {"other", "/"}


class Accounting:
    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.metrics = metrics
        self.worker_id = config.worker_id
        self.ledger = UsageLedger(config.log_dir / LEDGER_NAME)
        self._second = 0
        self._stamp = ""

    def close(self) -> None:
        self.ledger.close()

    def _timestamp(self) -> str:
        """UTC time to the second, formatted once per second rather than per request."""
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
        return self._stamp

    def finished(self, ex: Exchange, raw_path: str) -> None:
        metrics = self.metrics
        duration = time.monotonic() - ex.started
        if ex.disconnected:
            metrics.client_disconnects += 1
            if not ex.status:
                ex.status = 499  # nginx's "client closed request"
        if ex.refused is not None:
            metrics.rejections[ex.refused] += 1
        if ex.backend_error is not None:
            metrics.backend_errors[ex.backend_error] += 1
        metrics.finished(ex.path, ex.status, duration, ex.ttfb)
        tally = ex.tally
        prompt, completion = tally.prompt, tally.completion
        if prompt:
            metrics.tokens[(ex.key_id, "prompt")] += prompt
        if completion:
            metrics.tokens[(ex.key_id, "completion")] += completion
        if ex.path not in NOT_LEDGERED:
            self.ledger.record(
                {
                    "ts": self._timestamp(),
                    "request_id": ex.request_id,
                    "key_id": ex.key_id,
                    "model": bounded(ex.model),
                    "path": ex.path,
                    "status": ex.status,
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "cached_tokens": tally.cached,
                    "charged_tokens": ex.charged,
                    "ttft_ms": round(ex.ttfb * 1000, 1) if ex.ttfb is not None else None,
                    "duration_ms": round(duration * 1000, 1),
                    "disconnected": ex.disconnected,
                    "worker_id": self.worker_id,
                }
            )
        level = logging.DEBUG if ex.path in QUIET_PATHS else logging.INFO
        if access_log.isEnabledFor(level):
            self._log(level, ex, raw_path, duration)

    @staticmethod
    def _log(level: int, ex: Exchange, raw_path: str, duration: float) -> None:
        tally = ex.tally
        access_log.log(
            level,
            '%s %s "%s %s" %d %dB %.1fms ttfb=%s%s%s',
            ex.request_id,
            ex.key_id,
            ex.method,
            raw_path[:200],
            ex.status,
            ex.sent,
            duration * 1000,
            f"{ex.ttfb * 1000:.1f}ms" if ex.ttfb is not None else "-",
            f" tokens={tally.prompt or 0}+{tally.completion or 0}" if tally.known else "",
            " client-gone" if ex.disconnected else "",
            extra={
                "request_id": ex.request_id,
                "key_id": ex.key_id,
                "method": ex.method,
                "path": ex.path,
                "status": ex.status,
                "bytes": ex.sent,
                "duration_ms": round(duration * 1000, 2),
                "ttfb_ms": round(ex.ttfb * 1000, 2) if ex.ttfb is not None else None,
                "prompt_tokens": tally.prompt,
                "completion_tokens": tally.completion,
                "disconnected": ex.disconnected,
                "error": bounded(ex.error),
            },
        )
