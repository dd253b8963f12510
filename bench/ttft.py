"""First-token overhead of the proxy: proxied vs direct TTFT, interleaved in one run.

    python -m bench.ttft [--concurrency 1,64,512] [--requests N] [--tokens 64] [--delay-ms 5] [--json out.json]

Starts the mock backend and the proxy as child processes, pins the proxy to one CPU and the backend
plus this load generator to another, and has C workers alternate direct and proxied streams (random
order each round) so both paths see the same conditions. See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import asyncio
import operator
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import uvloop

from bench import interleave
from bench.harness import (
    HOST,
    SATURATED,
    add_level_args,
    add_run_args,
    chat_request,
    failure_lines,
    level_failures,
    logger,
    md_row,
    mock_service,
    ms,
    print_problems,
    proxy_config,
    proxy_service,
    report_head,
    start_run,
    stop_children,
    write_configs,
    write_json,
)
from bench.interleave import DIRECT, Failures, Interleaving, Level, Phase, Worker
from bench.loadgen import Lane
from bench.procs import Service, self_cpu_seconds
from bench.stats import QUANTILES, per_stream_ms, summary_ms

PROXIED = "proxied"
PATHS = (DIRECT, PROXIED)
PAIR = "proxied-direct"
# a round's order is written as the path that went first, which with two paths says it all
INTERLEAVING = Interleaving(PATHS, pairs=((PAIR, PROXIED, DIRECT),), label=operator.itemgetter(0),
                            count_upstream=True)
SLICE_STREAMS = 3  # throughput slices last at least this many stream lengths

log = logger("bench.ttft")


# --- command line ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ttft", description=__doc__.split("\n\n")[0])
    add_level_args(parser, [1, 64, 512], 80, "measured streams per path per level; each worker runs "
                   "max(3, ceil(N/C)) rounds, so high levels measure more (default 80)")
    parser.add_argument("--slices", type=int, default=2,
                        help="throughput phase: alternating slices per path (default 2; 0 skips the phase)")
    parser.add_argument("--slice-seconds", type=float, default=1.0,
                        help="minimum throughput slice length; slices last at least 3 stream lengths (default 1)")
    add_run_args(parser)
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

    def lane(self, path: str) -> Lane:
        return Lane(HOST, self.ports[path], self.payloads[path], self.timeout)

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the proxy, the mock and this load generator."""
        return {PROXIED: self.proxy.cpu_seconds(), "mock": self.mock.cpu_seconds(), "loadgen": self_cpu_seconds()}


# --- throughput phase -----------------------------------------------------------------------------


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
        "mock_loadgen_cpu_ms_per_stream": {path: per_stream_ms(client_cpu[path], round(credited[path]))
                                           for path in PATHS},
        "errors": errors.as_dict(),
    }


# --- one concurrency level ------------------------------------------------------------------------


async def run_level(env: Env, args: argparse.Namespace, concurrency: int) -> dict[str, Any]:
    """The interleaved first-token phase, then (unless --slices 0) the throughput phase on the same workers."""

    async def throughput(workers: list[Worker], phase: Phase, stream_ns: int) -> dict[str, Any] | None:
        if not args.slices:
            return None
        # measured stream length, not the warm-up's: warm-up is one synchronised burst
        stream_ns = int(statistics.median(phase.total[DIRECT] + phase.total[PROXIED] or [stream_ns]))
        # streams that straddle a flip are credited to their own path but to the next slice's time;
        # slices several streams long keep that carry-over a small part of each count
        slice_s = max(args.slice_seconds, SLICE_STREAMS * stream_ns / 1e9)
        log(f"c={concurrency}: throughput phase, {args.slices} x {slice_s:.2f}s slices per path")
        return await measure_throughput(env, workers, args.slices, slice_s, stream_ns)

    return summarise(await interleave.run_level(env, INTERLEAVING, concurrency, args.requests, log, throughput))


def summarise(level: Level) -> dict[str, Any]:
    paired = level.phase.paired[PAIR]
    return level.summary({
        "overhead_ms": level.overhead_ms(PROXIED),
        "paired_overhead_ms": summary_ms(paired) if paired else {"n": 0},
        "throughput": level.extra,
        "proxy_cpu_ms_per_stream": level.cpu_ms_per_stream(PROXIED, [PROXIED]),
        # for scale: what the mock backend spends per stream it generates, on either path
        "mock_cpu_ms_per_stream": level.cpu_ms_per_stream("mock", PATHS),
        "streams_in_cpu_window": level.phase.window_streams,
        # share of one core over the recording window; the second core runs the mock and the load generator
        "core_busy": {"proxy": level.busy(PROXIED), "mock": level.busy("mock"), "loadgen": level.busy("loadgen")},
        "wall_s": level.phase.wall_s,
        "proxy_upstream_connects": level.phase.upstream_connects,
    }, paired_raw=paired)


# --- reporting ------------------------------------------------------------------------------------


def table(levels: list[dict[str, Any]]) -> str:
    head = ["concurrency", "streams/path", "direct p50", "direct p99", "proxied p50", "proxied p99",
            "overhead p50", "overhead p90", "overhead p99", "paired Δ p50", "throughput ratio",
            "proxy CPU ms/stream", "errors"]
    rows = [md_row(head), "|" + "---:|" * len(head)]
    for level in levels:
        ttft, over = level["ttft_ms"], level["overhead_ms"]
        throughput = level["throughput"]
        ratio = f"{throughput['ratio']:.3f}" if throughput else "skipped"
        if throughput and _saturated(level):
            ratio += " (sat.)"
        errors = sum(errs["count"] for errs in level["errors"].values())
        cells = [str(level["concurrency"]), f"{ttft[DIRECT]['n']}/{ttft[PROXIED]['n']}",
                 ms(ttft[DIRECT].get("p50")), ms(ttft[DIRECT].get("p99")),
                 ms(ttft[PROXIED].get("p50")), ms(ttft[PROXIED].get("p99")),
                 *(ms(over[f"p{q}"]) for q in QUANTILES), ms(level["paired_overhead_ms"].get("p50")),
                 ratio, ms(level["proxy_cpu_ms_per_stream"]), str(errors)]
        rows.append(md_row(cells))
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
                f"stream duration p50 direct {ms(stream[DIRECT].get('p50'))} ms, "
                f"proxied {ms(stream[PROXIED].get('p50'))} ms")
        throughput = level["throughput"]
        if throughput:
            per_s, counted = throughput["streams_per_s"], throughput["counted_streams_per_s"]
            cost = throughput["mock_loadgen_cpu_ms_per_stream"]
            line += (f"; throughput direct {per_s[DIRECT]:.1f}/s, proxied {per_s[PROXIED]:.1f}/s "
                     f"(counted: {counted[DIRECT]:.1f}/s, {counted[PROXIED]:.1f}/s; mock + load generator "
                     f"CPU per stream: direct {ms(cost[DIRECT])} ms, proxied {ms(cost[PROXIED])} ms)")
        line += (f"; proxy opened {level['proxy_upstream_connects']} upstream connections; "
                 f"client reconnects {level['reconnects']}")
        line += f"; for scale, the mock spent {ms(level['mock_cpu_ms_per_stream'])} ms CPU per stream"
        if _saturated(level):
            line += ("\n  WARNING: the mock + load generator core is saturated: TTFT and throughput at this "
                     "level include queueing on that core, for both paths")
        lines.append(line)
    return "\n".join(lines)


def error_report(levels: list[dict[str, Any]]) -> str:
    sources = []
    for level in levels:
        sources += level_failures(level, PATHS)
        if level["throughput"]:
            sources.append((f"c={level['concurrency']} throughput phase", level["throughput"]["errors"]))
    return failure_lines(sources)


def report(command: str, info: dict[str, Any], levels: list[dict[str, Any]]) -> str:
    parts = [*report_head("bench.ttft", command, info), ""]
    if levels:
        parts += ["TTFT in ms (request write -> first bytes of the first SSE `data:` event). Overhead = proxied "
                  "minus direct percentile; paired Δ = median of per-round (proxied - direct). (sat.) = the "
                  "mock + load generator core was saturated at that level (see the warning below).", "",
                  table(levels), "", diagnostics(levels)]
    return "\n".join(parts)


# --- main -----------------------------------------------------------------------------------------


async def run_all(env: Env, args: argparse.Namespace) -> list[dict[str, Any]]:
    # one proxied request first: a proxy that cannot serve at all should fail loudly, not as 100% errors
    probe = await env.lane(PROXIED).send()
    if not probe.ok:
        raise RuntimeError(f"probe request through the proxy failed: {probe.error}")
    levels, _ = await interleave.run_levels(args.concurrency, lambda concurrency: run_level(env, args, concurrency),
                                            [env.proxy, env.mock], log)
    return levels


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command, pins, info = start_run("bench.ttft", argv, args.no_pin, log)
    mock = mock_service(args, pins)
    proxy: Service | None = None
    levels: list[dict[str, Any]] = []
    failure = None
    with tempfile.TemporaryDirectory(prefix="bench-ttft-") as tmp:
        try:
            mock_port = mock.start()
            config = write_configs(tmp, "ttft", {"proxy": proxy_config(mock_port)})["proxy"]
            proxy = proxy_service("proxy", config, pins)
            proxy_port = proxy.start()
            log(f"mock backend pid {mock.pid} on :{mock_port}, proxy pid {proxy.pid} on :{proxy_port}")
            ports = {DIRECT: mock_port, PROXIED: proxy_port}
            env = Env(mock, proxy, {path: chat_request(port) for path, port in ports.items()}, ports,
                      args.timeout, random.Random(args.seed))
            levels = uvloop.run(run_all(env, args))
        except (RuntimeError, OSError) as exc:
            failure = str(exc)
        finally:
            children_output = stop_children([proxy, mock])
    print(report(command, info, levels), flush=True)
    troubled = print_problems(failure, error_report(levels), [], children_output)
    write_json(args.json, {"command": command, "machine": info, "args": vars(args), "levels": levels}, log)
    return 1 if troubled else 0


if __name__ == "__main__":
    sys.exit(main())
