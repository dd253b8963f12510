"""Hostile HTTP/1.1 clients end to end, beyond the table of tests/e2e/test_malformed.py (not repeated here).

Every case checks the answer it must get *and* what must not happen: the backend receiving anything, a
second answer, the connection staying open, the answer waiting for bytes the proxy must not wait for.
Rejection cases are fed whole and one byte at a time. Every test ends with the invariants: nothing in
flight, no pooled connection checked out, no rate-limit slot held, open file descriptors back to baseline.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llmproxy.errors import ERRORS
from tests.support import (
    NO_PERIODIC_PROBES,
    Proc,
    assert_idle,
    mock_stats,
    open_fds,
    post_request,
    raw_connect,
    recv_until_closed,
    rss_kib,
    start_proxy,
    wait_steady,
)

HEAD_LIMIT, LINE_LIMIT, BODY_LIMIT = 4096, 1024, 65536
LIMITS = {"max_header_size": HEAD_LIMIT, "max_request_line": LINE_LIMIT, "max_body_size": BODY_LIMIT}
CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":2}'
CHAT_REQUEST = post_request("/v1/chat/completions", CHAT)  # well formed and forwarded: the backend counts it
READ_TIMEOUT = 5.0  # every read is bounded: a proxy that waits for bytes it must not wait for fails the test


# Processes --------------------------------------------------------------------------------------------

@dataclass
class Served:
    proxy: Proc
    mock: Proc
    fd_baseline: int

    def backend_requests(self) -> int:
        return mock_stats(self.mock)["requests_total"]

    def assert_idle(self) -> None:
        assert self.proxy.popen.poll() is None, "the proxy died:\n" + self.proxy.text()
        assert_idle(self.proxy, self.fd_baseline)


def serve(tmp_path: Path, mock: Proc, server: dict | None = None, **sections: dict) -> Served:
    """Start a proxy in front of `mock`, warm it up with one forwarded request, and take its fd baseline."""
    server = {"listen": "127.0.0.1:0", **LIMITS, **(server or {})}
    proxy = start_proxy(tmp_path, [{"url": mock.url}], server=server, health_check=NO_PERIODIC_PROBES, **sections)
    try:
        headers = {"Connection": "close"}
        if "auth" in sections:
            headers["Authorization"] = f"Bearer {API_KEY}"
        responses = exchange(proxy.port, post_request("/v1/chat/completions", CHAT, headers))
        assert [r.status for r in responses] == [200], responses
        # The start-up probes (type detection, health, model list) are over once the counter stops moving;
        # that takes long enough for the warm-up connection's fd to be closed too.
        wait_steady(lambda: mock_stats(mock)["requests_total"], timeout=10.0)
        return Served(proxy, mock, open_fds(proxy.pid))
    except BaseException:
        proxy.stop()
        raise


@pytest.fixture(scope="module")
def served(mock_vllm, tmp_path_factory):
    setup = serve(tmp_path_factory.mktemp("hostile"), mock_vllm)
    try:
        yield setup
    finally:
        setup.proxy.stop()


# Wire helpers ------------------------------------------------------------------------------------------

@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def parse_responses(data: bytes) -> list[Response]:
    """Split everything a connection received into complete responses; fail on anything else."""
    responses = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"a partial response head: {head[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        version, status_text, _ = (lines[0] + " ").split(" ", 2)
        assert version == "HTTP/1.1" and status_text.isdigit(), f"bad status line {lines[0]!r}"
        status = int(status_text)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            assert colon and name == name.strip(), f"bad response header line {line!r}"
            headers[name.lower()] = value.strip()
        if 100 <= status < 200 or status in (204, 304):
            body = b""
        elif headers.get("transfer-encoding") == "chunked":
            body, data = _dechunk(data)
        elif "content-length" in headers:
            length = int(headers["content-length"])
            assert len(data) >= length, f"a truncated response body ({len(data)} of {length} bytes)"
            body, data = data[:length], data[length:]
        else:
            body, data = data, b""  # delimited by the close
        responses.append(Response(status, headers, body))
    return responses


def _dechunk(data: bytes) -> tuple[bytes, bytes]:
    parts = []
    while True:
        size_line, sep, data = data.partition(b"\r\n")
        assert sep, "a truncated chunked response"
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            while True:  # trailer section, up to the empty line
                line, sep, data = data.partition(b"\r\n")
                assert sep, "a truncated chunked response"
                if not line:
                    return b"".join(parts), data
        assert len(data) >= size + 2 and data[size:size + 2] == b"\r\n", "a truncated chunked response"
        parts.append(data[:size])
        data = data[size + 2:]


def send_pieces(sock: socket.socket, pieces, interval: float = 0.0, stop_when_answered: bool = True) -> int:
    """Send `pieces` one by one, `interval` apart; stop early once the proxy has answered (or closed).

    Returns how many bytes were sent. Stopping at the answer keeps bytes from arriving after the proxy
    closed (they would make its kernel reset the connection, possibly before we read the answer).
    """
    sent = 0
    for piece in pieces:
        if stop_when_answered:
            readable, _, _ = select.select([sock], [], [], interval)
            if readable:
                break
        elif interval:
            time.sleep(interval)
        try:
            sock.sendall(piece)
        except OSError:  # the proxy answered and closed before the end: that is fine
            break
        sent += len(piece)
    return sent


def bytewise(payload: bytes) -> list[bytes]:
    return [payload[i:i + 1] for i in range(len(payload))]


def exchange(port: int, payload: bytes, one_byte_at_a_time: bool = False,
             stop_when_answered: bool = True) -> list[Response]:
    """Send `payload` and read until the proxy closes the connection (bounded); return the responses."""
    with raw_connect(port, timeout=READ_TIMEOUT) as sock:
        send_pieces(sock, bytewise(payload) if one_byte_at_a_time else [payload],
                    stop_when_answered=stop_when_answered)
        return parse_responses(recv_until_closed(sock))


def read_answer(sock: socket.socket) -> list[Response]:
    """Read until the proxy closes the connection (bounded by the socket timeout)."""
    return parse_responses(recv_until_closed(sock))


def assert_rejected(responses: list[Response], status: int) -> None:
    """Exactly one answer, `status`, OpenAI-shaped, saying the connection closes."""
    assert [r.status for r in responses] == [status], responses
    response = responses[0]
    assert response.headers.get("connection") == "close", response.headers
    error = json.loads(response.body)["error"]
    assert error["code"] in {spec.code for spec in ERRORS.values() if spec.status == status}, error
    assert error["type"] == "invalid_request_error" and error["message"], error


# 1. Malformed requests and smuggling attempts not in test_malformed.py ---------------------------------

_POST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\n"
_CHUNKED = _POST + b"Transfer-Encoding: chunked\r\n\r\n"
_GET = b"GET /v1/models HTTP/1.1\r\n"


def _smuggle(framing: bytes, body: bytes) -> bytes:
    """A request whose body, read with the other framing, would be a second (forwarded) request."""
    return _POST + framing + b"\r\n\r\n" + body + CHAT_REQUEST


HOSTILE = [
    # Content-Length: differing duplicates and lists, signs, decimals, inner spaces, overflow.
    ("cl_duplicate_differing", 400, _POST + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nxx"),
    ("cl_list_differing", 400, _POST + b"Content-Length: 1, 2\r\n\r\nxx"),
    ("cl_negative", 400, _POST + b"Content-Length: -1\r\n\r\nx"),
    ("cl_decimal", 400, _POST + b"Content-Length: 1.0\r\n\r\nx"),
    ("cl_inner_space", 400, _POST + b"Content-Length: 1 1\r\n\r\nx"),
    ("cl_trailing_garbage", 400, _POST + b"Content-Length: 1x\r\n\r\nx"),
    ("cl_overflow", 400, _POST + b"Content-Length: 99999999999999999999999\r\n\r\nx"),
    # Obfuscated Transfer-Encoding: leading whitespace (a folded line, or before the first field), whitespace
    # or a line break before the colon, duplicates, other codings, quoting, parameters, a trailing comma.
    ("te_leading_space_line", 400, _POST + b" Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("te_leading_space_first_field", 400,
     b"POST /v1/chat/completions HTTP/1.1\r\n Transfer-Encoding: chunked\r\nHost: a\r\n\r\n0\r\n\r\n"),
    ("te_space_before_colon", 400, _POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n"),
    ("te_tab_before_colon", 400, _POST + b"Transfer-Encoding\t: chunked\r\n\r\n0\r\n\r\n"),
    ("te_name_broken_by_crlf", 400, _POST + b"Transfer-Encoding\r\n : chunked\r\n\r\n0\r\n\r\n"),
    ("te_vertical_tab", 400, _POST + b"Transfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n"),
    ("te_duplicate_chunked", 400, _POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                                          b"0\r\n\r\n"),
    ("te_chunked_then_identity_field", 400, _POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity"
                                                    b"\r\n\r\n0\r\n\r\n"),
    ("te_trailing_comma", 400, _POST + b"Transfer-Encoding: chunked ,\r\n\r\n0\r\n\r\n"),
    ("te_identity", 501, _POST + b"Transfer-Encoding: identity\r\n\r\n"),
    ("te_gzip_chunked", 501, _POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
    ("te_quoted", 501, _POST + b'Transfer-Encoding: "chunked"\r\n\r\n0\r\n\r\n'),
    ("te_with_parameter", 501, _POST + b"Transfer-Encoding: chunked;q=1\r\n\r\n0\r\n\r\n"),
    ("te_and_cl_on_http10", 400, b"POST /v1/chat/completions HTTP/1.0\r\nHost: a\r\nContent-Length: 5\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("te_identity_on_http10", 501, b"POST /v1/chat/completions HTTP/1.0\r\nTransfer-Encoding: identity\r\n\r\n"),
    ("cl_and_obfuscated_te", 400, _POST + b"Content-Length: 5\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
    # Chunk sizes and terminators.
    ("chunk_size_negative", 400, _CHUNKED + b"-1\r\nx\r\n0\r\n\r\n"),
    ("chunk_size_0x", 400, _CHUNKED + b"0x1\r\nx\r\n0\r\n\r\n"),
    ("chunk_size_plus", 400, _CHUNKED + b"+1\r\nx\r\n0\r\n\r\n"),
    ("chunk_size_overflow", 400, _CHUNKED + b"fffffffffffffffff1\r\nx\r\n0\r\n\r\n"),
    ("chunk_size_trailing_space", 400, _CHUNKED + b"1 \r\nx\r\n0\r\n\r\n"),
    ("chunk_size_leading_space", 400, _CHUNKED + b" 1\r\nx\r\n0\r\n\r\n"),
    ("chunk_size_empty", 400, _CHUNKED + b"\r\nx\r\n0\r\n\r\n"),
    ("chunk_size_bare_lf", 400, _CHUNKED + b"1\nx\r\n0\r\n\r\n"),
    ("chunk_data_bare_lf", 400, _CHUNKED + b"1\r\nx\n0\r\n\r\n"),
    ("chunk_data_bare_cr", 400, _CHUNKED + b"1\r\nx\r0\r\n\r\n"),
    ("chunk_data_overrun", 400, _CHUNKED + b"1\r\nxx\r\n0\r\n\r\n"),
    ("chunk_data_short", 400, _CHUNKED + b"5\r\nab\r\n0\r\n\r\n"),
    ("last_chunk_bare_lf", 400, _CHUNKED + b"1\r\nx\r\n0\r\n\n"),
    ("chunk_extension_nul", 400, _CHUNKED + b"1;a\x00\r\nx\r\n0\r\n\r\n"),
    ("chunk_extension_bare_cr", 400, _CHUNKED + b"1;a\rb\r\nx\r\n0\r\n\r\n"),
    # Bare LF / bare CR where test_malformed.py has none: one line of many, the empty line, inside a value.
    ("bare_lf_after_request_line_only", 400, b"GET /v1/models HTTP/1.1\nHost: a\r\n\r\n"),
    ("bare_lf_ending_the_head", 400, _GET + b"Host: a\r\n\n"),
    ("bare_lf_inside_value", 400, _GET + b"Host: a\r\nX-A: a\nX-B: b\r\n\r\n"),
    ("bare_cr_inside_value", 400, _GET + b"Host: a\r\nX-A: a\rb\r\n\r\n"),
    # obs-fold with a tab, and folding the Host field itself; whitespace before the colon: a tab.
    ("obs_fold_tab", 400, _GET + b"Host: a\r\nX-A: a\r\n\tb\r\n\r\n"),
    ("obs_fold_host", 400, _GET + b"Host: a\r\n b\r\n\r\n"),
    ("tab_before_colon", 400, _GET + b"Host\t: a\r\n\r\n"),
    # NUL and other control bytes elsewhere than a header value; malformed field lines.
    ("nul_in_field_name", 400, _GET + b"Host: a\r\nX-\x00A: b\r\n\r\n"),
    ("nul_in_target", 400, b"GET /v1/mo\x00dels HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("nul_in_method", 400, b"G\x00T /v1/models HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("del_in_value", 400, _GET + b"Host: a\r\nX-A: a\x7fb\r\n\r\n"),
    ("escape_in_value", 400, _GET + b"Host: a\r\nX-A: \x1b[31mred\r\n\r\n"),
    ("field_without_colon", 400, _GET + b"Host: a\r\nX-A b\r\n\r\n"),
    ("empty_field_name", 400, _GET + b"Host: a\r\n: b\r\n\r\n"),
    ("separator_in_field_name", 400, _GET + b"Host: a\r\nX(A): b\r\n\r\n"),
    # Host: duplicates with the same value or another case, on HTTP/1.0; missing on a request with a body.
    ("duplicate_host_same_value", 400, _GET + b"Host: a\r\nHost: a\r\n\r\n"),
    ("duplicate_host_other_case", 400, _GET + b"Host: a\r\nhOST: b\r\n\r\n"),
    ("duplicate_host_http10", 400, b"GET /v1/models HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n"),
    ("missing_host_with_body", 400, b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 1\r\n\r\nx"),
    # Versions: 0.9 spelled out, unknown or malformed ones, HTTP/2 prior knowledge.
    ("http09_version_token", 400, b"GET /v1/models HTTP/0.9\r\nHost: a\r\n\r\n"),
    ("http12", 400, b"GET /v1/models HTTP/1.2\r\nHost: a\r\n\r\n"),  # llhttp: "Invalid HTTP version"
    ("http30", 400, b"GET /v1/models HTTP/3.0\r\nHost: a\r\n\r\n"),
    ("http_1_10", 400, b"GET /v1/models HTTP/1.10\r\nHost: a\r\n\r\n"),
    ("lowercase_version", 400, b"GET /v1/models http/1.1\r\nHost: a\r\n\r\n"),
    ("http2_prior_knowledge", 400, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    # Methods and request targets: CONNECT in origin form, methods we do not serve, asterisk, authority
    # and absolute https forms, whitespace inside the request line.
    ("connect_origin_form", 501, b"CONNECT /v1/models HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("trace", 501, b"TRACE /v1/models HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("propfind", 501, b"PROPFIND /v1/models HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("unknown_method", 400, b"FOO /v1/models HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("lowercase_method", 400, b"get /v1/models HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("asterisk_form", 400, b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("authority_form", 400, b"GET a:443 HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("absolute_https_form", 400, b"POST https://evil/v1/chat/completions HTTP/1.1\r\nHost: evil\r\n"
                                 b"Content-Length: 2\r\n\r\n{}"),
    ("space_inside_target", 400, b"GET /v1/ models HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("tab_after_method", 400, b"GET\t/v1/models HTTP/1.1\r\nHost: a\r\n\r\n"),
    # Other heads the proxy must not guess at.
    ("unsupported_expect", 400, _POST + b"Expect: 200-ok\r\nContent-Length: 2\r\n\r\n{}"),
    ("upgrade_with_chunked_body", 501, _POST + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
                                               b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    # Trailer fields that would change framing or routing if they were merged into the head.
    ("trailer_transfer_encoding", 400, _CHUNKED + b"1\r\nx\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("trailer_content_length", 400, _CHUNKED + b"1\r\nx\r\n0\r\nContent-Length: 100\r\n\r\n"),
    ("trailer_host", 400, _CHUNKED + b"1\r\nx\r\n0\r\nHost: evil\r\n\r\n"),
    # A head over max_header_size however it is made up: here of whitespace that is not part of any value.
    ("head_padded_with_whitespace", 431, _GET + b"Host: a\r\nConnection: close\r\nX-A:" + b" " * 30000
                                         + b"b\r\n\r\n"),
    # Pipelined after a bad one: a well-formed request the backend would count, which must never run.
    ("bad_head_then_forwardable", 400, _GET + b"Host: a\r\nHost: b\r\n\r\n" + CHAT_REQUEST),
    ("bad_chunk_then_forwardable", 400, _CHUNKED + b"zz\r\n\r\n" + CHAT_REQUEST),
    ("bad_trailer_then_forwardable", 400, _CHUNKED + b"2\r\n{}\r\n0\r\nHost: evil\r\n\r\n" + CHAT_REQUEST),
    ("http2_version_then_forwardable", 505, b"GET /v1/models HTTP/2.0\r\nHost: a\r\n\r\n" + CHAT_REQUEST),
    ("trace_then_forwardable", 501, b"TRACE /v1/models HTTP/1.1\r\nHost: a\r\n\r\n" + CHAT_REQUEST),
    ("smuggle_cl_te", 400, _smuggle(b"Content-Length: 5\r\nTransfer-Encoding: chunked", b"0\r\n\r\n")),
    ("smuggle_te_cl", 400, _smuggle(b"Transfer-Encoding: chunked\r\nContent-Length: 5", b"0\r\n\r\n")),
    ("smuggle_obfuscated_te", 400, _smuggle(b"Transfer-Encoding: chunked, x", b"0\r\n\r\n")),
    ("smuggle_te_http10", 400, b"POST /v1/chat/completions HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked"
                               b"\r\n\r\n0\r\n\r\n" + CHAT_REQUEST),
    ("smuggle_upgrade_body", 501, _POST + b"Connection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: "
                                  + str(len(CHAT_REQUEST)).encode() + b"\r\n\r\n" + CHAT_REQUEST),
]


@pytest.mark.parametrize("one_byte_at_a_time", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize(("status", "payload"), [pytest.param(s, p, id=n) for n, s, p in HOSTILE])
def test_hostile_request_is_answered_then_closed_and_never_forwarded(status, payload, one_byte_at_a_time, served):
    before = served.backend_requests()
    responses = exchange(served.proxy.port, payload, one_byte_at_a_time)  # returns once the proxy has closed
    assert_rejected(responses, status)
    assert served.backend_requests() == before, "the backend must receive nothing"
    served.assert_idle()


@pytest.mark.parametrize("one_byte_at_a_time", [False, True], ids=["whole", "bytewise"])
def test_pipelined_good_bad_good_answers_the_first_rejects_the_second_and_never_runs_the_third(
        one_byte_at_a_time, served):
    before = served.backend_requests()
    payload = CHAT_REQUEST + _GET + b"Host : a\r\n\r\n" + CHAT_REQUEST
    responses = exchange(served.proxy.port, payload, one_byte_at_a_time, stop_when_answered=False)
    assert [r.status for r in responses] == [200, 400], responses
    assert json.loads(responses[0].body)["object"] == "chat.completion"
    assert_rejected(responses[1:], 400)
    assert served.backend_requests() == before + 1, "only the request before the bad one may be forwarded"
    served.assert_idle()


# 2. Trailers never become headers --------------------------------------------------------------------

def test_a_chunked_body_reaches_the_backend_with_a_content_length_and_no_framing_headers(served):
    """The control for the trailer cases: what a chunked request becomes upstream."""
    body = CHAT[:13] + b"\r\n" + CHAT[13:]  # whitespace between JSON members; sent in two chunks
    payload = (_POST + b"Transfer-Encoding: chunked\r\nTrailer: Host, Content-Length\r\nConnection: close\r\n\r\n"
               + b"%x\r\n%b\r\n%x\r\n%b\r\n0\r\n\r\n" % (20, body[:20], len(body) - 20, body[20:]))
    before = mock_stats(served.mock)
    responses = exchange(served.proxy.port, payload)
    assert [r.status for r in responses] == [200], responses
    after = mock_stats(served.mock)
    assert after["requests_total"] == before["requests_total"] + 1
    (record,) = [r for r in after["requests"] if r["id"] > max((x["id"] for x in before["requests"]), default=0)]
    names = [name.lower() for name, _ in record["headers"]]
    headers = {name.lower(): value for name, value in record["headers"]}
    assert "transfer-encoding" not in names and "trailer" not in names
    assert names.count("host") == 1 and headers["host"] != "a"
    assert names.count("content-length") == 1 and headers["content-length"] == str(len(body))
    assert record["body"] == body.decode()
    served.assert_idle()


@pytest.mark.parametrize("field", [b"Transfer-Encoding: chunked", b"Content-Length: 100", b"Host: evil",
                                   b"Authorization: Bearer stolen", b"X-Forwarded-For: 10.0.0.1"])
def test_a_trailer_section_arriving_after_the_last_chunk_is_refused_and_nothing_is_forwarded(field, served):
    before = served.backend_requests()
    with raw_connect(served.proxy.port, timeout=READ_TIMEOUT) as sock:
        sock.sendall(_CHUNKED + b"%x\r\n%b\r\n0\r\n" % (len(CHAT), CHAT))
        # The last chunk has arrived, the trailer section has not: the request is not complete yet.
        readable, _, _ = select.select([sock], [], [], 0.3)
        assert not readable, "the proxy must wait for the end of the trailer section"
        assert served.backend_requests() == before
        sock.sendall(field + b"\r\n\r\n" + CHAT_REQUEST)
        assert_rejected(read_answer(sock), 400)
    assert served.backend_requests() == before, "the backend must receive nothing"
    served.assert_idle()


# 3. Fuzzing the real proxy ---------------------------------------------------------------------------

FUZZ_TIMEOUT = 0.3  # request head, body pause and keep-alive: every connection ends on its own, quickly
FUZZ_TOKENS = [
    b"\r\n", b"\n", b"\r", b" ", b"\t", b"\x00", b":", b",", b";", b"-", b"+", b"0x", b"\x7f", b"\xff", b"\r\n\r\n",
    b"chunked", b" HTTP/1.0", b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: identity\r\n",
    b"Content-Length: 7\r\n", b"Content-Length: 0\r\n", b"Host: b\r\n", b"Connection: keep-alive\r\n",
    b"Expect: 100-continue\r\n", b"Connection: Upgrade\r\nUpgrade: h2c\r\n", b"0\r\n\r\n", b"5\r\nhello\r\n",
    b"0\r\nX-Trailer: y\r\n\r\n", b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n", CHAT_REQUEST,
]
FUZZ_BASES = [
    post_request("/v1/chat/completions", CHAT, {"Connection": "close"}),
    _CHUNKED[:-2] + b"Connection: close\r\n\r\n" + b"%x\r\n%b\r\n0\r\n\r\n" % (len(CHAT), CHAT),
]
_position = st.integers(min_value=0, max_value=1000).map(lambda n: n / 1000)  # where, as a fraction
_mutation = st.one_of(
    st.tuples(st.just("replace"), _position, st.one_of(st.sampled_from(FUZZ_TOKENS[:14]),
                                                       st.binary(min_size=1, max_size=1))),
    st.tuples(st.just("insert"), _position, st.sampled_from(FUZZ_TOKENS)),
    st.tuples(st.just("insert_line"), _position, st.sampled_from(FUZZ_TOKENS[17:25])),  # a whole field line
    st.tuples(st.just("delete"), _position, st.integers(min_value=1, max_value=8)),
    st.tuples(st.just("repeat"), _position, st.integers(min_value=1, max_value=40)),
)


def mutate(payload: bytes, mutations) -> bytes:
    for op, where, arg in mutations:
        at = int(where * len(payload))
        if op == "replace":
            payload = payload[:at] + arg + payload[at + 1:]
        elif op == "insert":
            payload = payload[:at] + arg + payload[at:]
        elif op == "insert_line":  # after the request line or a field line: a well-formed hostile head
            ends = [i + 2 for i in range(len(payload) - 1) if payload[i:i + 2] == b"\r\n"] or [0]
            at = ends[int(where * (len(ends) - 1))]
            payload = payload[:at] + arg + payload[at:]
        elif op == "delete":
            payload = payload[:at] + payload[at + arg:]
        else:
            payload = payload[:at] + payload[at:at + arg] + payload[at:]
    return payload


@pytest.fixture(scope="module")
def fuzz_served(mock_vllm, tmp_path_factory):
    timeouts = {"request_head": FUZZ_TIMEOUT, "body": FUZZ_TIMEOUT, "keepalive": FUZZ_TIMEOUT}
    setup = serve(tmp_path_factory.mktemp("fuzz"), mock_vllm, server={"timeouts": timeouts})
    try:
        yield setup
    finally:
        setup.proxy.stop()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(FUZZ_BASES), mutations=st.lists(_mutation, min_size=1, max_size=4),
       piece=st.sampled_from([0, 1, 7, 64]))
def test_fuzz_mutated_requests_get_an_answer_and_a_close_and_reach_the_backend_only_when_accepted(
        base, mutations, piece, fuzz_served):
    """Invariant: complete well-formed responses (2xx, or 4xx/5xx and then nothing), then the proxy closes the
    connection within a bounded time; it stays alive, never answers 500; and every request the backend
    received is one the proxy accepted and answered (its X-Request-Id is on a response the client got)."""
    proxy, mock = fuzz_served.proxy, fuzz_served.mock
    payload = mutate(base, mutations)
    before = mock_stats(mock)
    with raw_connect(proxy.port, timeout=READ_TIMEOUT) as sock:
        pieces = [payload[i:i + piece] for i in range(0, len(payload), piece)] if piece else [payload]
        send_pieces(sock, pieces, stop_when_answered=False)
        received = recv_until_closed(sock)  # socket.timeout here: the proxy hung on to the connection
    responses = [r for r in parse_responses(received) if r.status >= 200]  # 100 Continue is fine
    event("answers: " + (" ".join(str(r.status) for r in responses) or "none"))
    for i, response in enumerate(responses):
        assert 200 <= response.status < 300 or 400 <= response.status < 600, response
        assert response.status != 500, response
        if response.headers.get("connection") == "close":
            assert i == len(responses) - 1, "nothing may follow an answer that closes the connection"
    assert proxy.popen.poll() is None, proxy.text()
    after = mock_stats(mock)
    forwarded = after["requests_total"] - before["requests_total"]
    assert forwarded <= len(responses)
    if forwarded:
        answered_ids = {r.headers.get("x-request-id") for r in responses}
        for record in after["requests"][-forwarded:]:
            request_id = dict((name.lower(), value) for name, value in record["headers"]).get("x-request-id")
            assert request_id in answered_ids, f"the backend got a request nobody was answered for: {record}"
    fuzz_served.assert_idle()  # after every example: a leak is then shrunk to the request that caused it


def test_fuzz_left_the_proxy_healthy(fuzz_served):
    """Runs after the fuzz target: nothing leaked across its examples, and no internal error was logged."""
    fuzz_served.assert_idle()
    assert "Traceback" not in fuzz_served.proxy.text()


# 4. Size limits: answered as soon as crossed, with memory flat -----------------------------------------

def _answer_while_sending(port: int, first: bytes, piece: bytes, count: int, interval: float = 0.01):
    """Send `first`, then `piece` `count` times `interval` apart, stopping once the proxy answers.

    Returns (bytes sent, responses): the answer must come before the client has finished sending.
    """
    with raw_connect(port, timeout=READ_TIMEOUT) as sock:
        sock.sendall(first)
        sent = len(first) + send_pieces(sock, [piece] * count, interval)
        return sent, read_answer(sock)


@pytest.mark.parametrize(("first", "piece"), [
    (_GET + b"Host: a\r\nX-Big: ", b"a" * 256),  # one value that never ends
    (_GET + b"Host: a\r\n", b"".join(b"X-%03d: v\r\n" % i for i in range(24))),  # many small fields
], ids=["long_value", "many_fields"])
def test_header_block_growing_past_the_limit_is_answered_431_before_the_client_finishes(first, piece, served):
    before = served.backend_requests()
    planned = len(first) + 64 * 1024
    sent, responses = _answer_while_sending(served.proxy.port, first, piece, (planned - len(first)) // len(piece))
    assert_rejected(responses, 431)
    assert sent <= HEAD_LIMIT + 16 * len(piece) < planned, f"answered only after {sent} bytes"
    assert served.backend_requests() == before
    served.assert_idle()


def test_request_target_growing_past_the_limit_is_answered_414_before_the_client_finishes(served):
    before = served.backend_requests()
    sent, responses = _answer_while_sending(served.proxy.port, b"GET /v1/", b"a" * 64, 1024)
    assert_rejected(responses, 414)
    assert sent <= LINE_LIMIT + 16 * 64 < 64 * 1024, f"answered only after {sent} bytes"
    assert served.backend_requests() == before
    served.assert_idle()


@pytest.mark.parametrize("expect", [False, True], ids=["plain", "expect_100_continue"])
def test_content_length_over_the_limit_is_answered_413_before_any_body_byte(expect, served):
    before = served.backend_requests()
    head = _POST + (b"Expect: 100-continue\r\n" if expect else b"") + b"Content-Length: %d\r\n\r\n" % (BODY_LIMIT + 1)
    with raw_connect(served.proxy.port, timeout=READ_TIMEOUT) as sock:
        sock.sendall(head)  # and not one body byte
        responses = read_answer(sock)
    assert_rejected(responses, 413)  # and no "100 Continue" before it: the client must not send the body
    assert served.backend_requests() == before
    served.assert_idle()


def test_content_length_at_the_limit_is_read_and_forwarded(served):
    """The boundary: exactly max_body_size is accepted, so the 413 above is the limit and not a guess."""
    body = CHAT[:-1] + b" " * (BODY_LIMIT - len(CHAT)) + b"}"
    before = served.backend_requests()
    with raw_connect(served.proxy.port, timeout=READ_TIMEOUT) as sock:
        sock.sendall(_POST + b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        readable, _, _ = select.select([sock], [], [], 0.3)
        assert not readable, "the proxy must wait for a body within the limit"
        sock.sendall(body)
        responses = read_answer(sock)
    assert [r.status for r in responses] == [200], responses
    assert served.backend_requests() == before + 1
    served.assert_idle()


def test_chunked_body_crossing_the_limit_is_answered_413_before_the_client_finishes(served):
    before = served.backend_requests()
    chunk = b"400\r\n" + b"a" * 1024 + b"\r\n"
    planned = 4 * BODY_LIMIT
    sent, responses = _answer_while_sending(served.proxy.port, _CHUNKED, chunk, planned // 1024)
    assert_rejected(responses, 413)
    body_sent = (sent - len(_CHUNKED)) // len(chunk) * 1024
    assert body_sent <= BODY_LIMIT + 16 * 1024 < planned, f"answered only after {body_sent} body bytes"
    assert served.backend_requests() == before
    served.assert_idle()


def read_within(sock: socket.socket, seconds: float) -> list[Response]:
    """Read until the proxy closes the connection; fail (rather than error) if it takes over `seconds`."""
    sock.settimeout(seconds)
    chunks: list[bytes] = []
    try:
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(65536):
                chunks.append(data)
    except TimeoutError:
        pytest.fail(f"no answer and close within {seconds} s; received so far: {b''.join(chunks)[-300:]!r}")
    return parse_responses(b"".join(chunks))


@pytest.mark.parametrize("one_byte_at_a_time", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("first", [CHAT_REQUEST, _GET + b"Host: a\r\n\r\n"], ids=["after_post", "after_get"])
def test_header_block_over_the_limit_behind_a_pipelined_request_is_answered_431_at_once(
        first, one_byte_at_a_time, served):
    """The bytes of a head that arrive in the same read as the end of the request before it count too."""
    before = served.backend_requests()
    payload = first + _GET + b"Host: a\r\nX-Big: " + b"a" * 30000  # and the head never ends
    with raw_connect(served.proxy.port, timeout=READ_TIMEOUT) as sock:
        send_pieces(sock, bytewise(payload) if one_byte_at_a_time else [payload], stop_when_answered=False)
        responses = read_within(sock, 2.0)  # well before server.timeouts.request_head (10 s) would give 408
    assert [r.status for r in responses] == [200, 431], responses
    assert_rejected(responses[1:], 431)
    assert served.backend_requests() == before + (first is CHAT_REQUEST)
    served.assert_idle()


def test_a_trailer_field_that_never_ends_is_cut_at_the_header_limit_with_memory_flat(served):
    """A trailer section is a header block too: bounded by max_header_size, not buffered without limit."""
    pid = served.proxy.pid
    before = served.backend_requests()
    rss_before = rss_kib(pid)
    with raw_connect(served.proxy.port, timeout=READ_TIMEOUT) as sock:
        sock.sendall(_CHUNKED + b"%x\r\n%b\r\n0\r\nX-Trailer: " % (len(CHAT), CHAT))
        # Up to 24 MiB, 2 ms apart, stopping as soon as the proxy answers (the socket buffers take a few MiB).
        sent = send_pieces(sock, [b"a" * 65536] * 384, interval=0.002)
        grown_kib = rss_kib(pid) - rss_before
        assert sent <= 8 * 1024 * 1024, (f"no answer after {sent} bytes of one trailer field (RSS +{grown_kib} KiB):"
                                         f" the trailer section is not bounded")
        responses = read_answer(sock)
    assert [r.status for r in responses] in ([400], [431]), responses
    assert_rejected(responses, responses[0].status)
    assert grown_kib < 20 * 1024
    assert served.backend_requests() == before
    served.assert_idle()


def _offer(port: int, first: bytes, filler: bytes, total: int) -> int:
    """Send `first`, then `filler` up to `total` bytes or until the proxy cuts the connection; return bytes sent."""
    with raw_connect(port, timeout=READ_TIMEOUT) as sock:
        sent = send_pieces(sock, [first] + [filler] * ((total - len(first)) // len(filler)), stop_when_answered=False)
        with contextlib.suppress(ConnectionResetError):
            recv_until_closed(sock)  # a timeout here: the proxy kept the connection open
        return sent


def _keepalive_round(port: int, payload: bytes, count: int, status: int) -> int:
    """Send `payload` `count` times on one keep-alive connection, each answered `status`; return bytes sent."""
    with raw_connect(port, timeout=READ_TIMEOUT) as sock:
        for _ in range(count):
            sock.sendall(payload)
            buffer = b""
            while b"\r\n\r\n" not in buffer:
                data = sock.recv(65536)
                assert data, "closed mid-round"
                buffer += data
            head, _, rest = buffer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 %d " % status), head
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(rest) < length:
                rest += sock.recv(65536)
    return len(payload) * count


def test_memory_stays_flat_while_tens_of_megabytes_of_head_and_body_bytes_stream_in(served):
    port = served.proxy.port
    mib = 1024 * 1024
    never_ending_head = (_GET + b"Host: a\r\nX-Big: ", b"a" * 65536)
    oversize_chunked = (_CHUNKED, b"ffff\r\n" + b"a" * 0xFFFF + b"\r\n")
    big_head = _GET + b"Host: a\r\n" + b"X-Pad: " + b"p" * (HEAD_LIMIT - 200) + b"\r\n\r\n"
    big_body = CHAT[:-1] + b" " * (BODY_LIMIT - 1024) + b"}"
    big_post = post_request("/v1/chat/completions", big_body)

    def round_(scale: int) -> tuple[int, int]:
        offered = 0
        for _ in range(10 * scale):
            offered += _offer(port, *never_ending_head, total=mib)  # cut at 431
            offered += _offer(port, *oversize_chunked, total=mib)  # cut at 413
        accepted = _keepalive_round(port, big_head, 250 * scale, 200)  # heads just under the limit
        accepted += _keepalive_round(port, big_post, 32 * scale, 200)  # bodies just under the limit, forwarded
        return offered, accepted

    before = served.backend_requests()
    round_(2)  # warm-up: allocator arenas, pools, caches
    served.assert_idle()
    baseline = rss_kib(served.proxy.pid)
    offered, accepted = round_(20)
    served.assert_idle()
    grown_kib = rss_kib(served.proxy.pid) - baseline
    assert accepted >= 50 * mib, accepted  # parsed in full (the cut-off connections come on top)
    assert grown_kib < 20 * 1024, f"RSS grew by {grown_kib} KiB after {(offered + accepted) // mib} MiB"
    assert served.backend_requests() == before + 32 * 22  # only the accepted bodies were forwarded


# 401 before any body byte -----------------------------------------------------------------------------

API_KEY = "sk-hostile-http-key-0123456789"


@pytest.fixture(scope="module")
def auth_served(mock_vllm, tmp_path_factory):
    # A body limit far above the announced lengths: the 401 must come from auth, not from a 413.
    setup = serve(tmp_path_factory.mktemp("auth"), mock_vllm, server={"max_body_size": 1024 * 1024 * 1024},
                  auth={"enabled": True, "keys": [{"key": API_KEY}]})
    try:
        yield setup
    finally:
        setup.proxy.stop()


@pytest.mark.parametrize("framing", [
    b"Content-Length: 500000000",
    b"Transfer-Encoding: chunked",
    b"Expect: 100-continue\r\nContent-Length: 500000000",
    b"Authorization: Bearer sk-wrong-key-0123456789\r\nContent-Length: 500000000",
], ids=["content_length", "chunked", "expect_100_continue", "wrong_key"])
def test_unauthenticated_request_is_answered_401_before_any_body_byte(framing, auth_served):
    before = auth_served.backend_requests()
    with raw_connect(auth_served.proxy.port, timeout=READ_TIMEOUT) as sock:
        sock.sendall(_POST + b"Content-Type: application/json\r\n" + framing + b"\r\n\r\n")  # the head only
        started = time.monotonic()
        responses = read_answer(sock)  # the proxy closes: it will not read the body as a request
        elapsed = time.monotonic() - started
    assert [r.status for r in responses] == [401], responses  # no "100 Continue" first
    response = responses[0]
    assert response.headers.get("connection") == "close"
    assert response.headers.get("www-authenticate", "").startswith("Bearer")
    assert json.loads(response.body)["error"]["code"] == "invalid_api_key"
    assert elapsed < 2.0, "the answer must not wait for the body"
    assert auth_served.backend_requests() == before
    auth_served.assert_idle()
