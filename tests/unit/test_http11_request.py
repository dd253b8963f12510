"""The request codec, driven with bytes only (no sockets): whole, byte by byte, and fuzzed."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmproxy.http11.request import CodecLimits, ProtocolError, RequestCodec


class Sink:
    def __init__(self) -> None:
        self.events: list = []

    def on_request_head(self, head) -> None:
        self.events.append(("head", head.method, head.target, head.version, head.keep_alive))

    def on_request_body(self, data: bytes) -> None:
        if self.events and self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + data)
        else:
            self.events.append(("body", data))

    def on_request_complete(self) -> None:
        self.events.append(("done",))


def feed(payload: bytes, bytewise: bool = False, limits: CodecLimits | None = None) -> list:
    sink = Sink()
    codec = RequestCodec(sink, limits or CodecLimits())
    pieces = [payload[i:i + 1] for i in range(len(payload))] if bytewise else [payload]
    for piece in pieces:
        codec.feed(piece)
    return sink.events


GOOD = [
    (b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n",
     [("head", b"GET", b"/v1/models", "1.1", True), ("done",)]),
    (b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
     [("head", b"POST", b"/v1/x", "1.1", True), ("body", b"abc"), ("done",)]),
    (b"POST /v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\n\r\n",
     [("head", b"POST", b"/v1/x", "1.1", True), ("body", b"abc"), ("done",)]),
    (b"GET / HTTP/1.0\r\n\r\n", [("head", b"GET", b"/", "1.0", False), ("done",)]),
    (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", [("head", b"GET", b"/", "1.1", False), ("done",)]),
    (b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n",
     [("head", b"GET", b"/a", "1.1", True), ("done",), ("head", b"GET", b"/b", "1.1", True), ("done",)]),
    # curl --http2 on plain http: served as HTTP/1.1, the pipelined request after it still parses.
    (b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: x\r\n\r\n"
     b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n",
     [("head", b"GET", b"/a", "1.1", True), ("done",), ("head", b"GET", b"/b", "1.1", True), ("done",)]),
]


@pytest.mark.parametrize("bytewise", [False, True])
@pytest.mark.parametrize(("payload", "expected"), GOOD)
def test_well_formed_requests_give_the_same_events_whole_and_bytewise(payload, expected, bytewise):
    assert feed(payload, bytewise) == expected


def test_trailing_garbage_after_a_good_request_is_rejected_after_its_events():
    sink = Sink()
    codec = RequestCodec(sink, CodecLimits())
    with pytest.raises(ProtocolError):
        codec.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\x00garbage\r\n\r\n")
    assert sink.events == [("head", b"GET", b"/", "1.1", True), ("done",)]
    with pytest.raises(ProtocolError):
        codec.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")  # a dead codec stays dead


@pytest.mark.parametrize(("payload", "status"), [
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 2000 + b"\r\n\r\n", 431),
    (b"GET /" + b"a" * 600 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n", 413),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n" + b"a" * 4096 + b"\r\n", 413),
])
@pytest.mark.parametrize("bytewise", [False, True])
def test_limits_are_answered_as_soon_as_crossed(payload, status, bytewise):
    limits = CodecLimits(max_header_size=1024, max_request_line=512, max_body_size=4000)
    with pytest.raises(ProtocolError) as raised:
        feed(payload, bytewise, limits)
    assert raised.value.spec.status == status


@pytest.mark.parametrize(("target", "canonical"), [
    (b"/v1//chat/completions", b"/v1/chat/completions"),
    (b"/health/../v1/chat/completions?x=1", b"/v1/chat/completions?x=1"),
    (b"/%68ealth", b"/health"),
])
def test_the_head_carries_the_canonical_target(target: bytes, canonical: bytes):
    events = feed(b"GET %b HTTP/1.1\r\nHost: a\r\n\r\n" % target)
    assert events[0][2] == canonical


@pytest.mark.parametrize(("request_line", "status", "code"), [
    (b"GET /v1%2fchat HTTP/1.1", 400, "invalid_path"),
    (b"GET /v1/chat;x HTTP/1.1", 400, "invalid_path"),
    (b"GET /v1/chat#frag HTTP/1.1", 400, "invalid_path"),
    (b"GET /v1/%2e%2e/x HTTP/1.1", 400, "invalid_path"),
])
@pytest.mark.parametrize("bytewise", [False, True])
def test_a_target_without_a_canonical_form_is_a_400(request_line: bytes, status: int, code: str, bytewise: bool):
    with pytest.raises(ProtocolError) as raised:
        feed(request_line + b"\r\nHost: a\r\n\r\n", bytewise)
    assert (raised.value.spec.status, raised.value.spec.code) == (status, code)


@pytest.mark.parametrize("upgrade", [b"websocket", b"WebSocket", b"foo/1.0"])
def test_a_protocol_upgrade_is_not_supported(upgrade: bytes):
    with pytest.raises(ProtocolError) as raised:
        feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: %b\r\n\r\n" % upgrade)
    assert (raised.value.spec.status, raised.value.spec.code) == (501, "upgrade_not_supported")


@pytest.mark.parametrize(("payload", "target"), [
    # Refused once the head is read: the refusal says which target it was for (its answer speaks that API).
    (b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n",
     b"/v1/messages?beta=true"),
    (b"GET /v1//messages HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
     b"/v1/messages"),
    (b"POST /v1/messages HTTP/1.1\r\n\r\n", b"/v1/messages"),  # no Host
    # Refused before the head could be read: no target to speak of.
    (b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 2000 + b"\r\n\r\n", None),
    (b"GET /v1/%2e%2e/messages HTTP/1.1\r\nHost: a\r\n\r\n", None),
    (b"NOT HTTP\r\n\r\n", None),
])
def test_a_refusal_carries_the_canonical_target_once_the_head_was_read(payload: bytes, target: bytes | None):
    with pytest.raises(ProtocolError) as raised:
        feed(payload, limits=CodecLimits(max_header_size=1024, max_body_size=4000))
    assert raised.value.target == target


def test_a_head_that_never_ends_is_cut_before_memory_grows():
    codec = RequestCodec(Sink(), CodecLimits(max_header_size=4096))
    codec.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: ")
    with pytest.raises(ProtocolError) as raised:
        for _ in range(100):
            codec.feed(b"a" * 1024)  # no CRLF ever: httptools would buffer it all
    assert raised.value.spec.status == 431


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=64))
def test_fuzz_any_bytes_parse_or_raise_protocol_error(data, split):
    codec = RequestCodec(Sink(), CodecLimits(max_header_size=512, max_request_line=256, max_body_size=256))
    try:
        for i in range(0, len(data), split):
            codec.feed(data[i:i + split])
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([
    b"GET ", b"POST ", b"/v1/x", b" HTTP/1.1", b" HTTP/1.0", b"\r\n", b"\n", b"Host: a", b"Content-Length: 3",
    b"Transfer-Encoding: chunked", b"abc", b"0\r\n\r\n", b"3\r\n", b": ", b" ", b"\x00", b"Expect: 100-continue",
]), max_size=30))
def test_fuzz_http_like_token_soup_parses_or_raises_protocol_error(tokens):
    codec = RequestCodec(Sink(), CodecLimits())
    with contextlib.suppress(ProtocolError):
        codec.feed(b"".join(tokens))
