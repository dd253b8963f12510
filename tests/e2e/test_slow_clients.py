"""Slow clients end to end: slowloris heads, slow bodies and slow readers against the real proxy.

Debian's `slowhttptest` drives the unauthenticated attacks (slowloris -H, slow body -B, slow read -X); a small
asyncio driver drives the authenticated ones (slowhttptest cannot send an Authorization header). While an
attack runs, a normal client streams a short chat completion every ~100 ms on a fresh connection: all of them
must be served, and their time to first token (connect included) is measured. After every test the
invariants hold: nothing in flight, no pooled connection checked out, no rate-limit slot held, open fds back
to the baseline; the proxy's RSS growth is bounded.

tests/e2e/test_timeouts.py has the basic timeout cases; the precise semantics here go further: where exactly
each cut happens relative to its configured timeout, and that progress (and only progress) defers it.

The soak versions (thousands of connections, repeated attacks) are marked `soak`; `-s` shows the numbers:
    python -m pytest -m soak tests/e2e/test_slow_clients.py -s
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import math
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from tests.support import (
    NO_PERIODIC_PROBES,
    STREAM_CHAT,
    Proc,
    ResponseReader,
    assert_idle,
    http_get,
    metric_value,
    mock_stats,
    open_fds,
    post_request,
    raw_connect,
    read_jsonl,
    recv_until_closed,
    rss_kib,
    wait_for,
    wait_steady,
    write_config,
)

# The proxy under attack: small timeouts, so that every cut happens within the test.
HEAD_S, BODY_S, WRITE_S = 2.0, 2.0, 2.0  # keepalive 5 s: longer, so that it never decides a cut here
TIMEOUTS = {"request_head": "2s", "body": "2s", "write": "2s", "keepalive": "5s"}
# A cut is "at the timeout" within this much (timers, scheduling, a loaded two-CPU runner).
TOLERANCE = 0.5
API_KEY = "sk-slow-clients-test-key-0123456789"
OFFERED = 100 * 1024 * 1024  # what the big backend offers each slow reader
BIG_PATH = f"/?bytes={OFFERED}"  # "/" is a TGI-only path: the router sends it to the big backend only
RSS_SLACK_KIB = 30 * 1024
CONNECTION_KIB = 16  # an open connection's own state (protocol, transport, parser, request): thousands are open
# What one stalled reader may cost the proxy: its transport's high-water mark (64 KiB, connection.py), over
# which the relay stops reading the backend, plus the upstream read that crossed it (uvloop reads up to
# 250 KiB at a time). Everything else waits in socket buffers, or in the backend.
READER_BUDGET_KIB = 320
TTFT_P50_LIMIT = 0.100
TCP_ESTABLISHED = 1
# /proc/net/tcp states of a socket that still has to deliver what it holds (an orphan after close()).
SENDING_STATES = {0x01: "ESTABLISHED", 0x04: "FIN_WAIT1", 0x08: "CLOSE_WAIT", 0x09: "LAST_ACK", 0x0B: "CLOSING"}


# The big backend: a stream of any size, generated as fast as it is read --------------------------------

BIG_BACKEND = r'''
import asyncio, json, socket

STATS = {"connections": 0, "open": 0, "streams": 0, "bytes_sent": 0}
CHUNK = b"data: " + b"x" * 65520 + b"\n\n"


async def handle(reader, writer):
    STATS["connections"] += 1
    STATS["open"] += 1
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
            path, _, query = target.partition("?")
            if path == "/":
                STATS["streams"] += 1
                size = int(dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("bytes", "0"))
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                while size > 0:
                    piece = CHUNK[:size]
                    writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                    STATS["bytes_sent"] += len(piece)
                    size -= len(piece)
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            else:
                status = b"200 OK"
                if path == "/_stats":
                    body = json.dumps(STATS).encode()
                elif path == "/v1/models":
                    body = b'{"object":"list","data":[{"id":"big","object":"model","owned_by":"test"}]}'
                elif path == "/health":
                    body = b""
                else:
                    status, body = b"404 Not Found", b'{"error":"not found"}'
                writer.write(b"HTTP/1.1 %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                             % (status, len(body), body))
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError, IndexError):
        pass
    finally:
        STATS["open"] -= 1
        writer.transport.abort()


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
    for sock in server.sockets:  # segments of a real network, not loopback's 64 KiB (see _non_reader)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1460)
    print("listening on http://127.0.0.1:%d" % server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
'''


class BigBackend:
    def __init__(self, script: Path) -> None:
        self.popen = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.popen.stdout.readline()), daemon=True)
        reader.start()
        reader.join(15)
        match = re.search(r":(\d+)\s*$", lines[0] if lines else "")
        if not match:
            self.stop()
            raise RuntimeError(f"the big backend did not start: {lines}")
        self.url = f"http://127.0.0.1:{match.group(1)}"

    def stats(self) -> dict:
        return json.loads(http_get(self.url + "/_stats")[1])

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


@pytest.fixture(scope="module")
def big_backend(tmp_path_factory):
    script = tmp_path_factory.mktemp("big") / "big_backend.py"
    script.write_text(BIG_BACKEND)
    backend = BigBackend(script)
    yield backend
    backend.stop()


@pytest.fixture(scope="module")
def slowhttptest() -> str:
    path = shutil.which("slowhttptest")
    assert path, "slowhttptest is not installed: scripts/test installs it (apt-get install slowhttptest)"
    return path


# The proxy under test ------------------------------------------------------------------------------------

@dataclass
class Served:
    proxy: Proc
    log: Path
    fd_baseline: int
    rss_baseline: int
    headers: dict[str, str] = field(default_factory=dict)  # what a normal client sends (its API key)

    @property
    def port(self) -> int:
        return self.proxy.port

    def access_log(self) -> list[dict]:
        return read_jsonl(self.log)

    def assert_idle(self) -> None:
        assert self.proxy.popen.poll() is None, "the proxy died:\n" + self.proxy.text()
        assert_idle(self.proxy, self.fd_baseline)


def conclude(served: Served, problems: list[str]) -> None:
    """The invariants first (they must hold whatever else went wrong), then everything found, in one report."""
    try:
        served.assert_idle()
    except AssertionError as error:
        problems.append(f"the invariants do not hold after the test: {error}")
    assert not problems, "\n".join(problems)


def serve(tmp_path: Path, procs: list[Proc], mock: Proc, big: BigBackend | None = None,
          timeouts: dict | None = None, **sections) -> Served:
    """A proxy in front of the mock (chat) and the big backend ("/" streams), warmed up, with its baselines."""
    backends = [{"url": mock.url}]
    if big is not None:
        backends.append({"url": big.url, "type": "tgi", "models": ["big"]})
    server = {"listen": "127.0.0.1:0", "timeouts": timeouts or TIMEOUTS}
    config = write_config(tmp_path, backends, server=server, health_check=NO_PERIODIC_PROBES, **sections)
    proxy = Proc(["serve", "--config", str(config)])
    procs.append(proxy)
    proxy.wait_listening()
    headers = {"Authorization": f"Bearer {API_KEY}"} if "auth" in sections else {}
    served = Served(proxy, tmp_path / "access.log", 0, 0, headers)
    for _ in range(2):  # everything lazily opened is open: a pooled connection, the code paths
        status, _, complete = chat_stream(served.port, headers)
        assert (status, complete) == (200, True), proxy.text()
        if big is not None:
            with raw_connect(served.port) as sock:
                sock.sendall(_get("/?bytes=100000", headers))
                assert ResponseReader(sock).read_head().read_body()[1]
    metric_value(proxy, "llmproxy_inflight_requests")
    # the start-up probes' connections are closed once the count stops moving
    served.fd_baseline = wait_steady(lambda: open_fds(proxy.pid), timeout=10.0)
    served.rss_baseline = rss_kib(proxy.pid)
    return served


def chat_entries(served: Served) -> list[dict]:
    return [r for r in served.access_log() if r.get("path") == "/v1/chat/completions"]


def since_first_byte(entry: dict) -> float:
    """Seconds from the first body bytes the proxy sent the client (its ttft) to the end of the request. A write
    timer cannot start before them; how long a request took to get that far is the machine's load."""
    return (entry["duration_ms"] - (entry["ttft_ms"] or 0.0)) / 1000


def _get(target: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: test", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chat_stream(port: int, headers: dict[str, str] | None = None, tokens: int = 8) -> tuple[int, float, bool]:
    """One streaming chat completion on a fresh connection: (status, seconds to the first event, complete)."""
    started = time.monotonic()
    with raw_connect(port, timeout=10) as sock:
        sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT,
                                  {"x-mock-tokens": str(tokens), **(headers or {})}))
        reader = ResponseReader(sock).read_head()
        if reader.status != 200:
            return reader.status, math.inf, False
        first = reader.read_chunk()
        ttft = time.monotonic() - started
        rest, complete = reader.read_body()
    return 200, ttft, bool(first) and complete and (first + rest).endswith(b"data: [DONE]\n\n")


class Background(threading.Thread):
    """A daemon thread for the span of a `with` block: on leaving it, told to stop (`_done`) and waited for, at
    most `join_timeout` seconds."""

    join_timeout = 5.0

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self._done = threading.Event()

    def __enter__(self) -> Background:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self.join(self.join_timeout)


class NormalClient(Background):
    """Streams a short chat completion every ~100 ms on a fresh connection, timing its first token."""

    join_timeout = 15.0

    def __init__(self, served: Served, period: float = 0.1) -> None:
        super().__init__()
        self.served = served
        self.period = period
        self.results: list[tuple[int, float, bool]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        while not self._done.is_set():
            started = time.monotonic()
            try:
                self.results.append(chat_stream(self.served.port, self.served.headers))
            except (OSError, EOFError, ValueError) as exc:
                self.errors.append(repr(exc))
            self._done.wait(max(0.0, self.period - (time.monotonic() - started)))

    def summary(self) -> dict:
        ttfts = sorted(r[1] for r in self.results if r[0] == 200)
        if not ttfts:
            return {"requests": len(self.results), "errors": len(self.errors)}
        return {"requests": len(self.results), "errors": len(self.errors),
                "p50_ms": round(statistics.median(ttfts) * 1000, 1),
                "p95_ms": round(ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.95))] * 1000, 1),
                "max_ms": round(ttfts[-1] * 1000, 1)}

    def problems(self, min_requests: int) -> list[str]:
        summary = self.summary()
        found = []
        bad = [r for r in self.results if r[0] != 200 or not r[2]]
        if self.errors or bad:
            found.append(f"normal clients were not all served: errors {self.errors[:3]}, bad {bad[:3]}")
        if len(self.results) < min_requests:
            found.append(f"only {len(self.results)} normal requests were made (expected >= {min_requests})")
        if summary.get("p50_ms", math.inf) >= TTFT_P50_LIMIT * 1000:
            found.append(f"normal clients' TTFT p50 is {summary.get('p50_ms')} ms (limit {TTFT_P50_LIMIT * 1000} ms)")
        return found


class Sampler(Background):
    """The proxy's peak RSS and open fds while an attack runs."""

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid
        self.peak_rss = rss_kib(pid)
        self.peak_fds = open_fds(pid)

    def run(self) -> None:
        while not self._done.wait(0.05):
            with contextlib.suppress(OSError, RuntimeError):
                self.peak_rss = max(self.peak_rss, rss_kib(self.pid))
                self.peak_fds = max(self.peak_fds, open_fds(self.pid))


class LastMove(Background):
    """Polls a counter every `interval` s while running; `at` is when (time.time(), the clock of the access
    log's "ts") it was first seen at its latest value: it had stopped moving by then, give or take a poll."""

    join_timeout = 10.0

    def __init__(self, read, interval: float = 0.1) -> None:
        super().__init__()
        self.read = read
        self.interval = interval
        self.value = None
        self.at = time.time()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            with contextlib.suppress(OSError, ValueError, KeyError):
                value = self.read()
                if value != self.value:
                    self.value, self.at = value, time.time()


def ended_at(entry: dict) -> float:
    """When the proxy ended the request (time.time()): its access-log line's start plus its duration."""
    started = datetime.fromisoformat(entry["ts"].replace("Z", "+00:00")).timestamp()
    return started + entry["duration_ms"] / 1000


def sockets_holding_data(port: int) -> dict[int, tuple[str, int]]:
    """Sockets whose local end is 127.0.0.1:`port` that still hold bytes to send, by remote port: (state,
    bytes queued).

    After the proxy drops a connection with close() (not a reset), the kernel keeps the socket as an orphan
    and keeps delivering what was queued to the peer, however slowly it reads: the connection is not cut.
    """
    held = {}
    suffix = f":{port:04X}"
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            state, queued = int(fields[3], 16), int(fields[4].split(":")[0], 16)
            if fields[1].endswith(suffix) and state in SENDING_STATES and queued:
                held[int(fields[2].rsplit(":", 1)[1], 16)] = (SENDING_STATES[state], queued)
    return held


def tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def spread(values: list[float]) -> str:
    if not values:
        return "none"
    values = sorted(values)
    return (f"n={len(values)} min={values[0]:.2f}s p50={statistics.median(values):.2f}s "
            f"max={values[-1]:.2f}s")


def report(name: str, **numbers) -> None:
    print(f"\n[{name}] " + " ".join(f"{k}={v}" for k, v in numbers.items()))


# slowhttptest --------------------------------------------------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class SlowReport:
    rows: list[dict[str, int]]  # the CSV: connection states each second
    exit_status: str
    seconds: float
    output: str

    @property
    def unavailable(self) -> bool:
        """slowhttptest's probe found the service unavailable at some point."""
        return (any(row["Service Available"] == 0 for row in self.rows)
                or re.search(r"service available:\s+NO", self.output) is not None)

    @property
    def unavailable_at(self) -> list[int]:
        """The seconds into the attack at which slowhttptest's table says the service was unavailable."""
        return [row["Seconds"] for row in self.rows if row["Service Available"] == 0]


def run_slowhttptest(binary: str, args: list[str], url: str, prefix: Path, while_running=None) -> SlowReport:
    """Run one attack to its end (bounded by -l); `while_running(popen)` is called once it is under way."""
    started = time.monotonic()
    popen = subprocess.Popen([binary, *args, "-u", url, "-g", "-o", str(prefix)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    collected: list[str] = []
    drain = threading.Thread(target=lambda: collected.extend(popen.stdout), daemon=True)
    drain.start()
    try:
        if while_running is not None:
            while_running(popen)
        popen.wait(120)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait(5)
        drain.join(5)
    seconds = time.monotonic() - started
    output = ANSI.sub("", "".join(collected))
    exit_status = re.findall(r"Exit status:\s*(.+)", output)
    with open(f"{prefix}.csv") as table:
        rows = [{k.strip(): int(v) for k, v in row.items() if k} for row in csv.DictReader(table)]
    assert rows, output
    return SlowReport(rows, exit_status[-1].strip() if exit_status else "", seconds, output)


@dataclass(frozen=True)
class Scale:
    connections: int
    rate: int
    rounds: int  # attacks run back to back (the soak repeats them: what leaks would pile up)


SHORT = Scale(connections=500, rate=200, rounds=1)
SOAK = Scale(connections=2000, rate=500, rounds=6)
SCALES = [pytest.param(SHORT, id="short"),
          pytest.param(SOAK, id="soak", marks=[pytest.mark.soak, pytest.mark.timeout(600)])]


def _attack(served: Served, binary: str, tmp_path: Path, mode: list[str], url: str, scale: Scale,
            while_running=None) -> tuple[list[SlowReport], NormalClient, Sampler]:
    reports = []
    with Sampler(served.proxy.pid) as sampler, NormalClient(served) as normal:
        time.sleep(0.3)  # the normal client's first requests are served before the attack
        for round_ in range(scale.rounds):
            args = [*mode, "-c", str(scale.connections), "-r", str(scale.rate), "-p", "3"]
            reports.append(run_slowhttptest(binary, args, url, tmp_path / f"slow{round_}", while_running))
    return reports, normal, sampler


@pytest.mark.parametrize("scale", SCALES)
def test_slowloris_heads_are_cut_at_the_head_deadline_while_normal_clients_are_served(
        scale, slowhttptest, mock_vllm, tmp_path, procs):
    served = serve(tmp_path, procs, mock_vllm)
    # A header line every second, never the end of the head; the test would last 15 s if the proxy let it.
    mode = ["-H", "-i", "1", "-x", "24", "-l", "15"]
    reports, normal, sampler = _attack(served, slowhttptest, tmp_path, mode,
                                       served.proxy.url + "/v1/chat/completions", scale)
    cut = [r for r in served.access_log() if r.get("error") == "request head not received in time"]
    growth = sampler.peak_rss - served.rss_baseline
    report("slowloris", **normal.summary(), cut_408=len(cut), attack_s=[round(r.seconds, 1) for r in reports],
           peak_fds=sampler.peak_fds, rss_growth_mib=round(growth / 1024, 1))
    problems = normal.problems(min_requests=int(sum(r.seconds for r in reports) * 5))
    for rep in reports:
        # slowhttptest stops early only when the server closed every connection it opened.
        if rep.exit_status != "No open connections left":
            problems.append(f"slowhttptest ended with {rep.exit_status!r}: the proxy left slow heads open")
        if rep.seconds > scale.connections / scale.rate + HEAD_S + 3:
            problems.append(f"the attack lasted {rep.seconds:.1f}s: slow heads were not cut at the deadline")
        if rep.unavailable:
            problems.append("slowhttptest's probe found the proxy unavailable")
    if len(cut) != scale.connections * scale.rounds or any(r["status"] != 408 for r in cut):
        problems.append(f"{len(cut)} heads were answered 408 at the deadline, not {scale.connections * scale.rounds}")
    if growth > RSS_SLACK_KIB + scale.connections * CONNECTION_KIB:
        problems.append(f"RSS grew {growth} KiB during the attack")
    conclude(served, problems)


@pytest.mark.parametrize("scale", SCALES)
def test_slow_bodies_are_cut_by_the_body_timeout_while_normal_clients_are_served(
        scale, slowhttptest, mock_vllm, tmp_path, procs):
    served = serve(tmp_path, procs, mock_vllm)
    # A head declaring 8 KiB of body, 7 bytes of it, then a few bytes every 3 s: more than the body timeout.
    mode = ["-B", "-i", "3", "-s", "8192", "-x", "24", "-l", "15"]
    reports, normal, sampler = _attack(served, slowhttptest, tmp_path, mode,
                                       served.proxy.url + "/v1/chat/completions", scale)
    cut = [r for r in served.access_log() if r.get("error") == "request body not received in time"]
    durations = [r["duration_ms"] / 1000 for r in cut]
    growth = sampler.peak_rss - served.rss_baseline
    report("slow body", **normal.summary(), cut_408=len(cut), cut_after=spread(durations),
           attack_s=[round(r.seconds, 1) for r in reports], rss_growth_mib=round(growth / 1024, 1))
    problems = normal.problems(min_requests=int(sum(r.seconds for r in reports) * 5))
    for rep in reports:
        if rep.exit_status != "No open connections left":
            problems.append(f"slowhttptest ended with {rep.exit_status!r}: the proxy left slow bodies open")
        if rep.unavailable:
            problems.append("slowhttptest's probe found the proxy unavailable")
    if len(cut) != scale.connections * scale.rounds or any(r["status"] != 408 for r in cut):
        problems.append(f"{len(cut)} bodies were answered 408, not {scale.connections * scale.rounds}")
    # slowhttptest sends follow-ups on one timer for all connections: a connection's first one comes 0-3 s after
    # its head. The body timeout then cuts it 2 s after the head, or 2 s after that follow-up: 2-4 s after it
    # started. A later cut let a pause longer than the body timeout pass.
    late = [d for d in durations if not BODY_S - 0.05 <= d <= 2 * BODY_S + TOLERANCE]
    if late:
        problems.append(f"{len(late)} bodies were not cut by the body timeout ({BODY_S}s without progress): "
                        f"{spread(late)} after their request started")
    if growth > RSS_SLACK_KIB + scale.connections * CONNECTION_KIB:
        problems.append(f"RSS grew {growth} KiB during the attack")
    conclude(served, problems)


# Fewer slow readers: on loopback (64 KiB segments) each costs the kernel ~7 MB of socket buffers (the proxy's
# send buffer to it, and its upstream connection's), and 500 at once put the machine under TCP memory pressure.
@pytest.mark.parametrize("scale", [pytest.param(Scale(200, 100, 1), id="short"),
                                   pytest.param(Scale(500, 200, 4), id="soak",
                                                marks=[pytest.mark.soak, pytest.mark.timeout(600)])])
def test_slow_readers_are_cut_by_the_write_timeout_with_memory_bounded(
        scale, slowhttptest, mock_vllm, big_backend, tmp_path, procs):
    served = serve(tmp_path, procs, mock_vllm, big_backend)
    before = big_backend.stats()
    # Receive windows of 1-512 bytes, 5 bytes read per second; slowhttptest never notices a server-side
    # close in this mode (it reads what its socket already holds first), so it always runs -l seconds.
    mode = ["-X", "-w", "1", "-y", "512", "-n", "1", "-z", "5", "-l", "10"]
    cut_window = scale.connections / scale.rate + WRITE_S + 2.0
    checks: list[dict] = []
    rounds: list[tuple[float, float]] = []  # each attack's start, and when the backend stopped sending (time.time())

    def while_running(popen: subprocess.Popen) -> None:
        # Once every slow reader has been cut, and while slowhttptest still holds them, the proxy holds none:
        # no fd, and no socket still delivering queued bytes to a reader that drains 5 bytes a second.
        begun = time.time()
        with LastMove(lambda: big_backend.stats()["bytes_sent"]) as sending:
            started = time.monotonic()
            time.sleep(cut_window)
            while open_fds(served.proxy.pid) > served.fd_baseline + 4 and time.monotonic() - started < 8.5:
                time.sleep(0.05)
            checks.append({"fds": open_fds(served.proxy.pid), "at": time.monotonic() - started, "running":
                           popen.poll() is None, "held": list(sockets_holding_data(served.port).values())})
        rounds.append((begun, sending.at))

    def stalled_by(entry: dict) -> float:
        """When the backend last sent a byte during the entry's attack: by then every stream waited on its reader."""
        started = ended_at(entry) - entry["duration_ms"] / 1000
        return [stalled for begun, stalled in rounds if begun <= started + 0.01][-1]

    reports, normal, sampler = _attack(served, slowhttptest, tmp_path, mode, served.proxy.url + BIG_PATH,
                                       scale, while_running)
    after = big_backend.stats()
    cut = [r for r in served.access_log() if r.get("error") == "client did not read the response in time"]
    durations = [r["duration_ms"] / 1000 for r in cut]
    growth = sampler.peak_rss - served.rss_baseline
    streams = after["streams"] - before["streams"]
    sent_mib = (after["bytes_sent"] - before["bytes_sent"]) / 2**20
    # Closed by the proxy (no fd left) yet still delivering: ESTABLISHED ones are the proxy's, counted by fds.
    orphans = [held for check in checks for held in check["held"] if held[0] != "ESTABLISHED"]
    report("slow read", **normal.summary(), cut_cD=len(cut), cut_after=spread(durations),
           backend_sent_mib_per_stream=round(sent_mib / max(1, streams), 1), peak_fds=sampler.peak_fds,
           rss_growth_mib=round(growth / 1024, 1), kib_per_reader=round(growth / scale.connections),
           orphaned_sockets=len(orphans), orphaned_mib=round(sum(q for _, q in orphans) / 2**20, 1),
           backend_sent_until_s=[round(stalled - begun, 1) for begun, stalled in rounds])
    problems = normal.problems(min_requests=int(sum(r.seconds for r in reports) * 5))
    for check in checks:
        if not check["running"] or check["fds"] > served.fd_baseline + 4:
            problems.append(f"{check['at']:.1f}s into the attack the proxy still had {check['fds']} fds open "
                            f"(baseline {served.fd_baseline}; slowhttptest running: {check['running']})")
    if any(rep.unavailable for rep in reports):
        problems.append(f"slowhttptest's probe found the proxy unavailable (at {[r.unavailable_at for r in reports]} "
                        f"s into each attack; the backend sent until "
                        f"{[round(stalled - begun, 1) for begun, stalled in rounds]} s)")
    if len(cut) < scale.connections * scale.rounds:
        problems.append(f"only {len(cut)} slow readers were cut by the write timeout, "
                        f"not {scale.connections * scale.rounds}")
    # The write timer starts when the proxy has to stop writing, once the socket buffers are full:
    # slowhttptest's loopback connections (64 KiB segments) make the kernel buffer ~3 MB for each, and
    # 500 of them take the proxy a second or two to fill; on a loaded machine, longer. So a cut more than 2.5 s
    # after its request started is late only if it also came more than the write timeout (and TOLERANCE) after
    # the backend's last byte: how long the buffers took to fill is the machine's, the timeout the proxy's.
    late = [d for r, d in zip(cut, durations, strict=True)
            if d < WRITE_S or (d > WRITE_S + 2.5 and ended_at(r) > stalled_by(r) + WRITE_S + TOLERANCE)]
    if late:
        problems.append(f"{len(late)} slow readers were not cut at the write timeout ({WRITE_S}s): {spread(late)}")
    if after["open"] > 1:
        problems.append(f"{after['open'] - 1} upstream connections were left open for cut readers")
    if sent_mib > streams * OFFERED / 2**20 / 4:
        problems.append(f"the backend sent {sent_mib:.0f} MiB for {streams} streams: no backpressure")
    if orphans:
        problems.append(
            f"{len(orphans)} connections the write timeout 'cut' still deliver {sum(q for _, q in orphans)} "
            f"queued bytes to their slow readers (e.g. {orphans[:3]}): the proxy close()s them instead of "
            f"resetting them, so the kernel keeps each as an orphan with a full send buffer")
    if growth > RSS_SLACK_KIB + scale.connections * READER_BUDGET_KIB:
        problems.append(f"RSS grew {growth // 1024} MiB for {scale.connections} slow readers "
                        f"({growth // scale.connections} KiB each; budget {READER_BUDGET_KIB} KiB each + 30 MiB)")
    conclude(served, problems)


# Authenticated slow clients: a small asyncio driver -------------------------------------------------------

@dataclass
class Cut:
    answer: bytes  # what the connection received before it ended
    after: float  # seconds from its reference moment to its end; inf: not cut within the test
    local: int = 0  # a reader left open: its local port
    held: tuple[str, int] | None = None  # not cut: what the proxy side of the connection still holds for it


async def _collect(reader: asyncio.StreamReader, into: bytearray) -> float:
    """Read until the connection ends (EOF or reset); return when."""
    with contextlib.suppress(OSError):
        while chunk := await reader.read(65536):
            into += chunk
    return time.monotonic()


async def _trickle(port: int, payload: bytes, interval: float, give_up: float) -> Cut:
    """Send `payload` one byte every `interval`; the cut is timed from the connect, as the proxy's head deadline
    runs from accept (timed from after the connect, a loaded test loop that resumes late would see it early)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = bytearray()
    ended = asyncio.ensure_future(_collect(reader, answer))
    try:
        for i in range(len(payload)):
            if ended.done() or time.monotonic() - started > give_up:
                break
            writer.write(payload[i:i + 1])
            await asyncio.wait([ended], timeout=interval)
        await asyncio.wait([ended], timeout=max(0.0, give_up - (time.monotonic() - started)))
    finally:
        writer.transport.abort()
    if not ended.done():
        ended.cancel()
        return Cut(bytes(answer), math.inf)
    return Cut(bytes(answer), ended.result() - started)


async def _stall(port: int, payload: bytes, give_up: float) -> Cut:
    """Send `payload` at once, then nothing; the cut is timed from the send."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = bytearray()
    ended = asyncio.ensure_future(_collect(reader, answer))
    writer.write(payload)
    started = time.monotonic()
    try:
        await asyncio.wait([ended], timeout=give_up)
    finally:
        writer.transport.abort()
    if not ended.done():
        ended.cancel()
        return Cut(bytes(answer), math.inf)
    return Cut(bytes(answer), ended.result() - started)


def _non_reader(rcvbuf: int = 4096) -> socket.socket:
    """A client socket with a small receive window and the segment size of a real network. On loopback the
    segments are 64 KiB, so the proxy's kernel would buffer megabytes for each client (its send buffer grows
    to ten segments): every slow reader would cost seconds of copying before the proxy even has to wait."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: they shape the handshake
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1460)
    return sock


async def _stop_reading(port: int, request: bytes, give_up: float, open_readers: dict[int, socket.socket]) -> Cut:
    """Send `request`, never read; the cut (the connection leaving ESTABLISHED: a reset) is timed from the first
    response byte received (from the send if none came): the write timer cannot start before the proxy writes,
    and how long a request takes to get that far is the machine's load, not the timeout.
    A connection not cut within `give_up` is left open in `open_readers` (by local port) for _drive to inspect."""
    loop = asyncio.get_running_loop()
    sock = _non_reader()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, request)
        started = sent = time.monotonic()
        peeked = b""
        while time.monotonic() - sent < give_up:
            if not peeked:
                with contextlib.suppress(BlockingIOError, OSError):
                    peeked = sock.recv(12, socket.MSG_PEEK)
                if peeked:
                    started = time.monotonic()
            if tcp_state(sock) != TCP_ESTABLISHED:
                return Cut(peeked, time.monotonic() - started)
            await asyncio.sleep(0.02)
        local = sock.getsockname()[1]
        open_readers[local], sock = sock, None
        return Cut(peeked, math.inf, local)
    finally:
        if sock is not None:
            sock.close()


def _drive(coroutines, port: int = 0, open_readers: dict[int, socket.socket] | None = None) -> list[Cut]:
    """Run the slow clients; then note what the proxy side still holds for readers left open, and close them."""
    async def main() -> list[Cut]:
        return await asyncio.gather(*coroutines)
    try:
        cuts = asyncio.run(main())
        if open_readers:
            held = sockets_holding_data(port)
            for cut in cuts:
                if cut.local:
                    cut.held = held.get(cut.local, ("nothing queued", 0))
        return cuts
    finally:
        for sock in (open_readers or {}).values():
            sock.close()


SLOW = 200  # authenticated slow clients of each kind


@pytest.fixture(scope="module")
def auth_served(mock_vllm, big_backend, tmp_path_factory):
    procs: list[Proc] = []
    try:  # a proxy that started but failed its warm-up is stopped too, not left running after the session
        yield serve(tmp_path_factory.mktemp("auth"), procs, mock_vllm, big_backend,
                    auth={"enabled": True, "keys": [{"key": API_KEY, "user_id": "slow"}]},
                    rate_limit={"enabled": True, "per_key": {"max_concurrent": 1000}})
    finally:
        for proc in procs:
            proc.stop()


def _authenticated(served: Served, coroutines, give_up: float,
                   open_readers: dict[int, socket.socket] | None = None) -> tuple[list[Cut], NormalClient, Sampler]:
    served.rss_baseline = rss_kib(served.proxy.pid)
    with Sampler(served.proxy.pid) as sampler, NormalClient(served) as normal:
        time.sleep(0.3)
        started = time.monotonic()
        cuts = _drive(coroutines, served.port, open_readers)
        assert time.monotonic() - started < give_up + 5
    return cuts, normal, sampler


AUTH_HEAD = (f"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer {API_KEY}\r\nHost: test\r\n"
             f"Content-Type: application/json\r\nContent-Length: {len(STREAM_CHAT)}\r\n\r\n").encode()


def test_authenticated_heads_trickled_every_100ms_are_cut_at_the_head_deadline(auth_served):
    served = auth_served
    give_up = HEAD_S + 3
    cuts, normal, sampler = _authenticated(
        served, [_trickle(served.port, AUTH_HEAD + STREAM_CHAT, 0.1, give_up) for _ in range(SLOW)], give_up)
    _conclude_408_cuts(served, "auth slow heads", "trickled heads", cuts, normal, sampler, HEAD_S)


def test_authenticated_bodies_that_stall_are_cut_by_the_body_timeout(auth_served):
    served = auth_served
    give_up = BODY_S + 3
    stalled = AUTH_HEAD + STREAM_CHAT[:10]  # a valid, authenticated head and the start of its body
    cuts, normal, sampler = _authenticated(served, [_stall(served.port, stalled, give_up) for _ in range(SLOW)],
                                           give_up)
    _conclude_408_cuts(served, "auth slow bodies", "stalled bodies", cuts, normal, sampler, BODY_S)


def _conclude_408_cuts(served, label: str, what: str, cuts, normal, sampler, timeout: float) -> None:
    """Every slow connection answered 408 at `timeout` (± TOLERANCE), normal clients served, RSS bounded."""
    after = [c.after for c in cuts]
    report(label, **normal.summary(), cut_after=spread(after),
           rss_growth_mib=round((sampler.peak_rss - served.rss_baseline) / 1024, 1))
    problems = normal.problems(min_requests=int(timeout * 5))
    not_408 = [c.answer[:40] for c in cuts if not c.answer.startswith(b"HTTP/1.1 408 ")]
    if not_408:
        problems.append(f"{len(not_408)} {what} were not answered 408: {not_408[:3]}")
    off = [a for a in after if not timeout - 0.05 <= a <= timeout + TOLERANCE]
    if off:
        problems.append(f"{len(off)} {what} were not cut at the {timeout}s timeout: {spread(off)}")
    if sampler.peak_rss - served.rss_baseline > RSS_SLACK_KIB:
        problems.append(f"RSS grew {sampler.peak_rss - served.rss_baseline} KiB")
    conclude(served, problems)


def test_authenticated_streams_whose_readers_stop_reading_are_cut_after_the_write_timeout(auth_served, mock_vllm):
    served = auth_served
    give_up = WRITE_S + 4
    log_before = len(served.access_log())
    big = _get(BIG_PATH, served.headers)
    # A few metered chat streams too (the mock generates them far slower than the big backend).
    chat = post_request("/v1/chat/completions", STREAM_CHAT, {"x-mock-tokens": "1000000", **served.headers})
    open_readers: dict[int, socket.socket] = {}
    readers = [_stop_reading(served.port, big, give_up, open_readers) for _ in range(SLOW)]
    readers += [_stop_reading(served.port, chat, give_up, open_readers) for _ in range(10)]
    cuts, normal, sampler = _authenticated(served, readers, give_up, open_readers)
    entries = served.access_log()[log_before:]
    cut = [r for r in entries if r.get("error") == "client did not read the response in time"]
    durations = [r["duration_ms"] / 1000 for r in cut]
    growth = sampler.peak_rss - served.rss_baseline
    reset = [c.after for c in cuts if c.after != math.inf]
    report("auth slow readers", **normal.summary(), proxy_cut_after=spread(durations),
           proxy_cut_after_first_byte=spread([since_first_byte(r) for r in cut]),
           client_saw_reset=spread(reset), rss_growth_mib=round(growth / 1024, 1),
           kib_per_reader=round(growth / len(readers)))
    problems = normal.problems(min_requests=int(WRITE_S * 5))
    not_200 = [c.answer for c in cuts if not c.answer.startswith(b"HTTP/1.1 200")]
    if not_200:
        problems.append(f"{len(not_200)} slow readers did not get their stream started: {not_200[:3]}")
    if len(cut) != len(readers):
        problems.append(f"{len(cut)} authenticated slow readers were cut by the write timeout, not {len(readers)}")
    # The write timer starts once the proxy has to stop writing: after the socket buffers (a 4 KiB window,
    # 1460-byte segments: they fill at once) took its first bytes. The cut is timed from those: how long 210
    # requests at once took to get their streams going is the machine's load, not the write timeout.
    late = [since_first_byte(r) for r in cut
            if not (r["duration_ms"] / 1000 >= WRITE_S and since_first_byte(r) <= WRITE_S + 1.0)]
    if late:
        problems.append(f"{len(late)} readers were not cut at the {WRITE_S}s write timeout: {spread(late)}")
    held = [c.held for c in cuts if c.after == math.inf]
    if len(reset) != len(cuts) or any(a > WRITE_S + 1.5 for a in reset):
        problems.append(f"only {len(reset)} of {len(cuts)} slow readers saw their connection cut (reset) within "
                        f"{give_up}s; the others were still established, their proxy-side sockets orphaned and "
                        f"still delivering what the proxy had queued (e.g. {held[:3]})")
    if growth > RSS_SLACK_KIB + len(readers) * READER_BUDGET_KIB:
        problems.append(f"RSS grew {growth // 1024} MiB for {len(readers)} slow readers "
                        f"({growth // len(readers)} KiB each; budget {READER_BUDGET_KIB} KiB each + 30 MiB)")
    conclude(served, problems)  # with rate limiting on: no concurrency slot left held by a cut reader


# Precise semantics -----------------------------------------------------------------------------------------

def _parallel(*calls):
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result() for f in futures]


def _trickle_blocking(sock: socket.socket, payload: bytes, interval: float, give_up: float) -> tuple[bytes, float]:
    """Send one byte every `interval` until the proxy answers or closes; return (answer, seconds from the
    first byte to the end of the connection)."""
    started = time.monotonic()
    answer = b""
    for i in range(len(payload)):
        with contextlib.suppress(OSError):
            sock.send(payload[i:i + 1])
        sock.settimeout(max(0.01, min(interval, give_up - (time.monotonic() - started))))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            if time.monotonic() - started > give_up:
                return answer, math.inf
            continue
        except OSError:
            return answer, time.monotonic() - started
        if not data:
            return answer, time.monotonic() - started
        answer += data
        sock.settimeout(give_up)
        answer += recv_until_closed(sock)
        return answer, time.monotonic() - started
    return answer, math.inf


SLOW_HEAD = b"GET /v1/models HTTP/1.1\r\nHost: test\r\nX-Trickle: " + b"a" * 60


def test_a_head_trickled_one_byte_per_second_is_cut_at_the_absolute_deadline(mock_vllm, tmp_path, procs):
    served = serve(tmp_path, procs, mock_vllm)

    def fresh() -> tuple[bytes, float]:
        with raw_connect(served.port, timeout=10) as sock:
            return _trickle_blocking(sock, SLOW_HEAD, 1.0, HEAD_S + 3)

    def after_a_request() -> tuple[bytes, float]:
        # The next head on a kept-alive connection, after 1.5 s idle: its own deadline, from its first byte.
        with raw_connect(served.port, timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
            assert ResponseReader(sock).read_head().read_body()[1]
            time.sleep(1.5)
            return _trickle_blocking(sock, SLOW_HEAD, 1.0, HEAD_S + 3)

    (first, first_after), (second, second_after) = _parallel(fresh, after_a_request)
    report("head 1 byte/s", fresh_cut_after=round(first_after, 2), kept_alive_cut_after=round(second_after, 2))
    assert first.startswith(b"HTTP/1.1 408 ") and second.startswith(b"HTTP/1.1 408 ")
    assert b"connection: close" in first.lower()
    # Bytes kept arriving at 0, 1, 2 s: none of them moved the deadline.
    assert HEAD_S - 0.05 <= first_after <= HEAD_S + TOLERANCE
    assert HEAD_S - 0.05 <= second_after <= HEAD_S + TOLERANCE
    served.assert_idle()


def test_idle_connections_are_closed_after_the_keepalive_timeout(mock_vllm, tmp_path, procs):
    # A connection that never sends a byte is closed by the head deadline, which runs from accept; one idle
    # after a response by the keep-alive timeout. Both are 1.5 s here; neither gets an answer.
    keepalive = 1.5
    served = serve(tmp_path, procs, mock_vllm, timeouts={**TIMEOUTS, "keepalive": "1500ms", "request_head": "1500ms"})

    def silent() -> tuple[bytes, float]:
        with raw_connect(served.port, timeout=10) as sock:  # never sends a byte
            started = time.monotonic()
            return recv_until_closed(sock), time.monotonic() - started

    def after_a_response() -> tuple[bytes, float]:
        with raw_connect(served.port, timeout=10) as sock:
            sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT, {"x-mock-tokens": "3"}))
            reader = ResponseReader(sock).read_head()
            assert reader.read_body()[1]
            started = time.monotonic()
            return reader.buffer + recv_until_closed(sock), time.monotonic() - started

    (silent_answer, silent_after), (idle_answer, idle_after) = _parallel(silent, after_a_response)
    report("keepalive", silent_closed_after=round(silent_after, 2), idle_closed_after=round(idle_after, 2))
    assert silent_answer == b"" and idle_answer == b"", "an idle connection is closed without an answer"
    assert keepalive - 0.05 <= silent_after <= keepalive + TOLERANCE
    assert keepalive - 0.05 <= idle_after <= keepalive + TOLERANCE
    served.assert_idle()


def _send_slowly(sock: socket.socket, head: bytes, body: bytes, pieces: int, interval: float) -> float:
    """Send the head and the body in `pieces` pieces, one every `interval`; return when the last piece left."""
    step = math.ceil(len(body) / pieces)
    sock.sendall(head)
    for i in range(0, len(body), step):
        sock.sendall(body[i:i + step])
        if i + step < len(body):
            time.sleep(interval)
    return time.monotonic()


def test_a_body_that_keeps_making_progress_is_not_cut_however_long_it_takes(mock_vllm, tmp_path, procs):
    served = serve(tmp_path, procs, mock_vllm, timeouts={**TIMEOUTS, "body": "1s"})
    request = post_request("/v1/chat/completions", STREAM_CHAT, {"x-mock-tokens": "3"})
    head, body = request[:len(request) - len(STREAM_CHAT)], STREAM_CHAT
    chunked_head = head.replace(f"Content-Length: {len(STREAM_CHAT)}".encode(), b"Transfer-Encoding: chunked")

    def content_length() -> tuple[int, bytes, float]:
        with raw_connect(served.port, timeout=10) as sock:
            started = time.monotonic()
            _send_slowly(sock, head, body, 10, 0.35)  # 3.2 s in all: more than three body timeouts
            reader = ResponseReader(sock).read_head()
            return reader.status, reader.read_body()[0], time.monotonic() - started

    def chunked() -> tuple[int, bytes, float]:
        encoded = b"".join(b"%x\r\n%b\r\n" % (len(STREAM_CHAT[i:i + 8]), STREAM_CHAT[i:i + 8])
                           for i in range(0, len(STREAM_CHAT), 8))
        with raw_connect(served.port, timeout=10) as sock:
            started = time.monotonic()
            _send_slowly(sock, chunked_head, encoded + b"0\r\n\r\n", 10, 0.35)
            reader = ResponseReader(sock).read_head()
            return reader.status, reader.read_body()[0], time.monotonic() - started

    results = _parallel(content_length, chunked)
    report("progressing bodies", took=[round(r[2], 2) for r in results])
    for status, response, took in results:
        assert status == 200, response
        assert response.endswith(b"data: [DONE]\n\n")
        assert took > 3 * 1.0
    served.assert_idle()


def test_a_stalled_body_is_cut_one_body_timeout_after_its_last_progress(mock_vllm, tmp_path, procs):
    served = serve(tmp_path, procs, mock_vllm)
    request = post_request("/v1/chat/completions", STREAM_CHAT)
    head = request[:len(request) - len(STREAM_CHAT)]

    def stall_after(progress_at: float) -> tuple[bytes, float]:
        """Head and 5 body bytes; 3 more at `progress_at`; then nothing. Seconds from the last progress."""
        with raw_connect(served.port, timeout=10) as sock:
            sock.sendall(head + STREAM_CHAT[:5])
            time.sleep(progress_at)
            sock.sendall(STREAM_CHAT[5:8])
            last_progress = time.monotonic()
            answer = recv_until_closed(sock)
            return answer, time.monotonic() - last_progress

    results = _parallel(lambda: stall_after(0.3), lambda: stall_after(1.0), lambda: stall_after(1.8))
    report("stalled body", cut_after_last_progress=[round(r[1], 2) for r in results],
           progress_at=[0.3, 1.0, 1.8])
    for answer, _ in results:
        assert answer.startswith(b"HTTP/1.1 408 ")
    served.assert_idle()
    # "The longest pause without body progress": the cut comes one body timeout after the last byte.
    assert [BODY_S - 0.05 <= after <= BODY_S + TOLERANCE for _, after in results] == [True] * 3, (
        f"cut {[round(r[1], 2) for r in results]} s after the last progress (at 0.3, 1.0, 1.8 s), "
        f"body timeout {BODY_S} s")


def test_a_reader_that_stops_reading_a_stream_is_cut_after_the_write_timeout_with_memory_bounded(
        mock_vllm, tmp_path, procs):
    served = serve(tmp_path, procs, mock_vllm)
    disconnects = mock_stats(mock_vllm)["client_disconnects_midstream"]
    # 500 000 events: over 100 MB offered by the backend, as fast as the proxy takes them.
    request = post_request("/v1/chat/completions", STREAM_CHAT, {"x-mock-tokens": "500000"})
    with Sampler(served.proxy.pid) as sampler:
        open_readers: dict[int, socket.socket] = {}
        (cut,) = _drive([_stop_reading(served.port, request, WRITE_S + 3, open_readers)], served.port, open_readers)
    entry = chat_entries(served)[-1]
    growth = sampler.peak_rss - served.rss_baseline
    report("stopped reader", proxy_cut_after=entry["duration_ms"] / 1000, bytes_out=entry["bytes_out"],
           client_saw_reset_after=cut.after, rss_growth_mib=round(growth / 1024, 1), still_delivering=cut.held)
    assert cut.answer.startswith(b"HTTP/1.1 200")
    assert entry["termination"] == "cD" and entry["error"] == "client did not read the response in time"
    assert WRITE_S <= entry["duration_ms"] / 1000 <= WRITE_S + TOLERANCE
    assert growth < RSS_SLACK_KIB
    wait_for(lambda: mock_stats(mock_vllm)["client_disconnects_midstream"] > disconnects, timeout=3.0)
    served.assert_idle()
    # Cut means cut: the reader's connection is reset, not left to the kernel to keep feeding it.
    assert cut.after <= WRITE_S + TOLERANCE + 0.5, (
        f"the proxy logged the cut after {entry['duration_ms']} ms, but the client's connection was still "
        f"established {WRITE_S + 3}s after its request; the proxy side is an orphan still delivering {cut.held}")


def test_each_stalled_reader_costs_the_proxy_a_bounded_amount_of_memory(mock_vllm, big_backend, tmp_path, procs):
    """While a reader that stopped reading waits for its write timeout, the proxy holds its transport's
    high-water mark and one upstream read for it, no more: the rest waits in socket buffers and the backend."""
    served = serve(tmp_path, procs, mock_vllm, big_backend, timeouts={**TIMEOUTS, "write": "30s"})
    count = 200
    sent = [big_backend.stats()["bytes_sent"]]
    readers = []
    try:
        for _ in range(count):
            sock = _non_reader()
            readers.append(sock)
            sock.settimeout(5)
            sock.connect(("127.0.0.1", served.port))
            sock.sendall(_get(BIG_PATH))

        def all_paused() -> bool:  # the backend stopped sending: every stream waits on its reader
            time.sleep(0.25)
            sent.append(big_backend.stats()["bytes_sent"])
            return len(sent) > 3 and sent[-1] == sent[-2] == sent[-3]
        wait_for(all_paused, timeout=20.0)
        assert metric_value(served.proxy, "llmproxy_inflight_requests") == count
        growth = rss_kib(served.proxy.pid) - served.rss_baseline
        report("stalled readers", readers=count, rss_growth_mib=round(growth / 1024, 1),
               kib_per_reader=round(growth / count), backend_sent_mib_per_reader=round(
                   (sent[-1] - sent[0]) / count / 2**20, 2))
    finally:
        for sock in readers:
            sock.close()
    served.assert_idle()
    assert growth / count <= READER_BUDGET_KIB, (
        f"each stalled reader costs the proxy {growth / count:.0f} KiB (budget {READER_BUDGET_KIB} KiB: the "
        f"64 KiB high-water mark and one upstream read)")


def test_a_slow_reader_that_keeps_making_progress_is_not_cut(mock_vllm, tmp_path, procs):
    served = serve(tmp_path, procs, mock_vllm, timeouts={**TIMEOUTS, "write": "1s"})
    request = post_request("/v1/chat/completions", STREAM_CHAT, {"x-mock-tokens": "500000"})
    reading_for = 4.0  # four write timeouts

    def stopped() -> None:
        """The control: what the socket buffers absorb for a reader that reads nothing (logged as bytes_out)."""
        _drive([_stop_reading(served.port, request, 3.0, {})])

    def slow_reader() -> tuple[int, bool]:
        sock = _non_reader(65536)
        with sock:
            sock.settimeout(5)
            sock.connect(("127.0.0.1", served.port))
            sock.sendall(request)
            received, started = 0, time.monotonic()
            while time.monotonic() - started < reading_for:
                data = sock.recv(65536)  # ~1.3 MB/s: far slower than the backend, but always progressing
                if not data:
                    return received, False
                received += len(data)
                time.sleep(0.05)
            return received, tcp_state(sock) == TCP_ESTABLISHED

    chats = len(chat_entries(served))
    _, (received, still_open) = _parallel(stopped, slow_reader)
    entries = wait_for(lambda: chat_entries(served)[chats:] if len(chat_entries(served)) >= chats + 2 else None)
    absorbed = max(r["bytes_out"] for r in entries if r["termination"] == "cD")
    report("progressing reader", received=received, absorbed_by_a_non_reader=absorbed,
           terminations=[r["termination"] for r in entries])
    assert still_open, "a reader that kept reading was cut"
    assert [r["termination"] for r in entries].count("cD") == 1, entries  # the control only
    # The reader took far more than the socket buffers hold: the proxy did wait on it, longer than `write`
    # in all, and never cut it.
    assert received > absorbed + 1_000_000
    served.assert_idle()


def test_big_backend_is_wired_to_the_tgi_only_path(mock_vllm, big_backend, tmp_path, procs):
    """The slow-read tests rely on "/" reaching the big backend only (and chat the mock only)."""
    served = serve(tmp_path, procs, mock_vllm, big_backend)
    before = big_backend.stats()["streams"]
    with raw_connect(served.port) as sock:
        sock.sendall(_get("/?bytes=300000"))
        reader = ResponseReader(sock).read_head()
        body, complete = reader.read_body()
    assert reader.status == 200 and complete and len(body) == 300000
    assert big_backend.stats()["streams"] == before + 1
    served.assert_idle()
