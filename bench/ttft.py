"""First-token overhead of the proxy: proxied vs direct TTFT, interleaved in one run.

    python -m bench.ttft [--concurrency 1,64,512] [--requests N] [--tokens 64] [--delay-ms 5] [--json out.json]

Starts the mock backend and the proxy as child processes, pins the proxy to one CPU and the backend
plus this load generator to another, and has C workers alternate direct and proxied streams (random
order each round) so both paths see the same conditions. See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import random
import resource
import shlex
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvloop
import yaml

from bench.loadgen import Lane, build_request, fetch_json
from bench.procs import Service, choose_cpus, cpu_model, pin_self, self_cpu_seconds
from bench.stats import QUANTILES, overhead_ms, summary_ms

DIRECT, PROXIED = "direct", "proxied"
PATHS = (DIRECT, PROXIED)
HOST = "127.0.0.1"
BODY = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
WARMUP_ROUNDS = 1  # per worker: first use of both connections, fills the proxy's upstream pool
MIN_ROUNDS = 3  # recorded per worker: at high concurrency N/C would otherwise leave too few samples
OPEN_BATCH = 64  # connections opened at once: a SYN burst past the accept queue costs 1 s retransmits
MAX_ERRORS_SHOWN = 5
SLICE_STREAMS = 3  # throughput slices last at least this many stream lengths
SATURATED = 0.9  # busy share of the mock + load generator core above which it, not the proxy, sets the pace


# --- command line ---------------------------------------------------------------------------------


def int_list(value: str) -> list[int]:
    """argparse type: comma-separated positive integers (shared with bench.metering)."""
    try:
        levels = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be positive integers")
    return levels


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ttft", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int_list, default=[1, 64, 512], metavar="C1,C2,...",
                        help="concurrency levels, each a number of concurrent workers (default 1,64,512)")
    parser.add_argument("--requests", type=int, default=80, metavar="N",
                        help="measured streams per path per level; each worker runs max(3, ceil(N/C)) rounds, "
                             "so high levels measure more (default 80)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream (default 64)")
    parser.add_argument("--delay-ms", type=float, default=5.0, help="backend pause between tokens (default 5)")
    parser.add_argument("--slices", type=int, default=2,
                        help="throughput phase: alternating slices per path (default 2; 0 skips the phase)")
    parser.add_argument("--slice-seconds", type=float, default=1.0,
                        help="minimum throughput slice length; slices last at least 3 stream lengths (default 1)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds (default 60)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--seed", type=int, default=None, help="seed for the round order and start jitter")
    parser.add_argument("--json", metavar="PATH", help="write the raw numbers as JSON")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.tokens < 1 or args.slices < 0 or args.slice_seconds <= 0:
        parser.error("--requests and --tokens must be >= 1, --slices >= 0, --slice-seconds > 0")
    return args


# --- environment ----------------------------------------------------------------------------------


@dataclass
class Env:
    mock: Service
    proxy: Service
    payloads: dict[str, bytes]
    ports: dict[str, int]
    timeout: float
    rng: random.Random


@dataclass
class Worker:
    lanes: dict[str, Lane]


class Failures:
    """Failed streams: how many, and each distinct message with its count (the first few kinds only)."""

    MAX_KINDS = 20

    def __init__(self) -> None:
        self.count = 0
        self.kinds: dict[str, int] = {}

    def add(self, message: str) -> None:
        self.count += 1
        if message in self.kinds or len(self.kinds) < self.MAX_KINDS:
            self.kinds[message] = self.kinds.get(message, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "kinds": self.kinds}


@dataclass
class TtftPhase:
    ttft: dict[str, list[int]] = field(default_factory=lambda: {DIRECT: [], PROXIED: []})
    total: dict[str, list[int]] = field(default_factory=lambda: {DIRECT: [], PROXIED: []})
    paired_diffs: list[int] = field(default_factory=list)
    rounds: list[tuple[str, int | None, int | None]] = field(default_factory=list)  # first path, TTFTs
    errors: dict[str, Failures] = field(default_factory=lambda: {DIRECT: Failures(), PROXIED: Failures()})
    wall_s: float = 0.0
    proxy_cpu_s: float = 0.0
    mock_cpu_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    window_open: bool = False
    window_streams: dict[str, int] = field(default_factory=lambda: {DIRECT: 0, PROXIED: 0})  # completed in it
    upstream_connects: int | None = None


def raise_fd_limit() -> None:
    # 512 workers hold 1024 sockets here and as many in each child; children inherit the raised limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def write_config(directory: str, mock_port: int) -> str:
    config = {"server": {"listen": f"{HOST}:0"}, "backends": [{"url": f"http://{HOST}:{mock_port}"}],
              "logging": {"access_log": "off"}}
    path = Path(directory) / "ttft-proxy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


# --- one concurrency level ------------------------------------------------------------------------


async def open_workers(env: Env, concurrency: int) -> list[Worker]:
    workers = [Worker({path: Lane(HOST, env.ports[path], env.payloads[path], env.timeout) for path in PATHS})
               for _ in range(concurrency)]
    await open_lanes(workers)
    return workers


async def open_lanes(workers: list[Any]) -> None:
    """Connect every worker's lanes, a batch at a time (shared with bench.metering)."""
    lanes = [lane for worker in workers for lane in worker.lanes.values()]
    for start in range(0, len(lanes), OPEN_BATCH):
        await asyncio.gather(*(lane.open() for lane in lanes[start:start + OPEN_BATCH]))


def close_workers(workers: list[Any]) -> None:
    for worker in workers:
        for lane in worker.lanes.values():
            lane.close()


async def warm_up(workers: list[Any]) -> tuple[int, Failures]:
    """One round of streams on every lane; return the median stream duration (ns) and any errors."""
    durations: list[int] = []
    errors = Failures()

    async def one(worker: Any) -> None:
        for _ in range(WARMUP_ROUNDS):
            for path, lane in worker.lanes.items():
                result = await lane.send()
                if result.ok:
                    durations.append(result.total_ns)
                else:
                    errors.add(f"{path}: {result.error}")

    await asyncio.gather(*(one(worker) for worker in workers))
    return (int(statistics.median(durations)) if durations else 0), errors


async def record_in_steady_state(workers: list[Any], rounds: int, spread_s: float, settle_s: float,
                                 rng: random.Random, play_round: Callable[[Any, bool], Awaitable[None]],
                                 on_open: Callable[[], Awaitable[None]],
                                 on_close: Callable[[], Awaitable[None]]) -> None:
    """Have each worker record `rounds` rounds while all C workers are streaming (steady state).

    Workers start staggered over `spread_s`, as independent users would, rather than in lock-step
    bursts every stream length. They play unrecorded rounds until every worker has started and settled
    (`settle_s`), record their rounds, then keep playing unrecorded until the last worker is done, so no
    recorded stream sees fewer than C concurrent streams. `on_open` / `on_close` bracket the recording
    window (for CPU samples). Shared by bench.ttft and bench.metering.
    """
    recording = asyncio.Event()
    all_recorded = asyncio.Event()
    unfinished = [len(workers)]

    def recorded() -> None:
        unfinished[0] -= 1
        if not unfinished[0]:
            all_recorded.set()

    async def one(worker: Any, delay_s: float) -> None:
        try:
            await asyncio.sleep(delay_s)
            while not recording.is_set():
                await play_round(worker, False)
            for _ in range(rounds):
                await play_round(worker, True)
        finally:
            recorded()  # also on a crash, so the window closes and gather() below raises it
        while not all_recorded.is_set():
            await play_round(worker, False)

    tasks = [asyncio.ensure_future(one(worker, rng.uniform(0, spread_s))) for worker in workers]
    if len(workers) > 1:
        await asyncio.sleep(settle_s)
    await on_open()
    recording.set()
    await all_recorded.wait()
    await on_close()
    await asyncio.gather(*tasks)


async def measure_ttft(env: Env, workers: list[Worker], rounds: int, stream_ns: int) -> TtftPhase:
    """Record `rounds` rounds per worker in steady state (see record_in_steady_state). CPU is sampled
    over the recording window and divided by the proxied streams completed in it (recorded or not)."""
    phase = TtftPhase()
    spread_s = 2 * stream_ns / 1e9 if len(workers) > 1 else 0.0
    before: dict[str, Any] = {}

    async def opened() -> None:
        before["reconnects"] = sum(worker.lanes[DIRECT].reconnects for worker in workers)
        before["cpu"] = env.proxy.cpu_seconds(), env.mock.cpu_seconds(), self_cpu_seconds()
        before["started"] = time.perf_counter()
        phase.window_open = True
        before["stats"] = await _mock_connections(env)

    async def closed() -> None:
        phase.window_open = False
        phase.wall_s = time.perf_counter() - before["started"]
        phase.proxy_cpu_s = env.proxy.cpu_seconds() - before["cpu"][0]
        phase.mock_cpu_s = env.mock.cpu_seconds() - before["cpu"][1]
        phase.loadgen_cpu_s = self_cpu_seconds() - before["cpu"][2]
        stats_after = await _mock_connections(env)
        if before["stats"] is not None and stats_after is not None:
            # connections the mock accepted in between, less one stats request and direct reopens
            direct_reopens = sum(worker.lanes[DIRECT].reconnects for worker in workers) - before["reconnects"]
            phase.upstream_connects = stats_after - before["stats"] - 1 - direct_reopens

    await record_in_steady_state(workers, rounds, spread_s, spread_s + stream_ns / 1e9, env.rng,
                                 lambda worker, record: _round(env, worker, phase, record=record), opened, closed)
    return phase


_ORDERS = (PATHS, PATHS[::-1])


async def play_streams(worker: Any, order: tuple[str, ...] | list[str], phase: Any, record: bool) -> dict[str, int]:
    """One stream per path in `order`, back to back on the worker's connections; failures are counted
    whether recorded or not. Returns the TTFTs recorded (shared with bench.metering)."""
    got: dict[str, int] = {}
    for path in order:
        result = await worker.lanes[path].send()
        if not result.ok:
            phase.errors[path].add(result.error or "unknown error")
            continue
        if record:
            phase.ttft[path].append(result.ttft_ns)
            phase.total[path].append(result.total_ns)
            got[path] = result.ttft_ns
        if phase.window_open:
            phase.window_streams[path] += 1
    return got


async def _round(env: Env, worker: Worker, phase: TtftPhase, *, record: bool) -> None:
    """One direct and one proxied stream, in random order, back to back on the worker's connections."""
    order = _ORDERS[env.rng.random() < 0.5]
    got = await play_streams(worker, order, phase, record)
    if record:
        phase.rounds.append((order[0], got.get(DIRECT), got.get(PROXIED)))
        if len(got) == 2:
            phase.paired_diffs.append(got[PROXIED] - got[DIRECT])


async def _mock_connections(env: Env) -> int | None:
    try:
        stats = await fetch_json(HOST, env.ports[DIRECT], "/_mock/stats")
    except (OSError, RuntimeError, ValueError, asyncio.TimeoutError):
        return None  # diagnostics only: the benchmark stands without it
    return stats.get("connections_total") if isinstance(stats, dict) else None


async def measure_throughput(env: Env, workers: list[Worker], slices: int, slice_s: float,
                             stream_ns: int) -> dict[str, Any]:
    """Streams per second per path, in alternating time slices where every worker uses one path.

    Each worker starts its next stream on whichever path is current. With C workers that never
    pause, Little's law gives the completion rate as C / mean stream time. That is the headline rate
    here. It uses only streams that ran wholly inside a slice of their own path, so it is not
    affected by streams that straddle a flip, or by how many completions happen to fall in a slice
    (at C = 1 a 1 s slice holds about three). The directly counted rate is kept too: each stream is
    credited to its own path in proportion to its lifetime inside the counted window, and each path's
    rate divides by the time that path was current. An uncounted lead-in on the path of the last
    slice makes the carry-over across flips even at both ends.
    """
    state: dict[str, Any] = {"path": PROXIED, "stop": False}
    streams: list[tuple[str, float, float]] = []  # path, begin, end (perf_counter s) of good streams
    errors = Failures()

    async def one(worker: Worker, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        while not state["stop"]:
            path = state["path"]
            begin = time.perf_counter()
            result = await worker.lanes[path].send()
            if result.ok:
                streams.append((path, begin, time.perf_counter()))
            else:
                errors.add(f"{path}: {result.error}")

    spread_s = stream_ns / 1e9 if len(workers) > 1 else 0.0  # one path per worker: one stream apart
    tasks = [asyncio.ensure_future(one(worker, env.rng.uniform(0, spread_s))) for worker in workers]
    await asyncio.sleep(max(slice_s, spread_s + stream_ns / 1e9))  # lead-in, not counted
    timeline: list[tuple[str, float, float]] = []  # path, start, end of each counted slice
    # CPU of the mock + load generator core per path: when that core saturates, this shows whether a
    # path costs it more per stream (and so explains a ratio away from 1 that is not the proxy's doing)
    client_cpu = {DIRECT: 0.0, PROXIED: 0.0}
    for path in [DIRECT, PROXIED] * slices:
        state["path"] = path
        started, cpu = time.perf_counter(), env.mock.cpu_seconds() + self_cpu_seconds()
        await asyncio.sleep(slice_s)
        timeline.append((path, started, time.perf_counter()))
        client_cpu[path] += env.mock.cpu_seconds() + self_cpu_seconds() - cpu
    state["stop"] = True
    await asyncio.gather(*tasks)
    return _throughput_summary(len(workers), timeline, streams, client_cpu, errors)


def _throughput_summary(concurrency: int, timeline: list[tuple[str, float, float]],
                        streams: list[tuple[str, float, float]], client_cpu: dict[str, float],
                        errors: Failures) -> dict[str, Any]:
    seconds = {DIRECT: 0.0, PROXIED: 0.0}
    for path, start, end in timeline:
        seconds[path] += end - start
    window_start, window_end = timeline[0][1], timeline[-1][2]
    credited = {DIRECT: 0.0, PROXIED: 0.0}
    inside: dict[str, list[float]] = {DIRECT: [], PROXIED: []}
    for path, begin, end in streams:
        overlap = min(end, window_end) - max(begin, window_start)
        if overlap > 0:
            credited[path] += overlap / (end - begin)
        if any(p == path and start <= begin and end <= stop for p, start, stop in timeline):
            inside[path].append(end - begin)
    little = {path: concurrency / statistics.fmean(inside[path]) if inside[path] else float("nan")
              for path in PATHS}
    counted = {path: credited[path] / seconds[path] for path in PATHS}
    return {
        "slice_s": timeline[0][2] - timeline[0][1], "seconds": seconds,
        "streams_per_s": little, "ratio": little[PROXIED] / little[DIRECT],
        "streams_inside_slices": {path: len(inside[path]) for path in PATHS},
        "counted_streams": credited, "counted_streams_per_s": counted,
        "counted_ratio": counted[PROXIED] / counted[DIRECT] if counted[DIRECT] else float("nan"),
        "mock_loadgen_cpu_ms_per_stream": {path: _per_stream_ms(client_cpu[path], round(credited[path]))
                                           for path in PATHS},
        "errors": errors.as_dict(),
    }


async def run_level(env: Env, args: argparse.Namespace, concurrency: int) -> dict[str, Any]:
    rounds = max(MIN_ROUNDS, math.ceil(args.requests / concurrency))
    log(f"c={concurrency}: opening {2 * concurrency} connections, warm-up ({WARMUP_ROUNDS} round(s) per worker)")
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
        throughput = None
        if args.slices:
            # measured stream length, not the warm-up's: warm-up is one synchronised burst
            stream_ns = int(statistics.median(phase.total[DIRECT] + phase.total[PROXIED] or [stream_ns]))
            # streams that straddle a flip are credited to their own path but to the next slice's time;
            # slices several streams long keep that carry-over a small part of each count
            slice_s = max(args.slice_seconds, SLICE_STREAMS * stream_ns / 1e9)
            log(f"c={concurrency}: throughput phase, {args.slices} x {slice_s:.2f}s slices per path")
            throughput = await measure_throughput(env, workers, args.slices, slice_s, stream_ns)
        reconnects = {path: sum(worker.lanes[path].reconnects for worker in workers) for path in PATHS}
    finally:
        close_workers(workers)
    return summarise(concurrency, rounds, phase, throughput, reconnects, warm_errors)


def _per_stream_ms(cpu_s: float, streams: int) -> float:
    return cpu_s * 1000 / streams if streams else float("nan")


def summarise(concurrency: int, rounds: int, phase: TtftPhase, throughput: dict[str, Any] | None,
              reconnects: dict[str, int], warm_errors: Failures) -> dict[str, Any]:
    direct, proxied = summary_ms(phase.ttft[DIRECT]), summary_ms(phase.ttft[PROXIED])
    wall = phase.wall_s or float("nan")
    direct_streams, proxied_streams = phase.window_streams[DIRECT], phase.window_streams[PROXIED]
    paired = sorted(phase.paired_diffs)
    return {
        "concurrency": concurrency,
        "rounds_per_worker": rounds,
        "ttft_ms": {DIRECT: direct, PROXIED: proxied},
        "stream_ms": {path: summary_ms(phase.total[path]) for path in PATHS},
        "overhead_ms": overhead_ms(direct, proxied),
        "paired_overhead_ms": summary_ms(paired) if paired else {"n": 0},
        "throughput": throughput,
        "proxy_cpu_ms_per_stream": _per_stream_ms(phase.proxy_cpu_s, proxied_streams),
        # for scale: what the mock backend spends per stream it generates, on either path
        "mock_cpu_ms_per_stream": _per_stream_ms(phase.mock_cpu_s, proxied_streams + direct_streams),
        "streams_in_cpu_window": phase.window_streams,
        # share of one core over the recording window; the second core runs the mock and the load generator
        "core_busy": {"proxy": phase.proxy_cpu_s / wall, "mock": phase.mock_cpu_s / wall,
                      "loadgen": phase.loadgen_cpu_s / wall},
        "wall_s": phase.wall_s,
        "proxy_upstream_connects": phase.upstream_connects,
        "reconnects": reconnects,
        "errors": {path: phase.errors[path].as_dict() for path in PATHS},
        "warmup_errors": warm_errors.as_dict(),
        "raw": {"ttft_ns": phase.ttft, "stream_ns": phase.total, "paired_diff_ns": phase.paired_diffs,
                "rounds": phase.rounds},
    }


# --- reporting ------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[bench.ttft] {message}", file=sys.stderr, flush=True)


def _ms(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def table(levels: list[dict[str, Any]]) -> str:
    head = ["concurrency", "streams/path", "direct p50", "direct p99", "proxied p50", "proxied p99",
            "overhead p50", "overhead p90", "overhead p99", "paired Δ p50", "throughput ratio",
            "proxy CPU ms/stream", "errors"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for level in levels:
        ttft, over = level["ttft_ms"], level["overhead_ms"]
        throughput = level["throughput"]
        ratio = f"{throughput['ratio']:.3f}" if throughput else "skipped"
        if throughput and _saturated(level):
            ratio += " (sat.)"
        errors = sum(errs["count"] for errs in level["errors"].values())
        cells = [str(level["concurrency"]), f"{ttft[DIRECT]['n']}/{ttft[PROXIED]['n']}",
                 _ms(ttft[DIRECT].get("p50")), _ms(ttft[DIRECT].get("p99")),
                 _ms(ttft[PROXIED].get("p50")), _ms(ttft[PROXIED].get("p99")),
                 *(_ms(over[f"p{q}"]) for q in QUANTILES), _ms(level["paired_overhead_ms"].get("p50")),
                 ratio, _ms(level["proxy_cpu_ms_per_stream"]), str(errors)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _saturated(level: dict[str, Any]) -> bool:
    busy = level["core_busy"]
    return busy["mock"] + busy["loadgen"] >= SATURATED


def diagnostics(levels: list[dict[str, Any]]) -> str:
    lines = []
    for level in levels:
        busy = level["core_busy"]
        stream = level["stream_ms"]
        line = (f"- c={level['concurrency']}: recording window {level['wall_s']:.1f}s; core busy: proxy "
                f"{busy['proxy']:.0%}, mock {busy['mock']:.0%} + load generator {busy['loadgen']:.0%}; "
                f"stream duration p50 direct {_ms(stream[DIRECT].get('p50'))} ms, "
                f"proxied {_ms(stream[PROXIED].get('p50'))} ms")
        throughput = level["throughput"]
        if throughput:
            per_s, counted = throughput["streams_per_s"], throughput["counted_streams_per_s"]
            cost = throughput["mock_loadgen_cpu_ms_per_stream"]
            line += (f"; throughput direct {per_s[DIRECT]:.1f}/s, proxied {per_s[PROXIED]:.1f}/s "
                     f"(counted: {counted[DIRECT]:.1f}/s, {counted[PROXIED]:.1f}/s; mock + load generator "
                     f"CPU per stream: direct {_ms(cost[DIRECT])} ms, proxied {_ms(cost[PROXIED])} ms)")
        line += (f"; proxy opened {level['proxy_upstream_connects']} upstream connections; "
                 f"client reconnects {level['reconnects']}")
        line += f"; for scale, the mock spent {_ms(level['mock_cpu_ms_per_stream'])} ms CPU per stream"
        if _saturated(level):
            line += ("\n  WARNING: the mock + load generator core is saturated: TTFT and throughput at this "
                     "level include queueing on that core, for both paths")
        lines.append(line)
    return "\n".join(lines)


def error_report(levels: list[dict[str, Any]], children_output: str) -> str:
    lines = []
    for level in levels:
        where = f"c={level['concurrency']}"
        sources = [(f"{where} {path}", level["errors"][path]) for path in PATHS]
        sources.append((f"{where} warm-up", level["warmup_errors"]))
        if level["throughput"]:
            sources.append((f"{where} throughput phase", level["throughput"]["errors"]))
        for name, failures in sources:
            if failures["count"]:
                lines.append(f"- {name}: {failures['count']} failed streams, e.g.:")
                kinds = list(failures["kinds"].items())[:MAX_ERRORS_SHOWN]
                lines += [f"    {count} x {message}" for message, count in kinds]
    if lines:
        lines += ["", "Last output of the children:", children_output]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------


async def run_all(env: Env, args: argparse.Namespace) -> list[dict[str, Any]]:
    # one proxied request first: a proxy that cannot serve at all should fail loudly, not as 100% errors
    probe = await Lane(HOST, env.ports[PROXIED], env.payloads[PROXIED], env.timeout).send()
    if not probe.ok:
        raise RuntimeError(f"probe request through the proxy failed: {probe.error}")
    gc.collect()
    gc.freeze()  # setup objects never die: keep them out of every later collection
    levels = []
    for concurrency in args.concurrency:
        levels.append(await run_level(env, args, concurrency))
        for service in (env.proxy, env.mock):
            if not service.alive():  # later levels would only collect connection errors
                log(f"{service.name} exited during c={concurrency}; stopping")
                return levels
    return levels


def machine(pins: tuple[int, int] | None) -> dict[str, Any]:
    if pins is None:
        pinning = f"none ({len(os.sched_getaffinity(0))} usable CPU(s); pinning needs 2)"
    else:
        pinning = f"proxy on CPU {pins[0]}; mock backend + load generator on CPU {pins[1]}"
    return {"nproc": os.cpu_count(), "usable_cpus": sorted(os.sched_getaffinity(0)), "cpu_model": cpu_model(),
            "python": sys.version.split()[0], "pinning": pinning}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m bench.ttft " + shlex.join(sys.argv[1:] if argv is None else argv)
    raise_fd_limit()
    # SIGTERM would otherwise end this process without its `finally`, orphaning both children
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    pins = None if args.no_pin else choose_cpus()
    info = machine(pins)  # before pinning, which narrows what sched_getaffinity reports
    if pins is not None:
        pin_self(pins[1])  # first, so the mock backend and every thread inherit CPU pins[1]
    if args.no_pin:
        info["pinning"] = "none (--no-pin)"
    log(f"pinning: {info['pinning']}")
    mock = Service("mock-backend", ["mock-backend", "--dialect", "vllm", "--listen", f"{HOST}:0", "--model", "m",
                                    "--tokens", str(args.tokens), "--delay-ms", f"{args.delay_ms:g}"],
                   cpu=pins[1] if pins else None)
    proxy: Service | None = None
    levels: list[dict[str, Any]] = []
    failure = None
    with tempfile.TemporaryDirectory(prefix="bench-ttft-") as tmp:
        try:
            mock_port = mock.start()
            proxy = Service("proxy", ["serve", "--config", write_config(tmp, mock_port), "--listen", f"{HOST}:0"],
                            cpu=pins[0] if pins else None)
            proxy_port = proxy.start()
            log(f"mock backend pid {mock.pid} on :{mock_port}, proxy pid {proxy.pid} on :{proxy_port}")
            ports = {DIRECT: mock_port, PROXIED: proxy_port}
            env = Env(mock, proxy, {path: build_request(HOST, port, "/v1/chat/completions", BODY)
                                    for path, port in ports.items()}, ports, args.timeout, random.Random(args.seed))
            levels = uvloop.run(run_all(env, args))
        except (RuntimeError, OSError) as exc:
            failure = str(exc)
        finally:
            children_output = stop_children([proxy, mock])
    print(report(command, info, levels), flush=True)
    problems = error_report(levels, children_output)
    if failure or problems:
        print("\n## Problems\n", file=sys.stderr)
        if failure:
            print(f"aborted: {failure}\n\n{children_output}", file=sys.stderr)
        if problems:
            print(problems, file=sys.stderr)
    if args.json:
        Path(args.json).write_bytes(orjson.dumps({"command": command, "machine": info, "args": vars(args),
                                                  "levels": levels}, option=orjson.OPT_INDENT_2))
        log(f"raw numbers written to {args.json}")
    return 1 if failure or problems else 0


def stop_children(services: list[Service | None]) -> str:
    """Stop the children in order and return their last output, each under a header with its exit status.

    The proxy goes first, so that it never sees its backend vanish mid-stream and log errors that
    are not its own.
    """
    outputs = []
    for service in services:
        if service is None:
            continue
        alive = service.alive()
        status = service.stop()
        state = f"stopped, exit {status}" if alive else f"had already exited with status {status}"
        outputs.append(f"--- {service.name} (pid {service.pid}, {state})\n{service.output()}")
    return "\n".join(outputs)


def report(command: str, info: dict[str, Any], levels: list[dict[str, Any]]) -> str:
    parts = ["## bench.ttft", "", f"- command: `{command}`",
             f"- machine: nproc {info['nproc']}, {info['cpu_model']}, Python {info['python']}",
             f"- pinning: {info['pinning']}", ""]
    if levels:
        parts += ["TTFT in ms (request write -> first bytes of the first SSE `data:` event). Overhead = proxied "
                  "minus direct percentile; paired Δ = median of per-round (proxied - direct). (sat.) = the "
                  "mock + load generator core was saturated at that level (see the warning below).", "",
                  table(levels), "", diagnostics(levels)]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
