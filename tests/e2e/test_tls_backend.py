"""An HTTPS backend: the proxy speaks TLS upstream (certificate verification can be turned off for labs)."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import threading

import pytest

from tests.support import ResponseReader, post_request, raw_connect

EVENTS = [b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n', b"data: [DONE]\n\n"]


@pytest.fixture
def tls_backend(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                   timeout=30)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    loop = asyncio.new_event_loop()
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        seen.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for event in EVENTS:
            writer.write(b"%x\r\n%b\r\n" % (len(event), event))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0, ssl=context))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield server.sockets[0].getsockname()[1], seen
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def test_https_backend_is_reached_over_tls(tls_backend, new_proxy):
    port, seen = tls_backend
    proxy = new_proxy([{"url": f"https://127.0.0.1:{port}", "tls_verify": False}])
    body = json.dumps({"model": "m", "stream": True}).encode()
    with raw_connect(proxy.port) as sock:
        sock.sendall(post_request("/v1/chat/completions", body))
        reader = ResponseReader(sock).read_head()
        streamed, complete = reader.read_body()
    assert reader.status == 200 and complete
    assert streamed == b"".join(EVENTS)
    assert seen and seen[0].startswith(b"POST /v1/chat/completions HTTP/1.1")


def test_https_backend_with_untrusted_certificate_is_refused_when_verifying(tls_backend, new_proxy):
    port, seen = tls_backend
    proxy = new_proxy([{"url": f"https://127.0.0.1:{port}"}])
    with raw_connect(proxy.port) as sock:
        sock.sendall(post_request("/v1/chat/completions", b"{}"))
        reader = ResponseReader(sock).read_head()
        body, _ = reader.read_body()
    assert reader.status == 502
    assert json.loads(body)["error"]["code"] == "upstream_connect_failed"
    assert not seen
