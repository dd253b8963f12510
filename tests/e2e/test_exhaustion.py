"""Resource exhaustion, with the real proxy process: connection limits, file descriptors, idle connections by
the thousand, a drain under load and memory over a long run.

The default run is quick (well under a minute). The soak-length runs (10 000 idle connections, 1 000 streams
for 60 s) are marked `soak` and excluded by default:

    python -m pytest -m soak tests/e2e/test_exhaustion.py -s    # -s shows the RSS numbers they print

Idle connections are held by tests/conn_holder.py, a process of its own, so the test's own file descriptors
and event loop are not what is measured. After every test the invariants hold: nothing in flight, no pooled
connection checked out, no rate-limit slot held, the proxy's open fds back to their baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import pytest

from tests.support import (
    REPO,
    STREAM_CHAT,
    Proc,
    ResponseReader,
    assert_idle,
    metric_value,
    open_fds,
    post_request,
    raw_connect,
    recv_until_closed,
    rss_kib,
    start_proxy,
    usage_config,
    usage_records,
    wait_for,
    write_config,
)

HOLDER = REPO / "tests" / "conn_holder.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# Helpers ---------------------------------------------------------------------------------------------

class LimitedProc(Proc):
    """A Proc started with RLIMIT_NOFILE set to `nofile` (as under `ulimit -n`), its output drained the same way."""

    def __init__(self, args: list[str], nofile: int) -> None:
        self.args = args
        self.output: deque[str] = deque(maxlen=5000)

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.popen = subprocess.Popen(
            [sys.executable, "-m", "llmproxy", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, text=True, cwd=REPO, env=dict(os.environ), preexec_fn=limit)
        self._listening = threading.Event()
        self.port = 0
        threading.Thread(target=self._drain, daemon=True).start()


class Holder:
    """tests/conn_holder.py: holds `count` idle connections to `port` from a process of its own."""

    def __init__(self, port: int, count: int, max_seconds: float = 300.0) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, str(HOLDER), "--port", str(port), "--count", str(count),
             "--max-seconds", str(max_seconds)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        self.events: queue.Queue[dict] = queue.Queue()
        self.last: dict = {}
        self.lines: deque[str] = deque(maxlen=200)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))
            with contextlib.suppress(ValueError):
                self.events.put(json.loads(line))

    def wait(self, predicate, timeout: float) -> dict:
        """The first event (newest status included) for which `predicate` holds; AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            if self.last and predicate(self.last):
                return self.last
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"conn_holder: condition not met in {timeout}s; last {self.last}; "
                                     f"output: {list(self.lines)[-5:]}")
            try:
                self.last = self.events.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if self.popen.poll() is not None and self.events.empty():
                    raise AssertionError(f"conn_holder exited: {list(self.lines)}") from None

    def status(self) -> dict:
        sent = time.monotonic()
        self.popen.stdin.write("status\n")
        self.popen.stdin.flush()
        self.last = {}
        answer = self.wait(lambda event: event.get("event") == "status", timeout=10)
        answer["latency"] = time.monotonic() - sent
        return answer

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(OSError):
                self.popen.stdin.write("close\n")
                self.popen.stdin.flush()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


@pytest.fixture
def holders():
    """conn_holder processes a test starts; all are stopped at the end of the test, whatever happened."""
    started: list[Holder] = []
    yield started
    for holder in started:
        holder.stop()


@contextlib.contextmanager
def raised_nofile():
    """This process's soft RLIMIT_NOFILE raised to its hard limit (children started meanwhile inherit it);
    yields the limit now in force, and restores the old one on exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    try:
        yield target
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (Linux /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tcp_sockets(pid: int, local_port: int | None = None, remote_port: int | None = None) -> int:
    """How many established IPv4 TCP connections the process holds with that local (or remote) port."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] != "01" or fields[9] not in inodes:
                continue
            if local_port is not None and int(fields[1].rsplit(":", 1)[1], 16) != local_port:
                continue
            if remote_port is not None and int(fields[2].rsplit(":", 1)[1], 16) != remote_port:
                continue
            count += 1
    return count


def client_sockets(pid: int, port: int) -> int:
    """The proxy's accepted client connections (local port `port`)."""
    return tcp_sockets(pid, local_port=port)


def closed_by_peer(sock: socket.socket) -> bool | None:
    """True if the server closed `sock` (EOF or reset), False if it is open and silent, None if it sent data."""
    sock.setblocking(False)
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)
    return None if data else True


def stream(port: int, tokens: int, delay_ms: int, timeout: float = 30.0) -> tuple[int, bytes, bool, str]:
    """One streaming chat completion on a new connection: (status, body, complete, x-request-id)."""
    with raw_connect(port, timeout=timeout) as sock:
        sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT,
                                  {"x-mock-tokens": str(tokens), "x-mock-delay-ms": str(delay_ms)}))
        reader = ResponseReader(sock).read_head()
        body, complete = reader.read_body()
    return reader.status, body, complete, reader.headers.get("x-request-id", "")


def warm_up(proxy: Proc, backend: Proc) -> int:
    """One stream and one scrape (everything lazily opened is open), then the proxy's fd baseline: its open
    fds less its client connections and its pooled connections to `backend` (assert_idle allows the pool)."""
    status, body, complete, _ = stream(proxy.port, 2, 0)
    assert status == 200 and complete and body.endswith(b"data: [DONE]\n\n")
    metric_value(proxy, "llmproxy_inflight_requests")
    wait_for(lambda: client_sockets(proxy.pid, proxy.port) == 0, timeout=5)
    return open_fds(proxy.pid) - tcp_sockets(proxy.pid, remote_port=backend.port)


def tokens_in(body: bytes) -> int:
    return body.count(b'"content":" tok')


# max_connections ---------------------------------------------------------------------------------------

def test_connections_beyond_max_connections_are_refused_while_streams_in_flight_finish(mock_vllm, new_proxy):
    limit = 50
    proxy = new_proxy([{"url": mock_vllm.url}], server={"listen": "127.0.0.1:0", "max_connections": limit})
    fds = warm_up(proxy, mock_vllm)

    # 25 streams in flight (40 tokens x 100 ms: 4 s each) and 25 idle connections: the limit is reached.
    streams: list[tuple[socket.socket, ResponseReader]] = []
    streams_started = time.monotonic()
    for _ in range(limit // 2):
        sock = raw_connect(proxy.port, timeout=15)
        sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT,
                                  {"x-mock-tokens": "40", "x-mock-delay-ms": "100"}))
        streams.append((sock, ResponseReader(sock).read_head()))
    assert all(reader.status == 200 for _, reader in streams)
    results: dict[int, tuple[bytes, bool]] = {}

    def finish(index: int, reader: ResponseReader) -> None:
        results[index] = reader.read_body()

    threads = [threading.Thread(target=finish, args=(i, reader)) for i, (_, reader) in enumerate(streams)]
    for thread in threads:
        thread.start()
    idle = [raw_connect(proxy.port, timeout=15) for _ in range(limit - len(streams))]
    wait_for(lambda: client_sockets(proxy.pid, proxy.port) == limit, timeout=5)

    # Beyond the limit: every new connection is closed at once (no status line; the kernel had accepted it).
    started = time.monotonic()
    extra = [raw_connect(proxy.port, timeout=5) for _ in range(20)]
    for sock in extra:
        assert recv_until_closed(sock) == b"", "a connection over the limit is closed without an answer"
        sock.close()
    assert time.monotonic() - started < 3.0, "refused at once, not after a timeout"
    # Refused sockets leave the proxy's table when its loop has run their close: soon, but on a loaded machine
    # not always by the time the client has read the end.
    wait_for(lambda: client_sockets(proxy.pid, proxy.port) == limit, timeout=2)
    assert not results and all(thread.is_alive() for thread in threads), \
        f"the refusals happened while the streams were in flight ({time.monotonic() - streams_started:.2f} s)"

    # The established connections are undisturbed: the idle ones are served, the streams finish whole.
    for sock in idle:
        sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT, {"x-mock-tokens": "3"}))
        reader = ResponseReader(sock).read_head()
        body, complete = reader.read_body()
        assert reader.status == 200 and complete and tokens_in(body) == 3
    for thread in threads:
        thread.join(15)
    assert len(results) == len(streams)
    for body, complete in results.values():
        assert complete and body.endswith(b"data: [DONE]\n\n") and tokens_in(body) == 40

    # Still at the limit (the 50 are open, keep-alive): still refused. Then they close, and new ones are served.
    late = raw_connect(proxy.port, timeout=5)
    assert recv_until_closed(late) == b""
    late.close()
    for sock in idle + [sock for sock, _ in streams]:
        sock.close()
    wait_for(lambda: client_sockets(proxy.pid, proxy.port) == 0, timeout=5)
    status, body, complete, _ = stream(proxy.port, 3, 0)
    assert status == 200 and complete and tokens_in(body) == 3
    assert_idle(proxy, fds)


# File descriptors ----------------------------------------------------------------------------------------

NOFILE = 256
OVER = 400  # connections opened against a proxy allowed NOFILE descriptors


def _exhausted_proxy(tmp_path: Path, mock: Proc, procs: list[Proc]) -> tuple[Proc, int, list[socket.socket]]:
    config = write_config(tmp_path, [{"url": mock.url}], server={"listen": "127.0.0.1:0"})
    proxy = LimitedProc(["serve", "--config", str(config)], nofile=NOFILE).wait_listening()
    procs.append(proxy)
    fds = warm_up(proxy, mock)
    socks = [raw_connect(proxy.port, timeout=10) for _ in range(OVER)]  # the kernel completes every handshake
    wait_for(lambda: open_fds(proxy.pid) >= NOFILE - 1, timeout=5)
    return proxy, fds, socks


def _classify(socks: list[socket.socket]) -> tuple[list[socket.socket], int]:
    """(connections the proxy holds open, how many it closed)."""
    states = [closed_by_peer(sock) for sock in socks]
    assert None not in states, "nothing was asked: nothing may be answered"
    return [sock for sock, closed in zip(socks, states, strict=True) if not closed], sum(states)


def test_fd_exhaustion_degrades_without_busy_loop_and_recovers(mock_vllm, tmp_path, procs):
    proxy, fds, socks = _exhausted_proxy(tmp_path, mock_vllm, procs)
    try:
        before = cpu_seconds(proxy.pid)
        time.sleep(2.0)
        spent = cpu_seconds(proxy.pid) - before
        assert spent < 0.5, f"the proxy spins while out of file descriptors: {spent:.2f} s of CPU in 2 s"
        assert proxy.popen.poll() is None

        # Every connection is either held or closed: none is left hanging unanswered in the accept queue.
        live, closed = wait_for(lambda: (lambda r: r if len(r[0]) + r[1] == OVER and r[1] > 0 else None)(
            _classify(socks)), timeout=5)
        assert NOFILE - 40 <= len(live) < NOFILE, (len(live), closed)

        # A new connection now is refused at once too (closed or reset), not left waiting.
        with raw_connect(proxy.port, timeout=5) as sock:
            started = time.monotonic()
            assert recv_until_closed(sock) == b""
            assert time.monotonic() - started < 2.0

        # A held connection still gets an answer: the pooled upstream connection (200), else a 5xx.
        live[0].settimeout(10)
        live[0].sendall(post_request("/v1/chat/completions", STREAM_CHAT, {"x-mock-tokens": "3"}))
        reader = ResponseReader(live[0]).read_head()
        _, complete = reader.read_body()
        assert complete and reader.status in (200, 502, 503), reader.status
        before = cpu_seconds(proxy.pid)
        time.sleep(1.0)
        assert cpu_seconds(proxy.pid) - before < 0.25
    finally:
        for sock in socks:
            sock.close()

    # Released: served again within seconds, and back to the baseline.
    def served() -> bool:
        try:
            status, body, complete, _ = stream(proxy.port, 3, 0, timeout=5)
        except OSError:
            return False
        return status == 200 and complete and tokens_in(body) == 3

    wait_for(served, timeout=5, interval=0.2)
    assert_idle(proxy, fds)
    before = cpu_seconds(proxy.pid)
    time.sleep(1.0)
    assert cpu_seconds(proxy.pid) - before < 0.25
    assert proxy.popen.poll() is None


def test_fd_exhaustion_is_not_blamed_on_the_backend(mock_vllm, tmp_path, procs):
    """The proxy's own EMFILE on socket() is not the backend failing: it must not eject a healthy backend
    (nor count as its failure), or the fleet stays degraded long after the descriptors are back."""
    proxy, fds, socks = _exhausted_proxy(tmp_path, mock_vllm, procs)
    try:
        live, _ = wait_for(lambda: (lambda r: r if len(r[0]) + r[1] == OVER else None)(_classify(socks)), timeout=5)
        answers: dict[int, int] = {}

        def ask(index: int, sock: socket.socket) -> None:
            sock.settimeout(15)
            sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT,
                                      {"x-mock-tokens": "10", "x-mock-delay-ms": "50"}))
            reader = ResponseReader(sock).read_head()
            reader.read_body()
            answers[index] = reader.status

        # Concurrent streams: beyond the one pooled connection, each needs a new upstream socket (EMFILE).
        threads = [threading.Thread(target=ask, args=(i, sock)) for i, sock in enumerate(live[:8])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert len(answers) == 8 and any(status != 200 for status in answers.values()), answers
    finally:
        for sock in socks:
            sock.close()
    wait_for(lambda: client_sockets(proxy.pid, proxy.port) == 0, timeout=5)
    assert_idle(proxy, fds)
    assert metric_value(proxy, "llmproxy_backend_ejections_total") == 0, \
        "the backend was ejected for the proxy's own lack of file descriptors:\n" + proxy.text()
    assert metric_value(proxy, "llmproxy_backend_healthy") == 1


# Graceful drain --------------------------------------------------------------------------------------------

def test_sigterm_with_100_streams_in_flight_drains_them_and_flushes_usage(mock_vllm, tmp_path, procs, metered_proxy):
    count, tokens, shutdown_timeout = 100, 30, 10.0
    proxy = metered_proxy([{"url": mock_vllm.url}], usage=usage_config(tmp_path, flush_interval="50ms"),
                          server={"listen": "127.0.0.1:0", "shutdown_timeout": f"{shutdown_timeout}s"})
    warm_up(proxy, mock_vllm)
    wait_for(lambda: len(usage_records(tmp_path)) == 1, timeout=5)
    (tmp_path / "usage.jsonl").unlink()

    barrier = threading.Barrier(count + 1, timeout=20)
    results: dict[int, tuple] = {}

    def run(index: int) -> None:
        try:
            with raw_connect(proxy.port, timeout=20) as sock:
                sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT,
                                          {"x-mock-tokens": str(tokens), "x-mock-delay-ms": "50"}))
                reader = ResponseReader(sock).read_head()
                first = reader.read_chunk()  # the stream has begun
                barrier.wait()
                body, complete = reader.read_body()
                results[index] = (reader.status, (first or b"") + body, complete, reader.headers.get("x-request-id"),
                                  time.monotonic())
        except Exception as error:  # reported below
            results[index] = (error,)
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    barrier.wait()  # all 100 are mid-stream
    assert metric_value(proxy, "llmproxy_inflight_requests") == count
    signalled = time.monotonic()
    proxy.popen.send_signal(signal.SIGTERM)

    # Draining: new connections are refused while the streams go on.
    refused = False
    while not refused and time.monotonic() - signalled < 2.0 and proxy.popen.poll() is None:
        try:
            with raw_connect(proxy.port, timeout=2) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                refused = recv_until_closed(sock) == b""
        except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError):
            refused = True
        time.sleep(0.01)
    assert refused and proxy.popen.poll() is None, "refused during the drain, before the process ended"

    rc = proxy.popen.wait(shutdown_timeout + 5)
    exited = time.monotonic() - signalled
    for thread in threads:
        thread.join(10)
    assert rc == 0, proxy.text()
    assert exited < shutdown_timeout, f"exited {exited:.1f} s after SIGTERM"
    failures = {i: r for i, r in results.items() if len(r) == 1}
    assert not failures and len(results) == count, failures
    ids = []
    for status, body, complete, request_id, finished in results.values():
        assert status == 200 and complete and body.endswith(b"data: [DONE]\n\n") and tokens_in(body) == tokens
        assert finished > signalled, "the stream was still in flight at SIGTERM"
        ids.append(request_id)
    assert len(set(ids)) == count

    # Every record is on disk at exit: delivered to the file reporter, or committed to the outbox (the spool),
    # which the next start delivers (README: "SIGTERM flushes everything to disk"). None twice.
    delivered_at_exit = len(usage_records(tmp_path))
    restarted = Proc(["serve", "--config", str(tmp_path / "config.yaml")]).wait_listening()
    procs.append(restarted)
    wait_for(lambda: len(usage_records(tmp_path)) >= count, timeout=10)
    time.sleep(0.3)  # nothing more arrives
    records = usage_records(tmp_path)
    print(f"\nusage records delivered to the file before exit: {delivered_at_exit}/{count}, "
          f"the rest from the spool after a restart")
    assert len(records) == count, f"{len(records)} usage records for {count} requests"
    assert sorted(r["request_id"] for r in records) == sorted(ids)
    assert all(r["completion_tokens"] == tokens for r in records)


# Idle connections ------------------------------------------------------------------------------------------

def _idle_connections(tmp_path: Path, mock: Proc, procs: list[Proc], holders: list[Holder], count: int,
                      keepalive: float) -> dict:
    """Hold `count` idle connections from another process until keep-alive closes them; return the numbers."""
    proxy = start_proxy(tmp_path, [{"url": mock.url}], server={
        "listen": "127.0.0.1:0", "max_connections": count + 1000,
        # A connection that never sends a byte is closed by the head deadline, which runs from accept.
        "timeouts": {"keepalive": f"{keepalive}s", "request_head": f"{keepalive}s"}})
    procs.append(proxy)
    fds = warm_up(proxy, mock)
    time.sleep(0.5)
    rss_before = rss_kib(proxy.pid)

    holder = Holder(proxy.port, count, max_seconds=keepalive + 120)
    holders.append(holder)
    started = time.monotonic()
    opened = holder.wait(lambda event: event["event"] == "opened", timeout=60)
    open_seconds = time.monotonic() - started
    assert opened["open"] == count and opened["failed"] == 0, opened
    wait_for(lambda: client_sockets(proxy.pid, proxy.port) == count, timeout=10, interval=0.1)
    time.sleep(0.5)
    rss_with = rss_kib(proxy.pid)
    fds_with = open_fds(proxy.pid)
    held = holder.status()
    assert held["closed_by_peer"] == 0 and held["open"] == count, held
    assert time.monotonic() - started < keepalive, "measured before the keep-alive timeout"
    assert metric_value(proxy, "llmproxy_client_connections") == count + 1  # and the scrape's own

    # Idle for the keep-alive timeout: the proxy closes every one of them, not earlier.
    closed = holder.wait(lambda event: event.get("closed_by_peer") == count, timeout=keepalive + 15)
    closed_after = time.monotonic() - started
    assert closed["open"] == 0
    assert closed_after >= keepalive - 0.5
    assert_idle(proxy, fds)
    wait_for(lambda: client_sockets(proxy.pid, proxy.port) == 0, timeout=5)
    rss_after = rss_kib(proxy.pid)
    numbers = {
        "connections": count, "open_seconds": round(open_seconds, 2), "fds_before": fds, "fds_with": fds_with,
        "fds_after": open_fds(proxy.pid), "rss_before_kib": rss_before, "rss_with_kib": rss_with,
        "rss_after_kib": rss_after, "kib_per_connection": round((rss_with - rss_before) / count, 2),
        "all_closed_after_s": round(closed_after, 2), "keepalive_s": keepalive,
    }
    print(f"\nidle connections: {json.dumps(numbers)}")
    return numbers


def test_1000_idle_connections_are_held_then_expire(mock_vllm, tmp_path, procs, holders):
    numbers = _idle_connections(tmp_path, mock_vllm, procs, holders, count=1000, keepalive=4.0)
    assert numbers["kib_per_connection"] <= 16, numbers
    assert numbers["all_closed_after_s"] < 4.0 + 5, numbers


@pytest.mark.soak
@pytest.mark.timeout(300)
def test_soak_10000_idle_connections_are_held_then_expire(mock_vllm, tmp_path, procs, holders):
    with raised_nofile() as limit:  # the proxy inherits it; conn_holder.py raises its own
        if limit < 10_000 + 200:
            pytest.skip(f"RLIMIT_NOFILE hard limit {limit} is too low for 10 000 connections")
        numbers = _idle_connections(tmp_path, mock_vllm, procs, holders, count=10_000, keepalive=20.0)
    assert numbers["kib_per_connection"] <= 16, numbers


# Long run: 1 000 streams for 60 s ----------------------------------------------------------------------------

async def _one_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tokens: int, delay_ms: int) -> bool:
    """Send one streaming request on an open connection and read its whole response. True if it was whole."""
    writer.write(post_request("/v1/chat/completions", STREAM_CHAT,
                              {"x-mock-tokens": str(tokens), "x-mock-delay-ms": str(delay_ms)}))
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 ") or b"transfer-encoding: chunked" not in head.lower():
        return False
    body = []
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            break
        body.append(data[:-2])
    text = b"".join(body)
    return text.endswith(b"data: [DONE]\n\n") and tokens_in(text) == tokens


async def _streams_for(port: int, concurrency: int, seconds: float, tokens: int, delay_ms: int,
                       sample, sample_every: float) -> dict:
    stats = {"ok": 0, "errors": 0, "error_kinds": {}}
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        await asyncio.sleep(random.uniform(0, tokens * delay_ms / 1000))  # spread the starts over one stream
        while time.monotonic() < stop_at:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
            except OSError as error:
                stats["errors"] += 1
                stats["error_kinds"][repr(error)] = stats["error_kinds"].get(repr(error), 0) + 1
                await asyncio.sleep(0.5)
                continue
            try:
                for _ in range(3):  # a few streams per connection (keep-alive), then a new connection
                    if time.monotonic() >= stop_at:
                        break
                    if await asyncio.wait_for(_one_stream(reader, writer, tokens, delay_ms), 60):
                        stats["ok"] += 1
                    else:
                        stats["errors"] += 1
                        stats["error_kinds"]["bad response"] = stats["error_kinds"].get("bad response", 0) + 1
                        break
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as error:
                stats["errors"] += 1
                stats["error_kinds"][repr(error)[:80]] = stats["error_kinds"].get(repr(error)[:80], 0) + 1
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def sampler() -> None:
        while time.monotonic() < stop_at:
            await asyncio.to_thread(sample)
            await asyncio.sleep(sample_every)

    sampling = asyncio.create_task(sampler())
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await sampling
    return stats


@pytest.mark.soak
@pytest.mark.timeout(300)
def test_soak_1000_streams_for_60s_keep_rss_flat(tmp_path, new_mock, metered_proxy):
    concurrency, seconds, warm, tokens, delay_ms = 1000, 60.0, 10.0, 25, 200
    # This process holds the client side of every stream, the proxy both sides, the mock the server side:
    # all three get the hard limit (the module's mock was started before, so this test starts its own).
    with raised_nofile() as limit:
        if limit < 3 * concurrency:
            pytest.skip(f"RLIMIT_NOFILE hard limit {limit} is too low for {concurrency} streams")
        mock = new_mock()
        proxy = metered_proxy([{"url": mock.url}], usage=usage_config(tmp_path, flush_interval="50ms"))
        fds = warm_up(proxy, mock)
        started = time.monotonic()
        samples: list[tuple[float, int, float]] = []  # (seconds since start, RSS KiB, requests in flight)

        def sample() -> None:
            samples.append((round(time.monotonic() - started, 1), rss_kib(proxy.pid),
                            metric_value(proxy, "llmproxy_inflight_requests")))

        stats = asyncio.run(_streams_for(proxy.port, concurrency, seconds, tokens, delay_ms, sample, 2.0))
    sample()
    steady = [s for s in samples if warm <= s[0] <= seconds]
    rss = [s[1] for s in steady]
    print(f"\n1000 streams for {seconds:.0f} s: {stats['ok']} streams, {stats['errors']} errors "
          f"{stats['error_kinds']}; RSS after warm-up {min(rss)}..{max(rss)} KiB (spread {max(rss) - min(rss)} KiB)")
    print("RSS curve (s, KiB, in flight): " + " ".join(f"{t:.0f}:{r}:{n:.0f}" for t, r, n in samples))
    assert stats["errors"] == 0, stats
    assert min(n for _, _, n in steady) >= 0.9 * concurrency, "1000 streams were in flight throughout"
    assert max(rss) - min(rss) < 20 * 1024, "RSS grows under a steady load"
    assert_idle(proxy, fds)
