"""The response codec: events whatever the read boundaries, framing, and the cap on a backend's head."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmproxy.http11.response import (
    FRAMING_CHUNKED,
    FRAMING_CLOSE,
    FRAMING_LENGTH,
    FRAMING_NONE,
    ResponseCodec,
    ResponseError,
)

LIMIT = 4096


class Events:
    def __init__(self) -> None:
        self.heads: list[tuple[int, list[tuple[bytes, bytes]], int]] = []
        self.pieces: list[bytes] = []  # the codec's body list, which its parser appends to
        self.completed = 0

    @property
    def body(self) -> bytes:
        return b"".join(self.pieces)

    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], framing: int) -> None:
        self.heads.append((status, headers, framing))

    def expect(self, parser: ResponseCodec, is_head: bool = False) -> None:
        parser.expect(is_head)
        self.pieces = parser.body

    def on_complete(self) -> None:
        self.completed += 1


def codec(limit: int = LIMIT, is_head: bool = False) -> tuple[ResponseCodec, Events]:
    events = Events()
    parser = ResponseCodec(events, limit)
    events.expect(parser, is_head)
    return parser, events


CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"6\r\ndata: \r\n3\r\nx\n\n\r\n0\r\n\r\n")


@pytest.mark.parametrize("cut", ["whole", "byte by byte", "head and body apart"])
def test_the_same_events_however_the_bytes_are_cut(cut: str):
    parser, events = codec()
    if cut == "whole":
        parser.feed(CHUNKED)
    elif cut == "byte by byte":
        for i in range(len(CHUNKED)):
            parser.feed(CHUNKED[i:i + 1])
    else:
        split = CHUNKED.index(b"\r\n\r\n") + 4
        parser.feed(CHUNKED[:split])
        parser.feed(CHUNKED[split:])
    assert events.heads == [(200, [(b"content-type", b"text/event-stream"), (b"transfer-encoding", b"chunked")],
                             FRAMING_CHUNKED)]
    assert bytes(events.body) == b"data: x\n\n" and events.completed == 1
    assert parser.keep_alive


@given(st.lists(st.integers(min_value=1, max_value=len(CHUNKED)), max_size=12))
@settings(max_examples=200, deadline=None)
def test_any_split_gives_the_whole_body_once(cuts: list[int]):
    parser, events = codec()
    start = 0
    for cut in sorted(set(cuts)):
        parser.feed(CHUNKED[start:cut])
        start = cut
    parser.feed(CHUNKED[start:])
    assert bytes(events.body) == b"data: x\n\n" and events.completed == 1


@pytest.mark.parametrize(("response", "is_head", "framing"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", False, FRAMING_LENGTH),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", False, FRAMING_CHUNKED),
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close", False, FRAMING_CLOSE),
    (b"HTTP/1.1 204 No Content\r\n\r\n", False, FRAMING_NONE),
    (b"HTTP/1.1 304 Not Modified\r\n\r\n", False, FRAMING_NONE),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", True, FRAMING_NONE),
])
def test_framing_of_the_body(response: bytes, is_head: bool, framing: int):
    parser, events = codec(is_head=is_head)
    parser.feed(response)
    assert events.heads[0][2] == framing == parser.framing


def test_the_next_response_starts_with_no_body_piece_of_the_last_left_in_the_list():
    parser, events = codec()
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")  # its body never taken
    assert parser.body == [b"hello"]
    events.expect(parser)
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbye")
    assert events.body == b"bye" and events.completed == 2


def test_informational_heads_are_skipped_and_the_real_one_follows():
    parser, events = codec()
    parser.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    assert [head[0] for head in events.heads] == [200]
    assert events.heads[0][1] == [(b"content-length", b"1")]  # the hint's headers are not carried over
    assert bytes(events.body) == b"x" and events.completed == 1


def _head_of_size(size: int) -> bytes:
    """A response head of exactly `size` bytes as the limit measures them (status and header lines)."""
    base = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Pad: \r\n"
    return base.replace(b"X-Pad: ", b"X-Pad: " + b"a" * (size - len(base))) + b"\r\n"


def test_a_head_at_the_limit_passes_and_one_byte_over_is_refused():
    parser, events = codec()
    parser.feed(_head_of_size(LIMIT))
    assert events.heads and events.completed == 1
    parser, events = codec()
    with pytest.raises(ResponseError, match="over 4096"):
        parser.feed(_head_of_size(LIMIT + 1))
    assert not events.heads


def test_one_byte_over_is_refused_however_it_arrives():
    data = _head_of_size(LIMIT + 1)
    parser, events = codec()
    with pytest.raises(ResponseError):
        for i in range(0, len(data), 7):
            parser.feed(data[i:i + 7])
    assert not events.heads


def test_a_header_line_that_never_ends_is_refused_within_a_slice_of_the_limit():
    parser, _ = codec()
    parser.feed(b"HTTP/1.1 200 OK\r\nX-Endless: ")
    fed = 0
    with pytest.raises(ResponseError, match="over 4096"):
        while True:
            parser.feed(b"a" * 512)
            fed += 512
    assert fed <= LIMIT + LIMIT // 4  # what the parser may have buffered stays bounded


def test_a_huge_read_is_measured_in_slices():
    parser, _ = codec()
    with pytest.raises(ResponseError):
        parser.feed(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 10_000_000 + b"\r\n\r\n")


def test_body_bytes_do_not_count_against_the_head_limit():
    body = b"x" * (LIMIT * 10)
    parser, events = codec()
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
    assert bytes(events.body) == body and events.completed == 1


def test_each_response_on_a_kept_connection_is_measured_on_its_own():
    parser, events = codec()
    for _ in range(3):
        events.expect(parser)
        parser.feed(_head_of_size(LIMIT))
    assert events.completed == 3


@pytest.mark.parametrize(("data", "match"), [
    (b"HTTX/1.1 200 OK\r\n\r\n", "malformed"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "malformed"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", "switched protocols"),
])
def test_malformed_responses_raise(data: bytes, match: str):
    parser, _ = codec()
    with pytest.raises(ResponseError, match=match):
        parser.feed(data)


def test_trailer_fields_are_not_headers():
    parser, events = codec()
    parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nX-Trailer: t\r\n\r\n")
    assert events.heads[0][1] == [(b"transfer-encoding", b"chunked")] and events.completed == 1
