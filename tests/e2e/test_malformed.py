"""Malformed and smuggling requests: each is answered 400/413/414/431/501/505 and closed, and the backend
receives nothing. Every payload is sent whole and one byte at a time."""

from __future__ import annotations

import contextlib
import json

import pytest

from tests.support import assert_idle, mock_stats, raw_connect, recv_until_closed

BAD_REQUESTS = [
    ("cl_and_te", 400, b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"0\r\n\r\n"),
    ("te_and_cl", 400, b"POST /v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
                       b"0\r\n\r\n"),
    ("duplicate_cl", 400, b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"),
    ("list_cl", 400, b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\nx"),
    ("plus_cl", 400, b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\nx"),
    ("hex_cl", 400, b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 0x1\r\n\r\nx"),
    ("empty_cl", 400, b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\nx"),
    ("xchunked", 501, b"POST /v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
    ("chunked_identity", 400, b"POST /v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
                              b"0\r\n\r\n"),
    ("comma_chunked", 501, b"POST /v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,chunked\r\n\r\n0\r\n\r\n"),
    ("te_on_http10", 400, b"POST /v1/x HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("bad_chunk_size", 400, b"POST /v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n"),
    ("bad_chunk_terminator", 400, b"POST /v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"1\r\nxYY0\r\n\r\n"),
    ("bare_lf", 400, b"GET /v1/models HTTP/1.1\nHost: a\n\n"),
    ("bare_cr", 400, b"GET /v1/models HTTP/1.1\rHost: a\r\r"),
    ("obs_fold", 400, b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-A: a\r\n b\r\n\r\n"),
    ("space_before_colon", 400, b"GET /v1/models HTTP/1.1\r\nHost : a\r\n\r\n"),
    ("nul_in_value", 400, b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n"),
    ("missing_host", 400, b"GET /v1/models HTTP/1.1\r\n\r\n"),
    ("duplicate_host", 400, b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    ("http09", 400, b"GET /v1/models\r\n\r\n"),
    ("http2_version", 505, b"GET /v1/models HTTP/2.0\r\nHost: a\r\n\r\n"),
    ("connect", 501, b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"),
    ("absolute_form", 400, b"GET http://evil/v1/models HTTP/1.1\r\nHost: evil\r\n\r\n"),
    ("trailer_injection", 400, b"POST /v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"1\r\nx\r\n0\r\nAuthorization: Bearer x\r\n\r\n"),
    ("oversized_head", 431, b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n"),
    ("oversized_target", 414, b"GET /v1/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("oversized_content_length", 413, b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999\r\n\r\n"),
    ("upgrade_with_body", 501, b"POST /v1/x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
                               b"Content-Length: 2\r\n\r\n{}"),
    ("bad_then_pipelined", 400, b"GET /v1/models HTTP/1.1\r\nHost : a\r\n\r\n"
                                b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n"),
]


def _send(port: int, payload: bytes, bytewise: bool) -> bytes:
    with raw_connect(port) as sock:
        if bytewise:
            for i in range(len(payload)):
                try:
                    sock.send(payload[i:i + 1])
                except (BrokenPipeError, ConnectionResetError):
                    break  # the proxy answered and closed before the end: that is fine
        else:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(payload)
        return recv_until_closed(sock)  # returns only once the proxy closes the connection


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize(("name", "status", "payload"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_malformed_request_is_rejected_and_never_forwarded(name, status, payload, bytewise, proxy, mock_vllm):
    before = mock_stats(mock_vllm)["requests_total"]
    answer = _send(proxy.port, payload, bytewise)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert error["message"] and error["type"] and error["code"]
    assert answer.count(b"HTTP/1.1 ") == 1, "nothing may be answered after a rejected request"
    assert mock_stats(mock_vllm)["requests_total"] == before, "the backend must receive nothing"
    assert_idle(proxy)


def test_body_over_limit_while_streaming_chunked_gets_413(mock_vllm, new_proxy):
    proxy = new_proxy([{"url": mock_vllm.url}], server={"listen": "127.0.0.1:0", "max_body_size": "1KiB"})
    payload = b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    payload += b"400\r\n" + b"a" * 1024 + b"\r\n" + b"400\r\n" + b"a" * 1024 + b"\r\n0\r\n\r\n"
    before = mock_stats(mock_vllm)["requests_total"]
    answer = _send(proxy.port, payload, bytewise=False)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert mock_stats(mock_vllm)["requests_total"] == before
