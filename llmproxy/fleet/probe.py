"""A tiny HTTP/1.1 client for health, discovery and tokenizer probes (not the hot path).

One request per connection (`Connection: close`), parsed with h11, the whole exchange bounded by one
timeout. Every failure becomes a `ProbeError` with a short message fit for a log line or a status page;
cancellation is never converted.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import h11
import orjson

from llmproxy.config.model import BackendConfig
from llmproxy.errors import LOCAL_EXHAUSTION_ERRNOS
from llmproxy.upstream.pool import _ssl_context

USER_AGENT = "llmproxy-health"
READ_SIZE = 64 * 1024
DEFAULT_MAX_BODY = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ProbeResponse:
    status: int
    body: bytes
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "


class ProbeError(Exception):
    """A probe that got no usable response.

    `status` is the HTTP status when a response head did arrive (body too large, broken body): the server
    is up and speaks HTTP. It is None for transport failures (refused, timeout, TLS, reset, no response).
    `local` is True when the proxy could not even open a socket (out of file descriptors): it says nothing
    about the backend.
    """

    def __init__(self, message: str, status: int | None = None, local: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.local = local


def host_header(backend: BackendConfig) -> str:
    """The Host value the proxy itself sends: port omitted when it is the scheme's default."""
    host = f"[{backend.host}]" if ":" in backend.host else backend.host
    default_port = 443 if backend.scheme == "https" else 80
    return host if backend.port == default_port else f"{host}:{backend.port}"


async def probe_get(backend: BackendConfig, path: str, timeout: float,
                    max_body: int = DEFAULT_MAX_BODY) -> ProbeResponse:
    """GET `backend.base_path + path`; raises ProbeError on any failure, within `timeout` seconds."""
    return await _bounded(_exchange(backend, "GET", backend.base_path + path, None, max_body), timeout)


async def probe_post(backend: BackendConfig, path: str, body: Any, timeout: float,
                     max_body: int = DEFAULT_MAX_BODY) -> ProbeResponse:
    """POST `body` as JSON to `backend.base_path + path`; raises ProbeError on any failure, within `timeout`."""
    return await _bounded(_exchange(backend, "POST", backend.base_path + path, orjson.dumps(body), max_body), timeout)


async def _bounded(exchange: Coroutine[Any, Any, ProbeResponse], timeout: float) -> ProbeResponse:
    try:
        return await asyncio.wait_for(exchange, timeout)
    except asyncio.TimeoutError:
        # Only wait_for's own timeout gets here: _exchange turns every OSError into a ProbeError.
        raise ProbeError(f"timed out after {timeout:g}s") from None


async def _exchange(backend: BackendConfig, method: str, target: str, body: bytes | None,
                    max_body: int) -> ProbeResponse:
    reader, writer = await _connect(backend)
    try:
        conn = h11.Connection(h11.CLIENT)
        headers = _request_headers(backend)
        if body is not None:
            headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        try:
            request = conn.send(h11.Request(method=method, target=target, headers=headers))
            if body is not None:
                request += conn.send(h11.Data(data=body))
        except h11.LocalProtocolError as exc:  # e.g. a target or api key h11 refuses to put on the wire
            raise ProbeError(f"invalid request: {exc}") from None
        writer.write(request + conn.send(h11.EndOfMessage()))
        return await _read_response(conn, reader, max_body)
    except OSError as exc:
        raise ProbeError(_describe(exc, "connection error")) from None
    finally:
        # abort, not close: nothing more to say, and a TLS close_notify must not wait on a stuck peer
        writer.transport.abort()


async def _connect(backend: BackendConfig) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    tls = _ssl_context(backend) if backend.scheme == "https" else None
    try:
        return await asyncio.open_connection(backend.host, backend.port, ssl=tls,
                                             server_hostname=backend.host if tls else None)
    except OSError as exc:
        raise ProbeError(_describe(exc, "connect failed"), local=exc.errno in LOCAL_EXHAUSTION_ERRNOS) from None


def _request_headers(backend: BackendConfig) -> list[tuple[str, str]]:
    headers = [("Host", host_header(backend)), ("User-Agent", USER_AGENT), ("Accept", "*/*"),
               ("Connection", "close")]
    keys = backend.keys
    if keys and backend.type == "anthropic":  # Anthropic's API takes its key as x-api-key, with a version
        headers += [("x-api-key", keys[0]), ("anthropic-version", backend.anthropic_version)]
    elif keys:
        headers.append(("Authorization", f"Bearer {keys[0]}"))
    return headers


async def _read_response(conn: h11.Connection, reader: asyncio.StreamReader, max_body: int) -> ProbeResponse:
    head: h11.Response | None = None
    body = bytearray()
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(READ_SIZE)
                if not data and head is None:
                    raise ProbeError("connection closed without a response")
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                head = event
                _check_declared_length(head, max_body)
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_body:
                    raise ProbeError(f"body over {max_body} bytes", _status_of(head))
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None  # h11 never ends a message it did not start
                return ProbeResponse(head.status_code, bytes(body), _headers(head))
            # InformationalResponse (1xx) is skipped; the final response follows it.
    except h11.RemoteProtocolError as exc:
        raise ProbeError(f"malformed response: {exc}", _status_of(head)) from None


def _status_of(head: h11.Response | None) -> int | None:
    return head.status_code if head is not None else None


def _check_declared_length(head: h11.Response, max_body: int) -> None:
    """Refuse an oversized body from its Content-Length, before reading any of it."""
    for name, value in head.headers:
        if name == b"content-length" and int(value) > max_body:  # h11 has validated it as digits
            raise ProbeError(f"body over {max_body} bytes", head.status_code)


def _headers(head: h11.Response) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in head.headers:  # h11 lower-cases names
        key, text = name.decode("latin-1"), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


def _describe(exc: OSError, fallback: str) -> str:
    """A short message for a socket-level failure."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate rejected: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failure: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connect refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror or exc}"
    return f"{fallback}: {exc.strerror or exc}"
