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
import itertools
import math
import random
import secrets
import shlex
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import uvloop

from bench import interleave
from bench.harness import (
    BODY,
    HOST,
    SATURATED,
    add_level_args,
    add_run_args,
    chat_request,
    core_busy_text,
    failure_lines,
    foreign_load,
    level_failures,
    logger,
    md_row,
    mock_service,
    ms,
    print_problems,
    process_cpu_seconds,
    proxy_config,
    report_head,
    result_line,
    start_proxies,
    start_run,
    stop_children,
    stream_p50s,
    write_configs,
    write_json,
)
from bench.interleave import DIRECT, Interleaving, Level
from bench.loadgen import Lane, StreamResult, exchange, http_get
from bench.procs import Service, pinned_core_seconds, self_cpu_seconds

NONE, AUTH, MEMORY, REDIS = "none", "auth", "memory", "redis"
PATHS = (DIRECT, NONE, AUTH, MEMORY, REDIS)
PROXIES = (NONE, AUTH, MEMORY, REDIS)
KEYED = (AUTH, MEMORY, REDIS)  # proxies that need the API key
LIMITED = (MEMORY, REDIS)
STEP_OF = {AUTH: NONE, MEMORY: AUTH, REDIS: MEMORY}  # each proxy's configuration minus the one before it
# every ordered (later, earlier) pair of paths: name, minuend, subtrahend
PAIRS = tuple((f"{a}-{b}", a, b) for b, a in itertools.combinations(PATHS, 2))
INTERLEAVING = Interleaving(PATHS, PAIRS, count_upstream=True)
# our processes on the second core: name -> label
MOCK_CORE = {"mock": "mock", "redis_server": "redis-server", "loadgen": "load generator"}
# Every limit type, per key, far above anything this run can reach: admission and settlement run in full
# (GCRA request check, token bucket, concurrency lease, budget charge), and nothing is ever refused.
LIMITS = {"requests_per_minute": 10_000_000, "burst": 1_000_000, "max_concurrent": 100_000,
          "tokens_per_minute": 1_000_000_000, "budget": {"tokens": 10**15, "per": "month"}}
REDIS_START_S = 10.0

log = logger("bench.limits")


# --- command line ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.limits", description=__doc__.split("\n\n")[0])
    add_level_args(parser, [1, 64], 60, "measured streams per path per level; each worker runs max(3, ceil(N/C)) "
                   "rounds of five streams (default 60: about 1 3/4 minutes at C = 1)")
    parser.add_argument("--redis-server", default="redis-server", metavar="PATH",
                        help="redis-server binary to start (default: redis-server on PATH)")
    add_run_args(parser)
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
        self.spawn(cwd=self.directory)
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
        out = {name: process_cpu_seconds([service.pid]) for name, service in services.items()}
        out.update({f"{name}_ticks": service.cpu_seconds() for name, service in services.items()})
        out["loadgen"] = self_cpu_seconds()
        return {**out, **pinned_core_seconds(self.pins)}



def write_proxy_configs(directory: str, mock_port: int, redis_port: int, api_key: str) -> dict[str, str]:
    common = proxy_config(mock_port)
    auth = {"enabled": True, "keys": [{"key": api_key, "user_id": "bench"}]}

    def limited(store: dict[str, Any]) -> dict[str, Any]:
        # fail_closed: a Redis hiccup must show up as a failed (503) stream, never as a silently unlimited one
        return {**common, "auth": auth, "rate_limit": {"enabled": True, **store, "on_store_error": "fail_closed",
                                                       "per_key": LIMITS}}

    return write_configs(directory, "limits", {
        NONE: common, AUTH: {**common, "auth": auth}, MEMORY: limited({"store": "memory"}),
        REDIS: limited({"store": "redis", "redis_url": f"redis://{HOST}:{redis_port}/0"})})


# --- first-token phase ----------------------------------------------------------------------------


async def run_level(env: Env, args: argparse.Namespace, concurrency: int) -> dict[str, Any]:
    return summarise(await interleave.run_level(env, INTERLEAVING, concurrency, args.requests, log))


def summarise(level: Level) -> dict[str, Any]:
    return level.summary({
        "overhead_ms": {px: level.overhead_ms(px) for px in PROXIES},
        "step_ms": {px: level.overhead_ms(px, base) for px, base in STEP_OF.items()},
        "paired_ms": level.paired_ms,
        "proxy_cpu_ms_per_stream": {px: level.cpu_ms_per_stream(px, [px]) for px in PROXIES},
        # the same from the 10 ms ticks of /proc/<pid>/stat: too coarse for the table, kept as a cross-check
        "proxy_cpu_ms_per_stream_ticks": {px: level.cpu_ms_per_stream(f"{px}_ticks", [px]) for px in PROXIES},
        "redis_cpu_ms_per_stream": level.cpu_ms_per_stream("redis_server", [REDIS]),
        "mock_cpu_ms_per_stream": level.cpu_ms_per_stream("mock", PATHS),
        "streams_in_cpu_window": level.phase.window_streams,
        "core_busy": {"proxies": level.busy(*PROXIES), **{px: level.busy(px) for px in PROXIES},
                      "mock": level.busy("mock"), "redis_server": level.busy("redis_server"),
                      "loadgen": level.busy("loadgen")},
        "wall_s": level.phase.wall_s,
        "proxy_upstream_connects": level.phase.upstream_connects,
        "cpu_s": level.phase.cpu_s,
    }, paired_raw=level.phase.paired, round_columns=["order", *PATHS])


# --- checks ---------------------------------------------------------------------------------------


async def fetch_head(port: int, payload: bytes, timeout: float) -> tuple[int, dict[str, str]]:
    """Send one request on a throwaway connection, read the whole response; status and lower-cased headers."""
    raw_head, _ = await exchange(HOST, port, payload, timeout)
    head = raw_head.decode("latin-1").split("\r\n")
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
        keyed = chat_request(port, {**close, "Authorization": f"Bearer {api_key}"} if px in KEYED else close)
        bare = chat_request(port, close)
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
            text = (await http_get(HOST, env.ports[px], "/metrics")).decode()
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
    # the checks below still run after a child exited: they say what went wrong
    out["levels"], _ = await interleave.run_levels(args.concurrency,
                                                   lambda concurrency: run_level(env, args, concurrency),
                                                   [*env.proxies.values(), env.mock, env.redis], log)
    found, failed = await refusals(env)
    out["checks"]["metrics"] = found
    out["failed"] += failed
    if env.redis.alive():
        found, failed = redis_check(env, calls_before)
        out["checks"]["redis"] = found
        out["failed"] += failed
    out["checks"]["requests_sent"] = dict(env.sent)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command, pins, info = start_run("bench.limits", argv, args.no_pin, log,
                                    pinning="all four proxies on CPU {proxy}; mock backend + redis-server + load "
                                            "generator on CPU {mock}")
    api_key = "bench-" + secrets.token_urlsafe(24)
    mock = mock_service(args, pins)
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
            start_proxies(write_proxy_configs(tmp, mock_port, redis_port, api_key), pins, proxies)
            ports = {DIRECT: mock_port, **{px: proxies[px].port for px in PROXIES}}
            log(f"mock backend pid {mock.pid} on :{mock_port}, redis-server pid {redis.pid} on :{redis_port}, "
                + ", ".join(f"proxy {px} pid {proxies[px].pid} on :{ports[px]}" for px in PROXIES))
            key_header = {"Authorization": f"Bearer {api_key}"}
            payloads = {path: chat_request(port, key_header if path in KEYED else None) for path, port in ports.items()}
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
    troubled = print_problems(failure, error_report(result["levels"]), result["failed"], children_output)
    write_json(args.json, {"command": command, "machine": info, "args": vars(args), "limits": LIMITS, **result}, log)
    return 1 if troubled else 0


def _redis_version(server_info: str | None) -> str:
    for line in (server_info or "").splitlines():
        if line.startswith("redis_version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


# --- reporting ------------------------------------------------------------------------------------


def ttft_table(levels: list[dict[str, Any]]) -> str:
    head = ["concurrency", "path", "streams", "TTFT p50", "TTFT p90", "TTFT p99", "overhead p50", "overhead p90",
            "paired Δ p50 vs direct", "paired step Δ p50", "proxy CPU ms/stream", "errors"]
    rows = [md_row(head), "|---:|:---|" + "---:|" * (len(head) - 2)]
    for level in levels:
        ttft, paired = level["ttft_ms"], level["paired_ms"]
        for path in PATHS:
            errors = str(level["errors"][path]["count"])
            cells = [str(level["concurrency"]), path, str(ttft[path]["n"]),
                     *(ms(ttft[path].get(f"p{q}")) for q in (50, 90, 99))]
            if path == DIRECT:
                cells += ["—"] * 5
            else:
                over = level["overhead_ms"][path]
                step = (f"{ms(paired[f'{path}-{STEP_OF[path]}'].get('p50'))} (vs {STEP_OF[path]})"
                        if path in STEP_OF else "—")
                cells += [ms(over["p50"]), ms(over["p90"]), ms(paired[f"{path}-{DIRECT}"].get("p50")), step,
                          ms(level["proxy_cpu_ms_per_stream"][path])]
            rows.append(md_row([*cells, errors]))
    return "\n".join(rows)


def diagnostics(levels: list[dict[str, Any]]) -> str:
    lines = []
    for level in levels:
        busy, stream, paired = level["core_busy"], level["stream_ms"], level["paired_ms"]
        line = (f"- c={level['concurrency']}: window {level['wall_s']:.1f}s; paired step Δ p90: "
                + ", ".join(f"{px} - {base} {ms(paired[f'{px}-{base}'].get('p90'))}" for px, base in STEP_OF.items())
                + f", redis - none p50 {ms(paired[f'{REDIS}-{NONE}'].get('p50'))} ms; "
                f"redis-server CPU {ms(level['redis_cpu_ms_per_stream'])} ms per redis-path stream "
                f"(with its idle 10 Hz housekeeping); {core_busy_text(busy, PROXIES, MOCK_CORE)}; "
                f"{stream_p50s(stream, PATHS)}; {foreign_load(level['cpu_s'], level['wall_s'], PROXIES, MOCK_CORE)}; "
                f"the mock accepted {level['proxy_upstream_connects']} connections from the proxies (with their "
                "health probes, one per proxy every 5 s); "
                f"client reconnects {sum(level['reconnects'].values())}")
        if sum(busy[name] for name in MOCK_CORE) >= SATURATED:
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
    lines.append(result_line(failed))
    return "\n".join(lines)


def report(command: str, info: dict[str, Any], args: argparse.Namespace, result: dict[str, Any]) -> str:
    limits = ", ".join(f"{name} {value:,}" for name, value in LIMITS.items() if name != "budget")
    limits += f", budget {LIMITS['budget']['tokens']:.0e} tokens per {LIMITS['budget']['per']}"
    parts = [*report_head("bench.limits", command, info, f", redis-server {info.get('redis', 'unknown')}",
                          " (redis-server shares the load generator's core: its replies wait behind the mock and "
                          "the load generator when that core is busy)"),
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
    return failure_lines(source for level in levels for source in level_failures(level, PATHS))


if __name__ == "__main__":
    sys.exit(main())
