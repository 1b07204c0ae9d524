"""The gateway's asyncio server: connections and the gateway's lifecycle.

One coroutine per client connection reads request heads (client.py), hands each request
to the pipeline (pipeline.py), then to accounting (accounting.py), and keeps the
connection alive or closes it. Connections are capped at MAX_CONNECTIONS; at the cap an
idle keep-alive connection is closed to make room before a newcomer is turned away.
Drain: stop accepting, close idle connections, wait (bounded) for in-flight requests,
then close the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .access import AccessControl
from .accounting import Accounting
from .backend import BackendPool
from .backends import Backend, BackendSet
from .channel import Channel, channel_type
from .client import MAX_PIPELINED, ClientConnection
from .config import Config
from .endpoints import LocalEndpoints
from .http11 import HttpError, Limits, RequestHead
from .keys import KeySource
from .metrics import Metrics
from .pipeline import AdmissionSource, Outcome, Pipeline, new_request_id
from .proxy import Relay
from .readiness import Readiness
from .refusals import Refusal, unavailable
from .responses import Exchange, Responder
from .shared_limits import SharedLimits

log = logging.getLogger("gateway")


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
        self.backends = BackendSet(
            [
                Backend(
                    i,
                    config.port_backend + i,
                    BackendPool(
                        config.backend_host,
                        config.port_backend + i,
                        config.backend_connect_timeout,
                    ),
                )
                for i in range(config.backends)
            ]
        )
        self.readiness = Readiness(
            self.backends,
            config.backend_host,
            config.backend_api_key,
            config.state_file,
            config.download_file,
            config.startup_file,
        )
        self.admission = AdmissionSource(config, self.readiness)
        self.endpoints = LocalEndpoints(
            config, self.metrics, self.readiness, lambda: self.admission.current
        )
        self.endpoints.limiter = lambda: self.shared
        self.shared = (
            SharedLimits(config.redis_url, config.redis_lease_seconds) if config.redis_url else None
        )
        self.pipeline = Pipeline(
            config,
            AccessControl(config, keys, self.shared),
            self.readiness,
            self.endpoints,
            Relay(config, self.readiness),
            self.admission,
        )
        self.accounting = Accounting(config, self.metrics)
        self._connections: dict[Channel, ClientConnection] = {}
        self._idle_event = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._channel: type[Channel] = Channel

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> asyncio.Server:
        if self.shared is not None:
            self.shared.start()
        self.pipeline.access.read_ledger()  # quotas' spending so far, while the model loads
        self._channel = channel_type()
        self._server = await asyncio.get_running_loop().create_server(
            self._accept, self.config.host, self.config.port, backlog=2048
        )
        return self._server

    async def drain(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), then close everything."""
        self.readiness.start_draining()
        if self._server is not None:
            self._server.close()
        for channel, conn in list(self._connections.items()):
            if not conn.busy:
                channel.close()
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
        for channel in list(self._connections):
            channel.abort()
        for backend in self.backends:
            backend.pool.close_all()
        if self.shared is not None:
            await self.shared.stop()
        self.accounting.close()

    # ------------------------------------------------------------------ connections

    def _make_room(self) -> bool:
        """At the connection cap: close the idle keep-alive connection waiting longest."""
        for channel, conn in self._connections.items():
            if not conn.busy and conn.requests:
                channel.abort()
                del self._connections[channel]
                return True
        return False

    def _accept(self) -> Channel:
        return self._channel(MAX_PIPELINED, self._connected)

    def _connected(self, channel: Channel) -> None:
        assert channel.transport is not None
        # Responses are buffered for the client up to RESPONSE_BUFFER_SIZE (not the
        # transport's default 64 KiB): a generation that fits is out of llama-server,
        # and its slot free, however slowly the client reads it.
        buffer = self.config.response_buffer_size
        channel.transport.set_write_buffer_limits(high=buffer, low=buffer // 4)
        conn = ClientConnection(channel, self.limits)
        # The connection holds its task: the loop keeps only weak references to tasks.
        conn.task = channel.current_loop().create_task(self._connection(conn))

    async def _connection(self, conn: ClientConnection) -> None:
        try:
            await self._serve_connection(conn)
        except asyncio.CancelledError:
            # The loop is shutting down with this connection still open (after drain):
            # a normal end for a connection handler, not an error to report.
            conn.channel.abort()

    async def _serve_connection(self, conn: ClientConnection) -> None:
        channel = conn.channel
        if len(self._connections) >= self.config.max_connections and not self._make_room():
            # Over the cap with nothing idle to drop: a clear answer and a close.
            refusal = unavailable("too many connections", "connections", retry_after=1)
            self._refuse_connection(conn, refusal, "-")
            await conn.close(linger=True)
            return
        self._connections[channel] = conn
        linger = False
        try:
            while True:
                first = conn.requests == 0
                try:
                    head = await conn.read_head(
                        (
                            self.config.client_header_timeout
                            if first
                            else self.config.client_idle_timeout
                        ),
                        self.config.client_header_timeout,
                    )
                except HttpError as exc:
                    # A head we could not parse: its framing is not trusted.
                    reason = "timeout" if exc.status == 408 else "framing"
                    self._refuse_connection(conn, Refusal(exc.status, exc.message, reason), "-")
                    linger = True
                    break
                except TimeoutError:
                    if first or conn.buf:
                        refusal = Refusal(408, "no complete request head in time", "timeout")
                        self._refuse_connection(conn, refusal, "-")
                        linger = True
                    break
                if head is None:
                    break
                conn.requests += 1
                outcome = await self._request(conn, head)
                linger = outcome.linger
                if not outcome.keep_alive or self.readiness.draining:
                    break
                # The request's slot and limits are given back already; its response
                # may still be buffered. A client that cannot take it in time is cut
                # rather than read from again.
                if not await conn.caught_up(self.config.slow_client_timeout):
                    self.metrics.rejections["slow_client"] += 1
                    log.warning("client cut: its response not taken within SLOW_CLIENT_TIMEOUT")
                    break
        except ConnectionError:
            pass
        finally:
            self._connections.pop(channel, None)
        await conn.close(linger=linger and not self.readiness.draining)
        conn.flush_within(self.config.slow_client_timeout)

    async def _request(self, conn: ClientConnection, head: RequestHead) -> Outcome:
        pipeline = self.pipeline
        out = Responder(conn.channel, pipeline.exchange_for(head))
        conn.busy = True
        self.metrics.in_flight += 1
        try:
            return await pipeline.handle(conn, head, out)
        finally:
            self.metrics.in_flight -= 1
            conn.busy = False
            if not self.metrics.in_flight:
                self._idle_event.set()
            self.accounting.finished(out.ex, head.path)

    def _refuse_connection(self, conn: ClientConnection, refusal: Refusal, path: str) -> None:
        """A refusal before there is a request to speak of: answer, account, close."""
        ex = Exchange(new_request_id(), "-", "other", time.monotonic())
        Responder(conn.channel, ex).refuse(refusal, keep_alive=False)
        self.accounting.finished(ex, path)
