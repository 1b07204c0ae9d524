"""Benchmark: the gateway against llama-server direct and nginx, same model, same load, one run.

Prints one JSON object: streaming events/s at several concurrencies with the
gateway/direct ratio, the latency the gateway adds to a small authenticated request
(p50/p99), the gateway's RSS per idle client connection, and, where nginx is installed,
the gateway's CPU time per relayed SSE event and per small request against nginx's (one
worker, an auth map, proxy_buffering off, upstream keepalive: the plain reverse proxy a
user could put there instead). CPU time comes from /proc for both (cpu_seconds). Each event
loop is measured (uvloop, the default where installed, first and at the top level; then
asyncio's own loop under its name), and ``targets`` judges each. A benchmark, not a test:
nothing here passes or fails.

    python tests/bench.py [--streams 1,4,16] [--tokens 256] [--requests 2000] [--idle 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.make_model import write_model  # noqa: E402
from support.procs import (  # noqa: E402
    Process,
    answers,
    free_port,
    free_ports,
    start_gateway,
    start_llama_server,
    wait_until,
)

BACKEND_KEY = "bench-backend-key"
CLIENT_KEY = "sk-bench-client-key"


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) of a process so far, summed over its threads.

    From the scheduler's own count (``schedstat``, nanoseconds): ``stat``'s clock ticks
    are 10 ms, coarser than nginx's whole CPU time for a run of small requests.
    """
    try:
        return (
            sum(
                int((task / "schedstat").read_text().split()[0])
                for task in Path(f"/proc/{pid}/task").iterdir()
            )
            / 1e9
        )
    except (OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
error_log {work}/nginx-error.log warn;
pid {work}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    map $http_authorization $allowed {{ default 0; "Bearer {client_key}" 1; }}
    # As the gateway's pool does: idle upstream connections dropped before llama-server's
    # own 5 s keep-alive timeout, and a request retried when a reused one was closed.
    upstream llama {{
        server 127.0.0.1:{backend_port};
        keepalive 64;
        keepalive_timeout 4s;
        keepalive_requests 90;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            if ($allowed = 0) {{ return 401; }}
            proxy_pass http://llama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {backend_key}";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_next_upstream error timeout non_idempotent;
        }}
    }}
}}
"""


def start_nginx(work: Path, backend_port: int) -> tuple[Process, int] | None:
    """nginx in front of the same llama-server, if it is installed; one process."""
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if binary is None:
        return None
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            work=work,
            client_key=CLIENT_KEY,
            backend_port=backend_port,
            port=port,
            backend_key=BACKEND_KEY,
        )
    )
    proc = Process([binary, "-c", str(conf), "-p", str(work)], dict(os.environ), work / "nginx.log")
    proc.start()
    wait_until(
        lambda: answers(port, "/health", 200, {"Authorization": f"Bearer {CLIENT_KEY}"}),
        10,
        "nginx",
    )
    return proc, port


def start_floor(work: Path, backend_port: int, loop: str) -> tuple[Process, int]:
    """The no-logic relay (support/floor_relay.py) on event loop ``loop``."""
    port = free_port()
    relay = Path(__file__).resolve().parent / "support" / "floor_relay.py"
    args = [sys.executable, str(relay), str(port), str(backend_port), BACKEND_KEY, loop]
    proc = Process(args, dict(os.environ), work / f"floor-{loop}.log").start()
    wait_until(lambda: answers(port, "/health", 200) or not proc.alive(), 10, "the floor relay")
    if not proc.alive():
        raise RuntimeError(f"floor relay exited:\n{proc.log()[-2000:]}")
    return proc, port


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def request(path: str, key: str, body: bytes = b"", method: str = "POST") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {key}\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """Read one response; returns (head, body). Handles Content-Length and chunked."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        parts: list[bytes] = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return head, b"".join(parts)
            parts.append(await reader.readexactly(size + 2))
    start = lower.index(b"content-length:") + 15
    length = int(lower[start : lower.index(b"\r\n", start)])
    return head, await reader.readexactly(length)


async def one_stream(port: int, key: str, tokens: int) -> int:
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": tokens,
            "ignore_eos": True,
            "stream": True,
        }
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request("/v1/chat/completions", key, body))
        head, payload = await read_response(reader)
        if b" 200 " not in head.split(b"\r\n")[0]:
            raise RuntimeError(f"stream failed: {head[:100]!r} {payload[:200]!r}")
        return payload.count(b"data: ")
    finally:
        writer.close()


async def streams(port: int, key: str, concurrency: int, tokens: int, rounds: int) -> float:
    """Events per second with ``concurrency`` streams running at once."""
    events, seconds = await stream_events(port, key, concurrency, tokens, rounds)
    return events / seconds


async def stream_events(
    port: int, key: str, concurrency: int, tokens: int, rounds: int
) -> tuple[int, float]:
    """Events relayed and seconds taken with ``concurrency`` streams at once."""
    started = time.perf_counter()
    total = 0
    for _ in range(rounds):
        counts = await asyncio.gather(*(one_stream(port, key, tokens) for _ in range(concurrency)))
        total += sum(counts)
    return total, time.perf_counter() - started


async def latencies(port: int, key: str, count: int) -> list[float]:
    """Sequential small authenticated requests on a keep-alive connection (ms).

    llama-server closes a connection after 100 requests; the client then reconnects, and
    that request's time is not counted.
    """
    data = request("/tokenize", key, b'{"content":"hi"}')
    out: list[float] = []
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while len(out) < count:
            started = time.perf_counter()
            writer.write(data)
            head, _ = await read_response(reader)
            elapsed = (time.perf_counter() - started) * 1000
            if b" 200 " not in head.split(b"\r\n")[0]:
                raise RuntimeError(f"request failed: {head[:100]!r}")
            out.append(elapsed)
            if b"connection: close" in head.lower():
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
    finally:
        writer.close()
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def idle_connections(port: int, pid: int, count: int) -> dict[str, float]:
    before = rss_kib(pid)
    conns = []
    ping = b"GET /ping HTTP/1.1\r\nHost: bench\r\n\r\n"
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(ping)
        await read_response(reader)
        conns.append((reader, writer))
    await asyncio.sleep(0.5)
    after = rss_kib(pid)
    # Still answering promptly with all of them open?
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(ping)
    await read_response(reader)
    prompt_ms = (time.perf_counter() - started) * 1000
    writer.close()
    for _, w in conns:
        w.close()
    return {
        "connections": count,
        "rss_kib_before": before,
        "rss_kib_after": after,
        "rss_bytes_per_connection": round((after - before) * 1024 / count, 1),
        "new_request_ms_while_held": round(prompt_ms, 2),
    }


async def cpu_per_event(
    port: int, pid: int, concurrency: int, tokens: int, rounds: int
) -> tuple[float, float]:
    """(events/s, CPU microseconds of process ``pid`` per relayed event)."""
    before = cpu_seconds(pid)
    events, seconds = await stream_events(port, CLIENT_KEY, concurrency, tokens, rounds)
    return events / seconds, (cpu_seconds(pid) - before) * 1e6 / events


async def cpu_per_request(port: int, pid: int, count: int) -> tuple[list[float], float]:
    """(latencies in ms, CPU microseconds of process ``pid`` per small request)."""
    before = cpu_seconds(pid)
    out = await latencies(port, CLIENT_KEY, count)
    return out, (cpu_seconds(pid) - before) * 1e6 / count


def paired(gateway: list[float], nginx: list[float]) -> dict[str, float]:
    """Medians of each side and of the ratios of adjacent runs, with the ratios' spread.

    On a shared machine CPU time per unit drifts more between minutes than between two
    neighbouring runs, so the ratio is judged per pair (as the gateway/direct ratio is).
    """
    ratios = sorted(g / n for g, n in zip(gateway, nginx))
    return {
        "gateway": round(statistics.median(gateway), 1),
        "nginx": round(statistics.median(nginx), 1),
        "cpu_ratio": round(statistics.median(ratios), 2),
        "cpu_ratio_min": round(ratios[0], 2),
        "cpu_ratio_max": round(ratios[-1], 2),
    }


async def versus_nginx(
    args: argparse.Namespace,
    gateway: tuple[int, int],
    nginx: tuple[int, int],
    floor: tuple[int, int],
) -> dict[str, object]:
    """CPU per relayed SSE event and per small request: gateway against nginx, paired runs.

    Both also go through the floor relay: what a Python relay on the same event loop
    costs before doing any of the gateway's work.
    """
    result: dict[str, object] = {}
    sides = (("gateway", gateway), ("nginx", nginx), ("floor", floor))
    for concurrency in args.streams:
        rounds = max(4, 64 // concurrency)
        per_event: dict[str, list[float]] = {name: [] for name, _ in sides}
        rates: dict[str, list[float]] = {name: [] for name, _ in sides}
        await streams(floor[0], CLIENT_KEY, concurrency, 32, 1)
        for _ in range(args.repeat):
            for name, (port, pid) in sides:
                rate, cpu = await cpu_per_event(port, pid, concurrency, args.tokens, rounds)
                rates[name].append(rate)
                per_event[name].append(cpu)
        events = paired(per_event["gateway"], per_event["nginx"])
        floor_events = paired(per_event["floor"], per_event["nginx"])
        result[f"stream_{concurrency}"] = {
            "gateway_events_per_s": round(statistics.median(rates["gateway"]), 1),
            "nginx_events_per_s": round(statistics.median(rates["nginx"]), 1),
            "gateway_cpu_us_per_event": events["gateway"],
            "nginx_cpu_us_per_event": events["nginx"],
            "cpu_ratio": events["cpu_ratio"],
            "cpu_ratio_min": events["cpu_ratio_min"],
            "cpu_ratio_max": events["cpu_ratio_max"],
            "floor_cpu_us_per_event": floor_events["gateway"],
            "floor_cpu_ratio": floor_events["cpu_ratio"],
        }
    await latencies(nginx[0], CLIENT_KEY, 100)
    await latencies(floor[0], CLIENT_KEY, 100)
    times: dict[str, list[float]] = {name: [] for name, _ in sides}
    per_request: dict[str, list[float]] = {name: [] for name, _ in sides}
    for _ in range(args.repeat):
        for name, (port, pid) in sides:
            ms, cpu = await cpu_per_request(port, pid, args.requests)
            times[name].extend(ms)
            per_request[name].append(cpu)
    requests = paired(per_request["gateway"], per_request["nginx"])
    floor_cost = paired(per_request["floor"], per_request["nginx"])
    result["small_request"] = {
        "gateway_p50_ms": round(pct(times["gateway"], 0.5), 3),
        "gateway_p99_ms": round(pct(times["gateway"], 0.99), 3),
        "nginx_p50_ms": round(pct(times["nginx"], 0.5), 3),
        "nginx_p99_ms": round(pct(times["nginx"], 0.99), 3),
        "gateway_cpu_us_per_request": requests["gateway"],
        "nginx_cpu_us_per_request": requests["nginx"],
        "cpu_ratio": requests["cpu_ratio"],
        "cpu_ratio_min": requests["cpu_ratio_min"],
        "cpu_ratio_max": requests["cpu_ratio_max"],
        "floor_cpu_us_per_request": floor_cost["gateway"],
        "floor_cpu_ratio": floor_cost["cpu_ratio"],
    }
    return result


async def run(
    args: argparse.Namespace,
    backend_port: int,
    gateway_port: int,
    gateway_pid: int,
    idle: bool,
    nginx: tuple[int, int] | None,
    floor: tuple[int, int] | None,
) -> dict[str, object]:
    result: dict[str, object] = {}
    for concurrency in args.streams:
        # Enough rounds that each measurement lasts seconds, not milliseconds.
        rounds = max(4, 64 // concurrency)
        # Warm up both paths, then alternate direct/gateway runs and keep the best of each.
        await streams(backend_port, BACKEND_KEY, concurrency, 32, 1)
        await streams(gateway_port, CLIENT_KEY, concurrency, 32, 1)
        # Direct and gateway runs alternate, and the ratio is taken per adjacent pair:
        # on a shared 2-core machine throughput drifts more between minutes than
        # between two neighbouring runs.
        direct, through = [], []
        for _ in range(args.repeat):
            direct.append(
                await streams(backend_port, BACKEND_KEY, concurrency, args.tokens, rounds)
            )
            through.append(
                await streams(gateway_port, CLIENT_KEY, concurrency, args.tokens, rounds)
            )
        ratios = sorted(g / d for g, d in zip(through, direct))
        result[f"stream_{concurrency}"] = {
            "direct_events_per_s": round(statistics.median(direct), 1),
            "gateway_events_per_s": round(statistics.median(through), 1),
            "ratio": round(statistics.median(ratios), 3),
            "ratio_min": round(ratios[0], 3),
            "ratio_max": round(ratios[-1], 3),
        }
    await latencies(backend_port, BACKEND_KEY, 100)
    await latencies(gateway_port, CLIENT_KEY, 100)
    direct_ms = await latencies(backend_port, BACKEND_KEY, args.requests)
    gateway_ms = await latencies(gateway_port, CLIENT_KEY, args.requests)
    result["small_request"] = {
        "path": "POST /tokenize",
        "requests": args.requests,
        "direct_p50_ms": round(pct(direct_ms, 0.5), 3),
        "direct_p99_ms": round(pct(direct_ms, 0.99), 3),
        "gateway_p50_ms": round(pct(gateway_ms, 0.5), 3),
        "gateway_p99_ms": round(pct(gateway_ms, 0.99), 3),
        "added_p50_ms": round(pct(gateway_ms, 0.5) - pct(direct_ms, 0.5), 3),
        "added_p99_ms": round(pct(gateway_ms, 0.99) - pct(direct_ms, 0.99), 3),
    }
    if nginx is not None and floor is not None:
        result["vs_nginx"] = await versus_nginx(args, (gateway_port, gateway_pid), nginx, floor)
    if idle:
        result["idle_connections"] = await idle_connections(gateway_port, gateway_pid, args.idle)
    return result


def two_backends(
    args: argparse.Namespace, work: Path, model: Path, keys: Path, one_port: int
) -> dict[str, object]:
    """Streams through a gateway over two llama-servers against one, in paired runs.

    Each of the two has half the slots, so both set-ups offer the same number of slots;
    on a machine without GPUs the two llama-servers share its cores.
    """
    first = free_ports(2)
    half = max(1, args.parallel // 2)
    procs = [
        start_llama_server(
            model, work / f"llama-{i}.log", api_key=BACKEND_KEY, parallel=half, port=first + i
        )[0]
        for i in range(2)
    ]
    gateways = []
    try:
        for port, count in ((one_port, "1"), (first, "2")):
            gateways.append(
                start_gateway(
                    {
                        "PORT_BACKEND": str(port),
                        "BACKENDS": count,
                        "BACKEND_API_KEY": BACKEND_KEY,
                        "AUTH_KEYS_FILE": str(keys),
                        "LOG_LEVEL": "WARNING",
                        "MAX_QUEUE_SIZE": "4096",
                        "MAX_QUEUE_PER_KEY": "4096",
                    },
                    work / f"gateway-backends-{count}.log",
                )
            )
        concurrency = max(args.streams)
        rounds = max(4, 64 // concurrency)

        async def measure() -> tuple[list[float], list[float]]:
            one, two = [], []
            for _ in range(args.repeat):
                one.append(
                    await streams(gateways[0][1], CLIENT_KEY, concurrency, args.tokens, rounds)
                )
                two.append(
                    await streams(gateways[1][1], CLIENT_KEY, concurrency, args.tokens, rounds)
                )
            return one, two

        one, two = asyncio.run(measure())
    finally:
        for proc, _ in gateways:
            proc.stop()
        for proc in procs:
            proc.stop()
    ratios = sorted(t / o for t, o in zip(two, one))
    return {
        "streams": concurrency,
        "slots_each_setup": 2 * half,
        "one_backend_events_per_s": round(statistics.median(one), 1),
        "two_backends_events_per_s": round(statistics.median(two), 1),
        "ratio": round(statistics.median(ratios), 3),
        "note": "each llama-server here runs one thread: two use two cores; on a GPU box, two GPUs",
    }


def loop_targets(figures: dict[str, object]) -> dict[str, object]:
    """The targets, judged on one event loop's figures."""
    stream16 = figures.get("stream_16", {})
    small = figures["small_request"]
    targets: dict[str, object] = {
        "stream_16_ratio_cpu_min": 0.90,
        "stream_16_ratio_met": isinstance(stream16, dict) and stream16.get("ratio", 0) >= 0.90,
        "added_p50_ms_max": 0.5,
        "added_p50_met": small["added_p50_ms"] <= 0.5,  # type: ignore[index]
        "added_p99_ms_max": 2.0,
        "added_p99_met": small["added_p99_ms"] <= 2.0,  # type: ignore[index]
    }
    versus = figures.get("vs_nginx")
    if isinstance(versus, dict):
        event_ratio = versus.get("stream_16", {}).get("cpu_ratio")
        request_ratio = versus["small_request"]["cpu_ratio"]
        targets["cpu_per_event_vs_nginx_max"] = 1.5
        targets["cpu_per_event_met"] = event_ratio is not None and event_ratio <= 1.5
        targets["cpu_per_request_vs_nginx_max"] = 2.0
        targets["cpu_per_request_met"] = request_ratio <= 2.0
    else:
        targets["vs_nginx"] = "not measured: nginx is not installed (apt-get install nginx-light)"
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--streams", default="1,4,16", type=lambda s: [int(x) for x in s.split(",")]
    )
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument(
        "--repeat", type=int, default=5, help="paired runs (gateway/direct, gateway/nginx)"
    )
    parser.add_argument("--parallel", type=int, default=4, help="llama-server slots (-np)")
    parser.add_argument(
        "--loops",
        # The default loop first (EVENT_LOOP=auto takes uvloop where installed, as the
        # image does): the top-level figures and targets are that loop's.
        default="uvloop,asyncio" if uvloop_available() else "asyncio",
        type=lambda s: s.split(","),
        help="gateway event loops to measure (EVENT_LOOP); the first is reported at the top",
    )
    args = parser.parse_args()
    raise_fd_limit()

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        model = work / "tiny.gguf"
        write_model(model)
        keys = work / "api_keys.txt"
        keys.write_text(f"bench:{CLIENT_KEY} rpm=100000000\n")
        backend, backend_port = start_llama_server(
            model, work / "llama-server.log", api_key=BACKEND_KEY, parallel=args.parallel
        )
        nginx = start_nginx(work, backend_port)
        try:
            figures: dict[str, object] = {}
            for loop in args.loops:
                gateway, gateway_port = start_gateway(
                    {
                        "PORT_BACKEND": str(backend_port),
                        "BACKEND_API_KEY": BACKEND_KEY,
                        "AUTH_KEYS_FILE": str(keys),
                        "LOG_LEVEL": "WARNING",
                        "EVENT_LOOP": loop,
                        # One key sends every stream: it may hold the whole queue here.
                        "MAX_QUEUE_SIZE": "4096",
                        "MAX_QUEUE_PER_KEY": "4096",
                    },
                    work / f"gateway-{loop}.log",
                )
                floor = start_floor(work, backend_port, loop) if nginx else None
                try:
                    first = not figures
                    measured = asyncio.run(
                        run(
                            args,
                            backend_port,
                            gateway_port,
                            gateway.pid,
                            idle=first,
                            nginx=(nginx[1], nginx[0].pid) if nginx else None,
                            floor=(floor[1], floor[0].pid) if floor else None,
                        )
                    )
                finally:
                    gateway.stop()
                    if floor is not None:
                        floor[0].stop()
                if first:
                    figures = measured
                    figures["event_loop"] = loop
                else:
                    figures[loop] = measured
            if nginx is not None:
                nginx[0].stop()
                nginx = None
            figures["two_backends"] = two_backends(args, work, model, keys, backend_port)
        finally:
            if nginx is not None:
                nginx[0].stop()
            backend.stop()

    idle = figures["idle_connections"]  # measured on the first loop
    targets = loop_targets(figures)
    targets["rss_bytes_per_idle_connection_max"] = 16384
    targets["rss_met"] = idle["rss_bytes_per_connection"] <= 16384  # type: ignore[index]
    for loop in args.loops[1:]:
        if isinstance(figures.get(loop), dict):
            targets[loop] = loop_targets(figures[loop])  # type: ignore[arg-type]
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "llama_server_slots": args.parallel,
            "tokens_per_stream": args.tokens,
        },
        **figures,
        "targets": targets,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
