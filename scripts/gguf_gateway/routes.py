"""The route table: every path the gateway answers, one line each, as data.

Deny by default: a path not in this table gets 404 and never reaches llama-server. The
backend is sent the table's own path string, not the client's, so encoded or dotted
variants of a path cannot reach anything else. The proxied lines follow llama-server's
own route list (``tools/server/server.cpp`` of the pinned build), one line per path as
it registers them; following its next route is one more line here.

Each line says, as data, what the rest of the gateway needs to know about a path:

* ``scope``: the key scope it needs (None: no key);
* ``cost``: its accounting class, the one thing the pipeline branches on;
* ``form``: the body and reply format (how tokens are planned from the body, whether a
  non-stream is run as a stream and rebuilt, where usage is read from the reply);
* ``model``: where a request names a model (``body``: the JSON ``model`` field,
  ``query``: ``?model=``), which llama-server's router mode acts on.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum


class Kind(Enum):
    LOCAL = "local"  # answered by the gateway
    KEY = "key"  # answered by the gateway about the caller's own key (GET /v1/key)
    PROXY = "proxy"  # forwarded to llama-server
    STATIC = "static"  # the web UI's files, fetched from llama-server (webui.py)


class Cost(Enum):
    """A route's accounting class."""

    LOCAL = "local"  # answered by the gateway itself
    KEY = "key"  # answered by the gateway about the caller's own key (GET /v1/key)
    # Generation: takes slots (admission), token-planned and settled, and stopped when the
    # client leaves; non-streams of an assembled format are run as streams.
    GENERATE = "generate"
    INPUT = "input"  # takes slots and reads input only (embeddings, rerank)
    FREE = "free"  # forwarded without a slot (tokenize, models, props...)
    OWNED = "owned"  # acts on a stream or completion: only the key that started it
    DISABLED = "disabled"  # makes the server act on its own (tools): off unless allowed


class Form(Enum):
    """How a route's body is read and its reply written."""

    CHAT = "chat"  # OpenAI chat completions
    TEXT = "text"  # OpenAI text completions
    NATIVE = "native"  # llama.cpp's own completion format (/completion, /infill)
    INFILL = "infill"  # /infill: the native format, prefix and suffix as the prompt
    RESPONSES = "responses"  # OpenAI Responses
    MESSAGES = "messages"  # Anthropic Messages
    EMBED = "embed"  # OpenAI embeddings
    EMBED_NATIVE = "embed_native"  # llama.cpp's /embedding(s): content or input
    RERANK = "rerank"
    DECISION = "decision"  # /v1/systemone: a decision model's questions, scored
    AUDIO = "audio"  # multipart/form-data upload (transcriptions), not JSON
    EVENTS = "events"  # the reply is an event stream that is not a generation's
    LOOKUP = "lookup"  # {"conversation_ids": [...]} -> a list of sessions
    CONTROL = "control"  # {"id": completion id, "action": ...}
    SLOT_ACTION = "slot_action"  # ?action=save|restore|erase, {"filename": ...}
    JSON = "json"  # any other JSON body, forwarded as it is
    NONE = "none"  # no body (GET, DELETE)
    MODELS = "models"  # a model listing: a key with models= sees only its own models
    # Vertex AI's prediction protocol: {"instances": [...]}, each naming the route it is
    # for in "@requestFormat"; {"predictions": [...]} back.
    VERTEX = "vertex"


# Formats whose non-streaming requests the gateway runs as streams and rebuilds
# (llama-server b11434 keeps generating a whole-reply request after its client has gone).
ASSEMBLED = frozenset({Form.CHAT, Form.TEXT, Form.NATIVE, Form.INFILL, Form.RESPONSES})
# Formats that name a model in their JSON body (router mode acts on it).
MODEL_IN_BODY = "body"
MODEL_IN_QUERY = "query"


@dataclass(frozen=True)
class Route:
    path: str
    methods: frozenset[str]
    kind: Kind
    scope: str | None = None  # None: no key needed
    cost: Cost = Cost.FREE
    form: Form = Form.JSON
    model: str | None = None  # where the request names a model: "body", "query", None
    # Replies that can carry filesystem paths: reduced to file names for the client.
    scrub: bool = False

    @property
    def admitted(self) -> bool:
        """Occupies llama-server slots: goes through admission and token limits."""
        return self.cost in (Cost.GENERATE, Cost.INPUT)

    @property
    def lists_models(self) -> bool:
        return self.form is Form.MODELS

    @property
    def generation(self) -> bool:
        """A non-streaming request is run as a stream on the backend, then rebuilt."""
        return self.cost is Cost.GENERATE and self.form in ASSEMBLED


def _line(
    path: str,
    methods: str,
    scope: str | None,
    cost: Cost,
    form: Form = Form.JSON,
    scrub: bool = False,
) -> Route:
    kind = {Cost.LOCAL: Kind.LOCAL, Cost.KEY: Kind.KEY}.get(cost, Kind.PROXY)
    posted = "POST" in methods.split()
    model = MODEL_IN_BODY if posted else MODEL_IN_QUERY if kind is Kind.PROXY else None
    return Route(path, frozenset(methods.split()), kind, scope, cost, form, model, scrub)


_INFER, _ADMIN = "inference", "admin"
_LOCAL, _GEN, _INPUT, _FREE = Cost.LOCAL, Cost.GENERATE, Cost.INPUT, Cost.FREE
_OWNED, _OFF = Cost.OWNED, Cost.DISABLED

TABLE: tuple[Route, ...] = (
    # answered by the gateway
    _line("/ping", "GET HEAD", None, _LOCAL, Form.NONE),
    _line("/health", "GET HEAD", None, _LOCAL, Form.NONE),
    # Kubernetes-style aliases: liveness (the process answers) and readiness.
    _line("/healthz", "GET HEAD", None, _LOCAL, Form.NONE),
    _line("/health/live", "GET HEAD", None, _LOCAL, Form.NONE),
    _line("/readyz", "GET HEAD", None, _LOCAL, Form.NONE),
    _line("/health/ready", "GET HEAD", None, _LOCAL, Form.NONE),
    _line("/metrics", "GET HEAD", None, _LOCAL, Form.NONE),
    # llama-server's routes, in server.cpp's order
    _line("/props", "GET", _INFER, _FREE, Form.NONE, scrub=True),
    _line("/props", "POST", _ADMIN, _FREE),
    _line("/models", "GET", _INFER, _FREE, Form.MODELS, scrub=True),
    _line("/v1/models", "GET", _INFER, _FREE, Form.MODELS, scrub=True),
    _line("/v1/key", "GET", _INFER, Cost.KEY, Form.NONE),  # the gateway's own
    _line("/completion", "POST", _INFER, _GEN, Form.NATIVE),
    _line("/completions", "POST", _INFER, _GEN, Form.NATIVE),
    _line("/v1/completions", "POST", _INFER, _GEN, Form.TEXT),
    _line("/chat/completions", "POST", _INFER, _GEN, Form.CHAT),
    _line("/v1/chat/completions", "POST", _INFER, _GEN, Form.CHAT),
    _line("/v1/chat/completions/control", "POST", _INFER, _OWNED, Form.CONTROL),
    _line("/v1/responses", "POST", _INFER, _GEN, Form.RESPONSES),
    _line("/responses", "POST", _INFER, _GEN, Form.RESPONSES),
    _line("/v1/audio/transcriptions", "POST", _INFER, _GEN, Form.AUDIO),
    _line("/audio/transcriptions", "POST", _INFER, _GEN, Form.AUDIO),
    _line("/v1/messages", "POST", _INFER, _GEN, Form.MESSAGES),
    _line("/infill", "POST", _INFER, _GEN, Form.INFILL),
    _line("/embedding", "POST", _INFER, _INPUT, Form.EMBED_NATIVE),
    _line("/embeddings", "POST", _INFER, _INPUT, Form.EMBED_NATIVE),
    _line("/v1/embeddings", "POST", _INFER, _INPUT, Form.EMBED),
    _line("/rerank", "POST", _INFER, _INPUT, Form.RERANK),
    _line("/reranking", "POST", _INFER, _INPUT, Form.RERANK),
    _line("/v1/rerank", "POST", _INFER, _INPUT, Form.RERANK),
    _line("/v1/reranking", "POST", _INFER, _INPUT, Form.RERANK),
    _line("/v1/systemone", "POST", _INFER, _INPUT, Form.DECISION),
    _line("/tokenize", "POST", _INFER, _FREE),
    _line("/detokenize", "POST", _INFER, _FREE),
    _line("/apply-template", "POST", _INFER, _FREE),
    _line("/chat/completions/input_tokens", "POST", _INFER, _FREE),
    _line("/v1/chat/completions/input_tokens", "POST", _INFER, _FREE),
    _line("/responses/input_tokens", "POST", _INFER, _FREE),
    _line("/v1/responses/input_tokens", "POST", _INFER, _FREE),
    _line("/v1/messages/count_tokens", "POST", _INFER, _FREE),
    _line("/lora-adapters", "GET", _INFER, _FREE, Form.NONE, scrub=True),
    _line("/lora-adapters", "POST", _ADMIN, _FREE),
    _line("/slots", "GET", _ADMIN, _FREE, Form.NONE),
    _line("/slots/:id_slot", "POST", _ADMIN, _FREE, Form.SLOT_ACTION),
    # resumable streams: ids namespaced per key (tenancy.py)
    _line("/v1/stream", "GET", _INFER, _OWNED, Form.EVENTS),
    _line("/v1/streams/lookup", "POST", _INFER, _OWNED, Form.LOOKUP),
    _line("/v1/stream", "DELETE", _INFER, _OWNED, Form.NONE),
    # router mode's model management
    _line("/models", "POST", _ADMIN, _FREE),
    _line("/models/load", "POST", _ADMIN, _FREE),
    _line("/models/unload", "POST", _ADMIN, _FREE),
    _line("/models/sse", "GET", _ADMIN, _FREE, Form.EVENTS),
    _line("/models", "DELETE", _ADMIN, _FREE, Form.NONE),
    # the server acting on its own: 403 as llama-server answers, unless ALLOW_SERVER_TOOLS
    _line("/tools", "GET POST", _ADMIN, _OFF),
    _line("/cors-proxy", "GET POST", _ADMIN, _OFF),
)


class Table:
    """Path and method -> route. One path may have several lines (GET and POST /props)."""

    def __init__(self, lines: tuple[Route, ...]) -> None:
        self.by_path: dict[str, dict[str, Route]] = {}
        for line in lines:
            methods = self.by_path.setdefault(line.path, {})
            for method in line.methods:
                if method in methods:
                    raise ValueError(f"route {method} {line.path} is listed twice")
                methods[method] = line

    def __iter__(self) -> Iterator[str]:
        """The table's paths (a parameterised one as written: ``/slots/:id_slot``)."""
        return iter(self.by_path)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self.path_of(path) is not None

    def path_of(self, path: str) -> tuple[str, str | None] | None:
        """The table's path string for a request path, and its ``:param`` value if any."""
        if path in self.by_path:
            return path, None
        match = _SLOT_PATH.fullmatch(path)
        if match:
            return "/slots/:id_slot", match.group(1)
        return None

    def get(self, path: str) -> Route | None:
        """Any line of ``path`` (for a 405's Allow list and for metrics labels)."""
        found = self.path_of(path)
        if found is None:
            return None
        return next(iter(self.by_path[found[0]].values()))

    def methods(self, path: str) -> frozenset[str]:
        return frozenset(self.by_path[path])

    def route(self, path: str, method: str) -> Route | None:
        """The line for this method on the table's ``path``; HEAD falls back to none."""
        return self.by_path[path].get(method)


# The slot id in /slots/{id}: digits only, so the backend's path is rebuilt from it.
_SLOT_PATH = re.compile(r"/slots/([0-9]{1,4})")

ROUTES = Table(TABLE)


# Vertex AI's predict route (AIP_MODE=PREDICTION; its path is AIP_PREDICT_ROUTE): every
# instance is a request to another route, which must itself be one an inference key may
# send and is planned by its own format (vertex.py).
def vertex_route(path: str) -> Route:
    return Route(path, frozenset({"POST"}), Kind.PROXY, _INFER, Cost.GENERATE, Form.VERTEX)


# /metrics when METRICS_AUTH_ENABLED=true.
ADMIN_METRICS = Route("/metrics", frozenset({"GET", "HEAD"}), Kind.LOCAL, "admin", Cost.LOCAL)
