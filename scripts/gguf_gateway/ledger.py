"""The usage ledger: one JSON line per finished request, kept on the data volume.

Operators on scale-to-zero platforms have no database; the ledger survives restarts on
the volume and is what `scripts/usage_report.py` sums per key and day. It is billing
history, so rotation archives and never deletes: at MAX_BYTES usage.jsonl becomes
usage.jsonl.N, N one more than the newest archive (pruning old archives is the
operator's decision, not traffic's). Every field is bounded by the caller (a string a
client chose is cut to FIELD_LIMIT characters). One small buffered write per
request, batched: lines are written at most once a second (and at shutdown), so the
request path pays no system call for them. Key ids only, never secrets.

Each line of a request whose key counts tokens also holds ``charged_tokens``: what the
request was charged against the key's limits (its reported usage, or the reserved bound
when no usage came, as for a client that left mid-stream). At start the day's and the
month's charges per key are summed from the ledger and this month's archives
(:func:`charges`), so daily and monthly quotas survive a restart.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("gateway")

LEDGER_NAME = "usage.jsonl"  # in LOG_DIR
MAX_BYTES = 64 * 1024 * 1024
# One encoder for every line: json.dumps with options builds a new encoder per call.
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
FLUSH_SECONDS = 1.0
FIELD_LIMIT = 128


def bounded(value: str | None) -> str | None:
    """A client-chosen string as the ledger and logs keep it."""
    return value if value is None or len(value) <= FIELD_LIMIT else value[:FIELD_LIMIT]


def archive_number(path: Path) -> int:
    suffix = path.name.rpartition(".")[2]
    return int(suffix) if suffix.isdigit() else 0


def archives(path: Path) -> list[Path]:
    """The archived files of ledger ``path``, oldest first."""
    found = [p for p in path.parent.glob(path.name + ".*") if archive_number(p)]
    return sorted(found, key=archive_number)


def charged(entry: dict[str, Any]) -> int:
    """Tokens one ledger line charged its key (older lines: the usage they report)."""
    value = entry.get("charged_tokens")
    if isinstance(value, int):
        return value
    total = 0
    for name in ("prompt_tokens", "completion_tokens"):
        count = entry.get(name)
        total += count if isinstance(count, int) else 0
    return total


# The ledger's own lines, as this module writes them (time, request id, key id first; ids
# never hold quotes), with what they charged: read without a JSON parse, which would cost
# seconds on a 64 MiB file. Other lines (older ones, with no charged_tokens) are parsed.
_CHARGED = re.compile(
    r'\{"ts":"(\d{4}-\d\d-\d\d)T[^"]*","request_id":"[^"\\]*","key_id":"([^"\\]*)",'
    r'.*?"charged_tokens":(\d+),'
)


def charges(path: Path, wall: float) -> tuple[str, str, dict[str, tuple[int, int]]]:
    """(day, month, key id -> tokens charged that UTC day and month) from ledger ``path``
    and its archives that may hold lines of this month (modified since it began)."""
    now = time.gmtime(wall)
    day = time.strftime("%Y-%m-%d", now)
    month = day[:7]
    month_start = calendar.timegm((now.tm_year, now.tm_mon, 1, 0, 0, 0))
    totals: dict[str, tuple[int, int]] = {}
    prefix = '{"ts":"' + month
    for file in [*archives(path), path]:
        try:
            if file.stat().st_mtime < month_start:
                continue
            handle = open(file, encoding="utf-8", errors="replace")
        except OSError:
            continue
        with handle:
            for line in handle:
                if not line.startswith(prefix):
                    continue  # another month (lines start with their time)
                fast = _CHARGED.match(line)
                if fast is not None:
                    date, key_id, count = fast.groups()
                    today, this_month = totals.get(key_id, (0, 0))
                    tokens = int(count)
                    totals[key_id] = (today + tokens if date == day else today, this_month + tokens)
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                key_id, tokens = entry.get("key_id"), charged(entry)
                if not isinstance(key_id, str) or not tokens:
                    continue
                today, this_month = totals.get(key_id, (0, 0))
                if str(entry.get("ts", "")).startswith(day):
                    today += tokens
                totals[key_id] = (today, this_month + tokens)
    return day, month, totals


class UsageLedger:
    def __init__(self, path: Path, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._file: IO[str] | None = None
        self._size = 0
        self._broken = False
        self._pending: list[str] = []
        self._flush_handle: asyncio.TimerHandle | None = None

    def _open(self) -> IO[str] | None:
        if self._file is None and not self._broken:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
                self._size = self._file.tell()
            except OSError as exc:
                # A read-only volume must not take the gateway down: say so once.
                self._broken = True
                log.warning("usage ledger disabled: cannot write %s (%s)", self.path, exc.strerror)
        return self._file

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        existing = archives(self.path)
        number = archive_number(existing[-1]) + 1 if existing else 1
        if self.path.exists():
            os.replace(self.path, self.path.with_name(f"{self.path.name}.{number}"))

    def record(self, entry: dict[str, Any]) -> None:
        if self._broken:
            return
        self._pending.append(_ENCODE(entry) + "\n")
        if self._flush_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._flush_handle = loop.call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        self._flush_handle = None
        lines, self._pending = "".join(self._pending), []
        handle = self._open() if lines else None
        if handle is None:
            return
        try:
            handle.write(lines)
            handle.flush()
            self._size += len(lines)
            if self._size >= self.max_bytes:
                self._rotate()
        except OSError as exc:
            self._broken = True
            log.warning("usage ledger disabled: write to %s failed (%s)", self.path, exc.strerror)

    def close(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
