"""The path allowlist: what the gateway answers itself and what it forwards.

Deny by default: a path not in this table gets 404 and never reaches llama-server. The
backend is sent the table's own path string, not the client's, so encoded or dotted
variants of a path cannot reach anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Kind(Enum):
    LOCAL = "local"  # answered by the gateway
    KEY = "key"  # answered by the gateway about the caller's own key (GET /v1/key)
    PROXY = "proxy"  # forwarded to llama-server
    STATIC = "static"  # the web UI's files, fetched from llama-server (webui.py)


@dataclass(frozen=True)
class Route:
    path: str
    methods: frozenset[str]
    kind: Kind
    scope: str | None = None  # None: no key needed
    # Generation endpoints: non-streaming requests are run as streams on the backend
    # so that a client disconnect stops generation (llama-server keeps generating a
    # non-streaming request after its client has gone).
    generation: bool = False
    # Occupies a llama-server slot: goes through admission and token limits.
    admitted: bool = False
    # Answers with a model listing: a key with models= sees only its own models there.
    lists_models: bool = False


def _route(
    path: str,
    methods: str,
    kind: Kind,
    scope: str | None,
    generation: bool = False,
    admitted: bool = False,
    lists_models: bool = False,
) -> Route:
    return Route(
        path,
        frozenset(methods.split()),
        kind,
        scope,
        generation,
        admitted or generation,
        lists_models,
    )


ROUTES: dict[str, Route] = {
    r.path: r
    for r in (
        _route("/ping", "GET HEAD", Kind.LOCAL, None),
        _route("/health", "GET HEAD", Kind.LOCAL, None),
        # Kubernetes-style aliases: liveness (the process answers) and readiness.
        _route("/healthz", "GET HEAD", Kind.LOCAL, None),
        _route("/health/live", "GET HEAD", Kind.LOCAL, None),
        _route("/readyz", "GET HEAD", Kind.LOCAL, None),
        _route("/health/ready", "GET HEAD", Kind.LOCAL, None),
        _route("/metrics", "GET HEAD", Kind.LOCAL, None),
        _route("/v1/chat/completions", "POST", Kind.PROXY, "inference", generation=True),
        _route("/v1/completions", "POST", Kind.PROXY, "inference", generation=True),
        _route("/v1/models", "GET", Kind.PROXY, "inference", lists_models=True),
        _route("/v1/key", "GET", Kind.KEY, "inference"),
        _route("/v1/embeddings", "POST", Kind.PROXY, "inference", admitted=True),
        _route("/v1/responses", "POST", Kind.PROXY, "inference", admitted=True),
        _route("/v1/messages", "POST", Kind.PROXY, "inference", admitted=True),
        _route("/v1/messages/count_tokens", "POST", Kind.PROXY, "inference"),
        _route("/v1/rerank", "POST", Kind.PROXY, "inference", admitted=True),
        _route("/tokenize", "POST", Kind.PROXY, "inference"),
        _route("/detokenize", "POST", Kind.PROXY, "inference"),
        _route("/slots", "GET", Kind.PROXY, "admin"),
        _route("/props", "GET", Kind.PROXY, "admin"),
    )
}

# /metrics when METRICS_AUTH_ENABLED=true.
ADMIN_METRICS = Route("/metrics", frozenset({"GET", "HEAD"}), Kind.LOCAL, "admin")
