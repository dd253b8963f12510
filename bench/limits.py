"""The first-token cost of auth and rate limits: no auth, auth, auth + memory limits, auth + Redis limits, one run.

    python -m bench.limits [--concurrency 1,64] [--requests N] [--json out.json]

Starts one mock backend, a redis-server, and four proxies in front of the mock: "none" (no auth, no limits),
"auth" (auth, one key), "memory" (auth + per-key rate limits in the memory store) and "redis" (the same
limits in the Redis store). The limits are set so high they never trigger, and every limit type is on, so
every admission and settlement path runs. The proxies share one CPU; the mock, redis-server and this load
generator share another. Each worker runs rounds of one stream on each path (direct, none, auth, memory,
redis) in random order, as bench.ttft and bench.metering do, so every path sees the same conditions.

Checks: no stream fails (a 429 or 503 is a failure: the limits must never trigger and Redis must answer),
keyless requests get 401 from the auth proxies, the limited proxies send x-ratelimit-* headers, their
/metrics count no refusal and no store error, and Redis ran the limit scripts for every request.
See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import math
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvloop
import yaml

from bench.loadgen import Lane, StreamResult, build_request, fetch_json
from bench.metering import core_seconds
from bench.procs import Service, choose_cpus, pin_self, self_cpu_seconds
from bench.stats import overhead_ms, summary_ms
from bench.ttft import (
    BODY,
    HOST,
    Failures,
    close_workers,
    int_list,
    machine,
    open_lanes,
    play_streams,
    raise_fd_limit,
    record_in_steady_state,
    stop_children,
    warm_up,
)

DIRECT, NONE, AUTH, MEMORY, REDIS = "direct", "none", "auth", "memory", "redis"
PATHS = (DIRECT, NONE, AUTH, MEMORY, REDIS)
PROXIES = (NONE, AUTH, MEMORY, REDIS)
KEYED = (AUTH, MEMORY, REDIS)  # proxies that need the API key
LIMITED = (MEMORY, REDIS)
STEP_OF = {AUTH: NONE, MEMORY: AUTH, REDIS: MEMORY}  # each proxy's configuration minus the one before it
# Every limit type, per key, far above anything this run can reach: admission and settlement run in full
# (GCRA request check, token bucket, concurrency lease, budget charge), and nothing is ever refused.
LIMITS = {"requests_per_minute": 10_000_000, "burst": 1_000_000, "max_concurrent": 100_000,
          "tokens_per_minute": 1_000_000_000, "budget": {"tokens": 10**15, "per": "month"}}
MIN_ROUNDS = 3
MAX_ERRORS_SHOWN = 5
SATURATED = 0.9  # busy share of the mock + load generator core above which it, not the proxies, sets the pace
REDIS_START_S = 10.0


# --- command line ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.limits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int_list, default=[1, 64], metavar="C1,C2,...",
                        help="concurrency levels, each a number of concurrent workers (default 1,64)")
    parser.add_argument("--requests", type=int, default=60, metavar="N",
                        help="measured streams per path per level; each worker runs max(3, ceil(N/C)) rounds of "
                             "five streams (default 60: about 1 3/4 minutes at C = 1)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream (default 64)")
    parser.add_argument("--delay-ms", type=float, default=5.0, help="backend pause between tokens (default 5)")
    parser.add_argument("--redis-server", default="redis-server", metavar="PATH",
                        help="redis-server binary to start (default: redis-server on PATH)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds (default 60)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--seed", type=int, default=None, help="seed for the round order and start jitter")
    parser.add_argument("--json", metavar="PATH", help="write the raw numbers as JSON")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.tokens < 1:
        parser.error("--requests and --tokens must be >= 1")
    return args


# --- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class RedisServer(Service):
    """A throwaway redis-server on a free loopback port: no persistence, output drained like the others."""

    def __init__(self, binary: str, directory: str, cpu: int | None) -> None:
        super().__init__("redis-server", [], cpu)
        found = shutil.which(binary)
        if found is None:
            raise RuntimeError(f"{binary} not found (install redis-server or pass --redis-server PATH)")
        self.binary = found
        self.directory = directory

    @property
    def started(self) -> bool:
        return self._proc is not None

    def start(self, timeout: float = REDIS_START_S) -> int:
        self.port = free_port()  # set before draining starts, so the `listening on` scan stays off
        self.argv = [self.binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
                     "--dir", self.directory, "--databases", "1"]
        self._proc = subprocess.Popen(self.argv, cwd=self.directory, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        if self.cpu is not None:
            os.sched_setaffinity(self._proc.pid, {self.cpu})
        self._thread = threading.Thread(target=self._drain, name="drain-redis-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                break
            if redis_command(self.port, "PING") == "PONG":
                return self.port
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING on :{self.port} within {timeout:g}s; "
                           f"command: {shlex.join(self.argv)}\noutput:\n{self.output()}")


def redis_command(port: int, *words: str, timeout: float = 2.0) -> str | None:
    """One inline command over a throwaway connection; the reply's payload (simple or bulk string), or None."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall((" ".join(words) + "\r\n").encode())
            reply = b""
            while True:
                piece = sock.recv(65536)
                if not piece:
                    break
                reply += piece
                if reply.startswith((b"+", b"-", b":")) and reply.endswith(b"\r\n"):
                    break
                if reply.startswith(b"$"):
                    head, _, rest = reply.partition(b"\r\n")
                    if int(head[1:]) < 0 or len(rest) >= int(head[1:]) + 2:
                        break
    except (OSError, ValueError):
        return None
    if reply.startswith(b"$"):
        head, _, rest = reply.partition(b"\r\n")
        return None if int(head[1:]) < 0 else rest[:int(head[1:])].decode()
    return reply[1:].strip().decode() if reply[:1] in (b"+", b":") else None


def redis_commandstats(port: int) -> dict[str, int]:
    """Calls per command since redis-server started (INFO commandstats), e.g. {"evalsha": 1234, "zrem": 617}."""
    text = redis_command(port, "INFO", "commandstats") or ""
    calls = {}
    for line in text.splitlines():
        if line.startswith("cmdstat_"):
            name, _, stats = line[len("cmdstat_"):].partition(":")
            fields = dict(part.split("=", 1) for part in stats.split(",") if "=" in part)
            with contextlib.suppress(KeyError, ValueError):
                calls[name] = int(fields["calls"])
    return calls


# --- environment ----------------------------------------------------------------------------------


class CountingLane(Lane):
    """A Lane that counts the requests it sends, per path (one dict increment: the same on every path)."""

    def __init__(self, host: str, port: int, payload: bytes, timeout: float, path: str, sent: dict[str, int]) -> None:
        super().__init__(host, port, payload, timeout)
        self.path = path
        self.sent = sent

    async def send(self) -> StreamResult:
        self.sent[self.path] += 1
        return await super().send()


@dataclass
class Env:
    mock: Service
    redis: RedisServer
    proxies: dict[str, Service]
    ports: dict[str, int]
    payloads: dict[str, bytes]
    timeout: float
    rng: random.Random
    pins: tuple[int, int] | None = None
    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PATHS, 0))

    def lane(self, path: str) -> CountingLane:
        return CountingLane(HOST, self.ports[path], self.payloads[path], self.timeout, path, self.sent)

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each process: run time in ns from schedstat, and the tick count (`*_ticks`)."""
        services = {**self.proxies, "mock": self.mock, "redis_server": self.redis}
        out = {name: run_seconds(service.pid) for name, service in services.items()}
        out.update({f"{name}_ticks": service.cpu_seconds() for name, service in services.items()})
        out["loadgen"] = self_cpu_seconds()
        if self.pins is not None:
            cores = core_seconds()
            for name, cpu in zip(("proxy_core", "mock_core"), self.pins, strict=True):
                out[f"{name}_busy"], out[f"{name}_steal"] = cores.get(cpu, (math.nan, math.nan))
        return out


def foreign_load(cpu_s: dict[str, float], seconds: float) -> str:
    """How much of each pinned core went to processes other than ours, and to the hypervisor (steal)."""
    if "proxy_core_busy" not in cpu_s or not seconds:
        return "other load: unknown (not pinned)"
    proxy_other = cpu_s["proxy_core_busy"] - sum(cpu_s[px] for px in PROXIES)
    mock_other = cpu_s["mock_core_busy"] - cpu_s["mock"] - cpu_s["redis_server"] - cpu_s["loadgen"]
    return (f"other processes on the proxies' core {max(proxy_other, 0) / seconds:.0%}, on the mock's core "
            f"{max(mock_other, 0) / seconds:.0%}; steal {cpu_s['proxy_core_steal'] / seconds:.0%} / "
            f"{cpu_s['mock_core_steal'] / seconds:.0%}")


def run_seconds(pid: int) -> float:
    """Time on CPU of all live threads of a process, from /proc/<pid>/task/*/schedstat (nanoseconds, unlike the
    10 ms ticks of /proc/<pid>/stat: the proxies differ by fractions of a millisecond per stream). Threads that
    exit are dropped from the sum; the proxies and redis-server keep theirs for the whole run."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return float("nan")
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread exited meanwhile
    return total / 1e9


def write_configs(directory: str, mock_port: int, redis_port: int, api_key: str) -> dict[str, str]:
    common = {"server": {"listen": f"{HOST}:0"}, "backends": [{"url": f"http://{HOST}:{mock_port}"}],
              "logging": {"access_log": "off"}}
    auth = {"enabled": True, "keys": [{"key": api_key, "user_id": "bench"}]}

    def limited(store: dict[str, Any]) -> dict[str, Any]:
        # fail_closed: a Redis hiccup must show up as a failed (503) stream, never as a silently unlimited one
        return {**common, "auth": auth, "rate_limit": {"enabled": True, **store, "on_store_error": "fail_closed",
                                                       "per_key": LIMITS}}

    configs = {NONE: common, AUTH: {**common, "auth": auth}, MEMORY: limited({"store": "memory"}),
               REDIS: limited({"store": "redis", "redis_url": f"redis://{HOST}:{redis_port}/0"})}
    paths = {}
    for name, config in configs.items():
        path = Path(directory) / f"limits-{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        paths[name] = str(path)
    return paths


# --- first-token phase ----------------------------------------------------------------------------


@dataclass
class Worker:
    lanes: dict[str, CountingLane]


def _pair_names() -> list[tuple[str, str, str]]:
    """Every ordered (later, earlier) pair of paths: name, minuend, subtrahend."""
    return [(f"{a}-{b}", a, b) for b, a in itertools.combinations(PATHS, 2)]


PAIRS = _pair_names()


@dataclass
class TtftPhase:
    ttft: dict[str, list[int]] = field(default_factory=lambda: {path: [] for path in PATHS})
    total: dict[str, list[int]] = field(default_factory=lambda: {path: [] for path in PATHS})
    pairs: dict[str, list[int]] = field(default_factory=lambda: {name: [] for name, _, _ in PAIRS})
    rounds: list[tuple[Any, ...]] = field(default_factory=list)  # order, then the TTFT of each path
    errors: dict[str, Failures] = field(default_factory=lambda: {path: Failures() for path in PATHS})
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    window_open: bool = False
    window_streams: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PATHS, 0))
    upstream_connects: int | None = None  # by all four proxies together, while recording


async def _mock_connections(env: Env) -> int | None:
    try:
        stats = await fetch_json(HOST, env.ports[DIRECT], "/_mock/stats")
    except (OSError, RuntimeError, ValueError, asyncio.TimeoutError):
        return None  # diagnostics only: the benchmark stands without it
    return stats.get("connections_total") if isinstance(stats, dict) else None


async def open_workers(env: Env, concurrency: int) -> list[Worker]:
    workers = [Worker({path: env.lane(path) for path in PATHS}) for _ in range(concurrency)]
    await open_lanes(workers)
    return workers


async def _round(env: Env, worker: Worker, phase: TtftPhase, *, record: bool) -> None:
    """One stream on each path, in random order, back to back on the worker's connections."""
    order = list(PATHS)
    env.rng.shuffle(order)
    got = await play_streams(worker, order, phase, record)
    if record:
        phase.rounds.append((",".join(order), *(got.get(path) for path in PATHS)))
        for name, a, b in PAIRS:
            if a in got and b in got:
                phase.pairs[name].append(got[a] - got[b])


async def measure_ttft(env: Env, workers: list[Worker], rounds: int, stream_ns: int) -> TtftPhase:
    """bench.ttft's steady-state scheme with five paths per round; CPU is sampled over the recording window."""
    phase = TtftPhase()
    spread_s = len(PATHS) * stream_ns / 1e9 if len(workers) > 1 else 0.0
    before: dict[str, Any] = {}

    async def opened() -> None:
        before["reconnects"] = sum(worker.lanes[DIRECT].reconnects for worker in workers)
        before["cpu"] = env.cpu()
        before["started"] = time.perf_counter()
        phase.window_open = True
        before["stats"] = await _mock_connections(env)

    async def closed() -> None:
        phase.window_open = False
        phase.wall_s = time.perf_counter() - before["started"]
        after = env.cpu()
        phase.cpu_s = {name: after[name] - before["cpu"][name] for name in after}
        stats_after = await _mock_connections(env)
        if before["stats"] is not None and stats_after is not None:
            # connections the mock accepted in between, less one stats request and direct reopens
            direct_reopens = sum(worker.lanes[DIRECT].reconnects for worker in workers) - before["reconnects"]
            phase.upstream_connects = stats_after - before["stats"] - 1 - direct_reopens

    await record_in_steady_state(workers, rounds, spread_s, spread_s + stream_ns / 1e9, env.rng,
                                 lambda worker, record: _round(env, worker, phase, record=record), opened, closed)
    return phase


def _per_stream_ms(cpu_s: float, streams: int) -> float:
    return cpu_s * 1000 / streams if streams else float("nan")


async def run_level(env: Env, args: argparse.Namespace, concurrency: int) -> dict[str, Any]:
    rounds = max(MIN_ROUNDS, math.ceil(args.requests / concurrency))
    log(f"c={concurrency}: opening {len(PATHS) * concurrency} connections, warm-up")
    workers = await open_workers(env, concurrency)
    try:
        stream_ns, warm_errors = await warm_up(workers)
        if warm_errors.count:
            log(f"c={concurrency}: {warm_errors.count} warm-up errors, first: {next(iter(warm_errors.kinds))}")
        log(f"c={concurrency}: measuring {rounds} rounds x {concurrency} workers "
            f"(median warm-up stream {stream_ns / 1e6:.0f} ms)")
        gc.collect()
        gc.disable()  # a collection pause would land on whichever stream is in flight: pure noise
        try:
            phase = await measure_ttft(env, workers, rounds, stream_ns)
        finally:
            gc.enable()
        reconnects = {path: sum(worker.lanes[path].reconnects for worker in workers) for path in PATHS}
    finally:
        close_workers(workers)
    ttft = {path: summary_ms(phase.ttft[path]) for path in PATHS}
    wall = phase.wall_s or float("nan")
    cpu = phase.cpu_s
    streams = phase.window_streams
    return {
        "concurrency": concurrency,
        "rounds_per_worker": rounds,
        "ttft_ms": ttft,
        "stream_ms": {path: summary_ms(phase.total[path]) for path in PATHS},
        "overhead_ms": {px: overhead_ms(ttft[DIRECT], ttft[px]) for px in PROXIES},
        "step_ms": {px: overhead_ms(ttft[base], ttft[px]) for px, base in STEP_OF.items()},
        "paired_ms": {name: summary_ms(diffs) for name, diffs in phase.pairs.items()},
        "proxy_cpu_ms_per_stream": {px: _per_stream_ms(cpu[px], streams[px]) for px in PROXIES},
        "proxy_cpu_ms_per_stream_ticks": {px: _per_stream_ms(cpu[f"{px}_ticks"], streams[px]) for px in PROXIES},
        "redis_cpu_ms_per_stream": _per_stream_ms(cpu["redis_server"], streams[REDIS]),
        "mock_cpu_ms_per_stream": _per_stream_ms(cpu["mock"], sum(streams.values())),
        "streams_in_cpu_window": streams,
        "core_busy": {"proxies": sum(cpu[px] for px in PROXIES) / wall, **{px: cpu[px] / wall for px in PROXIES},
                      "mock": cpu["mock"] / wall, "redis_server": cpu["redis_server"] / wall,
                      "loadgen": cpu["loadgen"] / wall},
        "wall_s": phase.wall_s,
        "proxy_upstream_connects": phase.upstream_connects,
        "cpu_s": cpu,
        "reconnects": reconnects,
        "errors": {path: phase.errors[path].as_dict() for path in PATHS},
        "warmup_errors": warm_errors.as_dict(),
        "raw": {"ttft_ns": phase.ttft, "stream_ns": phase.total, "paired_diff_ns": phase.pairs,
                "round_columns": ["order", *PATHS], "rounds": phase.rounds},
    }


# --- checks ---------------------------------------------------------------------------------------


async def fetch_head(port: int, payload: bytes, timeout: float) -> tuple[int, dict[str, str]]:
    """Send one request on a throwaway connection, read the whole response; status and lower-cased headers."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    try:
        writer.write(payload)
        raw = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
    head = raw.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1]) if head and head[0].startswith("HTTP/") else 0
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def probe(env: Env, api_key: str) -> tuple[dict[str, Any], list[str]]:
    """Each proxy once with the key and once without: that auth and the limits are really on where expected."""
    found: dict[str, Any] = {}
    failed = []
    for px in PROXIES:
        port = env.ports[px]
        close = {"Connection": "close"}
        keyed = build_request(HOST, port, "/v1/chat/completions", BODY,
                              {**close, "Authorization": f"Bearer {api_key}"} if px in KEYED else close)
        bare = build_request(HOST, port, "/v1/chat/completions", BODY, close)
        status, headers = await fetch_head(port, keyed, env.timeout)
        if status != 200:
            raise RuntimeError(f"probe request through the {px} proxy answered HTTP {status}")
        bare_status, _ = await fetch_head(port, bare, env.timeout)
        limit_headers = sorted(name for name in headers if name.startswith("x-ratelimit-"))
        found[px] = {"keyless_status": bare_status, "ratelimit_headers": limit_headers}
        want_status = 401 if px in KEYED else 200
        if bare_status != want_status:
            failed.append(f"{px}: a request without a key got HTTP {bare_status}, expected {want_status}")
        if (px in LIMITED) != bool(limit_headers):
            failed.append(f"{px}: x-ratelimit-* headers {limit_headers or 'absent'}, expected them "
                          + ("present" if px in LIMITED else "absent"))
    return found, failed


async def fetch_text(port: int, path: str, timeout: float = 5.0) -> str:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        status_line = head.split(b"\r\n", 1)[0]
        raise RuntimeError(f"GET {path}: {status_line!r}")
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if not size:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return body.decode()


def metric_sum(text: str, name: str) -> float:
    """Sum of every sample of `name` (all label sets) in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def refusals(env: Env) -> tuple[dict[str, Any], list[str]]:
    """Per proxy: requests refused by a limit and rate-limit store errors, from its /metrics (must be 0)."""
    found: dict[str, Any] = {}
    failed = []
    for px in PROXIES:
        try:
            text = await fetch_text(env.ports[px], "/metrics")
        except (OSError, RuntimeError, ValueError, asyncio.TimeoutError) as exc:
            failed.append(f"{px}: could not read /metrics: {exc}")
            continue
        found[px] = {"ratelimited": metric_sum(text, "llmproxy_ratelimited_total"),
                     "store_errors": metric_sum(text, "llmproxy_ratelimit_store_errors_total")}
        if any(found[px].values()):
            failed.append(f"{px}: /metrics counts {found[px]['ratelimited']:g} refused requests and "
                          f"{found[px]['store_errors']:g} rate-limit store errors")
    return found, failed


def redis_check(env: Env, calls_before: dict[str, int]) -> tuple[dict[str, Any], list[str]]:
    """Redis commands the run caused, per request sent to the redis proxy (admit + charge scripts, lease release)."""
    after = redis_commandstats(env.redis.port)
    calls = {name: n - calls_before.get(name, 0) for name, n in after.items() if n - calls_before.get(name, 0)}
    calls.pop("info", None)
    requests = env.sent[REDIS] + 1  # and the probe's keyed request
    scripts = calls.get("evalsha", 0) + calls.get("eval", 0)
    per_request = (lambda n: n / requests) if requests else (lambda n: math.nan)
    # commandstats also counts the commands a script runs (hmget, zadd, ...): those are not round trips
    found = {"requests": requests, "calls": calls, "scripts_per_request": per_request(scripts),
             "releases_per_request": per_request(calls.get("zrem", 0)),
             "commands_per_request": per_request(sum(calls.values()))}
    failed = []
    if scripts < requests:
        failed.append(f"redis: {scripts} Lua script calls for {requests} requests sent to the redis proxy: "
                      "some admissions did not go through Redis")
    return found, failed


# --- main -----------------------------------------------------------------------------------------


async def run_all(env: Env, args: argparse.Namespace, api_key: str) -> dict[str, Any]:
    out: dict[str, Any] = {"levels": [], "checks": {}, "failed": []}
    calls_before = redis_commandstats(env.redis.port)
    found, failed = await probe(env, api_key)
    out["checks"]["probe"] = found
    out["failed"] += failed
    gc.collect()
    gc.freeze()  # setup objects never die: keep them out of every later collection
    for concurrency in args.concurrency:
        out["levels"].append(await run_level(env, args, concurrency))
        if not all_alive(env, f"c={concurrency}"):
            break
    found, failed = await refusals(env)
    out["checks"]["metrics"] = found
    out["failed"] += failed
    if env.redis.alive():
        found, failed = redis_check(env, calls_before)
        out["checks"]["redis"] = found
        out["failed"] += failed
    out["checks"]["requests_sent"] = dict(env.sent)
    return out


def all_alive(env: Env, where: str) -> bool:
    for service in (*env.proxies.values(), env.mock, env.redis):
        if not service.alive():
            log(f"{service.name} exited during {where}; stopping")
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m bench.limits " + shlex.join(sys.argv[1:] if argv is None else argv)
    raise_fd_limit()
    # SIGTERM would otherwise end this process without its `finally`, orphaning the children
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    pins = None if args.no_pin else choose_cpus()
    info = machine(pins)  # before pinning, which narrows what sched_getaffinity reports
    if pins is not None:
        pin_self(pins[1])  # first, so the mock backend, redis-server and every thread inherit CPU pins[1]
        info["pinning"] = (f"all four proxies on CPU {pins[0]}; mock backend + redis-server + load generator "
                           f"on CPU {pins[1]}")
    if args.no_pin:
        info["pinning"] = "none (--no-pin)"
    log(f"pinning: {info['pinning']}")
    api_key = "bench-" + secrets.token_urlsafe(24)
    mock = Service("mock-backend", ["mock-backend", "--dialect", "vllm", "--listen", f"{HOST}:0", "--model", "m",
                                    "--tokens", str(args.tokens), "--delay-ms", f"{args.delay_ms:g}"],
                   cpu=pins[1] if pins else None)
    proxies: dict[str, Service] = {}
    redis: RedisServer | None = None
    result: dict[str, Any] = {"levels": [], "checks": {}, "failed": []}
    failure = None
    with tempfile.TemporaryDirectory(prefix="bench-limits-") as tmp:
        try:
            mock_port = mock.start()
            redis = RedisServer(args.redis_server, tmp, pins[1] if pins else None)
            redis_port = redis.start()
            info["redis"] = redis_command(redis_port, "INFO", "server")
            configs = write_configs(tmp, mock_port, redis_port, api_key)
            for px in PROXIES:
                proxies[px] = Service(f"proxy-{px}", ["serve", "--config", configs[px], "--listen", f"{HOST}:0"],
                                      cpu=pins[0] if pins else None)
                proxies[px].start()
            ports = {DIRECT: mock_port, **{px: proxies[px].port for px in PROXIES}}
            log(f"mock backend pid {mock.pid} on :{mock_port}, redis-server pid {redis.pid} on :{redis_port}, "
                + ", ".join(f"proxy {px} pid {proxies[px].pid} on :{ports[px]}" for px in PROXIES))
            key_header = {"Authorization": f"Bearer {api_key}"}
            payloads = {path: build_request(HOST, port, "/v1/chat/completions", BODY,
                                            key_header if path in KEYED else None) for path, port in ports.items()}
            env = Env(mock, redis, proxies, ports, payloads, args.timeout, random.Random(args.seed), pins)
            result = uvloop.run(run_all(env, args, api_key))
        except (RuntimeError, OSError) as exc:
            failure = str(exc)
        finally:
            # proxies first (none sees its backend or its store vanish mid-request), then the mock, then Redis
            children_output = stop_children([*(proxies.get(px) for px in PROXIES[::-1]), mock,
                                             redis if redis is not None and redis.started else None])
    info["redis"] = _redis_version(info.get("redis"))
    print(report(command, info, args, result), flush=True)
    problems = error_report(result["levels"])
    failed = result["failed"]
    if failure or problems or failed:
        print("\n## Problems\n", file=sys.stderr)
        if failure:
            print(f"aborted: {failure}\n", file=sys.stderr)
        if problems:
            print(problems, file=sys.stderr)
        if failed:
            print("\n".join(f"- check failed: {line}" for line in failed), file=sys.stderr)
        print(f"\nLast output of the children:\n{children_output}", file=sys.stderr)
    if args.json:
        Path(args.json).write_bytes(orjson.dumps({"command": command, "machine": info, "args": vars(args),
                                                  "limits": LIMITS, **result},
                                                 option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
        log(f"raw numbers written to {args.json}")
    return 1 if failure or problems or failed else 0


def _redis_version(server_info: str | None) -> str:
    for line in (server_info or "").splitlines():
        if line.startswith("redis_version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


# --- reporting ------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[bench.limits] {message}", file=sys.stderr, flush=True)


def _ms(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def ttft_table(levels: list[dict[str, Any]]) -> str:
    head = ["concurrency", "path", "streams", "TTFT p50", "TTFT p90", "TTFT p99", "overhead p50", "overhead p90",
            "paired Δ p50 vs direct", "paired step Δ p50", "proxy CPU ms/stream", "errors"]
    rows = ["| " + " | ".join(head) + " |", "|---:|:---|" + "---:|" * (len(head) - 2)]
    for level in levels:
        ttft, paired = level["ttft_ms"], level["paired_ms"]
        for path in PATHS:
            errors = str(level["errors"][path]["count"])
            cells = [str(level["concurrency"]), path, str(ttft[path]["n"]),
                     *(_ms(ttft[path].get(f"p{q}")) for q in (50, 90, 99))]
            if path == DIRECT:
                cells += ["—"] * 5
            else:
                over = level["overhead_ms"][path]
                step = (f"{_ms(paired[f'{path}-{STEP_OF[path]}'].get('p50'))} (vs {STEP_OF[path]})"
                        if path in STEP_OF else "—")
                cells += [_ms(over["p50"]), _ms(over["p90"]), _ms(paired[f"{path}-{DIRECT}"].get("p50")), step,
                          _ms(level["proxy_cpu_ms_per_stream"][path])]
            rows.append("| " + " | ".join([*cells, errors]) + " |")
    return "\n".join(rows)


def diagnostics(levels: list[dict[str, Any]]) -> str:
    lines = []
    for level in levels:
        busy, stream, paired = level["core_busy"], level["stream_ms"], level["paired_ms"]
        line = (f"- c={level['concurrency']}: window {level['wall_s']:.1f}s; paired step Δ p90: "
                + ", ".join(f"{px} - {base} {_ms(paired[f'{px}-{base}'].get('p90'))}" for px, base in STEP_OF.items())
                + f", redis - none p50 {_ms(paired[f'{REDIS}-{NONE}'].get('p50'))} ms; "
                f"redis-server CPU {_ms(level['redis_cpu_ms_per_stream'])} ms per redis-path stream "
                "(with its idle 10 Hz housekeeping); core busy: "
                f"proxies {busy['proxies']:.0%} (" + ", ".join(f"{px} {busy[px]:.0%}" for px in PROXIES)
                + f"), mock {busy['mock']:.0%} + redis-server {busy['redis_server']:.0%} + load generator "
                f"{busy['loadgen']:.0%}; "
                "stream p50 " + ", ".join(f"{path} {_ms(stream[path].get('p50'))}" for path in PATHS)
                + f" ms; {foreign_load(level['cpu_s'], level['wall_s'])}; "
                f"the mock accepted {level['proxy_upstream_connects']} connections from the proxies (with their "
                "health probes, one per proxy every 5 s); "
                f"client reconnects {sum(level['reconnects'].values())}")
        if busy["mock"] + busy["redis_server"] + busy["loadgen"] >= SATURATED:
            line += ("\n  WARNING: the mock + redis + load generator core is saturated: TTFTs include queueing on "
                     "it, and the redis path waits for redis-server behind that queue")
        lines.append(line)
    return "\n".join(lines)


def checks_section(checks: dict[str, Any], failed: list[str]) -> str:
    if not checks:
        return "- result: not run (the run was aborted, see stderr)"
    lines = []
    probe_found = checks.get("probe") or {}
    if probe_found:
        lines.append("- probe: without a key " + ", ".join(f"{px} HTTP {p['keyless_status']}"
                                                          for px, p in probe_found.items())
                     + "; x-ratelimit-* headers on " + (", ".join(px for px, p in probe_found.items()
                                                                  if p["ratelimit_headers"]) or "none"))
    metrics = checks.get("metrics") or {}
    if metrics:
        lines.append("- /metrics after the run: refused by a limit " + ", ".join(
            f"{px} {m['ratelimited']:g}" for px, m in metrics.items()) + "; store errors " + ", ".join(
            f"{px} {m['store_errors']:g}" for px, m in metrics.items()))
    redis = checks.get("redis")
    if redis:
        lines.append(f"- redis: {redis['requests']} requests sent to the redis proxy; per request "
                     f"{redis['scripts_per_request']:.2f} Lua script calls (EVALSHA: admit, then charge at the end) "
                     f"and {redis['releases_per_request']:.2f} lease releases (ZREM), "
                     f"{redis['commands_per_request']:.1f} Redis commands in all, counting those the scripts run")
    lines.append("- result: " + ("all checks passed" if not failed else f"{len(failed)} check(s) FAILED (see stderr)"))
    return "\n".join(lines)


def report(command: str, info: dict[str, Any], args: argparse.Namespace, result: dict[str, Any]) -> str:
    limits = ", ".join(f"{name} {value:,}" for name, value in LIMITS.items() if name != "budget")
    limits += f", budget {LIMITS['budget']['tokens']:.0e} tokens per {LIMITS['budget']['per']}"
    parts = ["## bench.limits", "", f"- command: `{command}`",
             f"- machine: nproc {info['nproc']}, {info['cpu_model']}, Python {info['python']}, "
             f"redis-server {info.get('redis', 'unknown')}",
             f"- pinning: {info['pinning']} (redis-server shares the load generator's core: its replies wait "
             "behind the mock and the load generator when that core is busy)",
             "- proxies, all access log off, in front of the same vLLM mock: **none** = no auth, no limits; "
             "**auth** = auth on, one key; **memory** = auth + rate_limit (store memory); **redis** = auth + "
             "rate_limit (store redis, on_store_error fail_closed)",
             f"- per-key limits (never reached): {limits}",
             f"- backend: {args.tokens} tokens x {args.delay_ms:g} ms; request `{BODY.decode()}`, with "
             "`Authorization: Bearer <key>` on auth, memory and redis", ""]
    if result["levels"]:
        parts += ["TTFT in ms (request write -> first bytes of the first SSE `data:` event). Overhead = path "
                  "percentile minus direct percentile; paired Δ = median over rounds of (path - direct); paired step "
                  "Δ = median over rounds of (path - the configuration before it). Errors = failed streams "
                  "(any non-200, 429 included).", "", ttft_table(result["levels"]), "",
                  diagnostics(result["levels"]), ""]
    parts += ["### Checks", "", checks_section(result["checks"], result["failed"])]
    return "\n".join(parts)


def error_report(levels: list[dict[str, Any]]) -> str:
    lines = []
    for level in levels:
        where = f"c={level['concurrency']}"
        sources = [(f"{where} {path}", level["errors"][path]) for path in PATHS]
        sources.append((f"{where} warm-up", level["warmup_errors"]))
        for name, failures in sources:
            if failures["count"]:
                lines.append(f"- {name}: {failures['count']} failed streams, e.g.:")
                kinds = list(failures["kinds"].items())[:MAX_ERRORS_SHOWN]
                lines += [f"    {count} x {message}" for message, count in kinds]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
