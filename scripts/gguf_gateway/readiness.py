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

from .backend import BackendUnavailable, simple_get

log = logging.getLogger("gateway")

# Published states, shared with health_server.py and start.sh.
STARTING, LOADING, READY, DRAINING, FAILED = "starting", "loading", "ready", "draining", "failed"
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
    def __init__(
        self,
        host: str,
        port: int,
        api_key: str,
        state_file: Path | None,
        download_file: Path | None = None,
    ) -> None:
        self.download_file = download_file
        self.host = host
        self.port = port
        self.api_key = api_key
        self.state_file = state_file
        self.backend = STARTING  # starting | loading | ready | down
        self.draining = False
        self.ever_ready = False
        self.slots: int | None = None
        self.ctx: int | None = None  # context per slot
        self.models: list[str] = []
        self.started = time.monotonic()
        self._wake = asyncio.Event()
        publish_state(state_file, STARTING)

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

    def backend_failed(self) -> None:
        """A request could not reach llama-server: re-check it now."""
        if self.backend == READY:
            self._set("down")
        self._wake.set()

    def start_draining(self) -> None:
        self.draining = True
        publish_state(self.state_file, DRAINING)

    def _set(self, backend: str) -> None:
        if backend == self.backend:
            return
        previous, self.backend = self.backend, backend
        log.info("backend %s -> %s", previous, backend)
        if not self.draining:
            publish_state(self.state_file, self.status)

    async def _get(self, path: str) -> tuple[int, bytes]:
        return await simple_get(self.host, self.port, path, self.api_key, timeout=5.0)

    async def _learn(self) -> None:
        try:
            status, body = await self._get("/props")
            if status == 200:
                props = json.loads(body)
                slots = props.get("total_slots")
                self.slots = slots if isinstance(slots, int) else None
                ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
                self.ctx = ctx if isinstance(ctx, int) and ctx > 0 else None
            status, body = await self._get("/v1/models")
            if status == 200:
                self.models = [m.get("id", "") for m in json.loads(body).get("data", [])]
        except (BackendUnavailable, TimeoutError, ValueError, AttributeError) as exc:
            log.warning("could not read llama-server properties: %s", exc)

    async def check_once(self) -> None:
        try:
            status, _ = await self._get("/health")
        except (BackendUnavailable, TimeoutError):
            self._set("down")
            return
        if status == 200:
            if self.backend != READY:
                await self._learn()
                self.ever_ready = True
                log.info(
                    "llama-server ready: slots=%s models=%s",
                    self.slots,
                    ",".join(self.models) or "?",
                )
            self._set(READY)
        else:
            self._set(LOADING)

    async def monitor(self) -> None:
        while True:
            await self.check_once()
            interval = 2.0 if self.backend == READY else 0.25
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except TimeoutError:
                pass
