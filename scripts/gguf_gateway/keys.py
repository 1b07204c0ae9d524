"""API keys: the key-file format, the key ring and its reloading.

A key file holds ``key_id:secret [name=value ...]`` lines. The secret is the key itself or
``sha256:<64 hex>`` of it. Only SHA-256 digests are kept in memory; a presented token is
hashed once and compared against every key's digest in constant time, without stopping at
the first match, so timing reveals neither which key matched nor how much of it.

A malformed line is reported by line number (never with its content, which may hold a
secret) and skipped; the other lines keep working.

Keys come from the file, from ``API_KEYS`` (the same lines, separated by newlines or ``;``,
for platforms whose secrets are environment variables; an entry is named by its position)
and from ``API_KEY``/``API_KEY_FILE`` (one key, id ``default``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

SCOPES = frozenset({"inference", "admin"})
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_HASHED = re.compile(r"sha256:([0-9a-fA-F]{64})")
# A model id as llama-server names it: a file name without .gguf, or an alias.
_MODEL_ID = re.compile(r"[^\s,;]{1,256}")
_COUNTS = ("rpm", "tpm", "concurrency", "daily_tokens", "monthly_tokens")
MAX_PRIORITY = 10


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    digest: bytes = field(repr=False)
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    expires: datetime | None = None
    scopes: frozenset[str] = frozenset({"inference"})
    # The model ids this key may use; None: all of them.
    models: frozenset[str] | None = None
    daily_tokens: int | None = None  # prompt + completion tokens per UTC day
    monthly_tokens: int | None = None  # ... per UTC calendar month
    priority: int = 1  # weight in the fair admission queue (1-10)

    @property
    def has_quota(self) -> bool:
        return self.daily_tokens is not None or self.monthly_tokens is not None

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    def expired(self, now: float | None = None) -> bool:
        if self.expires is None:
            return False
        return (time.time() if now is None else now) >= self.expires.timestamp()


def digest_of(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def _parse_expires(value: str) -> datetime:
    stamp = value[:-1] + "+00:00" if value.endswith("Z") else value
    parsed = datetime.fromisoformat(stamp)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed


def parse_key_line(line: str) -> ApiKey:
    """Parse one non-comment line; ValueError says what is wrong, never the secret."""
    words = line.split()
    key_id, colon, secret = words[0].partition(":")
    if not colon or not secret:
        raise ValueError("expected key_id:secret")
    if not _KEY_ID.fullmatch(key_id):
        raise ValueError("key id must be letters, digits, '.', '_', '@' or '-'")
    hashed = _HASHED.fullmatch(secret)
    if hashed:
        digest = bytes.fromhex(hashed.group(1))
    elif secret.startswith("sha256:"):
        raise ValueError("sha256: must be followed by 64 hex digits")
    else:
        digest = digest_of(secret)
    fields: dict[str, object] = {}
    for word in words[1:]:
        name, eq, value = word.partition("=")
        if not eq or not value:
            raise ValueError(f"field {name!r} needs name=value")
        if name in fields:
            raise ValueError(f"field {name!r} given twice")
        if name in _COUNTS:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{name} must be a positive whole number")
            fields[name] = int(value)
        elif name == "priority":
            if not value.isdigit() or not 1 <= int(value) <= MAX_PRIORITY:
                raise ValueError(f"priority must be a whole number from 1 to {MAX_PRIORITY}")
            fields[name] = int(value)
        elif name == "models":
            models = [m for m in value.split(",") if m]
            if not models or not all(_MODEL_ID.fullmatch(m) for m in models):
                raise ValueError("models must be model ids separated by commas")
            fields[name] = frozenset(models)
        elif name == "expires":
            try:
                fields[name] = _parse_expires(value)
            except ValueError:
                raise ValueError("expires must be an ISO 8601 time") from None
        elif name == "scopes":
            scopes = frozenset(s for s in value.split(",") if s)
            unknown = scopes - SCOPES
            if unknown or not scopes:
                raise ValueError(f"scopes must be among {', '.join(sorted(SCOPES))}")
            # admin extends inference, it does not replace it.
            fields[name] = scopes | {"inference"} if "admin" in scopes else scopes
        else:
            raise ValueError(f"unknown field {name!r}")
    return ApiKey(key_id, digest, **fields)  # type: ignore[arg-type]


def parse_key_text(text: str, source: str) -> tuple[list[ApiKey], list[str]]:
    """All valid keys in ``text`` and one problem message per skipped line."""
    return parse_key_entries(file_entries(text, source))


def file_entries(text: str, source: str) -> list[tuple[str, str]]:
    """A key file's lines, each with the place a problem names: "FILE line N"."""
    return [(f"{source} line {n}", raw) for n, raw in enumerate(text.splitlines(), start=1)]


def env_entries(text: str, name: str = "API_KEYS") -> list[tuple[str, str]]:
    """API_KEYS: key-file lines separated by newlines or ';', named "API_KEYS entry N".

    Platforms that hold secrets as environment variables often allow one line only, hence
    ';' (which a key line never needs: secrets are sk-... or sha256:<hex>).
    """
    pieces = re.split(r"[\r\n;]", text)
    return [(f"{name} entry {n}", raw) for n, raw in enumerate(pieces, start=1)]


def parse_key_entries(entries: Iterable[tuple[str, str]]) -> tuple[list[ApiKey], list[str]]:
    """Keys from (place, line) pairs; the first of two entries with one id or secret wins."""
    keys: list[ApiKey] = []
    problems: list[str] = []
    seen_ids: set[str] = set()
    seen_digests: set[bytes] = set()
    for place, raw in entries:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = parse_key_line(line)
        except ValueError as exc:
            problems.append(f"{place}: {exc}; skipped")
            continue
        if key.key_id in seen_ids:
            problems.append(f"{place}: duplicate key id {key.key_id!r}; skipped")
            continue
        if key.digest in seen_digests:
            problems.append(f"{place}: key {key.key_id!r} repeats an earlier secret; skipped")
            continue
        seen_ids.add(key.key_id)
        seen_digests.add(key.digest)
        keys.append(key)
    return keys, problems


class KeyRing:
    """An immutable set of keys; ``match`` is constant-time over all of them."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self.keys = tuple(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def holds(self, key: ApiKey) -> bool:
        """Whether ``key`` (id and secret) is still in this ring."""
        return any(k.key_id == key.key_id and k.digest == key.digest for k in self.keys)

    def match(self, token: str) -> ApiKey | None:
        presented = digest_of(token)
        found: ApiKey | None = None
        for key in self.keys:
            # No early exit: every digest is compared whatever the outcome.
            if hmac.compare_digest(presented, key.digest):
                found = key
        return found


class KeySource:
    """Builds the key ring from AUTH_KEYS_FILE, API_KEYS, API_KEY and API_KEY_FILE.

    The file is re-read when its mtime, size or inode changes (checked at most once a
    second, on use) and on ``reload()`` (SIGHUP). A file that vanishes or cannot be read
    keeps the last good ring rather than failing open or locking everyone out.
    """

    def __init__(
        self,
        keys_file: Path,
        api_key: str = "",
        api_key_file: Path | None = None,
        log: Callable[[str], None] | None = None,
        api_keys: str = "",
    ) -> None:
        self.keys_file = keys_file
        self.api_key = api_key
        self.api_key_file = api_key_file
        self.api_keys = api_keys  # API_KEYS: fixed for the process's life
        self._log = log or (lambda message: None)
        self._signature: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._file_read = False  # the key file has been read once: its keys are in force
        self._single_last: ApiKey | None = None  # API_KEY_FILE's key when last read
        self.ring = KeyRing(())
        self.reload()

    def _single_key(self) -> ApiKey | None:
        secret = self.api_key
        if not secret and self.api_key_file is not None:
            try:
                secret = self.api_key_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                # As with the key file: gone or unreadable after it was read (a secret
                # mount being swapped), its key stays rather than locking its clients out
                # until the next reload. To revoke it, empty the file.
                why = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
                kept = "; keeping the last good key" if self._single_last else ""
                self._log(f"API_KEY_FILE {self.api_key_file}: cannot read ({why}){kept}")
                return self._single_last
        single = (
            ApiKey("default", digest_of(secret), scopes=frozenset({"inference", "admin"}))
            if secret
            else None
        )
        self._single_last = single
        return single

    def reload(self) -> None:
        entries: list[tuple[str, str]] = []
        single = self._single_key()
        try:
            stat = os.stat(self.keys_file)
            text = self.keys_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            if self._file_read:
                # Gone after it was read (a volume remounting, an editor's rename, a slip):
                # revoking every key would lock everyone out. Revoke with key_mgmt.py, or
                # an empty file.
                self._log(
                    f"AUTH_KEYS_FILE {self.keys_file}: missing; keeping the last good keys "
                    f"({len(self.ring)} key(s))"
                )
                return
            self._signature = None
        except (OSError, UnicodeDecodeError) as exc:
            self._log(
                f"AUTH_KEYS_FILE {self.keys_file}: cannot read ({exc}); keeping the last good "
                f"keys ({len(self.ring)} key(s))"
            )
            return
        else:
            self._file_read = True
            self._signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            entries = file_entries(text, str(self.keys_file))
        # One parse over both sources, so an id or secret given twice is reported, the
        # file's entry winning.
        keys, problems = parse_key_entries(entries + env_entries(self.api_keys))
        for problem in problems:
            self._log(problem)
        if single is not None:
            if any(k.key_id == "default" for k in keys):
                self._log(
                    "API_KEY: key id 'default' also in AUTH_KEYS_FILE or API_KEYS; that entry wins"
                )
            else:
                keys.append(single)
        self.ring = KeyRing(keys)

    def current(self, now: float | None = None) -> KeyRing:
        now = time.monotonic() if now is None else now
        if now - self._checked >= 1.0:
            self._checked = now
            try:
                stat = os.stat(self.keys_file)
                signature: tuple[int, int, int] | None = (
                    stat.st_mtime_ns,
                    stat.st_size,
                    stat.st_ino,
                )
            except OSError:
                signature = None
            if signature != self._signature and signature is not None:
                self.reload()
        return self.ring
