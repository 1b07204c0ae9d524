"""Prometheus metrics kept in plain dicts and rendered on demand.

Label values are bounded by construction: paths come from the route table (anything else
is counted as ``other``), statuses are integers, key ids come from the key file, reasons
from a fixed vocabulary in the gateway. Nothing here allocates per streamed chunk.

Series labelled by key id are tenant data (who uses the service, and how much): they are
rendered only for a ``/metrics`` that needs a key (METRICS_AUTH_ENABLED=true, admin
scope). An open ``/metrics`` shows the same counters summed over keys.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

# Time to first byte spans milliseconds (cached prompt) to minutes (huge prefill on a
# cold GPU); durations span a tokenize call to an hour-long generation.
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
)  # fmt: skip


class Histogram:
    __slots__ = ("buckets", "counts", "total", "count")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def render(self, name: str) -> list[str]:
        lines = []
        cumulative = 0
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            lines.append(f'{name}_bucket{{le="{float(bound)}"}} {cumulative}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {self.total:.6f}")
        lines.append(f"{name}_count {self.count}")
        return lines

    def as_json(self) -> dict[str, object]:
        return {
            "buckets": dict(zip([str(b) for b in self.buckets], self.counts)),
            "sum": self.total,
            "count": self.count,
        }


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        self.rejections: defaultdict[str, int] = defaultdict(int)
        self.tokens: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.backend_errors: defaultdict[str, int] = defaultdict(int)
        self.client_disconnects = 0
        self.in_flight = 0
        self.queue_depth = 0
        self.backend_up = 0
        self.backend_requests: dict[int, int] = {}  # backend index -> requests routed there
        self.limiter_up = 0
        self.startup: dict[str, float] = {}  # phase -> seconds, once the phase is over
        self.duration = Histogram(DURATION_BUCKETS)
        self.ttfb = Histogram(TTFB_BUCKETS)

    def finished(self, path: str, status: int, duration: float, ttfb: float | None) -> None:
        self.requests[(path, status)] += 1
        self.duration.observe(duration)
        if ttfb is not None:
            self.ttfb.observe(ttfb)

    def tokens_by_kind(self) -> dict[str, int]:
        """Token counters summed over keys: what an open /metrics may show."""
        totals: defaultdict[str, int] = defaultdict(int)
        for (_key_id, kind), n in self.tokens.items():
            totals[kind] += n
        return dict(sorted(totals.items()))

    def render(self, extra: str = "", *, per_key: bool = False) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        family("gateway_requests_total", "counter", "Requests answered, by path and status.")
        for (path, status), n in sorted(self.requests.items()):
            out.append(f'gateway_requests_total{{path="{_escape(path)}",status="{status}"}} {n}')
        family("gateway_requests_in_flight", "gauge", "Requests being processed now.")
        out.append(f"gateway_requests_in_flight {self.in_flight}")
        family("gateway_queue_depth", "gauge", "Requests waiting for a backend slot.")
        out.append(f"gateway_queue_depth {self.queue_depth}")
        family("gateway_request_duration_seconds", "histogram", "Request duration.")
        out.extend(self.duration.render("gateway_request_duration_seconds"))
        family(
            "gateway_time_to_first_byte_seconds",
            "histogram",
            "Time from request to the first response byte from the backend.",
        )
        out.extend(self.ttfb.render("gateway_time_to_first_byte_seconds"))
        if per_key:
            family("gateway_tokens_total", "counter", "Tokens reported by the backend, by key.")
            for (key_id, kind), n in sorted(self.tokens.items()):
                out.append(f'gateway_tokens_total{{key_id="{_escape(key_id)}",kind="{kind}"}} {n}')
        else:
            family("gateway_tokens_total", "counter", "Tokens reported by the backend.")
            for kind, n in self.tokens_by_kind().items():
                out.append(f'gateway_tokens_total{{kind="{kind}"}} {n}')
        family("gateway_rejections_total", "counter", "Requests refused by the gateway.")
        for reason, n in sorted(self.rejections.items()):
            out.append(f'gateway_rejections_total{{reason="{reason}"}} {n}')
        family("gateway_backend_errors_total", "counter", "Backend failures, by kind.")
        for kind_name, n in sorted(self.backend_errors.items()):
            out.append(f'gateway_backend_errors_total{{kind="{kind_name}"}} {n}')
        family(
            "gateway_client_disconnects_total",
            "counter",
            "Clients that went away before their response was complete.",
        )
        out.append(f"gateway_client_disconnects_total {self.client_disconnects}")
        family("gateway_backend_up", "gauge", "1 when llama-server is ready.")
        out.append(f"gateway_backend_up {self.backend_up}")
        family("gateway_backend_requests_total", "counter", "Requests routed to each llama-server.")
        for index, n in sorted(self.backend_requests.items()):
            out.append(f'gateway_backend_requests_total{{backend="{index}"}} {n}')
        family(
            "gateway_limiter_up",
            "gauge",
            "1 when REDIS_URL is set and Redis answers (limits shared by every replica).",
        )
        out.append(f"gateway_limiter_up {self.limiter_up}")
        family(
            "gateway_startup_seconds",
            "gauge",
            "Cold start: seconds downloading the model, loading it, and from boot until ready.",
        )
        for phase, seconds in self.startup.items():
            out.append(f'gateway_startup_seconds{{phase="{phase}"}} {seconds}')
        text = "\n".join(out) + "\n"
        return text + extra

    def as_json(self, *, per_key: bool = False) -> dict[str, object]:
        tokens: list[dict[str, object]] = (
            [
                {"key_id": k, "kind": kind, "value": n}
                for (k, kind), n in sorted(self.tokens.items())
            ]
            if per_key
            else [{"kind": kind, "value": n} for kind, n in self.tokens_by_kind().items()]
        )
        return {
            "requests_total": [
                {"path": p, "status": s, "value": n} for (p, s), n in sorted(self.requests.items())
            ],
            "requests_in_flight": self.in_flight,
            "queue_depth": self.queue_depth,
            "request_duration_seconds": self.duration.as_json(),
            "time_to_first_byte_seconds": self.ttfb.as_json(),
            "tokens_total": tokens,
            "rejections_total": dict(sorted(self.rejections.items())),
            "backend_errors_total": dict(sorted(self.backend_errors.items())),
            "client_disconnects_total": self.client_disconnects,
            "backend_up": self.backend_up,
            "backend_requests_total": {str(i): n for i, n in sorted(self.backend_requests.items())},
            "limiter_up": self.limiter_up,
            "startup_seconds": dict(self.startup),
        }


def merge_backend_series(texts: list[tuple[int, str]], labelled: bool) -> str:
    """llama-server's ``llamacpp:*`` series from each backend, as one exposition.

    ``texts`` holds (backend index, its /metrics text). With one llama-server
    (``labelled`` false) its series are passed on exactly as it writes them, so whatever
    reads llama-server's own /metrics reads the gateway's the same way. With several,
    every sample gets a ``backend="<index>"`` label, so they never collide and ``sum``
    gives the whole (a ratio such as ``kv_cache_usage_ratio`` is per backend: summing
    several would mean nothing). Each family's HELP and TYPE appear once, followed by all
    its samples (Prometheus requires a family's samples together). Anything that is not
    a ``llamacpp:`` family is left out.
    """
    families: dict[str, tuple[list[str], list[str]]] = {}
    for index, text in texts:
        label = f'backend="{index}"'
        current: str | None = None
        for line in text.splitlines():
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    current = parts[2] if parts[2].startswith("llamacpp:") else None
                    if current is not None:
                        meta, _ = families.setdefault(current, ([], []))
                        if len(meta) < 2 and line not in meta:
                            meta.append(line)
                continue
            if current is None or not line.strip():
                continue
            name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
            if name_end < 0:
                continue
            name, rest = line[:name_end], line[name_end:]
            if not labelled:
                pass
            elif rest.startswith("{"):
                rest = "{" + label + ("," if not rest.startswith("{}") else "") + rest[1:]
            else:
                rest = "{" + label + "}" + rest
            families[current][1].append(name + rest)
    out: list[str] = []
    for meta, samples in families.values():
        out.extend(meta)
        out.extend(samples)
    return "\n".join(out) + "\n" if out else ""
