"""One request, from its head to its last byte: the gateway's request pipeline.

    route (deny by default) -> CORS preflight -> key and scope -> draining? -> local answer
    -> loading? -> rate and concurrency (taken at once) -> body (whole-body deadline)
    -> key still valid? -> parse and check the body -> the key's models -> plan (slots,
    token bound) -> token reservation (minute, day, month) -> admission (by priority)
    -> relay -> settle tokens

Requests that take no slot but make llama-server work (/tokenize and the like) have a
small body cap and a fair queue of their own instead of a slot.

Every refusal on the way is a :class:`Refusal`, raised where it is decided and written
here, in ``handle``, before any response byte; the connection loop (server.py) closes the
connection afterwards when the refusal or an unread body says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

from . import bodies, model_scope, tenancy, tokens, vertex, webui
from .access import AccessControl, Ticket
from .backend import BackendUnavailable, simple_exchange
from .backends import Backend, prefix_key
from .cache_counters import PROGRESS_FIELDS
from .client import ClientConnection, ClientGone, ClientWatch
from .config import Config
from .endpoints import LocalEndpoints
from .http11 import HttpError, RequestHead, request_bytes
from .keys import ApiKey
from .limits import Admission, QueueFull, QueueTimeout
from .proxy import Forward, Relay, Shape
from .readiness import LOADING, Readiness
from .refusals import Refusal, bad_request, unavailable
from .responses import Exchange, Responder
from .routes import vertex_route
from .routes import ADMIN_METRICS, ROUTES, Cost, Form, Kind, Route
from .scrub import scrub_paths
from .sse import NATIVE_MARK, PREDICTIONS_MARK

log = logging.getLogger("gateway")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# A slot file name: llama-server writes it under --slot-save-path; nothing path-like.
_FILE_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]{0,127}")
# Request ids: a random prefix per process and a counter, unique across replicas and
# restarts without a random draw (a system call) per request.
_ID_PREFIX = uuid.uuid4().hex[:12]
_ID_COUNTER = itertools.count(1)
# How often a resumable stream whose client left is asked about (llama-server's own
# polling of its HTTP connections is every second too).
SESSION_POLL_SECONDS = 1.0
BACKEND_QUESTION_TIMEOUT = 5.0


# What llama-server's /tools reads from a request's head (the tool's working directory and
# runtime, the reply's type), and the prefix of headers its /cors-proxy passes on.
TOOL_HEADERS = frozenset({"x-tool-cwd", "x-tool-runtime", "x-resp-type"})
PROXY_HEADER_PREFIX = "x-llama-server-proxy-header-"


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


@dataclass(slots=True)
class Outcome:
    """What the connection loop needs to know after a request."""

    keep_alive: bool
    # The request's body is still on the wire (refused before it was read): close, and
    # read what is left first so the client sees our answer rather than a reset.
    linger: bool = False


class Pipeline:
    def __init__(
        self,
        config: Config,
        access: AccessControl,
        readiness: Readiness,
        endpoints: LocalEndpoints,
        relay: Relay,
        admission: AdmissionSource,
    ) -> None:
        self.config = config
        self.access = access
        self.readiness = readiness
        self.endpoints = endpoints
        self.relay = relay
        self.admission = admission
        self.backends = readiness.backends
        # No-slot work: llama-server tokenizes on its HTTP threads (not in a slot), in
        # time quadratic in some texts, and keeps going after the client has left; a
        # small body cap and a bound of their own keep them from starving the rest.
        limit = config.max_concurrent_tokenize
        self.no_slot = Admission(limit, 4 * limit, config.queue_timeout, 2 * limit)
        # Single-port mode: the probe contract on /ping and on RunPod's HEALTH_CHECK_PATH.
        self._probe_paths = (
            frozenset({"/ping", config.health_check_path}) if config.single_port else frozenset()
        )
        # Which key each armed completion id went to (for the control route).
        self.completions = tenancy.Completions()
        # One Host for every backend: llama-server does not route on it.
        self._backend_host = f"{config.backend_host}:{config.port_backend}"
        self._backend_auth = f"Bearer {config.backend_api_key}" if config.backend_api_key else ""

    def _path_of(self, path: str) -> tuple[str, str | None] | None:
        """The table's path for a request path (and its ``:param``), Vertex AI's included."""
        if path == self.config.vertex_predict_route:
            return path, None
        if path == self.config.vertex_health_route:
            return "/health", None
        return ROUTES.path_of(path)

    def route_for(self, path: str) -> Route | None:
        """The route table's entry for a path, or the web UI's static files (WEBUI)."""
        found = self._path_of(path)
        if found is not None and found[0] == self.config.vertex_predict_route:
            return vertex_route(found[0])
        route = ROUTES.get(found[0]) if found is not None else None
        if route is None and self.config.webui and webui.is_ui_path(path):
            return webui.UI_ROUTE
        return route

    def exchange_for(self, head: RequestHead) -> Exchange:
        sent_id = head.get("x-request-id")
        request_id = sent_id if sent_id and _REQUEST_ID.fullmatch(sent_id) else new_request_id()
        route = self.route_for(head.path)
        # Every UI file counts under "/": a bounded metrics label.
        path = route.path if route else "/ping" if head.path in self._probe_paths else "other"
        return Exchange(request_id, head.method, path, time.monotonic())

    async def handle(self, conn: ClientConnection, head: RequestHead, out: Responder) -> Outcome:
        try:
            return await self._serve(conn, head, out)
        except Refusal as refusal:
            # The body was read unless the refusal came first; an unread one stays on
            # the wire, so the connection closes after a lingering read.
            body_read = out.ex.body_read or not head.has_body
            keep = out.refuse(refusal, head.keep_alive and body_read)
            return Outcome(keep, linger=not body_read or refusal.close)
        except HttpError as exc:
            # Bad framing in the body: the connection can no longer be trusted.
            reason = "size" if exc.status == 413 else "framing"
            out.refuse(Refusal(exc.status, exc.message, reason, close=True), False)
            return Outcome(False, linger=True)
        except TimeoutError:
            late = Refusal(
                408, "request body not received within CLIENT_BODY_TIMEOUT", "timeout", close=True
            )
            out.refuse(late, False)
            return Outcome(False, linger=True)
        except ClientGone:
            out.ex.disconnected = True
            return Outcome(False)

    async def _serve(self, conn: ClientConnection, head: RequestHead, out: Responder) -> Outcome:
        if head.path in self._probe_paths and head.method in ("GET", "HEAD"):
            _no_body(head)
            return Outcome(self.endpoints.probe(out, head))
        found = self._path_of(head.path)
        ui = found is None and self.config.webui and webui.is_ui_path(head.path)
        if found is None and not ui:
            raise Refusal(404, f"no such endpoint: {head.path[:200]}", "not_found")
        origin = head.get("origin")
        out.ex.cors_headers = self.access.cors_headers(origin)
        if head.method == "OPTIONS" and head.get("access-control-request-method"):
            # A browser's preflight carries no credentials: answer it before auth. As
            # llama-server does: 200 with an empty text/html body, and for an origin not
            # in CORS_ORIGINS no Access-Control-* headers at all (the browser stops there).
            keep = head.keep_alive and not head.has_body
            if origin is not None and out.ex.cors_headers:
                out.ex.cors_headers = self.access.preflight_headers(origin)
            else:
                out.ex.refused = "cors"
            out.send(200, b"", content_type="text/html", keep_alive=keep)
            return Outcome(keep, linger=head.has_body)
        param: str | None = None
        if found is None:
            route, allowed = webui.UI_ROUTE, webui.UI_ROUTE.methods
            line: Route | None = route if head.method in allowed else None
        elif found[0] == self.config.vertex_predict_route:
            route, allowed = vertex_route(found[0]), frozenset({"POST"})
            line = route if head.method in allowed else None
        else:
            table_path, param = found
            line, allowed = ROUTES.route(table_path, head.method), ROUTES.methods(table_path)
        if line is None:
            raise Refusal(
                405,
                f"{head.method} is not allowed on {head.path[:200]}",
                "method",
                headers=[("Allow", ", ".join(sorted(allowed)))],
            )
        route = line
        if route.path == "/metrics" and (
            self.config.metrics_auth_enabled
            or (self.config.auth_enabled and self.access.admin_presented(head))
        ):
            # Per-key series need a key: always with METRICS_AUTH_ENABLED, and on an open
            # /metrics for an admin key that comes with the scrape.
            route = ADMIN_METRICS
        if route.kind is Kind.STATIC:
            _no_body(head)  # a stranger's body is never read or buffered
            return Outcome(await self._static(head, out))
        if route.scope is None:
            _no_body(head)  # a stranger's body is never read or buffered
            return Outcome(await self.endpoints.answer(out, head, route))
        key = self.access.authenticate(head, route, out) if self.config.auth_enabled else None
        if key is None:
            out.ex.key_id = "anonymous"
        if route.cost is Cost.DISABLED and not self.config.allow_server_tools:
            # As llama-server answers while its tools and CORS proxy are off.
            raise Refusal(
                403, "this feature is disabled", "feature_disabled", code="feature_disabled"
            )
        if self.readiness.draining:
            raise unavailable("the server is shutting down", "draining", retry_after=1)
        if route.kind is Kind.LOCAL:
            _no_body(head)
            return Outcome(await self.endpoints.answer(out, head, route))
        if route.kind is Kind.KEY:
            _no_body(head)
            return Outcome(await self._key_info(out, head, key))
        if not self.readiness.ever_ready or self.readiness.backend == LOADING:
            raise unavailable("the model is still loading; retry shortly", "loading", 5)
        if key is None:
            return await self._with_body(conn, head, route, param, out, None, None)
        limits = self.access.limits_for(key)
        ticket = await self.access.enter(key, limits, out, route.cost is not Cost.OWNED)
        try:
            return await self._with_body(conn, head, route, param, out, key, ticket)
        finally:
            await self.access.leave(ticket)

    async def _with_body(
        self,
        conn: ClientConnection,
        head: RequestHead,
        route: Route,
        param: str | None,
        out: Responder,
        key: ApiKey | None,
        ticket: Ticket | None,
    ) -> Outcome:
        ring = self.access.keys.ring
        no_slot = route.cost is Cost.FREE and head.method == "POST"
        cap = self.config.max_tokenize_body_size if no_slot else self.config.max_request_body_size
        if (head.content_length or 0) > cap:
            raise Refusal(
                413,
                f"request body larger than {cap} bytes (MAX_TOKENIZE_BODY_SIZE) for {route.path}",
                "size",
                close=True,
            )
        body = await conn.read_body(head, self.config.client_body_timeout, cap)
        out.ex.body_read = True
        if key is not None:
            self.access.still_valid(key, ring)
        scoped = key is not None and key.models is not None
        forward, plan = self._prepare(head, route, param, out, body, canonical=scoped)
        if key is not None and key.models is not None:
            if route.lists_models:
                forward = dataclasses.replace(forward, models=key.models)
            else:
                named = forward.models_named
                for model in [out.ex.model, *model_scope.query_models(head.query), *named]:
                    self.access.check_model(
                        key, model, self.readiness.models, self.readiness.router
                    )
        reserved = ticket is not None and route.admitted and ticket.limits.counts_tokens
        if reserved:
            assert ticket is not None
            await self.access.reserve_tokens(ticket, plan.tokens, out)
        try:
            if no_slot:
                return Outcome(await self._no_slot(conn, out, forward))
            if not route.admitted:
                if route.cost is Cost.OWNED and len(self.backends) > 1:
                    return Outcome(await self._everywhere(out, forward))
                return Outcome(await self.relay.run(out, forward, self.backends.any()))
            weight = key.priority if key is not None else 1
            return Outcome(await self._admitted(conn, out, forward, plan, weight))
        finally:
            if reserved:
                assert ticket is not None
                out.ex.charged = self._settled(out.ex, plan.tokens)
                await self.access.settle(ticket, out.ex.charged)

    async def _key_info(self, out: Responder, head: RequestHead, key: ApiKey | None) -> bool:
        if key is None:
            raise Refusal(404, "GET /v1/key describes an API key: AUTH_ENABLED is false", "key")
        body = json.dumps(await self.access.describe(key)).encode()  # seeds quotas first
        out.ex.rate_headers = self.access.headers_for(key)
        return out.send(200, body, keep_alive=head.keep_alive)

    def _prepare(
        self,
        head: RequestHead,
        route: Route,
        param: str | None,
        out: Responder,
        body: bytes,
        canonical: bool = False,
    ) -> tuple[Forward, tokens.Plan]:
        """Check the body, plan its cost, and build the request llama-server will get.

        ``canonical``: send the body as parsed here, never as the client wrote it, so that
        the model llama-server reads is the one checked (a key limited to some models could
        otherwise name two, e.g. in repeated keys, hoping the parsers disagree).
        """
        slot_ctx = self.readiness.ctx or 4096
        shape, strip_usage = Shape.PLAIN, False
        plan = tokens.Plan(1, slot_ctx)
        affinity: bytes | None = None
        owner = out.ex.key_id
        query = dict(parse_qsl(head.query, keep_blank_values=True)) if head.query else {}
        headers: list[tuple[str, str]] = []
        rewrite: Callable[[bytes], bytes] | None = scrub_paths if route.scrub else None
        watch: tenancy.Watch | None = None
        named: tuple[str, ...] = ()  # models named besides the body's own (instances)
        loads = True  # may make router mode load a model (Vertex: every instance admitted)
        return_tokens = False
        if route.form is Form.AUDIO:
            # A multipart upload, not JSON: one task, up to the slot's context.
            if not body:
                raise bad_request("request body is empty: send the audio file", "body")
        elif head.method == "POST":
            if not body:
                raise bad_request("request body is empty: send a JSON object", "body")
            payload = bodies.parse_object(body)
            bodies.inspect(payload, self.config.allow_remote_media)
            model = payload.get("model")
            out.ex.model = model if isinstance(model, str) else None
            if route.form is Form.VERTEX:
                # Instances, each checked and planned as the request it stands for.
                checked = vertex.check_and_plan(
                    payload, len(body), slot_ctx, self.config.allow_remote_media
                )
                plan, named = checked.plan, checked.models
                loads = checked.all_admitted
                out.ex.tally.mark = PREDICTIONS_MARK
                canonical = True  # the instances as checked (server-owned fields gone)
            elif route.admitted:  # only requests that take a slot are planned and routed
                plan = tokens.plan(route.form, payload, len(body), slot_ctx)
                if len(self.backends) > 1:
                    # Per key unless the deployment has one tenant (cache_counters.py).
                    owner = "" if self.config.expose_prompt_cache else out.ex.key_id
                    affinity = prefix_key(payload, owner)
            changed = tokens.strip_server_fields(payload) or canonical
            if route.form is Form.LOOKUP:
                payload, changed = tenancy.lookup_body(owner, payload), True
                rewrite = tenancy.lookup_reply(owner)
            elif route.form is Form.CONTROL:
                changed = tenancy.control_body(self.completions, owner, payload) or changed
            if route.admitted and not self.config.expose_prompt_cache:
                for name in PROGRESS_FIELDS:
                    changed = payload.pop(name, None) is not None or changed
            streamed = payload.get("stream") is True
            if streamed:
                shape = Shape.STREAM
            if route.generation:
                if route.form in (Form.NATIVE, Form.INFILL):
                    # No usage object in llama.cpp's own format: each task's final event
                    # carries its counts, and the stream_options of OpenAI do not apply.
                    out.ex.tally.mark = NATIVE_MARK
                    return_tokens = payload.get("return_tokens") is True
                elif route.form in (Form.CHAT, Form.TEXT):
                    options = payload.get("stream_options")
                    asked = isinstance(options, dict) and options.get("include_usage") is True
                    # Usage is what token limits and metrics settle on: always ask for it,
                    # and drop the extra chunks from streams whose client did not.
                    payload["stream_options"] = {
                        **(options if isinstance(options, dict) else {}),
                        "include_usage": True,
                    }
                    strip_usage = streamed and not asked
                # Non-streams run as streams so that a client leaving stops generation.
                payload["stream"] = True
                shape = Shape.STREAM if streamed else Shape.ASSEMBLED
                changed = True
                if payload.get("reasoning_control") is True:
                    watch = self.completions.watcher(owner)
            if changed:
                body = json.dumps(payload).encode()
        session: str | None = None
        if route.cost is Cost.OWNED and "conv_id" in query:
            query["conv_id"] = tenancy.conversation_id(owner, query["conv_id"], "conv_id")
            session = query["conv_id"]
        if route.form is Form.EVENTS:
            # An event stream of its own (a replay, model states): relayed as it comes.
            shape = Shape.STREAM
        conv = head.get("x-conversation-id")
        if conv and route.cost is Cost.GENERATE:
            session = tenancy.conversation_id(owner, conv)
            headers.append(("X-Conversation-Id", session))
        if route.cost is Cost.DISABLED:
            # The server's own tools and CORS proxy (here only with ALLOW_SERVER_TOOLS and
            # an admin key): the headers they act on go with the request.
            headers.extend(
                (name, value)
                for name, value in head.headers
                if name in TOOL_HEADERS or name.startswith(PROXY_HEADER_PREFIX)
            )
        path = route.path
        if route.form is Form.SLOT_ACTION and param is not None:
            path, query = self._slot_action(route, param, query, body)
        if self.readiness.router and not (route.admitted and loads):
            # Router mode loads the model a request names: only requests that are
            # admitted (and counted) may make it load one.
            query["autoload"] = "false"
        target = path + ("?" + urlencode(query) if query else "")
        request = self._backend_request(head, target, body, out.ex.request_id, headers)
        forward = Forward(
            request,
            shape,
            route.path,
            head.keep_alive,
            head.http11,
            strip_usage,
            affinity,
            form=route.form,
            rewrite=rewrite,
            count_usage=route.form is not Form.EVENTS,
            watch=watch,
            session=session,
            models_named=named,
            return_tokens=return_tokens,
            conceal=route.admitted and not self.config.expose_prompt_cache,
        )
        return forward, plan

    @staticmethod
    def _slot_action(
        route: Route, slot: str, query: dict[str, str], body: bytes
    ) -> tuple[str, dict[str, str]]:
        """``POST /slots/{id}?action=``: a known action, on a plain file name only."""
        action = query.get("action", "")
        if action not in ("save", "restore", "erase"):
            raise bad_request(
                "action must be save, restore or erase", "slot_action", param="action"
            )
        if action != "erase":
            filename = json.loads(body).get("filename") if body else None
            if not isinstance(filename, str) or not _FILE_NAME.fullmatch(filename):
                raise bad_request(
                    "filename must be a plain file name (letters, digits, '.', '_', '-'; "
                    "no path)",
                    "slot_filename",
                    param="filename",
                )
        return route.path.replace(":id_slot", slot), {"action": action}

    async def _admitted(
        self,
        conn: ClientConnection,
        out: Responder,
        forward: Forward,
        plan: tokens.Plan,
        weight: int = 1,
    ) -> bool:
        """Wait for enough slots (queued by the key's priority), then relay while watching
        the client for a disconnect."""
        admission = self.admission()
        # Every task of a request runs on the one backend it is sent to.
        most = min(admission.limit, self.backends.most_slots or admission.limit)
        slots = plan.tasks
        if slots > most:
            if forward.form in tokens.INPUT_ONLY or forward.form is Form.VERTEX:
                # A batch of embeddings runs on every slot in turn: it takes them all.
                slots = most
            else:
                raise bad_request(
                    f"this request asks for {slots} generations at once (n times prompts); "
                    f"the server runs at most {most}",
                    "slots",
                    param="n",
                )
        task = conn.channel.current_task()
        with _watching(conn, task) as watch:
            await _enter(admission, out.ex.key_id, slots, "slot", weight)
            backend = self.backends.pick(slots, forward.affinity)
            try:
                return await self.relay.run(out, forward, backend)
            except asyncio.CancelledError:
                if not (watch.gone and forward.session):
                    raise
                task.uncancel()
                await self._detached(backend, forward.session)
                raise ClientGone() from None
            finally:
                self.backends.release(backend, slots)
                admission.release(slots)

    async def _static(self, head: RequestHead, out: Responder) -> bool:
        """A web UI file, asked of llama-server with the backend key (no client key needed).

        HEAD is asked as GET so that the length llama-server reports is the file's.
        """
        headers = [("Host", self._backend_host)]
        if self._backend_auth:
            headers.append(("Authorization", self._backend_auth))
        for name in webui.FORWARDED_REQUEST_HEADERS:
            value = head.get(name)
            if value is not None:
                headers.append((name, value))
        headers.append(("X-Request-ID", out.ex.request_id))
        request = request_bytes("GET", head.path, headers, b"")
        return await self.relay.static(
            out, request, self.backends.any(), head.keep_alive, head.method == "HEAD"
        )

    async def _ask(self, backend: Backend, request: bytes) -> tuple[int, bytes]:
        """One question to one llama-server; (502, b"") when it cannot answer."""
        try:
            return await simple_exchange(
                self.config.backend_host, backend.port, request, BACKEND_QUESTION_TIMEOUT
            )
        except (BackendUnavailable, TimeoutError):
            return 502, b""

    async def _session(self, backend: Backend, session: str) -> dict[str, Any] | None:
        """What this llama-server says of the resumable stream ``session`` (None: none)."""
        lookup = self._backend_lookup(json.dumps({"conversation_ids": [session]}).encode())
        status, answer = await self._ask(backend, lookup)
        try:
            sessions = json.loads(answer) if status == 200 else []
        except ValueError:
            return None
        for entry in sessions if isinstance(sessions, list) else ():
            if isinstance(entry, dict) and entry.get("conversation_id") == session:
                return entry
        return None

    def _backend_lookup(self, body: bytes) -> bytes:
        headers = [("Host", self._backend_host)]
        if self._backend_auth:
            headers.append(("Authorization", self._backend_auth))
        headers.append(("Content-Type", "application/json"))
        return request_bytes("POST", "/v1/streams/lookup", headers, body)

    async def _everywhere(self, out: Responder, forward: Forward) -> bool:
        """Several llama-servers (BACKENDS): a key's streams and completions may be on any.

        Each is asked, and the client answered as one llama-server holding them all
        would: a replay from the one that holds the stream, every server's sessions in
        one lookup, a stop sent to all, a control to the one running the completion.
        """
        backends = list(self.backends)
        if forward.form is Form.EVENTS:
            holders = [
                b
                for b in backends
                if forward.session and await self._session(b, forward.session) is not None
            ]
            return await self.relay.run(out, forward, holders[0] if holders else backends[0])
        answers = await asyncio.gather(*(self._ask(b, forward.request) for b in backends))
        keep = forward.keep_alive
        if forward.form is Form.LOOKUP:
            merged: list[Any] = []
            for status, answer in answers:
                try:
                    found = json.loads(answer) if status == 200 else []
                except ValueError:
                    found = []
                merged.extend(found if isinstance(found, list) else [])
            body = json.dumps(merged).encode()
            if forward.rewrite is not None:
                body = forward.rewrite(body)
            return out.send(
                200, body, content_type="application/json; charset=utf-8", keep_alive=keep
            )
        if forward.form is Form.CONTROL:
            for status, answer in answers:
                if status == 200 and b'"success":true' in answer:
                    return out.send(status, answer, keep_alive=keep)
        for status, answer in answers:
            if status != 502:
                return out.send(status, answer, keep_alive=keep)
        raise Refusal(502, "llama-server is not reachable", "unavailable", backend=True)

    async def _detached(self, backend: Backend, session: str) -> None:
        """Wait for a resumable stream whose client has left to end.

        llama-server keeps generating it into its buffer (for a resume), so its slots and
        the key's concurrency stay taken until it is done: a key cannot start streams,
        leave them and so run more at once than it may. Should llama-server not answer,
        there is nothing left to hold them for.
        """
        while True:
            entry = await self._session(backend, session)
            if entry is None or entry.get("is_done") is not False:
                return
            await asyncio.sleep(SESSION_POLL_SECONDS)

    async def _no_slot(self, conn: ClientConnection, out: Responder, forward: Forward) -> bool:
        """Wait for a no-slot place (MAX_CONCURRENT_TOKENIZE), then relay, watching the client."""
        with _watching(conn, conn.channel.current_task()):
            await _enter(self.no_slot, out.ex.key_id, 1, "tokenizer place")
            try:
                return await self.relay.run(out, forward, self.backends.any())
            finally:
                self.no_slot.release()

    @staticmethod
    def _settled(ex: Exchange, reserved: int) -> int:
        """The tokens a finished request holds in its key's window."""
        tally = ex.tally
        if tally.prompt is not None:
            return tally.prompt + (tally.completion or 0)
        if 400 <= ex.status < 500 and not ex.disconnected:
            return 0  # refused by llama-server: nothing was generated
        # No full report (a client that left, a failure, a stream whose prompt count
        # never came): the upper bound stays.
        return reserved

    def _backend_request(
        self,
        head: RequestHead,
        target: str,
        body: bytes,
        request_id: str,
        forwarded: list[tuple[str, str]],
    ) -> bytes:
        """A fresh request: the route's own path, one Content-Length, the backend key.

        Nothing else of the client's head is copied, so its credentials and hop-by-hop
        headers never reach llama-server; ``forwarded`` are the headers it acts on, as
        the gateway rewrote them.
        """
        headers = [("Host", self._backend_host)]
        if self._backend_auth:
            headers.append(("Authorization", self._backend_auth))
        if body:
            headers.append(("Content-Type", head.get("content-type") or "application/json"))
        headers.append(("X-Request-ID", request_id))
        headers.extend(forwarded)
        return request_bytes(head.method, target, headers, body)


@contextlib.contextmanager
def _watching(conn: ClientConnection, task: asyncio.Task[Any]) -> Iterator[ClientWatch]:
    """Watch the client while its request waits for or is with a backend: the cancellation
    its leaving causes becomes ClientGone (``task`` uncancelled, so the answer can run)."""
    watch = conn.watch()
    try:
        yield watch
    except asyncio.CancelledError:
        if not watch.gone:
            raise
        task.uncancel()
        raise ClientGone() from None
    finally:
        watch.stop()


async def _enter(admission: Admission, key_id: str, slots: int, what: str, weight: int = 1) -> None:
    """Take ``slots`` of ``admission`` (places of kind ``what``), waiting in its fair queue,
    or refuse with 503."""
    try:
        await admission.acquire(key_id, slots, weight)
    except QueueFull as exc:
        message = (
            f"key '{key_id}' already holds its {admission.per_key} queue places"
            if exc.per_key
            else f"all {what}s are busy and the queue is full"
        )
        raise unavailable(message, "queue_key_full" if exc.per_key else "queue_full") from None
    except QueueTimeout:
        raise unavailable(f"waited too long for a {what}", "queue_timeout") from None


def _no_body(head: RequestHead) -> None:
    """Paths the gateway answers itself take no body: refused at once, never read."""
    if head.has_body:
        raise bad_request(f"{head.path[:200]} takes no request body", "body")


class AdmissionSource:
    """The admission gate, created once llama-server's slot count is known."""

    def __init__(self, config: Config, readiness: Readiness) -> None:
        self.config = config
        self.readiness = readiness
        self.current: Admission | None = None

    def __call__(self) -> Admission:
        if self.current is None:
            config = self.config
            limit = config.max_concurrent_requests or self.readiness.slots or 4
            queue = config.max_queue_size if config.max_queue_size is not None else 4 * limit
            per_key = (
                config.max_queue_per_key
                if config.max_queue_per_key is not None
                else max(1, queue // 2)
            )
            self.current = Admission(limit, queue, config.queue_timeout, per_key)
            log.info(
                "admission: %d slot(s), queue of %d (%d per key)",
                limit,
                queue,
                self.current.per_key,
            )
        return self.current
