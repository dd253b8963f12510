"""Header rewriting (llmproxy/http11/headers.py): the request sent upstream, the response head relayed back,
the proxy's own responses and the Connection line. Bytes in, bytes out, without sockets.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from llmproxy.http11.headers import HeaderRules, connection_line, local_response, response_head
from llmproxy.http11.request import RequestHead
from llmproxy.http11.wire import HOP_BY_HOP

PEER = "203.0.113.7"
REQUEST_ID = b"rid-0001"


@dataclass
class Upstream:
    base_path: bytes = b""
    host_header: bytes = b"backend:8000"


def request(*headers: tuple[bytes, bytes], method: bytes = b"POST", target: bytes = b"/v1/chat/completions",
            version: str = "1.1", connection_tokens: frozenset[bytes] = frozenset()) -> RequestHead:
    """A request head as the codec makes one: lower-case names, in arrival order."""
    return RequestHead(method, target, version, [(b"host", b"proxy.example"), *headers], b"proxy.example", None,
                       False, True, False, connection_tokens=connection_tokens)


def split(message: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """The first line, the header fields and the body of a message; checks the framing on the way."""
    head, blank, body = message.partition(b"\r\n\r\n")
    assert blank, message
    first, *lines = head.split(b"\r\n")
    fields = []
    for line in lines:
        name, colon, value = line.partition(b": ")
        assert colon and name and name == name.lower(), line
        fields.append((name, value))
    return first, fields, body


def upstream(head: RequestHead, body: bytes = b"", *, peer: str = PEER, rules: HeaderRules | None = None,
             to: Upstream | None = None, **options) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    sent = (rules or HeaderRules()).upstream_request(head, peer, REQUEST_ID, to or Upstream(), body, **options)
    return split(sent)


def values(fields: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for n, value in fields if n == name]


# --- the request sent upstream ------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "base_path", "target", "line"), [
    (b"POST", b"", b"/v1/chat/completions", b"POST /v1/chat/completions HTTP/1.1"),
    (b"GET", b"", b"/v1/models?limit=5", b"GET /v1/models?limit=5 HTTP/1.1"),
    (b"POST", b"/openai", b"/v1/completions", b"POST /openai/v1/completions HTTP/1.1"),
    (b"GET", b"/a/b", b"/v1/models?x=1", b"GET /a/b/v1/models?x=1 HTTP/1.1"),
])
def test_the_request_line_prefixes_the_base_path(method: bytes, base_path: bytes, target: bytes, line: bytes):
    first, _, _ = upstream(request(method=method, target=target), to=Upstream(base_path=base_path))
    assert first == line


def test_an_http10_client_is_forwarded_as_http11():
    first, _, _ = upstream(request(version="1.0"))
    assert first.endswith(b" HTTP/1.1")


def test_host_is_the_backends_own_and_comes_first():
    _, fields, _ = upstream(request((b"accept", b"*/*")), to=Upstream(host_header=b"[::1]:9000"))
    assert fields[0] == (b"host", b"[::1]:9000")
    assert values(fields, b"host") == [b"[::1]:9000"]


# Each is sent by the client with a value it must not reach the backend with.
NOT_FORWARDED = [
    (b"connection", b"keep-alive"), (b"keep-alive", b"timeout=5"), (b"proxy-connection", b"keep-alive"),
    (b"te", b"trailers"), (b"trailer", b"x-checksum"), (b"transfer-encoding", b"chunked"), (b"upgrade", b"h2c"),
    (b"proxy-authenticate", b"Basic"), (b"proxy-authorization", b"Basic dXNlcjpwYXNz"),
    (b"host", b"client.example"), (b"content-length", b"999"), (b"expect", b"100-continue"),
    (b"authorization", b"Bearer sk-client-secret"), (b"x-api-key", b"sk-client-secret"),
    (b"x-request-id", b"client-chosen-id"), (b"x-forwarded-for", b"198.51.100.99"),
]


@pytest.mark.parametrize(("name", "value"), NOT_FORWARDED, ids=[n.decode() for n, _ in NOT_FORWARDED])
def test_hop_by_hop_framing_and_credential_headers_are_not_forwarded(name: bytes, value: bytes):
    sent = HeaderRules().upstream_request(request((name, value), (b"accept", b"*/*")), PEER, REQUEST_ID,
                                          Upstream(), b"{}")
    assert value not in sent
    _, fields, _ = split(sent)
    assert (b"accept", b"*/*") in fields


def test_headers_listed_in_connection_are_hop_by_hop_too():
    head = request((b"connection", b"keep-alive, x-hop-one, X-Hop-Two"), (b"x-hop-one", b"1"), (b"x-hop-two", b"2"),
                   (b"x-end-to-end", b"3"), connection_tokens=frozenset({b"keep-alive", b"x-hop-one", b"x-hop-two"}))
    _, fields, _ = upstream(head)
    names = [name for name, _ in fields]
    assert b"x-hop-one" not in names and b"x-hop-two" not in names and b"connection" not in names
    assert (b"x-end-to-end", b"3") in fields


def test_other_headers_are_forwarded_unchanged_and_in_order():
    carried = [(b"content-type", b"application/json"), (b"accept", b"text/event-stream"),
               (b"user-agent", b"OpenAI/Python 1.40.0"), (b"openai-organization", b"org-1"), (b"accept", b"*/*"),
               (b"x-custom", b"  spaced value  ")]
    _, fields, _ = upstream(request(*carried))
    assert [f for f in fields if f[0] not in (b"host", b"x-request-id", b"x-forwarded-for", b"content-length")] \
        == carried


@pytest.mark.parametrize("name", [b"x-llmproxy-key-id", b"x-llmproxy-cost", b"x-llmproxy-"])
def test_headers_in_the_proxys_own_namespace_are_never_forwarded(name: bytes):
    _, fields, _ = upstream(request((name, b"forged"), (b"x-llmproxy", b"not ours")))
    assert values(fields, name) == [] and values(fields, b"x-llmproxy") == [b"not ours"]


@pytest.mark.parametrize(("trusted", "kept"), [((), False), (("198.51.100.0/24",), False), ((PEER,), True)])
def test_claims_of_where_a_request_comes_from_are_kept_only_from_a_trusted_proxy(trusted, kept: bool):
    rules = HeaderRules(trusted_proxies=trusted)
    head = request((b"forwarded", b"for=203.0.113.9"), (b"x-real-ip", b"203.0.113.9"))
    _, fields, _ = upstream(head, rules=rules)
    expected = [[b"for=203.0.113.9"], [b"203.0.113.9"]] if kept else [[], []]
    assert [values(fields, b"forwarded"), values(fields, b"x-real-ip")] == expected


@pytest.mark.parametrize("name", [b"x-custom-key", b"x-team-token"])
def test_auth_header_names_are_never_forwarded(name: bytes):
    head = request((name, b"sk-client-secret"))
    assert b"sk-client-secret" in HeaderRules().upstream_request(head, PEER, REQUEST_ID, Upstream(), b"")
    rules = HeaderRules(credential_headers=frozenset({b"x-custom-key", b"x-team-token"}))
    assert b"sk-client-secret" not in rules.upstream_request(head, PEER, REQUEST_ID, Upstream(), b"")


def test_the_request_id_is_the_one_given_and_only_it():
    _, fields, _ = upstream(request((b"x-request-id", b"client-id")))
    assert values(fields, b"x-request-id") == [REQUEST_ID]


@pytest.mark.parametrize(("credential", "authorization", "api_key"), [
    (b"authorization: Bearer sk-backend\r\n", [b"Bearer sk-backend"], []),
    (b"x-api-key: sk-backend\r\n", [], [b"sk-backend"]),  # Anthropic's API
    (b"", [], []),
])
def test_the_backend_gets_its_own_credential_or_none(credential: bytes, authorization: list[bytes],
                                                     api_key: list[bytes]):
    head = request((b"authorization", b"Bearer sk-client"), (b"x-api-key", b"sk-client"))
    _, fields, _ = upstream(head, credential=credential)
    assert values(fields, b"authorization") == authorization
    assert values(fields, b"x-api-key") == api_key


def test_a_translated_request_goes_to_the_backend_apis_path_uncompressed():
    head = request((b"accept-encoding", b"gzip, deflate"), (b"anthropic-version", b"2023-06-01"),
                   target=b"/v1/messages")
    line, fields, _ = upstream(head, target=b"/v1/chat/completions", skip=frozenset({b"accept-encoding"}))
    assert line == b"POST /v1/chat/completions HTTP/1.1"
    assert values(fields, b"accept-encoding") == [] and values(fields, b"anthropic-version") == [b"2023-06-01"]


# (trusted_proxies, peer, the client's X-Forwarded-For headers, what the backend gets)
FORWARDED_FOR = [
    ((), PEER, [], PEER.encode()),
    ((), PEER, [b"198.51.100.1"], PEER.encode()),  # nobody is trusted: a forged chain is replaced
    (("10.0.0.0/8",), "192.168.1.1", [b"198.51.100.1"], b"192.168.1.1"),  # not a trusted proxy
    (("10.0.0.0/8",), "10.1.2.3", [b"198.51.100.1"], b"198.51.100.1, 10.1.2.3"),  # a proxy in front: appended
    (("10.0.0.0/8",), "10.1.2.3", [b"198.51.100.1, 10.9.9.9"], b"198.51.100.1, 10.9.9.9, 10.1.2.3"),
    (("10.0.0.0/8",), "10.1.2.3", [b"198.51.100.1", b"10.9.9.9"], b"198.51.100.1, 10.9.9.9, 10.1.2.3"),
    (("10.0.0.0/8",), "10.1.2.3", [], b"10.1.2.3"),  # a trusted peer that sent none
    (("10.1.2.3",), "10.1.2.3", [b"198.51.100.1"], b"198.51.100.1, 10.1.2.3"),  # a single IPv4 address
    (("10.1.2.3",), "10.1.2.4", [b"198.51.100.1"], b"10.1.2.4"),
    (("10.1.2.3/8",), "10.200.0.1", [b"198.51.100.1"], b"198.51.100.1, 10.200.0.1"),  # host bits are ignored
    (("2001:db8::/32",), "2001:db8::17", [b"198.51.100.1"], b"198.51.100.1, 2001:db8::17"),  # IPv6 CIDR
    (("2001:db8::/32",), "2001:db9::17", [b"198.51.100.1"], b"2001:db9::17"),
    (("::1",), "::1", [b"198.51.100.1"], b"198.51.100.1, ::1"),  # a single IPv6 address
    (("10.0.0.0/8",), "::1", [b"198.51.100.1"], b"::1"),  # an IPv6 peer is in no IPv4 range
    (("::/0",), "10.1.2.3", [b"198.51.100.1"], b"10.1.2.3"),  # nor an IPv4 peer in an IPv6 one
    (("10.0.0.0/8", "2001:db8::/32"), "2001:db8::1", [b"a"], b"a, 2001:db8::1"),  # any of several
    (("10.0.0.0/8",), "not-an-address", [b"198.51.100.1"], b"not-an-address"),
]


@pytest.mark.parametrize(("trusted", "peer", "client", "forwarded"), FORWARDED_FOR)
def test_x_forwarded_for_is_replaced_unless_the_peer_is_a_trusted_proxy(trusted, peer, client, forwarded):
    rules = HeaderRules(trusted_proxies=trusted)
    _, fields, _ = upstream(request(*[(b"x-forwarded-for", value) for value in client]), peer=peer, rules=rules)
    assert values(fields, b"x-forwarded-for") == [forwarded]


@pytest.mark.parametrize(("trusted", "peer", "is_trusted"), [
    ((), "10.1.2.3", False),
    (("10.0.0.0/8",), "10.1.2.3", True),
    (("10.0.0.0/8",), "11.1.2.3", False),
    (("192.0.2.7",), "192.0.2.7", True),
    (("192.0.2.7",), "192.0.2.8", False),
    (("fd00::/8",), "fd12::1", True),
    (("fd00::/8",), "fe80::1", False),
    (("10.0.0.0/8",), "", False),
    (("10.0.0.0/8",), "garbage", False),
])
def test_a_trusted_proxy_is_a_peer_in_a_trusted_network(trusted: tuple[str, ...], peer: str, is_trusted: bool):
    assert HeaderRules(trusted_proxies=trusted).is_trusted_proxy(peer) is is_trusted


# (method, body, the client's framing headers, the Content-Length sent or None)
CONTENT_LENGTH = [
    (b"POST", b'{"model": "m"}', [], b"14"),
    (b"POST", b"", [], b"0"),  # a body method always says how long its body is
    (b"PUT", b"", [], b"0"),
    (b"PATCH", b"xyz", [], b"3"),
    (b"GET", b"", [], None),
    (b"HEAD", b"", [], None),
    (b"DELETE", b"", [], None),
    (b"OPTIONS", b"", [], None),
    (b"GET", b"ab", [], b"2"),  # any method with a body
    (b"DELETE", b"abcd", [], b"4"),
    (b"POST", b"12345", [(b"content-length", b"999")], b"5"),  # the length read, not the one claimed
    (b"POST", b"12345", [(b"transfer-encoding", b"chunked")], b"5"),  # the body was read whole: no chunks
]


@pytest.mark.parametrize(("method", "body", "framing", "length"), CONTENT_LENGTH)
def test_content_length_is_recomputed_from_the_body(method: bytes, body: bytes, framing: list, length: bytes | None):
    _, fields, sent_body = upstream(request(*framing, method=method), body)
    assert values(fields, b"content-length") == ([] if length is None else [length])
    assert values(fields, b"transfer-encoding") == []
    assert sent_body == body


def test_the_body_follows_the_head_whole():
    body = b'{"a": "\r\n\r\n"}'
    sent = HeaderRules().upstream_request(request(), PEER, REQUEST_ID, Upstream(), body)
    assert sent.endswith(b"\r\n\r\n" + body) and sent.count(body) == 1


# --- the response head relayed to the client ----------------------------------------------------------------


def relayed(headers: list[tuple[bytes, bytes]], status: int = 200, *, keeps_length: bool = True,
            chunked: bool = False, streaming: bool = False, extra: bytes = b"",
            connection: bytes = b"") -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    head = response_head(status, headers, keeps_length=keeps_length, chunked=chunked, streaming=streaming,
                         request_id=REQUEST_ID, extra=extra, connection=connection)
    first, fields, rest = split(head)
    assert rest == b""  # a head only, ending with its blank line
    return first, fields, head


@pytest.mark.parametrize(("status", "line"), [
    (200, b"HTTP/1.1 200 OK"), (404, b"HTTP/1.1 404 Not Found"), (429, b"HTTP/1.1 429 Too Many Requests"),
    (503, b"HTTP/1.1 503 Service Unavailable"), (599, b"HTTP/1.1 599 Unknown"),
])
def test_the_status_line_is_http11_with_the_reason(status: int, line: bytes):
    assert relayed([], status)[0] == line


@pytest.mark.parametrize("name", sorted(HOP_BY_HOP))
def test_hop_by_hop_response_headers_are_dropped(name: bytes):
    _, fields, _ = relayed([(name, b"backend-value"), (b"content-type", b"application/json")])
    assert all(value != b"backend-value" for _, value in fields)
    assert (b"content-type", b"application/json") in fields


def test_response_headers_listed_in_connection_are_dropped():
    headers = [(b"connection", b"close, X-Backend-Hop"), (b"x-backend-hop", b"1"), (b"x-kept", b"2")]
    _, fields, _ = relayed(headers)
    names = [name for name, _ in fields]
    assert b"x-backend-hop" not in names and b"connection" not in names and (b"x-kept", b"2") in fields


@pytest.mark.parametrize(("keeps_length", "chunked", "content_length", "transfer_encoding"), [
    (True, False, [b"42"], []),  # the backend's length still holds
    (False, True, [], [b"chunked"]),  # re-framed: the proxy chunks it
    (False, False, [], []),  # re-framed by closing the connection
])
def test_content_length_is_kept_only_while_the_length_holds(keeps_length, chunked, content_length, transfer_encoding):
    headers = [(b"content-length", b"42"), (b"transfer-encoding", b"gzip")]
    _, fields, _ = relayed(headers, keeps_length=keeps_length, chunked=chunked)
    assert values(fields, b"content-length") == content_length
    assert values(fields, b"transfer-encoding") == transfer_encoding


@pytest.mark.parametrize(("backend_sent", "relayed_ids"), [
    ([], [REQUEST_ID]),
    ([(b"x-request-id", b"backend-id")], [b"backend-id"]),
])
def test_x_request_id_is_added_unless_the_backend_sent_one(backend_sent: list, relayed_ids: list[bytes]):
    _, fields, _ = relayed(backend_sent)
    assert values(fields, b"x-request-id") == relayed_ids


# (streaming, the backend's headers, cache-control sent, x-accel-buffering sent)
STREAMING_HINTS = [
    (True, [], [b"no-cache"], [b"no"]),
    (True, [(b"cache-control", b"no-store")], [b"no-store"], [b"no"]),
    (True, [(b"x-accel-buffering", b"yes")], [b"no-cache"], [b"yes"]),
    (True, [(b"cache-control", b"private"), (b"x-accel-buffering", b"no")], [b"private"], [b"no"]),
    (False, [], [], []),
    (False, [(b"cache-control", b"max-age=60")], [b"max-age=60"], []),
]


@pytest.mark.parametrize(("streaming", "headers", "cache_control", "accel"), STREAMING_HINTS)
def test_a_stream_tells_buffering_layers_to_pass_it_through_unless_the_backend_said(streaming, headers,
                                                                                     cache_control, accel):
    _, fields, _ = relayed(headers, streaming=streaming)
    assert values(fields, b"cache-control") == cache_control
    assert values(fields, b"x-accel-buffering") == accel


def test_extra_lines_framing_and_connection_close_the_head_in_that_order():
    extra = b"x-ratelimit-limit-requests: 5\r\nserver-timing: proxy;dur=0.4\r\n"
    _, fields, head = relayed([(b"content-type", b"text/event-stream")], keeps_length=False, chunked=True,
                              extra=extra, connection=b"connection: close\r\n")
    assert fields[-4:] == [(b"x-ratelimit-limit-requests", b"5"), (b"server-timing", b"proxy;dur=0.4"),
                           (b"transfer-encoding", b"chunked"), (b"connection", b"close")]
    assert head.endswith(extra + b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n")


@pytest.mark.parametrize("connection", [b"", b"connection: close\r\n", b"connection: keep-alive\r\n"])
def test_the_connection_line_is_the_proxys_not_the_backends(connection: bytes):
    _, fields, _ = relayed([(b"connection", b"upgrade")], connection=connection)
    assert values(fields, b"connection") == ([connection.split(b": ")[1].strip()] if connection else [])


def test_end_to_end_response_headers_are_relayed_unchanged_and_in_order():
    carried = [(b"content-type", b"application/json"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"),
               (b"x-ratelimit-remaining", b"7"), (b"content-length", b"10")]
    _, fields, _ = relayed(carried)
    assert fields[:len(carried)] == carried


# --- local responses and the Connection line ----------------------------------------------------------------


@pytest.mark.parametrize("with_body", [True, False])
def test_a_local_response_is_complete_and_a_head_request_gets_its_head_only(with_body: bool):
    body = b'{"error": {"message": "nope"}}'
    message = local_response(401, b"application/json", body, request_id=REQUEST_ID,
                             extra=b'www-authenticate: Bearer realm="llmproxy"\r\n',
                             connection=b"connection: close\r\n", with_body=with_body)
    first, fields, sent_body = split(message)
    assert first == b"HTTP/1.1 401 Unauthorized"
    assert fields == [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                      (b"x-request-id", REQUEST_ID), (b"www-authenticate", b'Bearer realm="llmproxy"'),
                      (b"connection", b"close")]
    assert sent_body == (body if with_body else b"")  # HEAD: the length of the body it would have had


def test_a_local_response_without_extra_lines_or_connection():
    first, fields, body = split(local_response(200, b"text/plain", b"ok", request_id=b"r", extra=b"",
                                               connection=b""))
    assert (first, body) == (b"HTTP/1.1 200 OK", b"ok")
    assert fields == [(b"content-type", b"text/plain"), (b"content-length", b"2"), (b"x-request-id", b"r")]


@pytest.mark.parametrize(("keep_alive", "http10", "line"), [
    (False, False, b"connection: close\r\n"),  # the connection ends with this response
    (False, True, b"connection: close\r\n"),
    (True, True, b"connection: keep-alive\r\n"),  # HTTP/1.0 closes by default: say it stays
    (True, False, b""),  # HTTP/1.1 keeps it by default: nothing to say
])
def test_connection_line(keep_alive: bool, http10: bool, line: bytes):
    assert connection_line(keep_alive, http10) == line
