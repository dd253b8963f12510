"""A real `redis-server` for tests, on a free 127.0.0.1 port, with nothing written to disk.

It can be killed (SIGKILL, as a crash), paused (SIGSTOP, as a hung server) and restarted on the same port,
so tests can check what clients do while Redis is gone and that they recover once it is back. Every wait
is bounded.

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        server.kill()     # connections reset, new ones refused
        server.start()    # the same port, empty again

`RedisServer(tls=Tls.make(directory))` speaks only TLS on its port, with a self-signed certificate.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support import free_port

START_TIMEOUT = 10.0


@dataclass(frozen=True)
class Tls:
    """A self-signed certificate for 127.0.0.1, its own CA, made by openssl; servers need no client certificate."""

    cert: Path
    key: Path

    @classmethod
    def make(cls, directory: Path) -> Tls:
        tls = cls(directory / "cert.pem", directory / "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tls.key),
                        "-out", str(tls.cert)], check=True, capture_output=True, timeout=30)
        return tls

    def server_args(self, port: int) -> list[str]:
        """TLS on `port` and no plain-text port; replication (and Sentinel's links) over TLS too."""
        return ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(self.cert), "--tls-key-file",
                str(self.key), "--tls-ca-cert-file", str(self.cert), "--tls-auth-clients", "no",
                "--tls-replication", "yes"]


def connect(port: int, timeout: float, tls: Tls | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if tls is None:
        return sock
    return ssl.create_default_context(cafile=str(tls.cert)).wrap_socket(sock, server_hostname="127.0.0.1")


def ping(port: int, timeout: float = 0.5, tls: Tls | None = None) -> bool:
    """True when a Redis server answers PING on 127.0.0.1:port, speaking RESP by hand (no client needed)."""
    try:
        with connect(port, timeout, tls) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A redis-server process; `start` waits until it answers PING, `kill`/`stop` wait until it is gone."""

    def __init__(self, port: int | None = None, executable: str = "redis-server", args: Sequence[str] = (),
                 tls: Tls | None = None) -> None:
        """`args`: more command-line options (`--cluster-enabled yes`, `--replicaof 127.0.0.1 6379`...)."""
        path = shutil.which(executable)
        if path is None:
            raise RuntimeError(f"{executable} not found on PATH")
        self.executable = path
        self.port = port or free_port()
        self.args = list(args)
        self.tls = tls
        self.popen: subprocess.Popen | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="llmproxy-redis-")

    @property
    def dir(self) -> Path:
        """Its working directory (kept across restarts: a Cluster node finds its nodes.conf there again)."""
        return Path(self._dir.name)

    def command(self) -> list[str]:
        return [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self._dir.name, "--logfile", str(self.log_path),
                *(self.tls.server_args(self.port) if self.tls else ()), *self.args]

    @property
    def log_path(self) -> Path:
        return Path(self._dir.name) / "redis.log"

    def log(self) -> str:
        """What the server logged (all its runs), for failure messages."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def answers(self) -> bool:
        return ping(self.port, tls=self.tls)

    def start(self, timeout: float = START_TIMEOUT) -> RedisServer:
        """Starts the server (again, on the same port) and returns once it answers PING."""
        if self.running:
            return self
        self.popen = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{self.log()}")
            time.sleep(0.02)
        return self

    def kill(self, timeout: float = START_TIMEOUT) -> None:
        """SIGKILL, as a crash: clients see their connections reset and new ones refused."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGCONT)  # a paused server must not outlive the test
                self.popen.kill()
        self.popen.wait(timeout)

    stop = kill  # nothing is persisted, so there is nothing a graceful shutdown would save

    def restart(self, timeout: float = START_TIMEOUT) -> RedisServer:
        self.kill(timeout)
        return self.start(timeout)

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers, as with a hung server."""
        assert self.popen is not None
        self.popen.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGCONT)

    def flushall(self, timeout: float = 2.0) -> None:
        """Empties every database, between tests sharing one server."""
        with connect(self.port, timeout, self.tls) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            reply = sock.recv(64)
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"FLUSHALL answered {reply!r}")

    def close(self) -> None:
        self.kill()
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
