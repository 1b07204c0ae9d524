"""Gateway configuration, read once from the environment.

``Config.from_env`` is a pure function of a mapping so tests pass plain dicts. A bad value
raises :class:`ConfigError` naming the variable and what it expected; the entrypoint turns
that into one line on stderr and exit status 2.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

VERSION = "0.1.0"


class ConfigError(Exception):
    """A setting that cannot be used; the message names the variable."""


def detect_platform(env: Mapping[str, str]) -> str:
    """The platform, from the variables each one documents (never guessed from paths)."""
    if env.get("RUNPOD_ENDPOINT_ID"):
        return "runpod-serverless"  # with or without a network volume
    if env.get("RUNPOD_POD_ID"):
        return "runpod-pod"
    if env.get("VAST_CONTAINERLABEL") or (
        env.get("CONTAINER_ID") and any(name.startswith("VAST_") for name in env)
    ):
        return "vastai"
    return "local"


def default_health_port(env: Mapping[str, str]) -> int:
    """PORT_HEALTH when unset: on RunPod serverless the balancer then probes PORT itself."""
    if detect_platform(env) == "runpod-serverless":
        return _port(env, "PORT", 8000)
    return 8001


def default_first_byte(env: Mapping[str, str]) -> float:
    """FIRST_BYTE_TIMEOUT when unset: under the platform's own cap where it has one.

    RunPod serverless ends a request at 5.5 minutes with a bare 524; answering 504 at 5
    minutes tells the client what happened. Elsewhere 10 minutes of prompt processing is
    allowed (streams send keepalives meanwhile).
    """
    return 300.0 if detect_platform(env) == "runpod-serverless" else 600.0


def detect_data_dir(env: Mapping[str, str], root: Path = Path("/")) -> Path:
    """DATA_DIR if set; else /runpod-volume, else /workspace if present; else /data.

    RunPod mounts network volumes at /runpod-volume (serverless) or /workspace (pods);
    Vast.ai mounts volumes at /data. ``root`` lets tests build these under a temporary
    folder.
    """
    explicit = env.get("DATA_DIR", "")
    if explicit:
        return Path(explicit)
    for name in ("runpod-volume", "workspace"):
        if (root / name).is_dir():
            return root / name
    return root / "data"


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a whole number") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r}: must be at least {minimum}")
    return value


def _optional_int(env: Mapping[str, str], name: str, minimum: int = 1) -> int | None:
    if not env.get(name, "").strip():
        return None
    return _int(env, name, 0, minimum)


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a number of seconds") from None
    if not value > 0:
        raise ConfigError(f"{name}={raw!r}: must be greater than 0")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r}: expected true or false")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip() or default
    value = raw.lower() if name != "LOG_LEVEL" else raw.upper()
    if value not in choices:
        raise ConfigError(f"{name}={raw!r}: expected one of {', '.join(choices)}")
    return value


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    """A TCP port: the one rule for PORT, PORT_HEALTH and PORT_BACKEND (start.sh asks --check)."""
    value = _int(env, name, default, minimum=1)
    if value > 65535:
        raise ConfigError(f"{name}={value}: expected a TCP port (1-65535)")
    return value


def _redis_url(env: Mapping[str, str]) -> str:
    raw = env.get("REDIS_URL", "").strip()
    if not raw:
        return ""
    parts = urllib.parse.urlsplit(raw)
    try:
        parts.port
    except ValueError:
        raise ConfigError("REDIS_URL: the port is not a number") from None
    if (
        parts.scheme != "redis"
        or not parts.hostname
        or not (parts.path.strip("/") or "0").isdigit()
    ):
        # Never echo it: the URL may carry a password.
        raise ConfigError("REDIS_URL: expected redis://[:password@]host[:port][/db]")
    return raw


def _backends(env: Mapping[str, str]) -> int:
    """BACKENDS: a count; "auto" is resolved to one per GPU by the supervisor."""
    raw = env.get("BACKENDS", "").strip().lower()
    if raw in ("", "auto"):
        return 1
    return _int(env, "BACKENDS", 1, minimum=1)


def _path(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    if not raw.startswith("/") or any(c in raw for c in "?# \t"):
        raise ConfigError(f"{name}={raw!r}: expected a URL path such as /ping")
    return raw


def _vertex(env: Mapping[str, str], name: str, default: str | None) -> str | None:
    """One of Vertex AI's routes when it runs the container for predictions (AIP_MODE)."""
    if env.get("AIP_MODE", "").strip() != "PREDICTION":
        return None
    if default is None and not env.get(name, "").strip():
        return None
    return _path(env, name, default or "")


@dataclass(frozen=True)
class Config:
    host: str = "0.0.0.0"
    port: int = 8000
    port_health: int = 8001
    health_check_path: str = "/ping"
    backend_host: str = "127.0.0.1"
    port_backend: int = 8090
    backends: int = 1  # llama-servers on port_backend, port_backend + 1, ...
    backend_api_key: str = ""

    auth_enabled: bool = True
    auth_keys_file: Path = Path("/data/api_keys.txt")
    api_key: str = ""
    api_key_file: Path | None = None
    api_keys: str = field(default="", repr=False)  # API_KEYS: key-file lines (secrets)

    max_requests_per_minute: int = 100
    max_concurrent_requests: int | None = None
    max_queue_size: int | None = None
    queue_timeout: float = 30.0
    max_queue_per_key: int | None = None

    max_request_body_size: int = 10 * 1024 * 1024
    max_header_bytes: int = 16384
    max_headers: int = 100
    max_connections: int = 4096
    # What a response may hold for a client reading slower than llama-server writes, and
    # how long in all such a client may keep llama-server waiting before it is cut.
    response_buffer_size: int = 1024 * 1024
    slow_client_timeout: float = 30.0
    # Requests that take no slot (/tokenize, /detokenize, count_tokens, ...): llama-server
    # runs them on its HTTP threads, its tokenizer quadratic on some text.
    max_tokenize_body_size: int = 262144
    max_concurrent_tokenize: int = 2
    # Single-tenant deployments: exact prompt-cache counters, prefix affinity across keys.
    expose_prompt_cache: bool = False

    client_header_timeout: float = 10.0
    client_body_timeout: float = 60.0
    client_idle_timeout: float = 75.0
    backend_connect_timeout: float = 5.0
    first_byte_timeout: float = 600.0
    stream_idle_timeout: float = 120.0
    sse_keepalive_interval: float = 15.0
    drain_timeout: float = 8.0

    allow_remote_media: bool = False
    allow_server_tools: bool = False  # /tools and /cors-proxy reach llama-server (admin)
    # Vertex AI (AIP_MODE=PREDICTION): its prediction and health routes; None: off.
    vertex_predict_route: str | None = None
    vertex_health_route: str | None = None
    redis_url: str = ""  # empty: limits in memory, per replica
    redis_lease_seconds: float = 30.0
    cors_origins: tuple[str, ...] = ()
    webui: bool = True  # llama-server's web UI at / (its static files need no key)
    metrics_auth_enabled: bool = False
    log_level: str = "INFO"
    log_format: str = "text"
    event_loop: str = "auto"
    state_file: Path | None = None
    download_file: Path | None = None
    startup_file: Path | None = None
    log_dir: Path = Path("/data/logs")
    worker_id: str = ""
    platform: str = "local"
    data_dir: Path = Path("/data")

    @property
    def single_port(self) -> bool:
        """PORT_HEALTH equal to PORT (RunPod's default): the gateway answers the probes."""
        return self.port_health == self.port

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env
        data_dir = detect_data_dir(env)
        api_key_file = env.get("API_KEY_FILE", "").strip()
        state_file = env.get("GATEWAY_STATE_FILE", "").strip()
        return cls(
            host=env.get("HOST", "").strip() or "0.0.0.0",
            port=_port(env, "PORT", 8000),
            port_health=_port(env, "PORT_HEALTH", default_health_port(env)),
            health_check_path=_path(env, "HEALTH_CHECK_PATH", "/ping"),
            port_backend=_port(env, "PORT_BACKEND", 8090),
            backends=_backends(env),
            backend_api_key=env.get("BACKEND_API_KEY", ""),
            auth_enabled=_bool(env, "AUTH_ENABLED", True),
            auth_keys_file=Path(env.get("AUTH_KEYS_FILE", "").strip() or data_dir / "api_keys.txt"),
            api_key=env.get("API_KEY", "").strip(),
            api_key_file=Path(api_key_file) if api_key_file else None,
            api_keys=env.get("API_KEYS", ""),
            max_requests_per_minute=_int(env, "MAX_REQUESTS_PER_MINUTE", 100, 1),
            max_concurrent_requests=_optional_int(env, "MAX_CONCURRENT_REQUESTS"),
            max_queue_size=_optional_int(env, "MAX_QUEUE_SIZE", minimum=0),
            queue_timeout=_seconds(env, "QUEUE_TIMEOUT", 30.0),
            max_queue_per_key=_optional_int(env, "MAX_QUEUE_PER_KEY"),
            max_request_body_size=_int(env, "MAX_REQUEST_BODY_SIZE", 10 * 1024 * 1024, 1),
            max_header_bytes=_int(env, "MAX_HEADER_BYTES", 16384, 256),
            max_headers=_int(env, "MAX_HEADERS", 100, 1),
            max_connections=_int(env, "MAX_CONNECTIONS", 4096, 1),
            response_buffer_size=_int(env, "RESPONSE_BUFFER_SIZE", 1024 * 1024, 65536),
            slow_client_timeout=_seconds(env, "SLOW_CLIENT_TIMEOUT", 30.0),
            max_tokenize_body_size=_int(env, "MAX_TOKENIZE_BODY_SIZE", 262144, 1024),
            max_concurrent_tokenize=_int(env, "MAX_CONCURRENT_TOKENIZE", 2, 1),
            expose_prompt_cache=_bool(env, "EXPOSE_PROMPT_CACHE", False),
            client_header_timeout=_seconds(env, "CLIENT_HEADER_TIMEOUT", 10.0),
            client_body_timeout=_seconds(env, "CLIENT_BODY_TIMEOUT", 60.0),
            client_idle_timeout=_seconds(env, "CLIENT_IDLE_TIMEOUT", 75.0),
            backend_connect_timeout=_seconds(env, "BACKEND_CONNECT_TIMEOUT", 5.0),
            first_byte_timeout=_seconds(env, "FIRST_BYTE_TIMEOUT", default_first_byte(env)),
            stream_idle_timeout=_seconds(env, "STREAM_IDLE_TIMEOUT", 120.0),
            sse_keepalive_interval=_seconds(env, "SSE_KEEPALIVE_INTERVAL", 15.0),
            drain_timeout=_seconds(env, "DRAIN_TIMEOUT", 8.0),
            cors_origins=tuple(
                o.strip() for o in env.get("CORS_ORIGINS", "").split(",") if o.strip()
            ),
            webui=_bool(env, "WEBUI", True),
            metrics_auth_enabled=_bool(env, "METRICS_AUTH_ENABLED", False),
            allow_remote_media=_bool(env, "ALLOW_REMOTE_MEDIA", False),
            allow_server_tools=_bool(env, "ALLOW_SERVER_TOOLS", False),
            vertex_predict_route=_vertex(env, "AIP_PREDICT_ROUTE", "/predict"),
            vertex_health_route=_vertex(env, "AIP_HEALTH_ROUTE", None),
            redis_url=_redis_url(env),
            redis_lease_seconds=_seconds(env, "REDIS_LEASE_SECONDS", 30.0),
            log_level=_choice(env, "LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
            log_format=_choice(env, "LOG_FORMAT", "text", ("text", "json")),
            event_loop=_choice(env, "EVENT_LOOP", "auto", ("auto", "asyncio", "uvloop")),
            state_file=Path(state_file) if state_file else None,
            download_file=(
                Path(download) if (download := env.get("GATEWAY_DOWNLOAD_FILE")) else None
            ),
            startup_file=(
                Path(timeline) if (timeline := env.get("GATEWAY_STARTUP_FILE")) else None
            ),
            data_dir=data_dir,
            log_dir=Path(env.get("LOG_DIR", "").strip() or data_dir / "logs"),
            platform=detect_platform(env),
            worker_id=(
                env.get("RUNPOD_POD_ID", "").strip()
                or env.get("VAST_CONTAINERLABEL", "").strip()
                or socket.gethostname()
            ),
        )
