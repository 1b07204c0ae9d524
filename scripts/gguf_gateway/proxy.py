"""Relaying one request to llama-server and its response back to the client.

Three shapes of response:

* plain: a whole JSON body (models, embeddings, tokenize...), forwarded as is;
* assembled: a non-streaming completion run as a stream on the backend, so that a client
  disconnect stops generation, turned back into the JSON llama-server would have sent;
* stream: SSE relayed as the backend's chunked bytes, unchanged and unbuffered, by a
  protocol that writes each read to the client as it arrives (pipe.py). The only
  per-read work is a framing check and a search for ``"usage":``; the few reads that end
  a task are the only ones parsed (sse.py).

Timeouts are per read: FIRST_BYTE_TIMEOUT until the response head, STREAM_IDLE_TIMEOUT
between reads afterwards. Nothing bounds a healthy stream's total length. Before the
client has response headers a failure is a plain error response; after, an SSE ``error``
event, then the connection closes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from . import assemble, cache_counters
from .cache_counters import CACHE_MARK
from .backend import BACKEND_LIMITS, BackendConnection, BackendUnavailable
from .config import Config
from .errors import sse_error_event
from .model_scope import filter_listing
from .http11 import LAST_CHUNK, ChunkedDecoder, HttpError, ResponseHead, chunk
from .backends import Backend
from .channel import Channel
from .pipe import BackendClosed, PipeEvent, StreamPipe, stream_pipe_type
from .readiness import Readiness
from .refusals import Refusal
from .responses import Responder
from .routes import Form
from .sse import SseEvents
from .webui import STATIC_HEADERS

# Lower-case name (as parsed) -> the spelling written to the client.
STATIC_HEADER_NAMES = {
    name: "-".join(p.capitalize() for p in name.split("-")) for name in STATIC_HEADERS
}
STATIC_HEADER_NAMES["etag"] = "ETag"

log = logging.getLogger("gateway")

_KEEPALIVE = b": keepalive\n\n"
_KEEPALIVE_CHUNK = chunk(_KEEPALIVE)


class Shape(Enum):
    PLAIN = "plain"
    ASSEMBLED = "assembled"
    STREAM = "stream"


@dataclass(frozen=True, slots=True)
class Forward:
    """How one request goes to llama-server and how its response comes back."""

    request: bytes  # the re-framed request, ready to write
    shape: Shape
    path: str  # the route's path
    keep_alive: bool  # the client's connection may be reused afterwards
    http11: bool  # the client speaks HTTP/1.1 (chunked) rather than 1.0
    strip_usage: bool  # drop usage-only chunks the client did not ask for
    affinity: bytes | None = None  # the prompt's prefix key, for routing to a warm cache
    models: frozenset[str] | None = None  # a listing shows only these models (key's models=)
    form: Form = Form.JSON  # the route's body format: which assembler rebuilds a reply
    # A whole 200 reply's body, changed before the client gets it (paths removed, ids
    # restored); None: forwarded as it is.
    rewrite: Callable[[bytes], bytes] | None = None
    count_usage: bool = True  # False: a replay of a stream whose usage was counted already
    # Shown the reply's first reads until it returns True (a completion id to remember).
    watch: Callable[[bytes], bool] | None = None
    # The request's resumable-stream id as llama-server knows it (X-Conversation-Id).
    session: str | None = None
    models_named: tuple[str, ...] = ()  # models named besides the body's (Vertex instances)
    return_tokens: bool = False  # a native reply keeps its token ids (the client asked)
    conceal: bool = False  # prompt-cache counters read "nothing cached" (cache_counters.py)


def _concealed(body: bytes) -> bytes:
    """A whole JSON response with its prompt-cache counters reading "nothing cached"."""
    try:
        message = json.loads(body)
    except ValueError:
        return body  # not JSON: nothing of ours to read in it
    if not cache_counters.conceal(message):
        return body
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()


def backend_failure(status: int, message: str, kind: str) -> Refusal:
    return Refusal(status, message, kind, backend=True)


class IdleWatchdog:
    """Cancels the current task when no progress was seen for ``timeout`` seconds.

    Progress is a ``touch()`` or, for a stream pipe, its read count moving on (or its
    reading being paused for a slow client, which SLOW_CLIENT_TIMEOUT bounds instead).
    One timer per stream, looking every quarter of the timeout, instead of work per read:
    it fires between 1 and 1.25 timeouts after the last progress.
    """

    __slots__ = ("_loop", "_task", "_timeout", "_last", "_handle", "_pipe", "_reads", "fired")

    def __init__(self, channel: Channel, timeout: float, pipe: StreamPipe | None = None) -> None:
        # The client's channel: its loop and the task running now.
        self._loop = channel.current_loop()
        self._task = channel.current_task()
        self._timeout = timeout
        self._pipe = pipe
        self._reads = 0
        self._last = self._loop.time()
        self.fired = False
        self._handle = self._loop.call_at(self._last + timeout / 4, self._check)

    def touch(self) -> None:
        self._last = self._loop.time()

    def _check(self) -> None:
        now = self._loop.time()
        if self._pipe is not None and (self._pipe.reads != self._reads or self._pipe.paused):
            self._reads = self._pipe.reads
            self._last = now
        if now >= self._last + self._timeout:
            self.fired = True
            self._task.cancel()
        else:
            self._handle = self._loop.call_at(now + self._timeout / 4, self._check)

    def stop(self) -> None:
        self._handle.cancel()


def uncancel() -> None:
    """We are handling a cancellation we caused ourselves; clear it from the task."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


class Relay:
    """Relays requests to one backend at a time: the one the pipeline's router chose."""

    def __init__(self, config: Config, readiness: Readiness) -> None:
        self.config = config
        self.readiness = readiness

    async def run(self, out: Responder, fwd: Forward, backend: Backend) -> bool:
        """Relay one request; returns whether the client connection may be kept alive.

        Raises Refusal for a failure before the client has a response head.
        """
        leg = _Leg(self, backend)
        if fwd.shape is Shape.STREAM:
            return await leg.stream(out, fwd)
        bconn, bhead = await leg.head(fwd.request, out)
        if fwd.shape is Shape.ASSEMBLED and bhead.status == 200 and bhead.chunked:
            return await leg.assembled(out, fwd, bconn)
        return await leg.whole(
            out, bconn, bhead, fwd.keep_alive, fwd.models, fwd.rewrite, fwd.conceal
        )

    async def static(
        self, out: Responder, request: bytes, backend: Backend, keep_alive: bool, head_only: bool
    ) -> bool:
        """A web UI file: the body as is, with the headers a browser's cache needs."""
        leg = _Leg(self, backend)
        bconn, bhead = await leg.head(request, out)
        if bhead.status in (204, 304):
            # No body by definition, whatever the framing headers say.
            leg.pool.release(bconn, bhead.keep_alive)
            body = b""
        else:
            try:
                body = await leg._body(bconn, bhead)
            except (BackendUnavailable, HttpError, TimeoutError, ConnectionError) as exc:
                raise backend_failure(
                    502, f"llama-server response broken: {exc}", "protocol"
                ) from None
        headers = [
            (STATIC_HEADER_NAMES[name], value)
            for name, value in bhead.headers
            if name in STATIC_HEADER_NAMES
        ]
        return out.send_static(
            bhead.status, body, headers, keep_alive=keep_alive, head_only=head_only
        )


class _Leg:
    """One request's way to the backend the router chose and back."""

    __slots__ = ("config", "readiness", "backend", "pool")

    def __init__(self, relay: Relay, backend: Backend) -> None:
        self.config = relay.config
        self.readiness = relay.readiness
        self.backend = backend
        self.pool = backend.pool

    # ------------------------------------------------------------------ shared steps

    def _unreachable(self, out: Responder, exc: Exception) -> Refusal:
        self.readiness.backend_failed(self.backend)
        log.warning("%s llama-server unreachable: %s", out.ex.request_id, exc)
        return backend_failure(502, "llama-server is not reachable", "unavailable")

    async def head(self, request: bytes, out: Responder) -> tuple[BackendConnection, ResponseHead]:
        try:
            bconn, bhead = await self.pool.exchange(request, self.config.first_byte_timeout)
        except BackendUnavailable as exc:
            raise self._unreachable(out, exc) from None
        except HttpError as exc:
            raise backend_failure(502, exc.message, "protocol") from None
        except TimeoutError:
            raise backend_failure(504, "llama-server did not answer in time", "timeout") from None
        out.ex.ttfb = time.monotonic() - out.ex.started
        return bconn, bhead

    async def _body(self, bconn: BackendConnection, bhead: ResponseHead) -> bytes:
        body = bconn.buffered_body(bhead)  # small responses arrive with their head
        if body is not None:
            self.pool.release(bconn, bhead.keep_alive)
            return body
        try:
            async with asyncio.timeout(self.config.stream_idle_timeout):
                body = await bconn.read_body(bhead)
        except BaseException:
            bconn.close()
            raise
        self.pool.release(bconn, bhead.keep_alive)
        return body

    async def whole(
        self,
        out: Responder,
        bconn: BackendConnection,
        bhead: ResponseHead,
        keep: bool,
        models: frozenset[str] | None = None,
        rewrite: Callable[[bytes], bytes] | None = None,
        conceal: bool = False,
    ) -> bool:
        """Read and forward a whole response (also the backend's own error responses)."""
        try:
            body = await self._body(bconn, bhead)
        except (BackendUnavailable, HttpError, TimeoutError, ConnectionError) as exc:
            raise backend_failure(502, f"llama-server response broken: {exc}", "protocol") from None
        if bhead.status == 200:
            out.ex.tally.add_body(body)
            if models is not None:
                body = filter_listing(body, models)
            if conceal and CACHE_MARK in body:
                body = _concealed(body)
            if rewrite is not None:
                body = rewrite(body)
        extra = [("Retry-After", bhead.get("retry-after") or "5")] if bhead.status == 503 else None
        return out.send(
            bhead.status,
            body,
            content_type=bhead.get("content-type") or "application/json",
            keep_alive=keep,
            extra=extra,
        )

    def _idle_expired(
        self, out: Responder, bconn: BackendConnection, watchdog: IdleWatchdog
    ) -> bool:
        """A cancellation arrived mid-body: True when it was the idle watchdog's."""
        bconn.close()
        if not watchdog.fired:
            return False  # the client went away, or shutdown: not ours to handle
        uncancel()
        out.ex.backend_error = "idle_timeout"
        return True

    # ------------------------------------------------------------------ assembled

    async def assembled(self, out: Responder, fwd: Forward, bconn: BackendConnection) -> bool:
        tally = out.ex.tally
        assembler = assemble.assembler_for(fwd.form, tally, fwd.return_tokens)
        decoder = ChunkedDecoder(BACKEND_LIMITS)
        events = SseEvents()
        watchdog = IdleWatchdog(out.channel, self.config.stream_idle_timeout)
        watch = fwd.watch
        try:
            while True:
                for payload in events.feed(decoder.feed(bconn.buf)):
                    if watch is not None and watch(payload):
                        watch = None
                    hidden = 0
                    if fwd.conceal and CACHE_MARK in payload:
                        payload, hidden = cache_counters.conceal_payload(payload)
                    assembler.add(payload)
                    if hidden:  # the ledger keeps what happened
                        tally.cached = (tally.cached or 0) + hidden
                if decoder.done or assembler.finished:
                    break
                if not await bconn.channel.more():
                    raise BackendUnavailable("llama-server closed the stream early")
                watchdog.touch()
        except asyncio.CancelledError:
            if not self._idle_expired(out, bconn, watchdog):
                raise
            raise Refusal(504, "llama-server stopped sending tokens", "idle_timeout", backend=True)
        except assemble.TooLarge as exc:
            bconn.close()  # llama-server stops generating what no one will read
            # Retrying would generate it all again: the SDKs are told not to.
            no_retry = [("x-should-retry", "false")]
            raise Refusal(502, str(exc), "response_too_large", headers=no_retry) from None
        except (BackendUnavailable, HttpError, ConnectionError, ValueError) as exc:
            bconn.close()
            raise backend_failure(502, f"llama-server response broken: {exc}", "protocol") from None
        finally:
            watchdog.stop()
        if assembler.error is not None:
            bconn.close()
            status, error = assembler.error
            out.ex.error = str(error.get("error"))
            return out.send(status, json.dumps(error).encode(), keep_alive=fwd.keep_alive)
        if not decoder.done:
            # [DONE] came before the end of the chunked body: drain the rest or drop it.
            bconn.close()
        else:
            self.pool.release(bconn, not bconn.buf)
        try:
            body = assembler.body()
        except ValueError as exc:  # the stream ended without what the reply is built from
            raise backend_failure(502, f"llama-server response broken: {exc}", "protocol") from None
        return out.send(
            200, body, content_type="application/json; charset=utf-8", keep_alive=fwd.keep_alive
        )

    # ------------------------------------------------------------------ stream

    async def stream(self, out: Responder, fwd: Forward) -> bool:
        client = out.channel
        committed = False
        loop = client.current_loop()
        deadline = loop.time() + self.config.first_byte_timeout
        pending = loop.create_task(self.pool.exchange(fwd.request))
        try:
            while True:
                wait = min(self.config.sse_keepalive_interval, deadline - loop.time())
                done, _ = await asyncio.wait((pending,), timeout=max(wait, 0.0))
                if done:
                    break
                if loop.time() >= deadline:
                    failure = backend_failure(504, "llama-server did not answer in time", "timeout")
                    return self._failed(out, committed, fwd.http11, failure)
                # A long prefill: commit to a stream and keep clients and proxies in
                # between from timing out the silent connection.
                if not committed:
                    client.write(out.stream_head(fwd.http11))
                    committed = True
                client.write(_KEEPALIVE_CHUNK if fwd.http11 else _KEEPALIVE)
                await client.drain()
            bconn, bhead = pending.result()
        except BackendUnavailable as exc:
            return self._failed(out, committed, fwd.http11, self._unreachable(out, exc))
        except HttpError as exc:
            return self._failed(
                out, committed, fwd.http11, backend_failure(502, exc.message, "protocol")
            )
        finally:
            if not pending.done():
                pending.cancel()
        out.ex.ttfb = time.monotonic() - out.ex.started

        if bhead.status != 200 or not bhead.chunked:
            if not committed:
                return await self.whole(
                    out, bconn, bhead, fwd.keep_alive, fwd.models, fwd.rewrite, fwd.conceal
                )
            message = f"llama-server answered {bhead.status}"
            try:
                body = await self._body(bconn, bhead)
                message = str(json.loads(body)["error"]["message"])
            except Exception:  # noqa: BLE001 - any unreadable body keeps the generic message
                bconn.close()
            return self._failed(
                out, committed, fwd.http11, backend_failure(bhead.status, message, "status")
            )

        if not committed:
            client.write(out.stream_head(fwd.http11))
        return await self._pump(out, fwd, bconn, bhead.keep_alive)

    async def _pump(
        self, out: Responder, fwd: Forward, bconn: BackendConnection, reusable: bool
    ) -> bool:
        """The hot path: hand the backend transport to a StreamPipe until the stream ends."""
        client = out.channel
        assert client.transport is not None and bconn.channel.transport is not None
        tally = out.ex.tally if fwd.count_usage else None
        pipe = stream_pipe_type(client)(
            client,
            decode=not fwd.http11,
            tally=tally,
            strip_usage=fwd.strip_usage,
            conceal=fwd.conceal,
        )
        pipe.watch = fwd.watch
        watchdog = IdleWatchdog(client, self.config.stream_idle_timeout, pipe)
        transport = bconn.channel.transport
        early = bconn.take_buffered()
        transport.set_protocol(pipe)
        pipe.connection_made(transport)
        transport.resume_reading()
        # A client more than RESPONSE_BUFFER_SIZE behind pauses llama-server's stream, and
        # with it the slot's release: that may last SLOW_CLIENT_TIMEOUT in all, however
        # the client trickles (each small read would otherwise count as progress).
        patience = self.config.slow_client_timeout
        try:
            if early:
                pipe.data_received(early)
            while await pipe.next_event() is PipeEvent.PAUSED:
                since = client.time()
                try:
                    async with asyncio.timeout(patience):
                        await client.drain()
                except TimeoutError:
                    return self._too_slow(out, bconn, pipe)
                patience -= client.time() - since
                watchdog.touch()
                pipe.resume()
        except asyncio.CancelledError:
            if not self._idle_expired(out, bconn, watchdog):
                raise
            out.ex.sent += pipe.sent
            failure = Refusal(504, "llama-server stopped sending tokens", "idle_timeout")
            return self._failed(out, True, fwd.http11, failure, pipe.scanner.at_boundary)
        except (BackendClosed, HttpError, ConnectionError) as exc:
            bconn.close()
            log.warning("%s stream from llama-server broke: %s", out.ex.request_id, exc)
            out.ex.sent += pipe.sent
            failure = backend_failure(502, "llama-server stream broke off", "stream_broken")
            return self._failed(out, True, fwd.http11, failure, pipe.scanner.at_boundary)
        finally:
            watchdog.stop()
        # The stream ended cleanly: the connection goes back to its channel, and to the
        # pool unless llama-server has closed it already.
        transport.set_protocol(bconn.channel)
        self.pool.release(bconn, reusable and not pipe.backend_closed)
        out.ex.sent += pipe.sent
        return fwd.keep_alive if fwd.http11 else False

    def _too_slow(self, out: Responder, bconn: BackendConnection, pipe: StreamPipe) -> bool:
        """Cut a client that kept the stream waiting past SLOW_CLIENT_TIMEOUT.

        Both connections are dropped at once: llama-server frees the slot, and the
        client's unread bytes are not kept for it.
        """
        bconn.close()
        out.channel.abort()
        out.ex.sent += pipe.sent
        out.ex.refused = "slow_client"
        out.ex.error = "the client did not read the stream within SLOW_CLIENT_TIMEOUT"
        log.warning("%s client cut: %s", out.ex.request_id, out.ex.error)
        return False

    def _failed(
        self,
        out: Responder,
        committed: bool,
        http11: bool,
        failure: Refusal,
        at_boundary: bool = True,
    ) -> bool:
        """Before headers: a plain error response. After: an SSE error event, then close."""
        if not committed:
            raise failure
        out.ex.error = failure.message
        if failure.backend:
            out.ex.backend_error = failure.reason
        if at_boundary:
            event = sse_error_event(failure.status, failure.message)
            out.channel.write(chunk(event) + LAST_CHUNK if http11 else event)
        return False
