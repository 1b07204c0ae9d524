"""The sans-IO HTTP/1.1 module, fed whole, one byte at a time, and with trailing bytes."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gguf_gateway import http11
from gguf_gateway.http11 import (
    FREE_CHUNKS,
    MIN_CHUNK_AVERAGE,
    ChunkedDecoder,
    ChunkedScanner,
    HttpError,
    Limits,
    RequestHead,
    RequestHeadParser,
    chunk,
    parse_response_head,
    request_bytes,
    response_head_bytes,
)

LIMITS = Limits(max_request_line=200, max_header_bytes=400, max_headers=10, max_body=1000)
NEXT = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"


def feeds(data: bytes) -> Iterator[tuple[str, list[bytes]]]:
    yield "whole", [data]
    yield "bytewise", [data[i : i + 1] for i in range(len(data))]
    yield "trailing", [data + NEXT]


def parse_head(pieces: list[bytes]) -> tuple[RequestHead | None, bytearray]:
    parser = RequestHeadParser(LIMITS)
    buf = bytearray()
    for piece in pieces:
        buf += piece
        head = parser.parse(buf)
        if head is not None:
            return head, buf
    return None, buf


GOOD = [
    pytest.param(
        b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n",
        {"method": "GET", "path": "/v1/models", "keep_alive": True, "content_length": None},
        id="simple-get",
    ),
    pytest.param(
        b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
        {"path": "/v1/chat/completions", "query": "x=1", "content_length": 5},
        id="post-with-query",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n",
        {"chunked": True, "content_length": None},
        id="chunked-case-insensitive",
    ),
    pytest.param(
        b"GET / HTTP/1.0\r\n\r\n",
        {"http11": False, "keep_alive": False},
        id="http10-no-host",
    ),
    pytest.param(
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        {"keep_alive": True},
        id="http10-keep-alive",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n",
        {"keep_alive": False},
        id="connection-close",
    ),
    pytest.param(
        b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        {"path": "/"},
        id="leading-crlf-ignored",
    ),
    pytest.param(
        b"GET http://example.com/v1/models?a HTTP/1.1\r\nHost: a\r\n\r\n",
        {"path": "/v1/models", "query": "a"},
        id="absolute-form",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n",
        {"expect_continue": True},
        id="expect-continue",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost:   spaced\t \r\nX-Obs: caf\xe9\r\n\r\n",
        {"headers": [("host", "spaced"), ("x-obs", "caf\xe9")]},
        id="ows-stripped-obs-text-kept",
    ),
]


@pytest.mark.parametrize("raw, expected", GOOD)
def test_valid_heads_parse_the_same_whole_bytewise_and_with_trailing_bytes(
    raw: bytes, expected: dict[str, object]
) -> None:
    for mode, pieces in feeds(raw):
        head, rest = parse_head(pieces)
        assert head is not None, mode
        for name, value in expected.items():
            assert getattr(head, name) == value, (mode, name)
        assert bytes(rest) == (NEXT if mode == "trailing" else b""), mode


BAD = [
    # request line
    pytest.param(b"GET /\r\nHost: a\r\n\r\n", 400, id="two-part-request-line"),
    pytest.param(b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400, id="double-space"),
    pytest.param(b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400, id="bad-method-char"),
    pytest.param(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, id="http2-version"),
    pytest.param(b"GET / HTTQ/1.1\r\nHost: a\r\n\r\n", 400, id="bad-protocol"),
    pytest.param(b"GET /a\x01b HTTP/1.1\r\nHost: a\r\n\r\n", 400, id="control-in-target"),
    pytest.param(b"GET relative HTTP/1.1\r\nHost: a\r\n\r\n", 400, id="relative-target"),
    pytest.param(
        b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414, id="long-request-line"
    ),
    # line endings
    pytest.param(b"GET / HTTP/1.1\nHost: a\n\n", 400, id="bare-lf"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 400, id="bare-cr"),
    # header fields
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nX : b\r\n\r\n", 400, id="space-before-colon"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400, id="obs-fold"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n", 400, id="nul-in-value"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n", 400, id="no-colon"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n: empty\r\n\r\n", 400, id="empty-name"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nX\xff: b\r\n\r\n", 400, id="non-ascii-name"),
    pytest.param(
        b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 11 + b"Host: a\r\n\r\n", 431, id="too-many-headers"
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: " + b"b" * 500 + b"\r\n\r\n",
        431,
        id="header-block-too-large",
    ),
    # host
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", 400, id="missing-host"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, id="duplicate-host"),
    # framing
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
        id="cl-te-conflict",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", 400, id="cl-plus-sign"
    ),
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n", 400, id="cl-list"),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
        400,
        id="cl-twice",
    ),
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n", 400, id="cl-hex"),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n", 413, id="cl-over-limit"
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501, id="te-gzip"
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        501,
        id="te-gzip-chunked",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", 501, id="te-xchunked"
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        501,
        id="te-twice",
    ),
    pytest.param(
        b'POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: "chunked"\r\n\r\n', 400, id="te-quoted"
    ),
    pytest.param(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400, id="te-in-http10"),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nExpect: magic\r\n\r\n", 417, id="unknown-expectation"
    ),
]


@pytest.mark.parametrize("raw, status", BAD)
def test_malformed_heads_raise_the_same_status_every_way(raw: bytes, status: int) -> None:
    for mode, pieces in feeds(raw):
        with pytest.raises(HttpError) as caught:
            parse_head(pieces)
        assert caught.value.status == status, mode


def test_incomplete_head_waits_for_more() -> None:
    head, buf = parse_head([b"GET / HTTP/1.1\r\nHost: a\r\n"])
    assert head is None and buf == bytearray(b"GET / HTTP/1.1\r\nHost: a\r\n")


def decode_chunked(pieces: list[bytes], max_body: int = 1000) -> tuple[bytes, bool, bytes]:
    decoder = ChunkedDecoder(LIMITS, max_body)
    buf = bytearray()
    out = bytearray()
    for piece in pieces:
        buf += piece
        out += decoder.feed(buf)
        if decoder.done:
            break
    return bytes(out), decoder.done, bytes(buf)


CHUNKED_GOOD = [
    pytest.param(b"5\r\nhello\r\n0\r\n\r\n", b"hello", id="one-chunk"),
    pytest.param(b"2\r\nhe\r\n3;ext=1\r\nllo\r\n0\r\n\r\n", b"hello", id="extension-ignored"),
    pytest.param(
        b"A\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n", b"0123456789", id="trailer-dropped"
    ),
    pytest.param(b"0\r\n\r\n", b"", id="empty"),
]


@pytest.mark.parametrize("raw, payload", CHUNKED_GOOD)
def test_chunked_bodies_decode_the_same_every_way(raw: bytes, payload: bytes) -> None:
    for mode, pieces in feeds(raw):
        out, done, rest = decode_chunked(pieces)
        assert (out, done) == (payload, True), mode
        assert rest == (NEXT if mode == "trailing" else b""), mode


CHUNKED_BAD = [
    pytest.param(b"5\r\nhelloX\r\n0\r\n\r\n", 400, id="data-overrun"),
    pytest.param(b"-5\r\nhello\r\n0\r\n\r\n", 400, id="negative-size"),
    pytest.param(b"5 \r\nhello\r\n0\r\n\r\n", 400, id="space-after-size"),
    pytest.param(b"0x5\r\nhello\r\n0\r\n\r\n", 400, id="0x-prefix"),
    pytest.param(b"ffffffffffffffffff\r\n", 400, id="size-too-many-digits"),
    pytest.param(b"5\nhello\n0\n\n", 400, id="bare-lf"),
    pytest.param(b"fff\r\n" + b"a" * 0xFFF + b"\r\n0\r\n\r\n", 413, id="body-over-limit"),
    pytest.param(b"1;" + b"e" * 2000 + b"\r\na\r\n0\r\n\r\n", 400, id="long-chunk-line"),
    pytest.param(b"0\r\nBad Trailer\r\n\r\n", 400, id="malformed-trailer"),
]


@pytest.mark.parametrize("raw, status", CHUNKED_BAD)
def test_malformed_chunked_bodies_are_refused(raw: bytes, status: int) -> None:
    for mode, pieces in feeds(raw):
        with pytest.raises(HttpError) as caught:
            decode_chunked(pieces)
        assert caught.value.status == status, mode


def test_a_body_in_tiny_chunks_is_refused_before_it_costs_much() -> None:
    tiny = b"1\r\nx\r\n" * (FREE_CHUNKS + 2) + b"0\r\n\r\n"
    for mode, pieces in feeds(tiny):
        with pytest.raises(HttpError) as caught:
            decode_chunked(pieces, max_body=1 << 20)
        assert caught.value.status == 400, mode
        assert "too many small chunks" in caught.value.message, mode


def test_many_chunks_pass_when_they_carry_enough_bytes() -> None:
    # Twice FREE_CHUNKS chunks of MIN_CHUNK_AVERAGE bytes: a streaming client's upload.
    piece = b"a" * MIN_CHUNK_AVERAGE
    body = chunk(piece) * (2 * FREE_CHUNKS) + b"0\r\n\r\n"
    out, done, _ = decode_chunked([body], max_body=1 << 22)
    assert done and out == piece * (2 * FREE_CHUNKS)
    # Small chunks within the free allowance pass too, and responses are not bounded.
    few = b"1\r\nx\r\n" * FREE_CHUNKS + b"0\r\n\r\n"
    assert decode_chunked([few], max_body=1 << 20)[:2] == (b"x" * FREE_CHUNKS, True)
    decoder = ChunkedDecoder(LIMITS)
    assert decoder.feed(bytearray(b"1\r\nx\r\n" * 10 * FREE_CHUNKS)) == b"x" * 10 * FREE_CHUNKS


def test_scanner_follows_chunk_boundaries_without_copying() -> None:
    body = chunk(b"data: 1\n\n") + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    for mode, pieces in feeds(body):
        if mode == "trailing":
            continue
        scanner = ChunkedScanner()
        done = False
        for piece in pieces:
            assert not done
            done = scanner.feed(piece)
        assert done and scanner.done, mode
    scanner = ChunkedScanner()
    scanner.feed(chunk(b"abc")[:3])
    assert not scanner.at_boundary
    scanner.feed(chunk(b"abc")[3:])
    assert scanner.at_boundary


@pytest.mark.parametrize(
    "raw",
    [b"5\r\nhelloXY", b"zz\r\n", b"5\nhello\r\n", b"0\r\n\r\nextra"],
    ids=["bad-data-end", "bad-size", "bare-lf", "bytes-after-end"],
)
def test_scanner_rejects_broken_backend_framing(raw: bytes) -> None:
    with pytest.raises(HttpError) as caught:
        ChunkedScanner().feed(raw)
    assert caught.value.status == 502


def test_response_head_parse_and_serialise_round_trip() -> None:
    raw = response_head_bytes(
        200, [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")]
    )
    for mode, pieces in feeds(raw):
        buf = bytearray()
        head = None
        for piece in pieces:
            buf += piece
            head = parse_response_head(buf, LIMITS)
            if head is not None:
                break
        assert head is not None and head.status == 200 and head.chunked, mode
        assert head.get("content-type") == "text/event-stream"


def test_request_serialisation_has_exactly_one_content_length() -> None:
    raw = request_bytes("POST", "/v1/completions", [("Host", "b")], b"{}")
    head, _ = parse_head([raw])
    assert head is not None
    assert [v for k, v in head.headers if k == "content-length"] == ["2"]
    assert raw.endswith(b"\r\n\r\n{}")


def test_http_module_is_sans_io() -> None:
    source = (Path(__file__).parents[2] / "scripts" / "gguf_gateway" / "http11.py").read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "socket", "selectors", "ssl"}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_parser_never_fails_other_than_with_an_http_error(data: bytes) -> None:
    parser = RequestHeadParser(LIMITS)
    buf = bytearray(data)
    try:
        head = parser.parse(buf)
    except HttpError as exc:
        assert 400 <= exc.status < 600
    else:
        if head is not None:
            assert head.path


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=50))
def test_chunked_decoder_is_split_invariant(data: bytes, step: int) -> None:
    def run(pieces: list[bytes]) -> tuple[bytes, bool] | int:
        try:
            out, done, _ = decode_chunked(pieces)
            return out, done
        except HttpError as exc:
            return exc.status

    whole = run([data])
    split = run([data[i : i + step] for i in range(0, len(data), step)] or [b""])
    if isinstance(whole, tuple) and whole[1]:
        assert split == whole


@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"Host", b"x-a", b"bad name", b" fold", b"", b"X\x00"]),
            st.binary(max_size=12),
        ),
        max_size=6,
    )
)
def test_whole_block_check_accepts_exactly_what_the_line_parser_accepts(
    fields: list[tuple[bytes, bytes]],
) -> None:
    block = b"\r\n".join(name + b":" + value for name, value in fields)
    limits = Limits()
    try:
        slow: object = http11._parse_fields(http11._split_lines(block), limits) if block else []
    except HttpError as exc:
        slow = exc.status
    try:
        fast: object = http11._fields(block, limits)
    except HttpError as exc:
        fast = exc.status
    assert fast == slow
