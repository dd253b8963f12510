"""Wire constants and small builders for HTTP/1.1 messages: status lines, header filtering, chunks."""

from __future__ import annotations

from http import HTTPStatus

# Hop-by-hop headers (RFC 9110 §7.6.1) plus the framing headers we always recompute ourselves.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})

CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"


def _status_line(code: int) -> bytes:
    try:
        reason = HTTPStatus(code).phrase
    except ValueError:
        reason = "Unknown"
    return b"HTTP/1.1 %d %s\r\n" % (code, reason.encode())


# Precomputed so the response path formats nothing for common codes.
STATUS_LINES: dict[int, bytes] = {code.value: _status_line(code.value) for code in HTTPStatus}


def status_line(code: int) -> bytes:
    """Return the HTTP/1.1 status line (with CRLF) for `code`."""
    line = STATUS_LINES.get(code)
    return line if line is not None else _status_line(code)


def connection_tokens(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Return the header names listed in Connection headers (they are hop-by-hop too)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens)


def chunk(data: bytes) -> bytes:
    """Frame `data` as one HTTP/1.1 chunk (a single allocation)."""
    return b"%x\r\n%b\r\n" % (len(data), data)
