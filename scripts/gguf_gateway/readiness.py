"""What the gateway knows about llama-server, and the state it publishes for the probes.

The monitor polls llama-server's ``/health`` on loopback (503 while the model loads, 200
when it serves) and, once ready, reads ``/props`` for the slot count and ``/v1/models`` for
the model names. The gateway's state is published to a small file that the health
responder reads, so platform probes never reach llama-server themselves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

from . import startup
from .backend import BackendUnavailable, simple_get
from .backends import Backend, BackendSet

log = logging.getLogger("gateway")

# Published states, shared with health_server.py and start.sh.
STARTING, LOADING, READY, DRAINING, FAILED = "starting", "loading", "ready", "draining", "failed"
# A backend state, never published: it accepts connections but its /health did not
# answer within HEALTH_POLL_TIMEOUT. It is routed around, and back in once it answers.
UNRESPONSIVE = "unresponsive"
# llama-server answers /health from its HTTP threads without waiting for a slot, in
# milliseconds even mid-generation; seconds of silence mean it is stuck.
HEALTH_POLL_TIMEOUT = 5.0
DOWNLOADING = "downloading"  # the supervisor is fetching the model from the Hub
# The platform probe contract (RunPod's load balancer): 204 initializing, 200 healthy,
# anything else unhealthy. The one definition for the health responder and the gateway.
PROBE_STATUS = {
    STARTING: 204,
    DOWNLOADING: 204,
    LOADING: 204,
    READY: 200,
    DRAINING: 503,
    FAILED: 503,
}


def publish_state(path: Path | None, state: str) -> None:
    """Write ``state`` to ``path`` atomically (rename), so a reader never sees half of it."""
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_text(state + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write state file %s: %s", path, exc.strerror)


class Readiness:
    """The backends' states, polled on loopback, and the state published for the probes.

    The gateway is ready when every backend is: one that dies ends the container anyway
    (the supervisor's rule), and until then it is taken out of routing. A backend that
    is alive but stops answering its health poll is unresponsive: out of routing while
    it lasts, and the gateway stays ready while another backend is.
    """

    def __init__(
        self,
        backends: BackendSet,
        host: str,
        api_key: str,
        state_file: Path | None,
        download_file: Path | None = None,
        startup_file: Path | None = None,
    ) -> None:
        self.backends = backends
        self.host = host
        self.api_key = api_key
        self.state_file = state_file
        self.download_file = download_file
        self.startup_file = startup_file
        # Wall-clock (the supervisor's timeline is in epoch seconds): the first READY.
        self.ready_at: float | None = None
        self.booted_at = time.time()
        self.backend = STARTING  # all backends together: starting | loading | ready | down
        self.draining = False
        self.ever_ready = False
        self._router = False  # /props said role=router
        self.started = time.monotonic()
        self._wake = asyncio.Event()
        publish_state(state_file, STARTING)

    @property
    def slots(self) -> int | None:
        """Slots over all backends, once every one has said."""
        known = [b.slots for b in self.backends if b.slots]
        return sum(known) if len(known) == len(self.backends) else None

    @property
    def ctx(self) -> int | None:
        """The context of one slot (the smallest, should backends differ)."""
        known = [b.ctx for b in self.backends if b.ctx]
        return min(known) if known else None

    @property
    def models(self) -> list[str]:
        return self.backends.backends[0].models

    @property
    def router(self) -> bool:
        """llama-server runs in router mode (several models; a request names the one to run).

        Its /props says so; a listing of more than one model does too, should /props have
        failed: a key's model list must never be waved through for want of knowing.
        """
        return self._router or len(self.models) > 1

    @property
    def ready(self) -> bool:
        return self.backend == READY and not self.draining

    @property
    def status(self) -> str:
        if self.draining:
            return DRAINING
        if self.backend == "down":
            if self.ever_ready:
                return FAILED
            return DOWNLOADING if self.download() is not None else STARTING
        return self.backend

    def download(self) -> dict[str, object] | None:
        """The model download's progress, while the supervisor fetches it (else None)."""
        if self.download_file is None or self.ever_ready:
            return None
        try:
            progress = json.loads(self.download_file.read_text())
        except (OSError, ValueError):
            return None
        return progress if isinstance(progress, dict) else None

    def startup_events(self) -> dict[str, float]:
        """The supervisor's timeline; run on its own, the gateway's start is boot and load."""
        if self.startup_file is None:
            return {"boot": self.booted_at, "load_start": self.booted_at}
        try:
            return startup.parse(self.startup_file.read_text())
        except (OSError, UnicodeDecodeError):
            return {}

    def startup(self) -> dict[str, object]:
        return startup.timeline(self.startup_events(), self.ready_at, time.time())

    def backend_failed(self, backend: Backend) -> None:
        """A request could not reach ``backend``: re-check it now."""
        if backend.state == READY:
            backend.state = "down"
            self._update()
        self._wake.set()

    def start_draining(self) -> None:
        self.draining = True
        publish_state(self.state_file, DRAINING)

    def _update(self) -> None:
        states = {b.state for b in self.backends}
        if READY in states and states <= {READY, UNRESPONSIVE}:
            combined = READY
        elif states == {UNRESPONSIVE}:
            combined = "down"
        elif "down" in states and (self.ever_ready or states == {"down"}):
            combined = "down"
        elif LOADING in states or READY in states:
            combined = LOADING
        else:
            combined = STARTING if "down" not in states else "down"
        if combined == self.backend:
            return
        previous, self.backend = self.backend, combined
        if combined == READY and not self.ever_ready:
            self.ever_ready = True
            self.ready_at = time.time()
            spans = startup.finished(self.startup_events(), self.ready_at)
            log.info(
                "startup: %s",
                ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in spans.items()),
            )
        log.info("backend %s -> %s", previous, combined)
        if not self.draining:
            publish_state(self.state_file, self.status)

    async def _get(self, backend: Backend, path: str) -> tuple[int, bytes]:
        return await simple_get(
            self.host, backend.port, path, self.api_key, timeout=HEALTH_POLL_TIMEOUT
        )

    async def _learn(self, backend: Backend) -> None:
        try:
            status, body = await self._get(backend, "/props")
            if status == 200:
                props = json.loads(body)
                self._router = props.get("role") == "router"
                slots = props.get("total_slots")
                backend.slots = slots if isinstance(slots, int) else None
                ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
                backend.ctx = ctx if isinstance(ctx, int) and ctx > 0 else None
            status, body = await self._get(backend, "/v1/models")
            if status == 200:
                backend.models = [m.get("id", "") for m in json.loads(body).get("data", [])]
        except (BackendUnavailable, TimeoutError, ValueError, AttributeError) as exc:
            log.warning("could not read llama-server %d's properties: %s", backend.index, exc)

    async def _check(self, backend: Backend) -> None:
        try:
            status, _ = await self._get(backend, "/health")
        except BackendUnavailable:
            backend.state = "down"
            return
        except TimeoutError:
            if backend.state != UNRESPONSIVE:
                log.warning(
                    "llama-server %d (port %d) did not answer /health within %ss: "
                    "routing around it until it does",
                    backend.index,
                    backend.port,
                    HEALTH_POLL_TIMEOUT,
                )
            backend.state = UNRESPONSIVE
            return
        if status != 200:
            backend.state = LOADING
        elif backend.state != READY:
            await self._learn(backend)
            backend.state = READY
            log.info(
                "llama-server %d (port %d) ready: slots=%s models=%s",
                backend.index,
                backend.port,
                backend.slots,
                ",".join(backend.models) or "?",
            )

    async def check_once(self) -> None:
        await asyncio.gather(*(self._check(b) for b in self.backends))
        self._update()

    async def monitor(self) -> None:
        while True:
            await self.check_once()
            interval = 2.0 if self.backend == READY else 0.25
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except TimeoutError:
                pass
