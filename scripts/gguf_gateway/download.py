"""One Hub file onto the volume: parallel Range parts, resumable per part, hashed on the fly.

The file is cut into fixed-size parts. A small pool of connections (DOWNLOAD_CONNECTIONS
threads, each holding one keep-alive ``http.client`` connection) takes runs of parts (long
ones first, single parts at the end) and writes them in place, with ``os.pwrite``, into a
pre-allocated ``<blob>.incomplete``. A
recorder thread makes finished parts durable (the data fdatasync'd, then a line fsync'd into
the sidecar ``<blob>.incomplete.parts``), so a kill costs at most the parts in flight; a
hasher thread feeds SHA-256 with the contiguous prefix as parts complete out of order, so the
digest is ready a moment after the last byte. The calling thread watches: a request that
sends nothing for a while is cut and queued again from where it stopped; once nothing is
left to hand out, a connection far slower than the others gives the parts after the one it
is writing to an idle connection, and on its last part a second copy races it (the first to
finish counts). A file under 8 parts (32 MiB), or a server that ignores Range, takes one
stream. Nothing past the listed size is ever written.

``HF_TOKEN`` goes only to the endpoint's own origin (scheme, host and port): not to the CDN a
resolve URL redirects to, and never over a redirect from https to http.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import hashlib
import http.client
import json
import os
import socket
import ssl
import statistics
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1024 * 1024
# Parts of 4 MiB: the unit of resuming, hashing and handing work out; a kill loses at most
# one part per connection (32 MiB at 8). A file under 8 parts (32 MiB) takes one stream.
PART_BYTES = 4 * MiB
SINGLE_STREAM_PARTS = 8
DEFAULT_CONNECTIONS = 8
MAX_CONNECTIONS = 64
# A part that sends nothing for this long is cut and asked for again.
STALL_SECONDS = 20.0
# The transfer fails when no byte at all arrived for this many stall periods (its deadline:
# a large model on a slow link legitimately takes long, a dead one makes no progress).
GIVE_UP_FACTOR = 6
# One request carries at most this many parts (see Transfer._span).
MAX_SPAN_PARTS = 64
# A part in flight at under 1/SLOW_FACTOR of the others' median rate is fetched again.
SLOW_FACTOR = 4.0
PROGRESS_SECONDS = 5.0
READ_BYTES = 256 * 1024
HASH_READ = 4 * MiB
MAX_REDIRECTS = 10
FAILURES = 8  # consecutive failed requests (no byte between them) before giving up


class TransferFailed(Exception):
    """The bytes could not be had now (network, cuts, stalls); the parts done are kept."""


class Refused(Exception):
    """The server refused the file (401, 403, 404...): retrying will not help."""

    def __init__(self, status: int) -> None:
        super().__init__(f"answered {status}")
        self.status = status


class SizeMismatch(Exception):
    """The server sends another length than the listing says: the listing wins, stop."""


class DigestMismatch(Exception):
    """Twice the bytes did not match the listed SHA-256."""


class DiskFull(Exception):
    """No room for the file where it goes; the parts already fetched are kept."""


class BadSetting(ValueError):
    """A download setting that cannot work; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    connections: int = DEFAULT_CONNECTIONS
    part_bytes: int = PART_BYTES
    stall_seconds: float = STALL_SECONDS
    give_up_seconds: float = GIVE_UP_FACTOR * STALL_SECONDS

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        raw = env.get("DOWNLOAD_CONNECTIONS", "").strip()
        connections = DEFAULT_CONNECTIONS
        if raw:
            if not raw.isdigit() or not 1 <= int(raw) <= MAX_CONNECTIONS:
                raise BadSetting(
                    f"DOWNLOAD_CONNECTIONS={raw!r}: expected a whole number from 1 to "
                    f"{MAX_CONNECTIONS}"
                )
            connections = int(raw)
        # Internal knobs, so tests can exercise parts and stalls with small files quickly.
        part = env.get("GATEWAY_DOWNLOAD_PART_BYTES", "").strip()
        stall = env.get("GATEWAY_DOWNLOAD_STALL_SECONDS", "").strip()
        try:
            part_bytes = int(part) if part else PART_BYTES
            stall_seconds = float(stall) if stall else STALL_SECONDS
        except ValueError:
            raise BadSetting(
                "GATEWAY_DOWNLOAD_PART_BYTES / GATEWAY_DOWNLOAD_STALL_SECONDS: expected numbers"
            ) from None
        if part_bytes < 4096 or stall_seconds <= 0:
            raise BadSetting("GATEWAY_DOWNLOAD_PART_BYTES must be >= 4096, STALL_SECONDS > 0")
        return cls(connections, part_bytes, stall_seconds, GIVE_UP_FACTOR * stall_seconds)


def origin(url: str) -> tuple[str, str, int]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


def carries_token(endpoint: str, url: str) -> bool:
    """Whether a request to ``url`` may carry the Hub token: the endpoint's own origin only.

    Comparing scheme and port too (not just the host) is what keeps the token off a redirect
    from https to plain http on the same host, where anyone on the path could read it.
    """
    return origin(url) == origin(endpoint)


@dataclass(frozen=True)
class Source:
    """Where a file's bytes come from, and who may see the token."""

    url: str  # the resolve URL on the endpoint
    endpoint: str
    token: str = ""

    def headers(self, url: str) -> dict[str, str]:
        if self.token and carries_token(self.endpoint, url):
            return {"Authorization": f"Bearer {self.token}"}
        return {}


@dataclass(frozen=True)
class Target:
    """The file to produce, and what the listing promises about it."""

    path: Path
    size: int  # 0: not listed
    sha256: str | None  # None: the listing gives no digest
    commit: str

    @property
    def partial(self) -> Path:
        return self.path.with_name(self.path.name + ".incomplete")

    @property
    def sidecar(self) -> Path:
        return self.path.with_name(self.path.name + ".incomplete.parts")


@dataclass
class Report:
    """What a transfer did (for the log, the bench and tests)."""

    bytes_fetched: int = 0
    bytes_resumed: int = 0
    seconds: float = 0.0
    connections: int = 0
    requests: int = 0
    reissued: int = 0
    attempts: int = 0


def _disk_full(target: Target, need: int) -> DiskFull:
    try:
        stat = os.statvfs(target.path.parent)
        free = f"{stat.f_bavail * stat.f_frsize / MiB:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFull(
        f"no room for {target.path.name} ({need / MiB:.1f} MiB) in {target.path.parent} "
        f"({free}); the parts already fetched are kept for the next start"
    )


# ---------------------------------------------------------------- the partial file and sidecar


class Partial:
    """``<blob>.incomplete`` at its full size, and the sidecar of parts known to be in it.

    The sidecar's first line says which file the parts belong to (size, part size, commit,
    digest); any difference starts over. Each later line is a part index, written only after
    the data it names was fdatasync'd, then fsync'd itself.
    """

    def __init__(self, target: Target, part_bytes: int) -> None:
        self.target = target
        self.part_bytes = part_bytes
        self.count = -(-target.size // part_bytes)
        self.header = {
            "size": target.size,
            "part_bytes": part_bytes,
            "commit": target.commit,
            "sha256": target.sha256,
        }
        self.done: set[int] = set()
        self.fd = -1
        self.side: int = -1
        self.resumed = False

    def bounds(self, index: int) -> tuple[int, int]:
        start = index * self.part_bytes
        return start, min(start + self.part_bytes, self.target.size)

    def open(self) -> None:
        self.done = self._recorded()
        self.resumed = bool(self.done)
        if not self.done:
            self.discard()
        try:
            self.fd = os.open(self.target.partial, os.O_RDWR | os.O_CREAT, 0o644)
            if not self.resumed:
                self._allocate()
            self.side = os.open(self.target.sidecar, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            if not self.resumed:
                os.write(self.side, (json.dumps(self.header) + "\n").encode())
                os.fsync(self.side)
                _fsync_dir(self.target.path.parent)  # the new names survive a power cut too
        except OSError as exc:
            self.close()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _disk_full(self.target, self.target.size) from None
            raise

    def _allocate(self) -> None:
        try:
            # Reserve the blocks now: a full disk shows at once, not at 97 %.
            os.posix_fallocate(self.fd, 0, self.target.size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                os.ftruncate(self.fd, 0)  # give back what was reserved
                raise
            os.ftruncate(self.fd, self.target.size)  # a file system without fallocate: sparse

    def _recorded(self) -> set[int]:
        """The parts a previous run finished, if its partial is for this very file."""
        try:
            text = self.target.sidecar.read_text()
            size = self.target.partial.stat().st_size
        except (OSError, UnicodeDecodeError):
            return set()
        # Only whole lines count: a kill or a full disk while appending can leave "7" of
        # "78\n", which is not part 7. The torn tail is cut off before anything is appended.
        whole = text[: text.rfind("\n") + 1]
        lines = whole.splitlines()
        try:
            if not lines or json.loads(lines[0]) != self.header or size != self.target.size:
                return set()
        except ValueError:
            return set()
        if len(whole) != len(text):
            try:
                os.truncate(self.target.sidecar, len(whole.encode()))
            except OSError:
                return set()
        return {int(n) for n in lines[1:] if n.isdigit() and int(n) < self.count}

    def record(self, indices: list[int]) -> None:
        os.fdatasync(self.fd)
        line = "".join(f"{i}\n" for i in indices).encode()
        if os.write(self.side, line) != len(line):  # a full disk can take part of it
            raise OSError(errno.ENOSPC, "the sidecar could not be written whole")
        os.fsync(self.side)

    def close(self) -> None:
        for fd in (self.fd, self.side):
            if fd >= 0:
                os.close(fd)
        self.fd = self.side = -1

    def discard(self) -> None:
        for path in (self.target.partial, self.target.sidecar):
            path.unlink(missing_ok=True)

    def finish(self) -> None:
        self.close()
        os.replace(self.target.partial, self.target.path)
        self.target.sidecar.unlink(missing_ok=True)
        _fsync_dir(self.target.path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- jobs and the transfer


@dataclass(eq=False)
class Job:
    """A byte range to fetch with one request; it completes every part it writes through.

    A job starting inside a part is only made after an earlier job of this run wrote that
    part from its start up to here (a continuation after a cut, or a second copy of a slow
    part), so writing through the part's end completes it.
    """

    start: int
    end: int  # exclusive
    pos: int = 0
    asked: int = 0  # the end the request asked for (a takeover may move ``end`` back)
    began: float = 0.0
    last_byte: float = 0.0
    copy: bool = False  # a second copy of a slow part
    copied: bool = False  # a second copy of this one is queued or running
    cut: bool = False
    conn: http.client.HTTPConnection | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.pos = self.start


class _RangesIgnored(Exception):
    """The server answered a Range with the whole file."""


class Transfer:
    def __init__(
        self,
        source: Source,
        target: Target,
        settings: Settings,
        log: Callable[[str], None],
        publish: Callable[[dict[str, object]], None] | None = None,
        name: str = "",
    ) -> None:
        self.source = source
        self.target = target
        self.settings = settings
        self.log = log
        self.publish = publish
        self.name = name or target.path.name
        self.location: str | None = None  # the resolve URL after its redirects
        self.tls: ssl.SSLContext | None = None
        self.lock = threading.Condition()
        # Jobs to run first (one-stream runs, continuations after a cut, second copies),
        # then parts not handed out yet, taken a span at a time.
        self.queue: collections.deque[Job] = collections.deque()
        self.pending: collections.deque[int] = collections.deque()
        self.connections = 1
        self.running: list[Job] = []
        self.rates: list[float] = []  # bytes/s of finished jobs
        self.error: BaseException | None = None
        self.stopping = False
        self.last_byte = time.monotonic()
        self.report = Report()
        self.ranged = True
        self.part: Partial | None = None
        self.finished_parts: list[int] = []  # done, not yet recorded
        self.digest: str | None = None

    # ------------------------------------------------------------ the whole file

    def probe_size(self) -> int:
        """The size of a file the listing does not give, from the server's answer."""
        conn, response, url = self._open(Job(0, 1), None)  # Range: bytes=0-0
        try:
            if response.status not in (200, 206):
                if response.status in (408, 429) or response.status >= 500:
                    raise TransferFailed(f"answered {response.status}")
                raise Refused(response.status)
            total = (response.getheader("Content-Range") or "").rpartition("/")[2]
            size = int(total) if response.status == 206 and total.isdigit() else response.length
        finally:
            conn.close()
        if not size:
            raise SizeMismatch("the server gives no length for it")
        return size

    def run(self) -> Report:
        started = time.monotonic()
        part = Partial(self.target, self.settings.part_bytes)
        self.part = part
        part.open()
        try:
            self.report.bytes_resumed = sum(
                part.bounds(i)[1] - part.bounds(i)[0] for i in part.done
            )
            if part.resumed:
                self.log(
                    f"resuming {self.name}: {len(part.done)} of {part.count} parts "
                    f"({self.report.bytes_resumed / 1e6:.1f} MB) already here"
                )
            single = self.target.size < SINGLE_STREAM_PARTS * self.settings.part_bytes
            now = time.monotonic()
            self._progress(now, collections.deque([(now, 0)]), 0, quiet=True)
            while True:
                try:
                    self._fetch_missing(
                        1 if single or not self.ranged else self.settings.connections
                    )
                    break
                except _RangesIgnored:
                    self.log(f"{self.name}: the server ignores Range: one stream")
                    self.ranged = False
            part.finish()
        except BaseException:
            part.close()
            raise
        self.report.seconds = seconds = time.monotonic() - started
        fetched = self.report.bytes_fetched
        self._progress(time.monotonic(), collections.deque([(started, 0), (0.0, fetched)]), 0)
        self.log(
            f"downloaded {self.name}: {fetched / 1e6:.1f} MB in {seconds:.1f}s "
            f"({fetched / 1e6 / max(seconds, 1e-6):.1f} MB/s, up to {self.report.connections} "
            f"connection(s), {self.report.reissued} part(s) re-issued), SHA-256 "
            + ("checked" if self.target.sha256 else "not listed")
        )
        return self.report

    def _fetch_missing(self, connections: int) -> None:
        part = self.part
        assert part is not None
        missing = [i for i in range(part.count) if i not in part.done]
        self.queue.clear()
        self.pending.clear()
        self.connections = connections
        if connections == 1 or not self.ranged:
            # One stream: one request for each run of missing parts (all of them, without
            # Range support), each part recorded as the stream passes its end.
            runs: list[list[int]] = []
            for i in missing:
                if runs and (runs[-1][-1] == i - 1 or not self.ranged):
                    runs[-1].append(i)
                else:
                    runs.append([i])
            for run in runs:
                start = 0 if not self.ranged else part.bounds(run[0])[0]
                self.queue.append(Job(start, part.bounds(run[-1])[1]))
        else:
            self.pending.extend(missing)
        connections = max(1, min(connections, len(self.queue) + len(self.pending)))
        self.report.connections = max(self.report.connections, connections)
        self.stopping = False
        self.error = None
        # No listed digest (a file outside LFS): nothing to check, so nothing to hash.
        helpers = [threading.Thread(target=self._record, name="record", daemon=True)]
        if self.target.sha256 is not None:
            helpers.append(threading.Thread(target=self._hash, name="sha256", daemon=True))
        workers = [
            threading.Thread(target=self._work, name=f"part-{n}", daemon=True)
            for n in range(connections)
        ]
        for thread in (*helpers, *workers):
            thread.start()
        try:
            self._watch(workers)
        finally:
            with self.lock:
                self.stopping = True
                for job in self.running:
                    self._cut(job)
                self.lock.notify_all()
            for thread in (*workers, *helpers):
                thread.join()
        if self.error is not None:
            raise self.error
        if self.target.sha256 is not None and self.digest != self.target.sha256:
            raise DigestMismatch(self.digest)

    def _complete(self) -> bool:
        part = self.part
        assert part is not None
        return len(part.done) == part.count

    # ------------------------------------------------------------ the calling thread

    def _watch(self, workers: list[threading.Thread]) -> None:
        stall = self.settings.stall_seconds
        last_line = time.monotonic()
        window: collections.deque[tuple[float, int]] = collections.deque([(last_line, 0)])
        while True:
            with self.lock:
                self.lock.wait(0.25)
                now = time.monotonic()
                if self.error is not None or (self._complete() and not self.finished_parts):
                    return
                if not any(w.is_alive() for w in workers):
                    if self.error is None and not self._complete():
                        self.error = TransferFailed("every connection ended")
                    return
                if now - self.last_byte > self.settings.give_up_seconds:
                    self.error = TransferFailed(
                        f"no data for {self.settings.give_up_seconds:.0f}s on any connection"
                    )
                    return
                for job in self.running:
                    if not job.cut and now - max(job.last_byte, job.began) > stall:
                        self.log(
                            f"{self.name}: bytes {job.pos}-{job.end - 1} stalled "
                            f"{stall:.0f}s: asking again"
                        )
                        self.report.reissued += 1
                        self._cut(job)
                self._copy_slow(now)
                fetched = self.report.bytes_fetched
                in_use = len(self.running)
            window.append((now, fetched))
            while len(window) > 2 and now - window[0][0] > 10:
                window.popleft()
            if now - last_line >= PROGRESS_SECONDS:
                last_line = now
                self._progress(now, window, in_use)

    def _progress(
        self,
        now: float,
        window: collections.deque[tuple[float, int]],
        in_use: int,
        quiet: bool = False,
    ) -> None:
        part = self.part
        assert part is not None
        then, before = window[0]
        rate = (window[-1][1] - before) / max(now - then, 1e-6) / 1e6
        done = self.report.bytes_resumed + self.report.bytes_fetched
        done = min(done, self.target.size)
        share = 100 * done / self.target.size
        if not quiet:
            self.log(
                f"downloading {self.name}: {share:.1f}% ({done / 1e6:.1f} of "
                f"{self.target.size / 1e6:.1f} MB) at {rate:.1f} MB/s over {in_use} connection(s)"
            )
        if self.publish is not None:
            self.publish(
                {
                    "file": self.name,
                    "bytes_done": done,
                    "bytes_total": self.target.size,
                    "percent": round(share, 1),
                    "mb_per_s": round(rate, 1),
                    "connections": in_use,
                }
            )

    def _copy_slow(self, now: float) -> None:
        """Nothing left to hand out and a connection idle: help a job far behind the rest.

        Its whole parts after the one it is writing go to the idle connection (it stops at
        that part's end); with none left, its remainder is fetched a second time.
        """
        if self.queue or self.pending or not self.ranged:
            return
        if len(self.running) >= self.report.connections:
            return
        rates = list(self.rates[-32:])
        for job in self.running:
            if now - job.began > 1.0:
                rates.append((job.pos - job.start) / (now - job.began))
        if len(rates) < 3:
            return
        typical = statistics.median(rates)
        for job in self.running:
            age = now - job.began
            rate = (job.pos - job.start) / age if age > 0 else 0.0
            if job.copied or job.copy or job.cut or age < 1.0 or rate * SLOW_FACTOR >= typical:
                continue
            self.report.reissued += 1
            size = self.settings.part_bytes
            after = (job.pos // size + 1) * size  # the end of the part it is writing
            if after < job.end:
                self.queue.append(Job(after, job.end))
                job.end = after
            else:
                job.copied = True
                self.queue.append(Job(job.pos, job.end, copy=True))
            self.lock.notify_all()
            return

    # ------------------------------------------------------------ the connections

    def _cut(self, job: Job) -> None:
        """Make a job's blocked read return at once (called with the lock held)."""
        job.cut = True
        conn = job.conn
        sock = getattr(conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _span(self) -> Job:
        """The next parts not handed out, as one request (called with the lock held).

        Guided: a share of what is left (half of it spread over the connections), so the
        first requests are long (few waits for a first byte) and the last ones a part each
        (no connection left with a long tail while the others idle).
        """
        part = self.part
        assert part is not None
        count = max(1, min(MAX_SPAN_PARTS, len(self.pending) // (2 * self.connections)))
        first = last = self.pending.popleft()
        while count > 1 and self.pending and self.pending[0] == last + 1:
            last = self.pending.popleft()
            count -= 1
        return Job(part.bounds(first)[0], part.bounds(last)[1])

    def _take(self) -> Job | None:
        with self.lock:
            while not (self.queue or self.pending) and not self.stopping and self.error is None:
                if self._complete() or not self.running:
                    return None
                self.lock.wait(0.5)
            if self.stopping or self.error is not None:
                return None
            if not (self.queue or self.pending):
                return None
            job = self.queue.popleft() if self.queue else self._span()
            job.began = time.monotonic()
            job.cut = False
            self.running.append(job)
            return job

    def _work(self) -> None:
        conn: http.client.HTTPConnection | None = None
        failures = 0
        try:
            while True:
                job = self._take()
                if job is None:
                    return
                try:
                    conn = self._fetch(job, conn)
                    failures = 0
                except (Refused, SizeMismatch, DiskFull, _RangesIgnored) as exc:
                    self._fail(exc)
                    return
                except (OSError, http.client.HTTPException, TransferFailed) as exc:
                    if conn is not None:
                        conn.close()
                        conn = None
                    if self._give_back(job):
                        failures = 0 if job.pos > job.start else failures + 1
                        if failures >= FAILURES:
                            self._fail(
                                TransferFailed(f"{failures} requests in a row failed: {exc}")
                            )
                            return
                        time.sleep(min(0.2 * 2**failures, 5.0))
                finally:
                    with self.lock:
                        if job in self.running:
                            self.running.remove(job)
                        self.lock.notify_all()
        except BaseException as exc:  # a bug must not leave the watcher waiting forever
            self._fail(exc)
        finally:
            if conn is not None:
                conn.close()

    def _fail(self, exc: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = exc
            self.lock.notify_all()

    def _give_back(self, job: Job) -> bool:
        """Queue what a failed or cut job had left, unless it is done or stopping."""
        with self.lock:
            if self.stopping or self.error is not None:
                return False
            if job.copy or self._covered(job):
                return True  # its first copy goes on
            # Without Range support a stream can only start again from the first byte.
            self.queue.appendleft(Job(job.pos if self.ranged else 0, job.end))
            self.lock.notify_all()
            return True

    def _covered(self, job: Job) -> bool:
        part = self.part
        assert part is not None
        first = job.pos // part.part_bytes
        last = (job.end - 1) // part.part_bytes
        return all(i in part.done for i in range(first, last + 1))

    def _connect(self, url: str) -> http.client.HTTPConnection:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        timeout = self.settings.stall_seconds
        if parts.scheme == "https":
            if self.tls is None:  # loading the CA store once, not once per connection
                self.tls = ssl.create_default_context()
            return http.client.HTTPSConnection(host, parts.port, timeout=timeout, context=self.tls)
        return http.client.HTTPConnection(host, parts.port, timeout=timeout)

    def _open(
        self, job: Job, conn: http.client.HTTPConnection | None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, str]:
        """A response for the job's range, following the resolve URL's redirects."""
        url = self.location or self.source.url
        for _ in range(MAX_REDIRECTS):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https"):
                raise TransferFailed(f"redirected to a {parts.scheme or 'relative'} URL")
            if conn is None or origin(url) != getattr(conn, "_gguf_origin", None):
                if conn is not None:
                    conn.close()
                conn = self._connect(url)
                setattr(conn, "_gguf_origin", origin(url))
            headers = {"Accept-Encoding": "identity", **self.source.headers(url)}
            job.asked = job.end
            if self.ranged:
                headers["Range"] = f"bytes={job.start}-{job.asked - 1}"
            path = parts.path + ("?" + parts.query if parts.query else "")
            with self.lock:
                job.conn = conn
            conn.request("GET", path or "/", headers=headers)
            response = conn.getresponse()
            self.report.requests += 1
            if response.status in (301, 302, 303, 307, 308):
                response.read(64 * 1024)
                response.close()
                conn.close()
                location = response.getheader("Location")
                if not location:
                    raise TransferFailed(f"redirect {response.status} without a Location")
                url = urllib.parse.urljoin(url, location)
                continue
            return conn, response, url
        raise TransferFailed(f"more than {MAX_REDIRECTS} redirects")

    def _fetch(
        self, job: Job, conn: http.client.HTTPConnection | None
    ) -> http.client.HTTPConnection | None:
        conn, response, url = self._open(job, conn)
        if response.status in (408, 429) or response.status >= 500:
            raise TransferFailed(f"answered {response.status}")
        if response.status in (401, 403, 404, 410) and url != self.source.url:
            # A redirect's signed URL may expire during a long download: resolve it again
            # (a refusal that persists still ends the attempt after a few tries).
            self.location = None
            raise TransferFailed(f"the redirected URL answered {response.status}")
        if response.status == 416:
            raise SizeMismatch(
                f"answered 416 to bytes {job.start}-{job.end - 1} of a file listed at "
                f"{self.target.size} bytes"
            )
        if response.status not in (200, 206):
            raise Refused(response.status)
        self.location = url
        if self.ranged and response.status == 200:
            response.close()
            conn.close()
            raise _RangesIgnored()
        self._check_length(job, response)
        self._receive(job, response)
        if response.isclosed() or job.pos == job.end and response.length == 0:
            # read1 leaves a fully read response open; the connection takes no new request
            # until it is closed.
            response.close()
            return conn if not response.will_close else None
        # We stopped early (a copy overtaken, or cut): the rest of the body is unwanted.
        conn.close()
        return None

    def _check_length(self, job: Job, response: http.client.HTTPResponse) -> None:
        size = self.target.size
        if response.status == 206:
            unit, _, spec = (response.getheader("Content-Range") or "").partition(" ")
            span, _, total = spec.partition("/")
            first, _, last = span.partition("-")
            if unit != "bytes" or not (first.isdigit() and last.isdigit()):
                raise TransferFailed(f"a 206 with Content-Range {spec!r}")
            if total != str(size):
                raise SizeMismatch(f"the server has {total} bytes for a file listed at {size}")
            if int(first) != job.start or int(last) != job.asked - 1:
                raise TransferFailed(f"asked for bytes {job.start}-{job.asked - 1}, got {span}")
        elif response.length is not None and response.length != size:
            raise SizeMismatch(
                f"the server sends {response.length} bytes for a file listed at {size}"
            )

    def _receive(self, job: Job, response: http.client.HTTPResponse) -> None:
        part = self.part
        assert part is not None
        fd = part.fd
        end = job.end
        while job.pos < end:
            if job.cut or self.stopping:
                raise TransferFailed("cut")
            # Never past the range asked for, so never past the listed size. read1, not
            # readinto: what has arrived is written at once, not held until a buffer fills
            # (a part cut or stalled half-way keeps what it got).
            block = response.read1(min(READ_BYTES, end - job.pos))
            got = len(block)
            if not got:
                raise TransferFailed(f"cut at byte {job.pos} of {job.start}-{job.end - 1}")
            try:
                os.pwrite(fd, block, job.pos)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise _disk_full(self.target, self.target.size) from None
                raise
            now = time.monotonic()
            before = job.pos
            with self.lock:
                job.pos += got
                end = job.end  # another connection may have taken over the rest
                job.last_byte = self.last_byte = now
                self.report.bytes_fetched += got
                first = before // part.part_bytes
                # Parts this block carried us through the end of.
                through = [
                    i
                    for i in range(first, (job.pos - 1) // part.part_bytes + 1)
                    if part.bounds(i)[1] <= job.pos and i not in part.done
                ]
                if through:
                    for i in through:
                        part.done.add(i)
                    self.finished_parts.extend(through)
                    self.lock.notify_all()
                    if job.pos < job.end and self._covered(job):
                        return  # a copy of this job got there first
            if job.copy or job.copied:
                with self.lock:
                    if job.pos < job.end and self._covered(job):
                        return
        age = time.monotonic() - job.began
        if age > 0:
            with self.lock:
                self.rates.append((job.pos - job.start) / age)

    # ------------------------------------------------------------ durability and digest

    def _record(self) -> None:
        part = self.part
        assert part is not None
        try:
            while True:
                with self.lock:
                    while not self.finished_parts and not self._recording_over():
                        self.lock.wait(0.5)
                    batch, self.finished_parts = self.finished_parts, []
                    if not batch and self._recording_over():
                        return
                try:
                    part.record(batch)
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise _disk_full(self.target, self.target.size) from None
                    raise
                with self.lock:
                    self.lock.notify_all()
        except BaseException as exc:
            self._fail(exc)

    def _recording_over(self) -> bool:
        return self.stopping or self.error is not None or self._complete()

    def _hash(self) -> None:
        """SHA-256 of the contiguous prefix of finished parts, read back as it grows."""
        part = self.part
        assert part is not None
        digest = hashlib.sha256()
        index = 0
        try:
            while index < part.count:
                with self.lock:
                    while index not in part.done and not self.stopping and self.error is None:
                        self.lock.wait(0.5)
                    if index not in part.done:
                        return
                start, end = part.bounds(index)
                offset = start
                while offset < end and self.error is None:
                    block = os.pread(part.fd, min(HASH_READ, end - offset), offset)
                    if not block:
                        raise TransferFailed(f"{self.name} is shorter than its parts say")
                    digest.update(block)
                    offset += len(block)
                index += 1
            self.digest = digest.hexdigest()
        except BaseException as exc:
            self._fail(exc)
        finally:
            with self.lock:
                self.lock.notify_all()


def download(
    source: Source,
    target: Target,
    settings: Settings,
    log: Callable[[str], None],
    publish: Callable[[dict[str, object]], None] | None = None,
    name: str = "",
) -> Report:
    """Fetch ``target`` (resuming its partial); a digest mismatch is fetched again once."""
    if target.size <= 0:
        try:
            size = Transfer(source, target, settings, log, publish, name).probe_size()
        except (OSError, http.client.HTTPException) as exc:
            raise TransferFailed(str(exc)) from None
        target = dataclasses.replace(target, size=size)
    for attempt in (1, 2):
        transfer = Transfer(source, target, settings, log, publish, name)
        try:
            report = transfer.run()
        except DigestMismatch:
            Partial(target, settings.part_bytes).discard()
            if attempt == 2:
                raise
            log(
                f"{name or target.path.name} does not match the SHA-256 the Hub lists: fetching it again"
            )
            continue
        report.attempts = attempt
        return report
    raise AssertionError("unreachable")
