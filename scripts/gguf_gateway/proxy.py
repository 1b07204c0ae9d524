"""Relaying one request to llama-server and its response back to the client.

Three shapes of response:

* plain: a whole JSON body (models, embeddings, tokenize...), forwarded as is;
* assembled: a non-streaming completion run as a stream on the backend, so that a client
  disconnect stops generation, turned back into the JSON llama-server would have sent;
* stream: SSE relayed as the backend's chunked bytes, unchanged and unbuffered, by a
  protocol that writes each read to the client as it arrives (pipe.py). The only
  per-read work is a framing check; the end of the stream (where the usage chunk is) is
  the one place events are parsed.

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
from typing import Any, cast

from . import assemble
from .backend import (
    BACKEND_LIMITS,
    READ_SIZE,
    BackendConnection,
    BackendPool,
    BackendUnavailable,
)
from .config import Config
from .errors import sse_error_event
from .http11 import (
    LAST_CHUNK,
    ChunkedDecoder,
    HttpError,
    ResponseHead,
    chunk,
)
from .metrics import Metrics
from .pipe import USAGE_MARK, USAGE_ONLY, BackendClosed, PipeEvent, StreamPipe
from .readiness import Readiness
from .responses import Responder

log = logging.getLogger("gateway")

_KEEPALIVE = b": keepalive\n\n"
_KEEPALIVE_CHUNK = chunk(_KEEPALIVE)


class IdleWatchdog:
    """Cancels the current task when ``touch`` has not been called for ``timeout`` seconds.

    One timer per stream instead of one per read keeps the relay loop allocation-free.
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


def uncancel() -> None:
    """We are handling a cancellation we caused ourselves; clear it from the task."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def _usage_in(events: list[bytes]) -> dict[str, Any] | None:
    for event in reversed(events):
        if USAGE_MARK in event:
            try:
                usage = json.loads(event.partition(b"data:")[2]).get("usage")
            except (ValueError, AttributeError):
                continue
            if isinstance(usage, dict):
                return usage
    return None


def _is_usage_only(event: bytes) -> bool:
    """The extra chunk include_usage adds: no choices, only usage."""
    return USAGE_MARK in event and USAGE_ONLY in event


class Relay:
    def __init__(
        self, config: Config, pool: BackendPool, metrics: Metrics, readiness: Readiness
    ) -> None:
        self.config = config
        self.pool = pool
        self.metrics = metrics
        self.readiness = readiness

    # ------------------------------------------------------------------ shared steps

    def _unreachable(self, out: Responder, exc: Exception, keep: bool) -> bool:
        self.metrics.backend_errors["unavailable"] += 1
        self.readiness.backend_failed()
        log.warning("%s llama-server unreachable: %s", out.ex.request_id, exc)
        return out.error(502, "llama-server is not reachable", keep_alive=keep)

    async def _head(self, request: bytes, out: Responder) -> tuple[BackendConnection, ResponseHead]:
        async with asyncio.timeout(self.config.first_byte_timeout):
            bconn, bhead = await self.pool.exchange(request)
        out.ex.ttfb = time.monotonic() - out.ex.started
        return bconn, bhead

    async def _head_or_error(
        self, request: bytes, out: Responder, keep: bool
    ) -> tuple[BackendConnection, ResponseHead] | bool:
        """The backend's response head, or the error response already sent instead."""
        try:
            return await self._head(request, out)
        except BackendUnavailable as exc:
            return self._unreachable(out, exc, keep)
        except HttpError as exc:
            self.metrics.backend_errors["protocol"] += 1
            return out.error(502, exc.message, keep_alive=keep)
        except TimeoutError:
            self.metrics.backend_errors["timeout"] += 1
            return out.error(504, "llama-server did not answer in time", keep_alive=keep)

    async def _body(self, bconn: BackendConnection, bhead: ResponseHead) -> bytes:
        try:
            async with asyncio.timeout(self.config.stream_idle_timeout):
                body = await bconn.read_body(bhead)
        except BaseException:
            bconn.close()
            raise
        self.pool.release(bconn, bhead.keep_alive)
        return body

    def _forward(self, out: Responder, bhead: ResponseHead, body: bytes, keep: bool) -> bool:
        extra = [("Retry-After", bhead.get("retry-after") or "5")] if bhead.status == 503 else None
        return out.send(
            bhead.status,
            body,
            content_type=bhead.get("content-type") or "application/json",
            keep_alive=keep,
            extra=extra,
        )

    async def _finish_whole(
        self, out: Responder, bconn: BackendConnection, bhead: ResponseHead, keep: bool
    ) -> bool:
        """Read and forward a whole response (also the backend's own error responses)."""
        try:
            body = await self._body(bconn, bhead)
        except (BackendUnavailable, HttpError, TimeoutError, ConnectionError) as exc:
            self.metrics.backend_errors["protocol"] += 1
            return out.error(502, f"llama-server response broken: {exc}", keep_alive=keep)
        if bhead.status == 200 and USAGE_MARK in body:
            try:
                usage = json.loads(body).get("usage")
                out.ex.usage = usage if isinstance(usage, dict) else None
            except (ValueError, AttributeError):
                pass
        return self._forward(out, bhead, body, keep)

    def _idle_expired(self, bconn: BackendConnection, watchdog: IdleWatchdog) -> bool:
        """A cancellation arrived mid-body: True when it was the idle watchdog's."""
        bconn.close()
        if not watchdog.fired:
            return False  # the client went away, or shutdown: not ours to handle
        uncancel()
        self.metrics.backend_errors["idle_timeout"] += 1
        return True

    # ------------------------------------------------------------------ plain

    async def plain(self, out: Responder, request: bytes, keep: bool) -> bool:
        got = await self._head_or_error(request, out, keep)
        if isinstance(got, bool):
            return got
        return await self._finish_whole(out, *got, keep)

    # ------------------------------------------------------------------ assembled

    async def assembled(self, out: Responder, request: bytes, keep: bool, path: str) -> bool:
        got = await self._head_or_error(request, out, keep)
        if isinstance(got, bool):
            return got
        bconn, bhead = got
        if bhead.status != 200 or not bhead.chunked:
            return await self._finish_whole(out, bconn, bhead, keep)
        assembler = assemble.Assembler(path)
        decoder = ChunkedDecoder(BACKEND_LIMITS)
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
            if not self._idle_expired(bconn, watchdog):
                raise
            return out.error(504, "llama-server stopped sending tokens", keep_alive=keep)
        except (BackendUnavailable, HttpError, ConnectionError, ValueError) as exc:
            bconn.close()
            self.metrics.backend_errors["protocol"] += 1
            return out.error(502, f"llama-server response broken: {exc}", keep_alive=keep)
        finally:
            watchdog.stop()
        if assembler.error is not None:
            bconn.close()
            status, error = assembler.error
            out.ex.error = str(error.get("error"))
            return out.send(status, json.dumps(error).encode(), keep_alive=keep)
        if not decoder.done:
            # [DONE] came before the end of the chunked body: drain the rest or drop it.
            bconn.close()
        else:
            self.pool.release(bconn, bhead.keep_alive and not bconn.buf)
        out.ex.usage = assembler.usage if isinstance(assembler.usage, dict) else None
        body = json.dumps(assembler.result(), ensure_ascii=False).encode()
        return out.send(200, body, content_type="application/json; charset=utf-8", keep_alive=keep)

    # ------------------------------------------------------------------ stream

    async def stream(
        self,
        out: Responder,
        request: bytes,
        keep: bool,
        http11: bool,
        strip_usage: bool,
        openai_chunks: bool,
    ) -> bool:
        writer = out.writer
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
                    return self._failed(
                        out, committed, http11, 504, "llama-server did not answer in time"
                    )
                # A long prefill: commit to a stream and keep clients and proxies in
                # between from timing out the silent connection.
                if not committed:
                    writer.write(out.stream_head(http11))
                    committed = True
                writer.write(_KEEPALIVE_CHUNK if http11 else _KEEPALIVE)
                await writer.drain()
            bconn, bhead = pending.result()
        except BackendUnavailable as exc:
            if not committed:
                return self._unreachable(out, exc, keep)
            self.readiness.backend_failed()
            self.metrics.backend_errors["unavailable"] += 1
            return self._failed(out, committed, http11, 502, "llama-server is not reachable")
        except HttpError as exc:
            self.metrics.backend_errors["protocol"] += 1
            return self._failed(out, committed, http11, 502, exc.message)
        finally:
            if not pending.done():
                pending.cancel()
        out.ex.ttfb = time.monotonic() - out.ex.started

        if bhead.status != 200 or not bhead.chunked:
            if not committed:
                return await self._finish_whole(out, bconn, bhead, keep)
            message = f"llama-server answered {bhead.status}"
            try:
                body = await self._body(bconn, bhead)
                message = str(json.loads(body)["error"]["message"])
            except Exception:  # noqa: BLE001 - any unreadable body keeps the generic message
                bconn.close()
            return self._failed(out, committed, http11, bhead.status, message)

        if not committed:
            writer.write(out.stream_head(http11))
        return await self._pump(
            out, bconn, http11, keep, bhead.keep_alive, strip_usage, openai_chunks
        )

    async def _pump(
        self,
        out: Responder,
        bconn: BackendConnection,
        http11: bool,
        keep: bool,
        reusable: bool,
        strip_usage: bool,
        openai_chunks: bool,
    ) -> bool:
        """The hot path: hand the backend transport to a StreamPipe until the stream ends."""
        writer = out.writer
        watchdog = IdleWatchdog(self.config.stream_idle_timeout)
        client = writer.transport
        pipe = StreamPipe(client, watchdog.touch, decode=not http11, watch_usage=openai_chunks)
        # cast, not isinstance: uvloop's transports implement the interface without
        # subclassing asyncio's classes.
        transport = cast(asyncio.Transport, bconn.writer.transport)
        original = transport.get_protocol()
        early = bconn.take_buffered()
        transport.set_protocol(pipe)
        pipe.connection_made(transport)
        transport.resume_reading()
        try:
            if early:
                pipe.data_received(early)
            while await pipe.next_event() is PipeEvent.PAUSED:
                await writer.drain()
                watchdog.touch()
                pipe.resume()
        except asyncio.CancelledError:
            if not self._idle_expired(bconn, watchdog):
                raise
            out.ex.sent += pipe.sent
            return self._failed(
                out,
                True,
                http11,
                504,
                "llama-server stopped sending tokens",
                pipe.scanner.at_boundary,
            )
        except (BackendClosed, HttpError, ConnectionError) as exc:
            bconn.close()
            self.metrics.backend_errors["stream_broken"] += 1
            log.warning("%s stream from llama-server broke: %s", out.ex.request_id, exc)
            out.ex.sent += pipe.sent
            return self._failed(
                out, True, http11, 502, "llama-server stream broke off", pipe.scanner.at_boundary
            )
        finally:
            watchdog.stop()
        # The stream ended cleanly: the connection goes back to its stream reader.
        transport.set_protocol(original)
        self.pool.release(bconn, reusable)
        sent = pipe.sent
        if pipe.tail is not None:
            sent += self._finish_tail(out, pipe.tail, http11, strip_usage)
        out.ex.sent += sent
        return keep if http11 else False

    def _finish_tail(self, out: Responder, tail: bytearray, http11: bool, strip_usage: bool) -> int:
        """Write the stream's last events, reading usage and dropping what was not asked for."""
        payload = ChunkedDecoder(BACKEND_LIMITS).feed(tail)
        events = payload.split(b"\n\n")
        out.ex.usage = _usage_in(events)
        if strip_usage:
            events = [e for e in events if not _is_usage_only(e)]
        body = b"\n\n".join(events)
        data = chunk(body) + LAST_CHUNK if http11 else body
        out.writer.write(data)
        return len(data)

    def _failed(
        self,
        out: Responder,
        committed: bool,
        http11: bool,
        status: int,
        message: str,
        at_boundary: bool = True,
    ) -> bool:
        """Before headers: a plain error response. After: an SSE error event, then close."""
        out.ex.error = message
        if not committed:
            return out.error(status, message, keep_alive=False)
        if at_boundary:
            event = sse_error_event(status, message)
            out.writer.write(chunk(event) + LAST_CHUNK if http11 else event)
        return False
