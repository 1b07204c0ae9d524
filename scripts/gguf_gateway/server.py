"""The gateway's asyncio server: one coroutine per client connection.

A connection reads request heads with the sans-IO parser and takes each request through
the same steps: route (deny by default) -> key and scope -> per-key limits -> body ->
admission -> relay to llama-server (see proxy.py). While a request is with the backend a
watcher reads the client socket: end of file means the client has gone, and the
request's task is cancelled, which closes the backend connection so llama-server frees
the slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid

from .backend import READ_SIZE, BackendPool
from .config import Config
from .http11 import ChunkedDecoder, HttpError, Limits, RequestHead, RequestHeadParser, request_bytes
from .keys import ApiKey, KeySource
from .ledger import UsageLedger
from .limits import Admission, KeyLimits, QueueFull, QueueTimeout, Reservation, retry_headers
from .metrics import Metrics
from .proxy import Relay
from .readiness import LOADING, Readiness
from .responses import Exchange, Responder
from .access import AccessControl
from .endpoints import LocalEndpoints
from .routes import ADMIN_METRICS, ROUTES, Kind, Route

log = logging.getLogger("gateway")
access_log = logging.getLogger("gateway.access")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Pipelined bytes a client may send while its previous request is in flight.
_MAX_PIPELINED = 65536
# Probes arrive every few seconds; their access lines go to DEBUG.
_QUIET_PATHS = frozenset(
    {"/ping", "/health", "/metrics", "/healthz", "/readyz", "/health/live", "/health/ready"}
)


def _count(usage: dict[str, object], *names: str) -> int | None:
    for name in names:
        value = usage.get(name)
        if isinstance(value, int):
            return value
    return None


_USAGE_NAMES = (("prompt_tokens", "input_tokens"), ("completion_tokens", "output_tokens"))


class ClientGone(Exception):
    pass


class ClientWatch:
    """Reads the client socket while its request is with the backend.

    EOF or a reset cancels the request's task. Bytes that arrive (a pipelined request)
    are kept in the connection buffer for the parser.
    """

    __slots__ = ("_task", "gone")

    def __init__(self, reader: asyncio.StreamReader, buf: bytearray) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.gone = False
        self._task = asyncio.ensure_future(self._watch(reader, buf, task))

    async def _watch(
        self, reader: asyncio.StreamReader, buf: bytearray, task: asyncio.Task[object]
    ) -> None:
        try:
            while len(buf) < _MAX_PIPELINED:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                buf += data
            else:
                return
        except ConnectionError:
            pass
        self.gone = True
        task.cancel()

    async def stop(self) -> None:
        # A stream reader allows one waiting reader at a time: the watcher must have
        # left read() before the connection reads its next request.
        if not self._task.done():
            self._task.cancel()
            await asyncio.wait((self._task,))


class Gateway:
    def __init__(self, config: Config, keys: KeySource) -> None:
        self.config = config
        self.keys = keys
        self.metrics = Metrics()
        self.limits = Limits(
            max_header_bytes=config.max_header_bytes,
            max_headers=config.max_headers,
            max_body=config.max_request_body_size,
        )
        self.pool = BackendPool(
            config.backend_host, config.port_backend, config.backend_connect_timeout
        )
        self.readiness = Readiness(
            config.backend_host, config.port_backend, config.backend_api_key, config.state_file
        )
        self.relay = Relay(config, self.pool, self.metrics, self.readiness)
        self.access = AccessControl(config, keys, self.metrics, self.readiness)
        self._admission: Admission | None = None
        self.endpoints = LocalEndpoints(
            config, self.metrics, self.readiness, lambda: self._admission
        )
        self._backend_host = f"{config.backend_host}:{config.port_backend}"
        self._backend_auth = f"Bearer {config.backend_api_key}" if config.backend_api_key else ""
        self._connections: dict[asyncio.StreamWriter, bool] = {}  # writer -> busy
        self._idle_event = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.ledger = UsageLedger(config.log_dir / "usage.jsonl")

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> asyncio.Server:
        self._server = await asyncio.start_server(
            self._connection, self.config.host, self.config.port, limit=READ_SIZE, backlog=2048
        )
        return self._server

    async def drain(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), then close everything."""
        self.readiness.start_draining()
        if self._server is not None:
            self._server.close()
        for writer, busy in list(self._connections.items()):
            if not busy:
                writer.close()
        if self.metrics.in_flight:
            log.info(
                "draining: waiting up to %ss for %d request(s)",
                self.config.drain_timeout,
                self.metrics.in_flight,
            )
            try:
                async with asyncio.timeout(self.config.drain_timeout):
                    while self.metrics.in_flight:
                        self._idle_event.clear()
                        await self._idle_event.wait()
            except TimeoutError:
                log.warning(
                    "drain timeout: closing %d request(s) still running", self.metrics.in_flight
                )
        for writer in list(self._connections):
            writer.transport.abort()
        self.pool.close_all()
        self.ledger.close()

    @property
    def admission(self) -> Admission:
        """Created once llama-server's slot count is known (MAX_CONCURRENT_REQUESTS wins)."""
        if self._admission is None:
            limit = self.config.max_concurrent_requests or self.readiness.slots or 4
            queue = (
                self.config.max_queue_size if self.config.max_queue_size is not None else 4 * limit
            )
            self._admission = Admission(limit, queue, self.config.queue_timeout)
            log.info("admission: %d request(s) at once, queue of %d", limit, queue)
        return self._admission

    # ------------------------------------------------------------------ connections

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self.config.max_connections:
            # Over the cap: a clear answer and a close, before reading anything.
            self.metrics.rejections["connections"] += 1
            ex = Exchange(uuid.uuid4().hex, "-", "other", time.monotonic())
            extra = [("Retry-After", "1")]
            Responder(writer, ex).error(503, "too many connections", keep_alive=False, extra=extra)
            writer.close()
            return
        self._connections[writer] = False
        buf = bytearray()
        parser = RequestHeadParser(self.limits)
        first = True
        try:
            while True:
                try:
                    head = await self._read_head(reader, buf, parser, first)
                except HttpError as exc:
                    self._refuse(writer, exc)
                    break
                except TimeoutError:
                    if first or buf:
                        self._refuse(writer, HttpError(408, "no complete request head in time"))
                    break
                if head is None:
                    break
                self._connections[writer] = True
                self.metrics.in_flight += 1
                try:
                    keep_alive = await self._request(reader, writer, buf, head)
                finally:
                    self.metrics.in_flight -= 1
                    self._connections[writer] = False
                    if not self.metrics.in_flight:
                        self._idle_event.set()
                if not keep_alive or self.readiness.draining:
                    break
                first = False
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.pop(writer, None)
            if writer.transport.is_closing():
                writer.transport.abort()
            else:
                writer.close()

    async def _read_head(
        self, reader: asyncio.StreamReader, buf: bytearray, parser: RequestHeadParser, first: bool
    ) -> RequestHead | None:
        head = parser.parse(buf) if buf else None
        if head is not None:
            return head
        if not buf:
            # Between requests a keep-alive connection may idle longer than a new one
            # may take to send its first byte.
            wait = self.config.client_header_timeout if first else self.config.client_idle_timeout
            async with asyncio.timeout(wait):
                data = await reader.read(READ_SIZE)
            if not data:
                return None
            buf += data
            head = parser.parse(buf)
            if head is not None:
                return head  # the usual case: the whole head in one read
        # From the first byte on, the whole head must arrive within the timeout: a
        # client trickling one byte at a time cannot hold the connection.
        async with asyncio.timeout(self.config.client_header_timeout):
            while True:
                head = parser.parse(buf)
                if head is not None:
                    return head
                data = await reader.read(READ_SIZE)
                if not data:
                    return None
                buf += data

    def _refuse(self, writer: asyncio.StreamWriter, exc: HttpError) -> None:
        """Answer a request we could not parse, and close: its framing is not trusted."""
        self.metrics.rejections["timeout" if exc.status == 408 else "framing"] += 1
        self.metrics.requests[("other", exc.status)] += 1
        ex = Exchange(uuid.uuid4().hex, "-", "other", time.monotonic())
        Responder(writer, ex).error(exc.status, exc.message, keep_alive=False)
        access_log.info(
            '%s - "-" %d %s',
            ex.request_id,
            exc.status,
            exc.message,
            extra={"request_id": ex.request_id, "status": exc.status, "error": exc.message},
        )

    # ------------------------------------------------------------------ one request

    async def _request(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        buf: bytearray,
        head: RequestHead,
    ) -> bool:
        sent_id = head.get("x-request-id")
        request_id = sent_id if sent_id and _REQUEST_ID.fullmatch(sent_id) else uuid.uuid4().hex
        route = ROUTES.get(head.path)
        ex = Exchange(request_id, head.method, route.path if route else "other", time.monotonic())
        out = Responder(writer, ex)
        keep_alive = False
        try:
            keep_alive = await self._route(reader, buf, head, route, out)
        except HttpError as exc:
            # Bad framing in the body: the connection can no longer be trusted.
            self.metrics.rejections["size" if exc.status == 413 else "framing"] += 1
            out.error(exc.status, exc.message, keep_alive=False)
        except TimeoutError:
            self.metrics.rejections["timeout"] += 1
            out.error(408, "request body not received in time", keep_alive=False)
        except ClientGone:
            ex.disconnected = True
        finally:
            self._finished(ex, head)
        return keep_alive

    def _finished(self, ex: Exchange, head: RequestHead) -> None:
        duration = time.monotonic() - ex.started
        if ex.disconnected:
            self.metrics.client_disconnects += 1
            if not ex.status:
                ex.status = 499  # nginx's "client closed request"
        self.metrics.finished(ex.path, ex.status, duration, ex.ttfb)
        usage = ex.usage or {}
        # OpenAI names; Anthropic-style and Responses bodies say input/output.
        prompt = _count(usage, "prompt_tokens", "input_tokens")
        completion = _count(usage, "completion_tokens", "output_tokens")
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        if prompt:
            self.metrics.tokens[(ex.key_id, "prompt")] += prompt
        if completion:
            self.metrics.tokens[(ex.key_id, "completion")] += completion
        if ex.path not in _QUIET_PATHS and ex.path != "other":
            self.ledger.record(
                {
                    "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "request_id": ex.request_id,
                    "key_id": ex.key_id,
                    "model": ex.model,
                    "path": ex.path,
                    "status": ex.status,
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "cached_tokens": cached,
                    "ttft_ms": round(ex.ttfb * 1000, 1) if ex.ttfb is not None else None,
                    "duration_ms": round(duration * 1000, 1),
                    "disconnected": ex.disconnected,
                    "worker_id": self.config.worker_id,
                }
            )
        level = logging.DEBUG if ex.path in _QUIET_PATHS else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        access_log.log(
            level,
            '%s %s "%s %s" %d %dB %.1fms ttfb=%s%s%s',
            ex.request_id,
            ex.key_id,
            ex.method,
            head.path[:200],
            ex.status,
            ex.sent,
            duration * 1000,
            f"{ex.ttfb * 1000:.1f}ms" if ex.ttfb is not None else "-",
            f" tokens={prompt or 0}+{completion or 0}" if usage else "",
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
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "disconnected": ex.disconnected,
                "error": ex.error,
            },
        )

    async def _route(
        self,
        reader: asyncio.StreamReader,
        buf: bytearray,
        head: RequestHead,
        route: Route | None,
        out: Responder,
    ) -> bool:
        # A response sent before the body was read leaves that body on the wire: close.
        keep = head.keep_alive and not head.has_body
        if route is None:
            self.metrics.rejections["not_found"] += 1
            return out.error(404, f"no such endpoint: {head.path[:200]}", keep_alive=keep)
        out.ex.cors_headers = self.access.cors_headers(head.get("origin"))
        if head.method == "OPTIONS" and head.get("access-control-request-method"):
            # A browser's preflight carries no credentials: answer it before auth.
            if not out.ex.cors_headers:
                self.metrics.rejections["cors"] += 1
                return out.error(403, "origin not allowed (CORS_ORIGINS)", keep_alive=keep)
            preflight = self.access.preflight_headers(route)
            out.send(204, b"", keep_alive=keep, extra=preflight, head_only=True)
            return keep
        if head.method not in route.methods:
            allow = [("Allow", ", ".join(sorted(route.methods)))]
            return out.error(
                405, f"{head.method} is not allowed on {route.path}", keep_alive=keep, extra=allow
            )
        key: ApiKey | None = None
        if route.path == "/metrics" and self.config.metrics_auth_enabled:
            route = ADMIN_METRICS
        if route.scope is not None and self.config.auth_enabled:
            found = self.access.authenticate(head, route, out)
            if not isinstance(found, ApiKey):
                return found
            key = found
        elif route.scope is not None:
            out.ex.key_id = "anonymous"
        if self.readiness.draining:
            self.metrics.rejections["draining"] += 1
            return out.error(
                503, "the server is shutting down", keep_alive=False, extra=[("Retry-After", "1")]
            )
        if route.kind is Kind.LOCAL:
            if head.has_body:
                await self._read_body(reader, out.writer, buf, head)
            return await self.endpoints.answer(out, head, route)
        if not self.readiness.ever_ready or self.readiness.backend == LOADING:
            self.metrics.rejections["loading"] += 1
            return out.error(
                503,
                "the model is still loading; retry shortly",
                keep_alive=keep,
                extra=[("Retry-After", "5")],
            )
        limits = None
        if key is not None:
            limits = self.access.limits_for(key)
            refused = self.access.check_request_limits(key, limits, out, keep)
            if refused is not None:
                return refused
        body = await self._read_body(reader, out.writer, buf, head) if head.has_body else b""
        return await self._proxy(reader, buf, head, route, out, body, limits)

    async def _read_body(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        buf: bytearray,
        head: RequestHead,
    ) -> bytes:
        if head.expect_continue and not buf:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        timeout = self.config.client_header_timeout
        if head.chunked:
            decoder = ChunkedDecoder(self.limits, self.limits.max_body)
            parts = [decoder.feed(buf)]
            while not decoder.done:
                async with asyncio.timeout(timeout):
                    data = await reader.read(READ_SIZE)
                if not data:
                    raise ClientGone()
                buf += data
                parts.append(decoder.feed(buf))
            return b"".join(parts)
        length = head.content_length or 0
        while len(buf) < length:
            # Per read: a slow upload that keeps moving is fine, a stalled one is not.
            async with asyncio.timeout(timeout):
                data = await reader.read(max(READ_SIZE, length - len(buf)))
            if not data:
                raise ClientGone()
            buf += data
        body = bytes(buf[:length])
        del buf[:length]
        return body

    # ------------------------------------------------------------------ local endpoints

    # ------------------------------------------------------------------ proxying

    def _backend_request(
        self, head: RequestHead, route: Route, body: bytes, request_id: str
    ) -> bytes:
        """A fresh request: the route's own path, one Content-Length, the backend key.

        Nothing else of the client's head is copied, so its credentials and hop-by-hop
        headers never reach llama-server.
        """
        target = route.path + ("?" + head.query if head.query else "")
        headers = [("Host", self._backend_host)]
        if self._backend_auth:
            headers.append(("Authorization", self._backend_auth))
        if body:
            headers.append(("Content-Type", head.get("content-type") or "application/json"))
        headers.append(("X-Request-ID", request_id))
        return request_bytes(head.method, target, headers, body)

    async def _proxy(
        self,
        reader: asyncio.StreamReader,
        buf: bytearray,
        head: RequestHead,
        route: Route,
        out: Responder,
        body: bytes,
        limits: KeyLimits | None,
    ) -> bool:
        keep = head.keep_alive
        stream = strip_usage = assemble = False
        payload: object = None
        if head.method == "POST" and body:
            try:
                payload = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                return out.error(400, "request body is not valid JSON", keep_alive=keep)
            if isinstance(payload, dict):
                model = payload.get("model")
                out.ex.model = model if isinstance(model, str) else None
                stream = payload.get("stream") is True
                if route.generation:
                    options = payload.get("stream_options")
                    asked = isinstance(options, dict) and options.get("include_usage") is True
                    # Usage is what token limits and metrics settle on: always ask for
                    # it, and drop the extra chunk from streams whose client did not.
                    payload["stream"] = True
                    payload["stream_options"] = {
                        **(options if isinstance(options, dict) else {}),
                        "include_usage": True,
                    }
                    strip_usage = stream and not asked
                    assemble = not stream
                    body = json.dumps(payload).encode()

        reservation: Reservation | None = None
        if limits is not None and limits.tokens is not None and route.admitted:
            got = self.access.reserve_tokens(limits, payload, body, out)
            if not isinstance(got, Reservation):
                self.metrics.rejections["tokens"] += 1
                never = math.isinf(got)
                message = (
                    f"this request could use more tokens than key '{out.ex.key_id}' may use per minute"
                    if never
                    else f"token limit: {limits.tokens.limit} tokens per minute for key '{out.ex.key_id}'"
                )
                return out.error(
                    429, message, keep_alive=keep, extra=retry_headers(got), code="tokens_exceeded"
                )
            reservation = got

        request = self._backend_request(head, route, body, out.ex.request_id)
        task = asyncio.current_task()
        assert task is not None
        # Only requests that hold a slot need watching: the others finish in about a
        # millisecond, less than the watcher itself costs.
        watch = ClientWatch(reader, buf) if route.admitted else None
        admitted = False
        if limits is not None:
            limits.active += 1
        try:
            if route.admitted:
                try:
                    await self.admission.acquire(out.ex.key_id)
                except (QueueFull, QueueTimeout) as exc:
                    full = isinstance(exc, QueueFull)
                    self.metrics.rejections["queue_full" if full else "queue_timeout"] += 1
                    message = (
                        "all slots are busy and the queue is full"
                        if full
                        else "waited too long for a slot"
                    )
                    return out.error(503, message, keep_alive=keep, extra=[("Retry-After", "2")])
                admitted = True
            if stream:
                return await self.relay.stream(
                    out, request, keep, head.http11, strip_usage, openai_chunks=route.generation
                )
            if assemble:
                return await self.relay.assembled(out, request, keep, route.path)
            return await self.relay.plain(out, request, keep)
        except asyncio.CancelledError:
            if watch is None or not watch.gone:
                raise
            task.uncancel()
            raise ClientGone() from None
        finally:
            if admitted:
                self.admission.release()
            if limits is not None:
                limits.active -= 1
            if reservation is not None and out.ex.usage:
                used = [_count(out.ex.usage, *names) for names in _USAGE_NAMES]
                if all(n is not None for n in used):
                    reservation.tokens = sum(n for n in used if n)  # settle to real usage
                # Without usage (a client that left) the upper bound stays reserved.
            if watch is not None:
                await watch.stop()
