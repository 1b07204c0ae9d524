"""Sans-IO HTTP/1.1: parse request and response heads, frame bodies, serialise heads.

Everything here is a pure function or a small state machine over a ``bytearray`` that the
caller fills from whatever transport it has; nothing here touches a socket or an event loop.
A parser either returns a result (consuming the bytes it used from the buffer), returns
``None`` for "need more bytes", or raises :class:`HttpError` carrying the status to answer
with. Feeding a message whole, one byte at a time, or followed by the next message gives
the same results.

The rules are deliberately strict, because the gateway re-frames every request for the
backend and must never disagree with a client about where a message ends (RFC 9112 §6.3,
request smuggling): CRLF line endings only, Content-Length is digits only and appears at
most once, Transfer-Encoding is exactly ``chunked`` and never beside Content-Length,
chunk sizes are bounded hex, no obs-fold, no control bytes in field values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from http import HTTPStatus

__all__ = [
    "ChunkedDecoder",
    "ChunkedScanner",
    "HttpError",
    "Limits",
    "RequestHead",
    "RequestHeadParser",
    "ResponseHead",
    "chunk",
    "parse_response_head",
    "request_bytes",
    "response_head_bytes",
    "LAST_CHUNK",
]

# RFC 9110 §5.6.2 token characters.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A field value may hold visible ASCII, SP, HTAB and obs-text (RFC 9110 §5.5); no other
# control byte, and never NUL, CR or LF, which are the raw material of header injection.
_BAD_VALUE_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET = re.compile(rb"[\x21-\x7e]+")
# A whole field block, well formed: token names, values of HTAB, SP, visible ASCII and
# obs-text, CRLF between lines (no obs-fold, no bare CR or LF, no control bytes).
_FIELD_BLOCK = re.compile(
    rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*"
    rb"(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*)*"
)

_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,15})(?:;[^\r\n]{0,1000})?\r\n")

LAST_CHUNK = b"0\r\n\r\n"


class HttpError(Exception):
    """A request the gateway must refuse; ``status`` is the response code to send."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Limits:
    max_request_line: int = 8192
    max_header_bytes: int = 16384
    max_headers: int = 100
    max_body: int = 10 * 1024 * 1024
    max_chunk_line: int = 1024


# Backend responses: trusted, but still parsed strictly; llama-server sends a dozen fields.
_BACKEND_FIELDS = Limits(max_headers=1000)


@dataclass(slots=True)
class RequestHead:
    method: str
    target: str
    path: str
    query: str
    http11: bool
    # Lower-cased names, values stripped of surrounding whitespace, in arrival order.
    headers: list[tuple[str, str]]
    content_length: int | None = None
    chunked: bool = False
    keep_alive: bool = True
    expect_continue: bool = False
    # Built on first lookup; not part of what the head is.
    _first_values: dict[str, str] | None = field(default=None, repr=False, compare=False)

    def get(self, name: str) -> str | None:
        """The first value of header ``name`` (lower case), or None."""
        index = self._first_values
        if index is None:
            # Built once, in C: reversed, so the first of repeated fields is kept.
            index = self._first_values = dict(reversed(self.headers))
        return index.get(name)

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


@dataclass(slots=True)
class ResponseHead:
    status: int
    headers: list[tuple[str, str]]
    content_length: int | None = None
    chunked: bool = False
    keep_alive: bool = True

    def get(self, name: str) -> str | None:
        return _first(self.headers, name)


def _first(headers: list[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _split_lines(block: bytes) -> list[bytes]:
    """Split a head (without its final blank line) on CRLF, refusing bare CR or LF."""
    lines = block.split(b"\r\n")
    for line in lines:
        if b"\r" in line or b"\n" in line:
            raise HttpError(400, "line endings must be CRLF")
    return lines


def _fields(field_block: bytes, limits: Limits) -> list[tuple[str, str]]:
    """Header fields of a head's field block (without its final CRLF CRLF).

    A well-formed block is checked by one regular expression and split without per-line
    checks; anything else goes through ``_parse_fields`` line by line, which finds the
    exact error to answer with. Both accept exactly the same blocks.
    """
    if not field_block:
        return []
    if _FIELD_BLOCK.fullmatch(field_block):
        lines = field_block.decode("latin-1").split("\r\n")
        if len(lines) > limits.max_headers:
            raise HttpError(431, f"more than {limits.max_headers} header fields")
        headers = []
        for line in lines:
            name, _, value = line.partition(":")
            headers.append((name.lower(), value.strip(" \t")))
        return headers
    return _parse_fields(_split_lines(field_block), limits)


def _parse_fields(lines: list[bytes], limits: Limits) -> list[tuple[str, str]]:
    if len(lines) > limits.max_headers:
        raise HttpError(431, f"more than {limits.max_headers} header fields")
    headers: list[tuple[str, str]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise HttpError(400, "obsolete line folding is not accepted")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HttpError(400, "malformed header field name")
        value = value.strip(b" \t")
        if _BAD_VALUE_BYTE.search(value):
            raise HttpError(400, "control character in header field value")
        headers.append((name.decode("ascii").lower(), value.decode("latin-1")))
    return headers


def _comma_tokens(values: list[str]) -> list[str]:
    return [t.strip().lower() for v in values for t in v.split(",") if t.strip()]


class RequestHeadParser:
    """Incremental request-head parser.

    Keeps only how far it has already scanned, so feeding a head one byte at a time costs
    linear time; everything else is recomputed from the buffer.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._scanned = 0

    def parse(self, buf: bytearray) -> RequestHead | None:
        # RFC 9112 §2.2: ignore empty lines before the request line (some clients send a
        # stray CRLF after a POST body).
        while buf[:2] == b"\r\n":
            del buf[:2]
            self._scanned = 0
        end = buf.find(b"\r\n\r\n", max(0, self._scanned - 3))
        if end < 0:
            self._check_incomplete(buf)
            self._scanned = len(buf)
            return None
        self._scanned = 0
        block = bytes(buf[:end])
        del buf[: end + 4]
        return self._parse_block(block)

    def _check_incomplete(self, buf: bytearray) -> None:
        limits = self.limits
        first_end = buf.find(b"\r\n")
        line_len = first_end if first_end >= 0 else len(buf)
        if line_len > limits.max_request_line:
            raise HttpError(414, "request line too long")
        # Fail fast on what cannot become a method (a TLS handshake, binary noise)
        # instead of waiting for a line end that may never come.
        space = buf.find(b" ", 0, line_len)
        method = bytes(buf[: space if space >= 0 else min(line_len, 32)])
        # (A lone CR may be the start of an empty line the parser skips.)
        if method and method != b"\r" and not _TOKEN.fullmatch(method):
            raise HttpError(400, "malformed method")
        if first_end >= 0 and len(buf) - first_end > limits.max_header_bytes:
            raise HttpError(431, "header section too large")
        # A lone LF would otherwise leave us waiting for a CRLFCRLF that never comes.
        start = max(0, self._scanned - 1)
        pos = buf.find(b"\n", start)
        while pos >= 0:
            if pos == 0 or buf[pos - 1] != 0x0D:
                raise HttpError(400, "line endings must be CRLF")
            pos = buf.find(b"\n", pos + 1)

    def _parse_block(self, block: bytes) -> RequestHead:
        limits = self.limits
        request_line, _, field_block = block.partition(b"\r\n")
        if len(request_line) > limits.max_request_line:
            raise HttpError(414, "request line too long")
        if len(field_block) > limits.max_header_bytes:
            raise HttpError(431, "header section too large")
        _split_lines(request_line)
        parts = request_line.split(b" ")
        if len(parts) != 3:
            raise HttpError(400, "malformed request line")
        raw_method, raw_target, raw_version = parts
        if not _TOKEN.fullmatch(raw_method):
            raise HttpError(400, "malformed method")
        version = _VERSION.fullmatch(raw_version)
        if version is None:
            raise HttpError(400, "malformed HTTP version")
        if version.group(1) != b"1":
            raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        http11 = version.group(2) != b"0"
        if not _TARGET.fullmatch(raw_target):
            raise HttpError(400, "malformed request target")
        method = raw_method.decode("ascii")
        target = raw_target.decode("ascii")
        path = _origin_path(method, target)
        path, _, query = path.partition("?")
        path = path.partition("#")[0]

        headers = _fields(field_block, limits)
        head = RequestHead(method, target, path, query, http11, headers)
        _apply_request_framing(head, limits)
        return head


def _origin_path(method: str, target: str) -> str:
    if target.startswith("/"):
        return target
    # RFC 9112 §3.2.2: a server must accept absolute-form; only its path matters here.
    lowered = target.lower()
    for scheme in ("http://", "https://"):
        if lowered.startswith(scheme):
            rest = target[len(scheme) :]
            slash = rest.find("/")
            return rest[slash:] if slash >= 0 else "/"
    if target == "*" and method == "OPTIONS":
        return "*"
    raise HttpError(400, "malformed request target")


def _apply_request_framing(head: RequestHead, limits: Limits) -> None:
    hosts = []
    lengths = []
    encodings = []
    connection = []
    expect = []
    for name, value in head.headers:
        if name == "host":
            hosts.append(value)
        elif name == "content-length":
            lengths.append(value)
        elif name == "transfer-encoding":
            encodings.append(value)
        elif name == "connection":
            connection.append(value)
        elif name == "expect":
            expect.append(value)

    # RFC 9112 §3.2: exactly one Host in HTTP/1.1; two Hosts can route differently.
    if len(hosts) > 1 or (head.http11 and not hosts):
        raise HttpError(400, "a request needs exactly one Host header")

    if encodings:
        if lengths:
            raise HttpError(400, "Content-Length together with Transfer-Encoding")
        if not head.http11:
            raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = _comma_tokens(encodings)
        if codings != ["chunked"]:
            for coding in codings:
                if not _TOKEN.fullmatch(coding.encode("latin-1")):
                    raise HttpError(400, "malformed Transfer-Encoding")
            raise HttpError(501, "only Transfer-Encoding: chunked is supported")
        head.chunked = True
    elif lengths:
        if len(lengths) > 1:
            raise HttpError(400, "more than one Content-Length")
        raw = lengths[0].encode("latin-1")
        if not _DIGITS.fullmatch(raw):
            raise HttpError(400, "Content-Length must be digits")
        head.content_length = int(raw)
        if head.content_length > limits.max_body:
            raise HttpError(413, f"request body larger than {limits.max_body} bytes")

    tokens = _comma_tokens(connection)
    if "close" in tokens:
        head.keep_alive = False
    elif not head.http11:
        head.keep_alive = "keep-alive" in tokens

    if expect:
        if [e.lower() for e in expect] != ["100-continue"]:
            raise HttpError(417, "only Expect: 100-continue is supported")
        head.expect_continue = head.http11


# A request body's chunks: each costs a few microseconds of the one event loop however
# small it is, so a body sent one byte per chunk (six bytes of framing per byte) would
# pin the loop for everyone (about 0.3 s of CPU per MB). Past FREE_CHUNKS, chunks must
# average MIN_CHUNK_AVERAGE bytes: streaming clients send kilobytes per chunk.
FREE_CHUNKS = 1024
MIN_CHUNK_AVERAGE = 1024


class ChunkedDecoder:
    """Decode a chunked body incrementally; ``feed`` returns payload bytes.

    ``done`` turns true after the last chunk and its trailer section; trailer fields are
    read, bounded and dropped (never forwarded, never used for auth). With ``max_body``
    (a client's request) the body is bounded in size (413) and in chunks (400: more than
    FREE_CHUNKS plus one per MIN_CHUNK_AVERAGE bytes received); llama-server's responses
    come one small chunk per event and are not bounded in chunks.
    """

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self, limits: Limits, max_body: int | None = None) -> None:
        self.limits = limits
        self.max_body = max_body
        self.received = 0
        self.chunks = 0
        self.done = False
        self._state = self._SIZE
        self._remaining = 0
        self._trailer_bytes = 0

    def feed(self, buf: bytearray) -> bytes:
        """Consume what can be decoded from ``buf`` and return the payload found."""
        out = bytearray()
        while not self.done:
            if self._state == self._DATA:
                take = min(self._remaining, len(buf))
                if take == 0:
                    break
                out += buf[:take]
                del buf[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._state = self._DATA_END
            elif self._state == self._DATA_END:
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise HttpError(400, "chunk data not followed by CRLF")
                del buf[:2]
                self._state = self._SIZE
            elif self._state == self._SIZE:
                line = self._line(buf)
                if line is None:
                    break
                size = _chunk_size(line)
                if size == 0:
                    self._state = self._TRAILER
                    continue
                self.received += size
                if self.max_body is not None:
                    if self.received > self.max_body:
                        raise HttpError(413, f"request body larger than {self.max_body} bytes")
                    self.chunks += 1
                    if self.chunks > FREE_CHUNKS + self.received // MIN_CHUNK_AVERAGE:
                        raise HttpError(
                            400,
                            f"chunked body in too many small chunks ({self.chunks} for "
                            f"{self.received} bytes): past {FREE_CHUNKS} chunks they must "
                            f"average {MIN_CHUNK_AVERAGE} bytes",
                        )
                self._remaining = size
                self._state = self._DATA
            else:
                line = self._line(buf)
                if line is None:
                    break
                self._trailer_bytes += len(line) + 2
                if self._trailer_bytes > self.limits.max_header_bytes:
                    raise HttpError(431, "trailer section too large")
                if line == b"":
                    self.done = True
                else:
                    _parse_fields([line], self.limits)
        return bytes(out)

    def _line(self, buf: bytearray) -> bytes | None:
        end = buf.find(b"\r\n", 0, self.limits.max_chunk_line + 2)
        if end < 0:
            if len(buf) > self.limits.max_chunk_line or b"\n" in buf:
                raise HttpError(400, "malformed chunk line")
            return None
        line = bytes(buf[:end])
        del buf[: end + 2]
        if b"\r" in line or b"\n" in line:
            raise HttpError(400, "malformed chunk line")
        return line


def _chunk_size(line: bytes) -> int:
    # RFC 9112 §7.1.1: chunk extensions are allowed and ignored; whitespace is not
    # (some servers trim it and disagree about the size, a known smuggling vector).
    size, _, _extension = line.partition(b";")
    if not _HEX.fullmatch(size):
        raise HttpError(400, "malformed chunk size")
    return int(size, 16)


class ChunkedScanner:
    """Follow a chunked body without copying it, to relay it verbatim.

    ``feed(data)`` validates framing as the bytes go past and returns True when the body
    (last chunk and trailers) is complete. ``at_boundary`` tells whether the bytes so far
    end exactly between two chunks, where a chunk of our own may be inserted.
    """

    __slots__ = ("_remaining", "_crlf", "_pending", "_in_trailer", "done")

    def __init__(self) -> None:
        self._remaining = 0  # payload bytes still to pass
        self._crlf = 0  # bytes of the CRLF after the payload still to check
        self._pending = b""  # a size or trailer line split across reads
        self._in_trailer = False
        self.done = False

    @property
    def at_boundary(self) -> bool:
        return not (self._remaining or self._crlf or self._pending or self._in_trailer)

    def feed(self, data: bytes) -> bool:
        pos = 0
        end = len(data)
        match = _CHUNK_LINE.match
        while pos < end:
            if not (self._remaining or self._crlf or self._pending or self._in_trailer):
                # Fast path: a whole chunk in this read, checked without copying it.
                head = match(data, pos)
                if head is not None:
                    size = int(head.group(1), 16)
                    body = head.end()
                    if size and body + size + 2 <= end:
                        if not data.startswith(b"\r\n", body + size):
                            raise HttpError(502, "malformed chunked body from backend")
                        pos = body + size + 2
                        continue
            if self._remaining:
                step = min(self._remaining, end - pos)
                pos += step
                self._remaining -= step
                continue
            if self._crlf:
                if data[pos] != (0x0D if self._crlf == 2 else 0x0A):
                    raise HttpError(502, "malformed chunked body from backend")
                pos += 1
                self._crlf -= 1
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._pending += data[pos:]
                if len(self._pending) > 4096:
                    raise HttpError(502, "malformed chunked body from backend")
                return False
            line = data[pos:newline]
            if self._pending:
                line = self._pending + line
                self._pending = b""
            pos = newline + 1
            if not line.endswith(b"\r"):
                raise HttpError(502, "malformed chunked body from backend")
            line = line[:-1]
            if self._in_trailer:
                if not line:
                    self.done = True
                    if pos != end:
                        raise HttpError(502, "bytes after the end of a chunked body")
                    return True
                continue
            try:
                size = _chunk_size(line)
            except HttpError:
                raise HttpError(502, "malformed chunk size from backend") from None
            if size == 0:
                self._in_trailer = True
            else:
                self._remaining = size
                self._crlf = 2
        return False


def chunk(payload: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def parse_response_head(buf: bytearray, limits: Limits) -> ResponseHead | None:
    """Parse a backend response head from ``buf``; None if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > limits.max_header_bytes * 4:
            raise HttpError(502, "backend response head too large")
        return None
    block = bytes(buf[:end])
    del buf[: end + 4]
    status_line, _, field_block = block.partition(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not _VERSION.fullmatch(parts[0]) or not _DIGITS.fullmatch(parts[1]):
        raise HttpError(502, "malformed status line from backend")
    try:
        headers = _fields(field_block, _BACKEND_FIELDS)
    except HttpError as exc:
        raise HttpError(502, f"malformed header from backend: {exc.message}") from None
    head = ResponseHead(int(parts[1]), headers)
    http11 = parts[0] == b"HTTP/1.1"
    lengths = [v for k, v in headers if k == "content-length"]
    encodings = _comma_tokens([v for k, v in headers if k == "transfer-encoding"])
    if encodings:
        if encodings != ["chunked"]:
            raise HttpError(502, "unsupported Transfer-Encoding from backend")
        head.chunked = True
    elif lengths:
        if len(set(lengths)) != 1 or not _DIGITS.fullmatch(lengths[0].encode("latin-1")):
            raise HttpError(502, "malformed Content-Length from backend")
        head.content_length = int(lengths[0])
    tokens = _comma_tokens([v for k, v in headers if k == "connection"])
    head.keep_alive = "close" not in tokens and (http11 or "keep-alive" in tokens)
    return head


_REASONS = {status.value: status.phrase for status in HTTPStatus}


def _reason(status: int) -> str:
    return _REASONS.get(status, "Unknown")


def response_head_bytes(status: int, headers: list[tuple[str, str]]) -> bytes:
    """Serialise a response head. Header values come from the gateway itself."""
    lines = [f"HTTP/1.1 {status} {_reason(status)}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


def request_bytes(method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    """Serialise a complete request with exactly one Content-Length."""
    lines = [f"{method} {target} HTTP/1.1"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if body or method not in ("GET", "HEAD"):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1") + body
