"""The shared store over TLS (rediss://): a real redis-server that speaks only TLS, with a self-signed
certificate made by openssl for the test."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess

import pytest

from llmproxy.ratelimit.redis_store import RedisStore
from llmproxy.ratelimit.store import Limits, StoreUnavailable
from tests.redis_server import RedisServer

pytestmark = pytest.mark.timeout(30)


class TlsRedisServer(RedisServer):
    """TLS on `port`, no plain-text port; the certificate is its own CA."""

    def __init__(self) -> None:
        super().__init__()
        self.cert, key = self.dir / "cert.pem", self.dir / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                        "-out", str(self.cert)], check=True, capture_output=True, timeout=30)
        self.args = ["--tls-port", str(self.port), "--port", "0", "--tls-cert-file", str(self.cert),
                     "--tls-key-file", str(key), "--tls-ca-cert-file", str(self.cert), "--tls-auth-clients", "no"]

    def answers(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.cert))
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw, \
                    context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


@pytest.fixture(scope="module")
def tls_server():
    with TlsRedisServer() as server:
        yield server


def admitted(url: str, count: int) -> int:
    async def run() -> int:
        store = RedisStore(url, prefix="tls:")
        try:
            decisions = [await store.admit([("k", Limits(requests_per_minute=1, burst=3))]) for _ in range(count)]
        finally:
            await store.close()
        return sum(d.allowed for d in decisions)

    return asyncio.run(run())


def test_rediss_with_the_servers_ca_admits_the_burst(tls_server: TlsRedisServer) -> None:
    assert admitted(f"rediss://127.0.0.1:{tls_server.port}/0?ssl_ca_certs={tls_server.cert}", 5) == 3


def test_rediss_refuses_a_certificate_it_cannot_verify(tls_server: TlsRedisServer) -> None:
    with pytest.raises(StoreUnavailable):
        admitted(f"rediss://127.0.0.1:{tls_server.port}/1", 1)


def test_plain_redis_to_a_tls_port_is_unavailable_not_a_hang(tls_server: TlsRedisServer) -> None:
    with pytest.raises(StoreUnavailable):
        admitted(f"redis://127.0.0.1:{tls_server.port}/1", 1)

