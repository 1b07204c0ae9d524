"""The gateway's asyncio server: one coroutine per client connection.

A connection reads request heads with the sans-IO parser, answers local endpoints itself,
and proxies allowed paths to llama-server with a fresh, re-framed request. While a request
is with the backend a watcher reads the client socket: end of file means the client has
gone, and the request's task is cancelled, which closes the backend connection so
llama-server frees the slot. Non-streaming generation requests are run as streams on the
backend for the same reason and assembled here.

Streams are relayed as the backend's chunked bytes, unchanged and unbuffered: one read,
one framing check, one write per backend read. Timeouts are per read (first byte, gap
between chunks), never on a whole stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass

from . import assemble
from .backend import READ_SIZE, BackendConnection, BackendPool, BackendUnavailable
from .config import VERSION, Config
from .errors import error_body, sse_error_event
from .http11 import (
    LAST_CHUNK,
    ChunkedDecoder,
    ChunkedScanner,
    HttpError,
    Limits,
    RequestHead,
    RequestHeadParser,
    ResponseHead,
    chunk,
    request_bytes,
    response_head_bytes,
)
from .keys import ApiKey, KeySource
from .metrics import Metrics
from .readiness import LOADING, Readiness
from .routes import ROUTES, Kind, Route

log = logging.getLogger("gateway")
access_log = logging.getLogger("gateway.access")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_KEEPALIVE_CHUNK = chunk(b": keepalive\n\n")
_SECURITY_HEADERS = [
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
]
# Pipelined bytes a client may send while its previous request is in flight.
_MAX_PIPELINED = 65536


class ClientGone(Exception):
    pass


@dataclass(slots=True)
class Exchange:
    """One request's bookkeeping, for metrics and the access log."""

    request_id: str
    method: str
    path: str
    started: float
    key_id: str = "-"
    status: int = 0
    ttfb: float | None = None
    sent: int = 0
    disconnected: bool = False


class IdleWatchdog:
    """Cancels the current task when ``touch`` has not been called for ``timeout`` seconds.

    One timer per stream instead of one per chunk keeps the relay loop allocation-free.
    """

    __slots__ = ("_loop", "_task", "_timeout", "_last", "_handle", "fired")

    def __init__(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._timeout = timeout
        self._last = self._loop.time()
        self.fired = False
        self._handle = self._loop.call_at(self._last + timeout, self._check)

    def touch(self) -> None:
        self._last = self._loop.time()

    def _check(self) -> None:
        due = self._last + self._timeout
        if self._loop.time() >= due:
            self.fired = True
            self._task.cancel()
        else:
            self._handle = self._loop.call_at(due, self._check)

    def stop(self) -> None:
        self._handle.cancel()


class ClientWatch:
    """Reads the client socket while its request is with the backend.

    EOF or a reset cancels the request's task. Bytes that arrive (a pipelined request)
    are kept in the connection buffer for the parser.
    """

    __slots__ = ("_task", "_reader", "gone")

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
        # The reader allows one waiting reader at a time: the watcher must have left
        # read() before the connection reads its next request.
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
            config.backend_host,
            config.port_backend,
            config.backend_api_key,
            config.state_file,
        )
        self._backend_host = f"{config.backend_host}:{config.port_backend}"
        self._backend_auth = f"Bearer {config.backend_api_key}" if config.backend_api_key else ""
        self._connections: dict[asyncio.StreamWriter, bool] = {}  # writer -> busy
        self._idle_event = asyncio.Event()
        self._server: asyncio.Server | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> asyncio.Server:
        self._server = await asyncio.start_server(
            self._connection,
            self.config.host,
            self.config.port,
            limit=READ_SIZE,
            backlog=2048,
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
        in_flight = self.metrics.in_flight
        if in_flight:
            log.info(
                "draining: waiting up to %ss for %d request(s)",
                self.config.drain_timeout,
                in_flight,
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

    # ------------------------------------------------------------------ connections

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections[writer] = False
        buf = bytearray()
        parser = RequestHeadParser(self.limits)
        first = True
        try:
            while True:
                try:
                    head = await self._read_head(reader, buf, parser, first)
                except HttpError as exc:
                    self._refuse_framing(writer, exc)
                    break
                except TimeoutError:
                    if first or buf:
                        self._refuse_framing(
                            writer, HttpError(408, "no complete request head in time")
                        )
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
        self,
        reader: asyncio.StreamReader,
        buf: bytearray,
        parser: RequestHeadParser,
        first: bool,
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

    def _refuse_framing(self, writer: asyncio.StreamWriter, exc: HttpError) -> None:
        """Answer a request we could not parse, and close: its framing is not trusted."""
        self.metrics.rejections["framing" if exc.status != 408 else "timeout"] += 1
        self.metrics.requests[("other", exc.status)] += 1
        request_id = uuid.uuid4().hex
        body = error_body(exc.status, exc.message)
        headers = self._common_headers(request_id, "application/json", len(body), False)
        writer.write(response_head_bytes(exc.status, headers) + body)
        access_log.info(
            "%s - - %s %s %d",
            request_id,
            "-",
            "-",
            exc.status,
            extra={"request_id": request_id, "status": exc.status, "error": exc.message},
        )

    def _common_headers(
        self, request_id: str, content_type: str, length: int | None, keep_alive: bool
    ) -> list[tuple[str, str]]:
        headers = [("Content-Type", content_type)]
        if length is not None:
            headers.append(("Content-Length", str(length)))
        headers.append(("X-Request-ID", request_id))
        headers.extend(_SECURITY_HEADERS)
        if not keep_alive:
            headers.append(("Connection", "close"))
        return headers

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
        keep_alive = head.keep_alive
        try:
            keep_alive = await self._route(reader, writer, buf, head, route, ex)
        except HttpError as exc:
            # Framing errors in the body: the connection can no longer be trusted.
            keep_alive = self._send_error(writer, ex, exc.status, exc.message, keep_alive=False)
            self.metrics.rejections["framing" if exc.status != 413 else "size"] += 1
        except TimeoutError:
            keep_alive = self._send_error(
                writer, ex, 408, "request body not received in time", keep_alive=False
            )
            self.metrics.rejections["timeout"] += 1
        except ClientGone:
            ex.disconnected = True
            keep_alive = False
        finally:
            duration = time.monotonic() - ex.started
            if ex.disconnected:
                self.metrics.client_disconnects += 1
                if not ex.status:
                    ex.status = 499
            self.metrics.finished(ex.path, ex.status, duration, ex.ttfb)
            access_log.info(
                '%s %s "%s %s" %d %d %.1fms%s',
                ex.request_id,
                ex.key_id,
                ex.method,
                head.path if route else "-",
                ex.status,
                ex.sent,
                duration * 1000,
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
                    "disconnected": ex.disconnected,
                },
            )
        return keep_alive

    async def _route(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        buf: bytearray,
        head: RequestHead,
        route: Route | None,
        ex: Exchange,
    ) -> bool:
        # A response sent before the body was read leaves that body on the wire: close.
        keep = head.keep_alive and not head.has_body
        if route is None:
            self.metrics.rejections["not_found"] += 1
            return self._send_error(
                writer, ex, 404, f"no such endpoint: {head.path[:200]}", keep_alive=keep
            )
        if head.method not in route.methods:
            return self._send_error(
                writer,
                ex,
                405,
                f"{head.method} is not allowed on {route.path}",
                keep_alive=keep,
                extra=[("Allow", ", ".join(sorted(route.methods)))],
            )
        if route.scope is not None:
            denied = self._authorize(head, route, ex)
            if denied is not None:
                status, message, reason = denied
                self.metrics.rejections[reason] += 1
                extra = [("WWW-Authenticate", "Bearer")] if status == 401 else []
                return self._send_error(writer, ex, status, message, keep_alive=keep, extra=extra)
        if self.readiness.draining:
            self.metrics.rejections["draining"] += 1
            return self._send_error(
                writer,
                ex,
                503,
                "the server is shutting down",
                keep_alive=False,
                extra=[("Retry-After", "1")],
            )
        if route.kind is Kind.LOCAL:
            if head.has_body:
                await self._read_body(reader, writer, buf, head)
            return self._local(writer, head, route, ex)
        if not self.readiness.ever_ready or self.readiness.backend == LOADING:
            self.metrics.rejections["loading"] += 1
            return self._send_error(
                writer,
                ex,
                503,
                "the model is still loading; retry shortly",
                keep_alive=keep,
                extra=[("Retry-After", "5")],
            )
        body = await self._read_body(reader, writer, buf, head) if head.has_body else b""
        return await self._proxy(reader, writer, buf, head, route, ex, body)

    def _authorize(
        self, head: RequestHead, route: Route, ex: Exchange
    ) -> tuple[int, str, str] | None:
        if not self.config.auth_enabled:
            ex.key_id = "anonymous"
            return None
        token = ""
        authorization = head.get("authorization")
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer":
                token = value.strip()
        if not token:
            token = (head.get("x-api-key") or "").strip()
        if not token:
            return 401, "missing API key: send Authorization: Bearer <key>", "auth"
        key: ApiKey | None = self.keys.current().match(token)
        if key is None:
            return 401, "invalid API key", "auth"
        ex.key_id = key.key_id
        if key.expired():
            return 401, "API key has expired", "auth"
        if route.scope not in key.scopes:
            return 403, f"this key lacks the '{route.scope}' scope for {route.path}", "scope"
        return None

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

    # ------------------------------------------------------------------ responses

    def _send(
        self,
        writer: asyncio.StreamWriter,
        ex: Exchange,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        keep_alive: bool = True,
        extra: list[tuple[str, str]] | None = None,
        head_only: bool = False,
    ) -> bool:
        headers = self._common_headers(ex.request_id, content_type, len(body), keep_alive)
        if extra:
            headers.extend(extra)
        data = response_head_bytes(status, headers)
        writer.write(data if head_only else data + body)
        ex.status = status
        ex.sent += len(body)
        return keep_alive

    def _send_error(
        self,
        writer: asyncio.StreamWriter,
        ex: Exchange,
        status: int,
        message: str,
        *,
        keep_alive: bool = True,
        extra: list[tuple[str, str]] | None = None,
    ) -> bool:
        return self._send(
            writer, ex, status, error_body(status, message), keep_alive=keep_alive, extra=extra
        )

    def _local(
        self, writer: asyncio.StreamWriter, head: RequestHead, route: Route, ex: Exchange
    ) -> bool:
        head_only = head.method == "HEAD"
        keep = head.keep_alive
        if route.path == "/ping":
            ready = self.readiness.ready
            body = b'{"status":"ok"}' if ready else b'{"status":"unavailable"}'
            return self._send(
                writer, ex, 200 if ready else 503, body, keep_alive=keep, head_only=head_only
            )
        if route.path == "/health":
            body = json.dumps(self.health()).encode()
            status = 200 if self.readiness.ready else 503
            return self._send(writer, ex, status, body, keep_alive=keep, head_only=head_only)
        # /metrics
        if "format=json" in head.query.split("&"):
            body = json.dumps(self.metrics.as_json()).encode()
            return self._send(writer, ex, 200, body, keep_alive=keep, head_only=head_only)
        self.metrics.backend_up = 1 if self.readiness.backend == "ready" else 0
        body = self.metrics.render().encode()
        return self._send(
            writer,
            ex,
            200,
            body,
            content_type="text/plain; version=0.0.4; charset=utf-8",
            keep_alive=keep,
            head_only=head_only,
        )

    def health(self) -> dict[str, object]:
        r = self.readiness
        return {
            "status": r.status,
            "backend": r.backend,
            "models": r.models,
            "slots": {"total": r.slots},
            "in_flight": self.metrics.in_flight,
            "queue_depth": self.metrics.queue_depth,
            "uptime_seconds": round(time.monotonic() - r.started, 1),
            "version": VERSION,
        }

    # ------------------------------------------------------------------ proxying

    def _backend_request(
        self, head: RequestHead, route: Route, body: bytes, request_id: str
    ) -> bytes:
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
        writer: asyncio.StreamWriter,
        buf: bytearray,
        head: RequestHead,
        route: Route,
        ex: Exchange,
        body: bytes,
    ) -> bool:
        stream = False
        assemble_kind: str | None = None
        if head.method == "POST" and body:
            try:
                payload = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                return self._send_error(
                    writer, ex, 400, "request body is not valid JSON", keep_alive=head.keep_alive
                )
            if isinstance(payload, dict):
                stream = payload.get("stream") is True
                if route.generation and not stream:
                    payload["stream"] = True
                    payload["stream_options"] = {"include_usage": True}
                    body = json.dumps(payload).encode()
                    assemble_kind = route.path
        request = self._backend_request(head, route, body, ex.request_id)
        task = asyncio.current_task()
        assert task is not None
        watch = ClientWatch(reader, buf)
        try:
            if stream:
                return await self._relay_stream(writer, head, ex, request)
            if assemble_kind is not None:
                return await self._relay_assembled(writer, head, ex, request, assemble_kind)
            return await self._relay_plain(writer, head, ex, request)
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            task.uncancel()
            raise ClientGone() from None
        finally:
            await watch.stop()

    def _backend_down(
        self, writer: asyncio.StreamWriter, ex: Exchange, exc: Exception, keep: bool
    ) -> bool:
        self.metrics.backend_errors["unavailable"] += 1
        self.readiness.backend_failed()
        log.warning("%s backend unavailable: %s", ex.request_id, exc)
        return self._send_error(writer, ex, 502, "llama-server is not reachable", keep_alive=keep)

    async def _exchange(
        self, request: bytes, ex: Exchange
    ) -> tuple[BackendConnection, ResponseHead]:
        async with asyncio.timeout(self.config.first_byte_timeout):
            bconn, bhead = await self.pool.exchange(request)
        ex.ttfb = time.monotonic() - ex.started
        return bconn, bhead

    async def _relay_plain(
        self, writer: asyncio.StreamWriter, head: RequestHead, ex: Exchange, request: bytes
    ) -> bool:
        keep = head.keep_alive
        try:
            bconn, bhead = await self._exchange(request, ex)
        except BackendUnavailable as exc:
            return self._backend_down(writer, ex, exc, keep)
        except HttpError as exc:
            self.metrics.backend_errors["protocol"] += 1
            return self._send_error(writer, ex, 502, exc.message, keep_alive=keep)
        except TimeoutError:
            self.metrics.backend_errors["timeout"] += 1
            return self._send_error(
                writer, ex, 504, "llama-server did not answer in time", keep_alive=keep
            )
        try:
            async with asyncio.timeout(self.config.stream_idle_timeout):
                body = await bconn.read_body(bhead)
        except (BackendUnavailable, HttpError, TimeoutError, ConnectionError) as exc:
            bconn.close()
            self.metrics.backend_errors["protocol"] += 1
            return self._send_error(
                writer, ex, 502, f"llama-server response broken: {exc}", keep_alive=keep
            )
        except BaseException:
            bconn.close()
            raise
        self.pool.release(bconn, bhead.keep_alive)
        return self._forward(writer, ex, bhead, body, keep)

    def _forward(
        self,
        writer: asyncio.StreamWriter,
        ex: Exchange,
        bhead: ResponseHead,
        body: bytes,
        keep: bool,
    ) -> bool:
        extra = [("Retry-After", bhead.get("retry-after") or "5")] if bhead.status == 503 else None
        return self._send(
            writer,
            ex,
            bhead.status,
            body,
            content_type=bhead.get("content-type") or "application/json",
            keep_alive=keep,
            extra=extra,
        )

    async def _relay_assembled(
        self,
        writer: asyncio.StreamWriter,
        head: RequestHead,
        ex: Exchange,
        request: bytes,
        path: str,
    ) -> bool:
        keep = head.keep_alive
        try:
            bconn, bhead = await self._exchange(request, ex)
        except BackendUnavailable as exc:
            return self._backend_down(writer, ex, exc, keep)
        except HttpError as exc:
            self.metrics.backend_errors["protocol"] += 1
            return self._send_error(writer, ex, 502, exc.message, keep_alive=keep)
        except TimeoutError:
            self.metrics.backend_errors["timeout"] += 1
            return self._send_error(
                writer, ex, 504, "llama-server did not answer in time", keep_alive=keep
            )
        if bhead.status != 200 or not bhead.chunked:
            return await self._finish_plain(writer, ex, bconn, bhead, keep)
        assembler = assemble.Assembler(path)
        decoder = ChunkedDecoder(Limits(max_body=1 << 40))
        events = assemble.SseEvents()
        watchdog = IdleWatchdog(self.config.stream_idle_timeout)
        try:
            while True:
                for payload in events.feed(decoder.feed(bconn.buf)):
                    assembler.add(payload)
                if decoder.done or assembler.finished:
                    break
                data = await bconn.reader.read(READ_SIZE)
                if not data:
                    raise BackendUnavailable("llama-server closed the stream early")
                watchdog.touch()
                bconn.buf += data
        except asyncio.CancelledError:
            bconn.close()
            if not watchdog.fired:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            self.metrics.backend_errors["idle_timeout"] += 1
            return self._send_error(
                writer, ex, 504, "llama-server stopped sending tokens", keep_alive=keep
            )
        except (BackendUnavailable, HttpError, ConnectionError, ValueError) as exc:
            bconn.close()
            self.metrics.backend_errors["protocol"] += 1
            return self._send_error(
                writer, ex, 502, f"llama-server response broken: {exc}", keep_alive=keep
            )
        finally:
            watchdog.stop()
        if assembler.error is not None:
            bconn.close()
            status, error = assembler.error
            return self._send(writer, ex, status, json.dumps(error).encode(), keep_alive=keep)
        self.pool.release(bconn, bhead.keep_alive and decoder.done and not bconn.buf)
        body = json.dumps(assembler.result(), ensure_ascii=False).encode()
        return self._send(
            writer, ex, 200, body, content_type="application/json; charset=utf-8", keep_alive=keep
        )

    async def _finish_plain(
        self,
        writer: asyncio.StreamWriter,
        ex: Exchange,
        bconn: BackendConnection,
        bhead: ResponseHead,
        keep: bool,
    ) -> bool:
        """Forward a whole (usually error) response from the backend."""
        try:
            async with asyncio.timeout(self.config.stream_idle_timeout):
                body = await bconn.read_body(bhead)
        except (BackendUnavailable, HttpError, TimeoutError, ConnectionError) as exc:
            bconn.close()
            return self._send_error(
                writer, ex, 502, f"llama-server response broken: {exc}", keep_alive=keep
            )
        except BaseException:
            bconn.close()
            raise
        self.pool.release(bconn, bhead.keep_alive)
        return self._forward(writer, ex, bhead, body, keep)

    def _stream_head(self, ex: Exchange, http11: bool) -> bytes:
        headers = [
            ("Content-Type", "text/event-stream"),
            ("Cache-Control", "no-cache"),
            ("X-Accel-Buffering", "no"),
            ("X-Request-ID", ex.request_id),
            ("X-Content-Type-Options", "nosniff"),
        ]
        headers.append(("Transfer-Encoding", "chunked") if http11 else ("Connection", "close"))
        ex.status = 200
        return response_head_bytes(200, headers)

    async def _relay_stream(
        self, writer: asyncio.StreamWriter, head: RequestHead, ex: Exchange, request: bytes
    ) -> bool:
        keep = head.keep_alive
        http11 = head.http11
        committed = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.first_byte_timeout
        pending = asyncio.ensure_future(self.pool.exchange(request))
        try:
            while True:
                wait = min(self.config.sse_keepalive_interval, deadline - loop.time())
                done, _ = await asyncio.wait((pending,), timeout=max(wait, 0.0))
                if done:
                    break
                if loop.time() >= deadline:
                    self.metrics.backend_errors["timeout"] += 1
                    return self._stream_failed(
                        writer, ex, committed, http11, 504, "llama-server did not answer in time"
                    )
                # Long prefill: commit to a stream and keep proxies and clients from
                # timing out the silent connection.
                if not committed:
                    writer.write(self._stream_head(ex, http11))
                    committed = True
                writer.write(_KEEPALIVE_CHUNK if http11 else b": keepalive\n\n")
                await writer.drain()
            bconn, bhead = pending.result()
        except BackendUnavailable as exc:
            if not committed:
                return self._backend_down(writer, ex, exc, keep)
            self.readiness.backend_failed()
            self.metrics.backend_errors["unavailable"] += 1
            return self._stream_failed(
                writer, ex, committed, http11, 502, "llama-server is not reachable"
            )
        except HttpError as exc:
            self.metrics.backend_errors["protocol"] += 1
            return self._stream_failed(writer, ex, committed, http11, 502, exc.message)
        finally:
            if not pending.done():
                pending.cancel()
        ex.ttfb = time.monotonic() - ex.started

        if bhead.status != 200:
            if not committed:
                return await self._finish_plain(writer, ex, bconn, bhead, keep)
            try:
                async with asyncio.timeout(self.config.stream_idle_timeout):
                    body = await bconn.read_body(bhead)
                message = json.loads(body)["error"]["message"]
            except Exception:  # noqa: BLE001 - any unreadable error body gets a generic message
                message = f"llama-server answered {bhead.status}"
            bconn.close()
            return self._stream_failed(writer, ex, committed, http11, bhead.status, str(message))

        if not bhead.chunked:
            # Not a stream after all (llama-server streams chunked): pass the body on.
            if committed:
                bconn.close()
                return self._stream_failed(
                    writer, ex, committed, http11, 502, "llama-server did not stream"
                )
            return await self._finish_plain(writer, ex, bconn, bhead, keep)
        if not committed:
            writer.write(self._stream_head(ex, http11))
        return await self._pump(writer, ex, bconn, http11, keep, bhead.keep_alive)

    async def _pump(
        self,
        writer: asyncio.StreamWriter,
        ex: Exchange,
        bconn: BackendConnection,
        http11: bool,
        keep: bool,
        reusable: bool,
    ) -> bool:
        """The hot path: relay the backend's chunked SSE body as it arrives."""
        scanner = ChunkedScanner()
        # HTTP/1.0 clients cannot take chunked framing: decode and end by closing.
        decoder = None if http11 else ChunkedDecoder(Limits(max_body=1 << 40))
        watchdog = IdleWatchdog(self.config.stream_idle_timeout)
        read = bconn.reader.read
        write = writer.write
        drain = writer.drain
        touch = watchdog.touch
        sent = 0
        try:
            data = bytes(bconn.buf)
            bconn.buf.clear()
            while True:
                if data:
                    done = scanner.feed(data)
                    if decoder is None:
                        write(data)
                    else:
                        bconn.buf += data
                        write(decoder.feed(bconn.buf))
                    sent += len(data)
                    if done:
                        break
                    await drain()
                data = await read(READ_SIZE)
                if not data:
                    raise BackendUnavailable("llama-server closed the stream early")
                touch()
        except asyncio.CancelledError:
            bconn.close()
            if not watchdog.fired:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            self.metrics.backend_errors["idle_timeout"] += 1
            ex.sent += sent
            return self._stream_failed(
                writer,
                ex,
                True,
                http11,
                504,
                "llama-server stopped sending tokens",
                scanner.at_boundary,
            )
        except (BackendUnavailable, HttpError, ConnectionError) as exc:
            bconn.close()
            self.metrics.backend_errors["stream_broken"] += 1
            log.warning("%s stream from llama-server broke: %s", ex.request_id, exc)
            ex.sent += sent
            return self._stream_failed(
                writer, ex, True, http11, 502, "llama-server stream broke off", scanner.at_boundary
            )
        finally:
            watchdog.stop()
        ex.sent += sent
        self.pool.release(bconn, reusable)
        if not http11:
            return False
        return keep

    def _stream_failed(
        self,
        writer: asyncio.StreamWriter,
        ex: Exchange,
        committed: bool,
        http11: bool,
        status: int,
        message: str,
        at_boundary: bool = True,
    ) -> bool:
        """Before headers: a plain error response. After: an SSE error event, then close."""
        if not committed:
            return self._send_error(writer, ex, status, message, keep_alive=False)
        if at_boundary:
            event = sse_error_event(status, message)
            writer.write(chunk(event) + LAST_CHUNK if http11 else event)
        return False
