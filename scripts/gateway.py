#!/usr/bin/env python3
"""llama-gguf-inference gateway: authenticated, stream-aware proxy in front of llama-server.

Configured from the environment (see .env.example). Exit status 2 means a setting is
wrong; the message names it. SIGTERM/SIGINT drain in-flight requests (DRAIN_TIMEOUT),
SIGHUP reloads the key file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import sys
from types import ModuleType

from gguf_gateway import logs
from gguf_gateway.config import Config, ConfigError
from gguf_gateway.keys import KeySource
from gguf_gateway.server import Gateway

log = logging.getLogger("gateway")

NO_KEYS_MESSAGE = (
    "AUTH_ENABLED=true but no API key is configured: create {file} with a line like "
    "'mykey:sk-...' (python3 scripts/key_mgmt.py generate mykey), or set API_KEYS (key "
    "lines separated by ';'), API_KEY or API_KEY_FILE, or set AUTH_ENABLED=false for a "
    "private network"
)


async def serve(config: Config, keys: KeySource) -> int:
    gateway = Gateway(config, keys)
    try:
        server = await gateway.start()
    except OSError as exc:
        log.error(
            "cannot listen on %s:%s: %s (is PORT in use?)", config.host, config.port, exc.strerror
        )
        return 2
    bound = ", ".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in server.sockets)
    log.info(
        "gateway listening on %s -> llama-server 127.0.0.1:%s (auth %s, %d key(s))",
        bound,
        config.port_backend,
        "on" if config.auth_enabled else "OFF",
        len(keys.ring),
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def reload_keys() -> None:
        keys.reload()
        log.info("keys reloaded: %d key(s)", len(keys.ring))

    loop.add_signal_handler(signal.SIGHUP, reload_keys)
    monitor = asyncio.create_task(gateway.readiness.monitor())
    await stop.wait()
    log.info("shutdown requested: draining")
    await gateway.drain()
    monitor.cancel()
    log.info("gateway stopped")
    return 0


def main(argv: list[str]) -> int:
    check_only = "--check" in argv
    try:
        config = Config.from_env()
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.setup(config.log_level, config.log_format)
    keys = KeySource(
        config.auth_keys_file,
        config.api_key,
        config.api_key_file,
        log=log.warning,
        api_keys=config.api_keys,
    )
    problem = key_file_problem(config)
    if problem:
        log.error(problem)
        return 2
    if config.auth_enabled and not len(keys.ring):
        log.error(NO_KEYS_MESSAGE.format(file=config.auth_keys_file))
        return 2
    if check_only:
        # Used by start.sh: validate everything before any process starts, and tell it
        # the facts its boot block needs, so no rule is written twice.
        print(f"platform={config.platform}")
        print(f"data_dir={config.data_dir}")
        print(f"auth={'on' if config.auth_enabled else 'off'}")
        print(f"keys={len(keys.ring)}")
        print(f"port_health={config.port_health}")
        return 0
    raise_fd_limit(config.max_connections)
    uvloop = event_loop(config.event_loop)
    if uvloop is not None:
        # A runner with uvloop's loop, not uvloop.run: distributions ship uvloop releases
        # older than 0.18, which lack it (Debian 12 has 0.17).
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(serve(config, keys))
    return asyncio.run(serve(config, keys))


def event_loop(choice: str) -> ModuleType | None:
    """uvloop's module when it is to run the gateway; None for asyncio's own loop.

    ``auto`` takes uvloop where it is installed (the image installs Ubuntu's
    python3-uvloop): the same code spends about a third less CPU per request and per
    relayed event on it (``make bench`` measures both). The stdlib loop is the fallback.
    """
    if choice == "asyncio":
        log.info("event loop: asyncio")
        return None
    try:
        import uvloop  # optional, never required
    except ImportError:
        if choice == "uvloop":
            log.warning("EVENT_LOOP=uvloop but uvloop is not installed: using asyncio's loop")
        else:
            log.info("event loop: asyncio (uvloop is not installed)")
        return None
    log.info("event loop: uvloop %s", getattr(uvloop, "__version__", ""))
    return uvloop


def key_file_problem(config: Config) -> str | None:
    """A key file that exists but cannot be used: said plainly rather than as "no keys"."""
    if not config.auth_enabled:
        return None
    path = config.auth_keys_file
    if path.is_dir():
        return f"AUTH_KEYS_FILE={path} is a directory, not a key file"
    if path.exists() and not os.access(path, os.R_OK):
        return f"AUTH_KEYS_FILE={path} is not readable"
    if config.api_key_file is not None and not os.access(config.api_key_file, os.R_OK):
        return f"API_KEY_FILE={config.api_key_file} is not readable"
    return None


def raise_fd_limit(connections: int) -> None:
    """Each client and backend connection is a descriptor; the default 1024 is too few."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < connections + 256:
        log.warning(
            "open-file limit %d is below MAX_CONNECTIONS=%d: raise it (docker run --ulimit nofile=65536)",
            soft,
            connections,
        )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
