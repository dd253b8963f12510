"""Helpers for tests that run the real processes on 127.0.0.1 ephemeral ports.

Every wait is bounded: process start-up, reads and polls all take a timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from pathlib import Path

import yaml

from llmproxy.mockbackend.options import DEFAULT_MODELS

REPO = Path(__file__).resolve().parents[1]
# The project's recorded streams (python -m tests.fixtures.record); the variable points tests elsewhere.
FIXTURES = Path(os.environ.get("LLMPROXY_FIXTURES_DIR") or REPO / "tests" / "fixtures" / "streams")
FIXTURE_FILES = sorted(p.name for p in FIXTURES.glob("*") if p.suffix in (".sse", ".ndjson"))
LISTENING = re.compile(r"listening on http://([^\s:]+|\[[^\]]+\]):(\d+)")
START_TIMEOUT = 15.0
# A health_check section with no periodic probes or model-list refreshes: once start-up is over, a backend's
# request counter and the proxy's open fds move only with the test's own traffic.
NO_PERIODIC_PROBES = {"interval": 3600, "models_interval": 3600}
# The `caching:` example of issue 18's guide, exactly as written there (config and e2e tests both read it).
GUIDE_CACHING = yaml.safe_load("""
caching:
  enabled: true
  default_ttl_seconds: 3600    # cache for 1 hour
  max_size_mb: 500
  strategies:
    - id: common_questions_cache
      match:
        path: "/v1/chat/completions"
        json_body:
          temperature: 0.0     # only cache deterministic responses
      ttl_seconds: 86400
""")["caching"]


class Proc:
    """A child process started with `python -m llmproxy ...`, whose output is drained in a thread."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = args
        self.output: deque[str] = deque(maxlen=5000)
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "llmproxy", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, text=True, cwd=REPO, env={**os.environ, **(env or {})})
        self._listening = threading.Event()
        self.port = 0
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.popen.stdout:
            self.output.append(line.rstrip("\n"))
            match = LISTENING.search(line)
            if match and not self._listening.is_set():
                self.port = int(match.group(2))
                self._listening.set()

    def wait_listening(self, timeout: float = START_TIMEOUT) -> Proc:
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.05):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.args} did not start (rc={self.popen.poll()}):\n" + self.text())
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def text(self) -> str:
        return "\n".join(self.output)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


# The smallest chat completion requests, plain and streamed (the mock answers with its default tokens).
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
STREAM_CHAT = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()

# Model names the tests send, served by every mock after its dialect's own default (which stays the
# default for requests naming none): the proxy routes by model and answers 404 for one nobody serves.
TEST_MODELS = ("m", "priced-model")


def start_mock(dialect: str, *extra: str) -> Proc:
    if "--model" not in extra:
        extra = ("--model", ",".join((DEFAULT_MODELS[dialect], *TEST_MODELS)), *extra)
    return Proc(["mock-backend", "--dialect", dialect, "--listen", "127.0.0.1:0", *extra]).wait_listening()


def write_config(tmp_path: Path, backends: list[dict], **sections: dict) -> Path:
    config = {"server": {"listen": "127.0.0.1:0"}, "backends": backends, **sections}
    config.setdefault("logging", {"access_log": str(tmp_path / "access.log")})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_proxy(tmp_path: Path, backends: list[dict], **sections: dict) -> Proc:
    path = write_config(tmp_path, backends, **sections)
    return Proc(["serve", "--config", str(path)]).wait_listening()


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def http_post(url: str, body: bytes = b"", timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def mock_stats(mock: Proc) -> dict:
    return json.loads(http_get(mock.url + "/_mock/stats")[1])


def mock_posts(mock: Proc) -> list[dict]:
    """The POSTs clients sent a mock through the proxy (since its last stats reset), not the proxy's own: its
    probes are GETs, and its prompt recounts (POST /tokenize) say llmproxy in their User-Agent."""
    return [r for r in mock_stats(mock)["requests"] if r["method"] == "POST" and not _from_the_proxy(r)]


def _from_the_proxy(request: dict) -> bool:
    return any(name == "user-agent" and value.startswith("llmproxy-") for name, value in request["headers"])


def post_count(mock: Proc) -> int:
    """How many POSTs the mock received (since its last stats reset)."""
    return len(mock_posts(mock))


def health(proxy: Proc) -> dict:
    """The proxy's /health document (which must answer 200)."""
    status, body = http_get(proxy.url + "/health")
    assert status == 200, body
    return json.loads(body)


def upstreams(proxy: Proc) -> dict[str, dict]:
    """The upstreams of /health by name, in the proxy's order."""
    return {upstream["name"]: upstream for upstream in health(proxy)["upstreams"]}


def sighup(proxy: Proc, expect: str = "reloaded", timeout: float = 10.0) -> None:
    """Send SIGHUP and wait until the proxy says `expect` once more than it had ("reloaded", "reload refused")."""
    seen = proxy.text().count(expect)
    proxy.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: proxy.text().count(expect) > seen, timeout=timeout)


def free_port() -> int:
    """A port nobody listens on (bound, then closed): free to listen on, and connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Usage records and the access log: the JSON-lines files a proxy writes in its directory -----------------

USAGE_FILE = "usage.jsonl"


def usage_config(directory: Path, reporter: dict | None = None, **options: object) -> dict:
    """The `usage` section: records spooled in directory/spool and given to one reporter, by default a file
    reporter named "f" writing directory/usage.jsonl (read it with usage_records); `options` adds settings
    (flush_interval...)."""
    reporter = reporter or {"name": "f", "type": "file", "file": {"path": str(directory / USAGE_FILE)}}
    return {"enabled": True, "spool_dir": str(directory / "spool"), **options, "reporters": [reporter]}


def read_jsonl(path: Path) -> list[dict]:
    """The complete records of a JSON-lines file, [] while it does not exist (blank lines are no records).

    A last line without its newline is being written as we read: it is left for the next read."""
    if not path.exists():
        return []
    complete, _, _ = path.read_text().rpartition("\n")
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def usage_records(directory: Path) -> list[dict]:
    """What the file reporter of usage_config(directory) has written so far."""
    return read_jsonl(directory / USAGE_FILE)


def access_log(directory: Path) -> list[dict]:
    """The access log of a proxy started by start_proxy(directory, ...), so far."""
    return read_jsonl(directory / "access.log")


def usage_record(directory: Path, request_id: str, timeout: float = 5.0) -> dict:
    """The usage record of the request `request_id` once it is written; there must be exactly one."""
    found = wait_for(lambda: [r for r in usage_records(directory) if r["request_id"] == request_id], timeout=timeout)
    assert len(found) == 1, f"exactly one record per request, got {found}"
    return found[0]


def metric_value(proxy: Proc, name: str, labels: str = "") -> float:
    """Sum of the samples of `name` (optionally only those whose label text contains `labels`)."""
    _, text = http_get(proxy.url + "/metrics")
    total = 0.0
    for line in text.decode().splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02):
    """Poll `predicate` until it returns a truthy value; raise AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def assert_idle(proxy: Proc, fd_baseline: int | None = None) -> None:
    """The invariants after every test: nothing in flight, no pooled connection checked out, no rate-limit
    slot held, and (given a baseline from open_fds) the proxy's open file descriptors back to it.

    The fd count allows the idle pool: connections the proxy keeps to backends are not a leak.
    """
    wait_for(lambda: metric_value(proxy, "llmproxy_inflight_requests") == 0
             and metric_value(proxy, "llmproxy_upstream_connections_checked_out") == 0
             and metric_value(proxy, "llmproxy_ratelimit_admissions_held") == 0, timeout=5.0)
    if fd_baseline is not None:
        def back_to_baseline() -> bool:
            idle = metric_value(proxy, "llmproxy_upstream_connections_idle")
            return open_fds(proxy.pid) <= fd_baseline + idle
        wait_for(back_to_baseline, timeout=10.0)


def open_fds(pid: int) -> int:
    """How many file descriptors the process has open (Linux /proc)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# Raw HTTP over a socket ------------------------------------------------------------------------

def raw_connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_until_closed(sock: socket.socket, limit: int = 50_000_000) -> bytes:
    chunks = []
    size = 0
    with contextlib.suppress(ConnectionResetError):
        while size < limit:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
            size += len(data)
    return b"".join(chunks)


class ResponseReader:
    """Reads one HTTP/1.1 response from a socket incrementally: head, then body (chunked or not)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.status = 0
        self.headers: dict[str, str] = {}

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buffer += data
        return True

    def read_head(self) -> ResponseReader:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise EOFError("connection closed before the response head")
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.headers = {}
        for line in lines[1:]:
            name, value = line.split(":", 1)
            self.headers[name.strip().lower()] = value.strip()
        return self

    def read_chunk(self) -> bytes | None:
        """Return the next chunk's payload, b"" for the last chunk; None if the connection ended first."""
        while b"\r\n" not in self.buffer:
            if not self._fill():
                return None
        size_line, rest = self.buffer.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0], 16)
        while len(rest) < size + 2:
            if not self._fill():
                return None
            size_line, rest = self.buffer.split(b"\r\n", 1)
        self.buffer = rest[size + 2:]
        return rest[:size]

    def read_body(self) -> tuple[bytes, bool]:
        """Return (body, complete). complete is False if the body was truncated."""
        if self.headers.get("transfer-encoding") == "chunked":
            parts = []
            while True:
                chunk = self.read_chunk()
                if chunk is None:
                    return b"".join(parts), False
                if chunk == b"":
                    return b"".join(parts), True
                parts.append(chunk)
        length = self.headers.get("content-length")
        if length is not None:
            while len(self.buffer) < int(length):
                if not self._fill():
                    return self.buffer, False
            body, self.buffer = self.buffer[:int(length)], self.buffer[int(length):]
            return body, True
        while self._fill():
            pass
        return self.buffer, True


def post_request(path: str, body: bytes, headers: dict[str, str] | None = None, version: str = "1.1") -> bytes:
    lines = [f"POST {path} HTTP/{version}", "Host: test", "Content-Type: application/json",
             f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def send_request(port: int, body: bytes | dict, headers: dict[str, str] | None = None, *,
                 path: str = "/v1/chat/completions", timeout: float = 5.0) -> tuple[ResponseReader, bytes, bool]:
    """One POST (a dict body is sent as JSON) on a fresh connection, its whole response read:
    (reader with status and headers, body, complete)."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    with raw_connect(port, timeout=timeout) as sock:
        sock.sendall(post_request(path, body, headers))
        reader = ResponseReader(sock).read_head()
        data, complete = reader.read_body()
    return reader, data, complete


def wait_steady(sample, timeout: float = 10.0, interval: float = 0.1):
    """Sample every `interval` s until the last three of at least four samples are equal; return that value
    (a count that start-up traffic still moves: the backend's requests, the proxy's open fds)."""
    samples = [sample()]

    def steady() -> bool:
        time.sleep(interval)
        samples.append(sample())
        return len(samples) > 3 and samples[-1] == samples[-2] == samples[-3]
    wait_for(steady, timeout=timeout, interval=0)
    return samples[-1]


def owned(stop):
    """For a fixture: yields the list a test appends what it starts to; when the test is over, each is stopped
    with `stop`, in order, whatever happened. Returns the list (`started = yield from owned(...)`)."""
    started: list = []
    yield started
    for item in started:
        stop(item)
    return started


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
