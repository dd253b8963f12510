"""First-token overhead of the proxy: proxied vs direct TTFT (and nginx as a reference), interleaved in one run.

    python -m bench.ttft [--concurrency 1,64,512] [--backends paced,burst] [--nginx auto|off] [--requests N]
                         [--json out.json]

Starts the mock backend, the proxy and (when installed) nginx as child processes, pins the proxies to one
CPU and the backend plus this load generator to another, and has C workers play rounds of one stream per
path (random order each round) so all paths see the same conditions. Each level runs once per backend
mode: paced (one event every --delay-ms) and burst (the whole stream in one write). See bench/README.md
for how to read the output.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import operator
import os
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
    CPU_SOURCE,
    HOST,
    Pins,
    add_level_args,
    add_run_args,
    chat_request,
    int_list,
    logger,
    mock_service,
    print_problems,
    process_cpu_seconds,
    proxy_config,
    proxy_service,
    start_run,
    stop_children,
    write_configs,
    write_json,
)
from bench.inproduct import PROXIED, inproduct_summary, scrape, scrape_settled
from bench.interleave import DIRECT, Failures, Interleaving, Level, Phase, Worker
from bench.loadgen import Lane
from bench.nginx import Nginx, find_nginx
from bench.procs import Service, pinned_core_seconds
from bench.stats import per_stream_ms, summary_ms
from bench.ttft_report import BURST, NGINX, PACED, error_report, failed_checks, report, saturated

# PROXIED, NGINX, PACED and BURST come from bench.inproduct and bench.ttft_report, which import nothing from here
PATHS = (DIRECT, PROXIED)  # the throughput phase compares these two
PAIR, NGINX_PAIR, VS_NGINX = "proxied-direct", "nginx-direct", "proxied-nginx"
MODES = (PACED, BURST)
MODE_HEADERS = {PACED: {}, BURST: {"x-mock-delay-ms": "0"}}  # burst: the same tokens, all in one write
SLICE_STREAMS = 3  # throughput slices last at least this many stream lengths

log = logger("bench.ttft")


# --- command line ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ttft", description=__doc__.split("\n\n")[0])
    add_level_args(parser, [1, 64, 512], 80, "paced backend: measured streams per path per level; each worker "
                   "runs max(3, ceil(N/C)) rounds, so high levels measure more (default 80)")
    parser.add_argument("--burst-requests", type=int, default=1000, metavar="N",
                        help="the same for the burst backend, whose streams take about 1 ms at C = 1 (default 1000)")
    parser.add_argument("--backends", type=modes, default=list(MODES), metavar="paced,burst",
                        help="backend modes, each level runs once per mode (default paced,burst)")
    parser.add_argument("--nginx", choices=("auto", "off"), default="auto",
                        help="auto: add nginx as a third path when it is installed (default); off: never")
    parser.add_argument("--slices", type=int, default=2,
                        help="throughput phase (paced only): alternating slices per path (default 2; 0 skips it)")
    parser.add_argument("--slice-seconds", type=float, default=1.0,
                        help="minimum throughput slice length; slices last at least 3 stream lengths (default 1)")
    parser.add_argument("--throughput-levels", type=int_list, default=None, metavar="C1,C2,...",
                        help="levels that get the throughput phase (default: every level above 1)")
    add_run_args(parser)
    args = parser.parse_args(argv)
    if min(args.requests, args.burst_requests, args.tokens) < 1 or args.slices < 0 or args.slice_seconds <= 0:
        parser.error("--requests, --burst-requests and --tokens must be >= 1, --slices >= 0, --slice-seconds > 0")
    if args.throughput_levels is None:  # at C = 1 both paths are bound by the pacing: the ratio is 1 by design
        args.throughput_levels = [c for c in args.concurrency if c > 1]
    return args


def modes(value: str) -> list[str]:
    """argparse type: comma-separated backend modes."""
    chosen = [part.strip() for part in value.split(",") if part.strip()]
    if not chosen or set(chosen) - set(MODES):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(MODES)}, got {value!r}")
    return list(dict.fromkeys(chosen))


# --- environment ----------------------------------------------------------------------------------


@dataclass
class Env:
    mock: Service
    proxy: Service
    nginx: Nginx | None
    ports: dict[str, int]
    requests: dict[str, dict[str, bytes]]  # backend mode -> path -> request
    timeout: float
    rng: random.Random
    pins: Pins
    mode: str = PACED  # of the level being run

    @property
    def paths(self) -> tuple[str, ...]:
        return (DIRECT, PROXIED, NGINX) if self.nginx else PATHS

    def lane(self, path: str) -> Lane:
        # event arrival times only where events are paced: in a burst they arrive in one or two reads
        return Lane(HOST, self.ports[path], self.requests[self.mode][path], self.timeout,
                    record_arrivals=self.mode == PACED)

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the proxy, the mock, this load generator and nginx (master + worker)."""
        out = {PROXIED: process_cpu_seconds([self.proxy.pid]), "mock": process_cpu_seconds([self.mock.pid]),
               "loadgen": process_cpu_seconds([os.getpid()])}
        if self.nginx:
            out[NGINX] = self.nginx.cpu_seconds()
        return {**out, **pinned_core_seconds(self.pins)}  # whole cores: shows load from other processes


def interleaving(paths: tuple[str, ...]) -> Interleaving:
    pairs = ((PAIR, PROXIED, DIRECT),)
    if NGINX in paths:
        pairs += ((NGINX_PAIR, NGINX, DIRECT), (VS_NGINX, PROXIED, NGINX))
    # with two paths a round's order is the path that went first, which says it all
    label = operator.itemgetter(0) if len(paths) == 2 else ",".join
    return Interleaving(paths, pairs, label=label, count_upstream=True)


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
        started, cpu = time.perf_counter(), client_cpu_seconds(env)
        await asyncio.sleep(slice_s)
        timeline.append((path, started, time.perf_counter()))
        client_cpu[path] += client_cpu_seconds(env) - cpu
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


def client_cpu_seconds(env: Env) -> float:
    """CPU seconds so far of the second core's processes: the mock and this load generator."""
    return process_cpu_seconds([env.mock.pid, os.getpid()])


# --- one level ------------------------------------------------------------------------------------


async def run_level(env: Env, args: argparse.Namespace, concurrency: int, mode: str) -> dict[str, Any]:
    """The interleaved first-token phase in one backend mode, bracketed by scrapes of the proxy's /metrics,
    then (paced, at --throughput-levels, unless --slices 0) the throughput phase on the same workers."""
    env.mode = mode
    scrapes: dict[str, Any] = {}

    async def before() -> None:
        scrapes["before"] = await scrape(env.ports[PROXIED])

    async def then(workers: list[Worker], phase: Phase, stream_ns: int) -> dict[str, Any] | None:
        scrapes["after"] = await scrape_settled(env.ports[PROXIED], scrapes["before"], phase)
        if not args.slices or mode != PACED or concurrency not in args.throughput_levels:
            return None
        # measured stream length, not the warm-up's: warm-up is one synchronised burst
        stream_ns = int(statistics.median(phase.total[DIRECT] + phase.total[PROXIED] or [stream_ns]))
        # streams that straddle a flip are credited to their own path but to the next slice's time;
        # slices several streams long keep that carry-over a small part of each count
        slice_s = max(args.slice_seconds, SLICE_STREAMS * stream_ns / 1e9)
        log(f"c={concurrency} {mode}: throughput phase, {args.slices} x {slice_s:.2f}s slices per path")
        return await measure_throughput(env, workers, args.slices, slice_s, stream_ns)

    log(f"c={concurrency}: {mode} backend")
    requests = args.requests if mode == PACED else args.burst_requests
    level = await interleave.run_level(env, interleaving(env.paths), concurrency, requests, log, then, before)
    return summarise(level, mode, scrapes)


def summarise(level: Level, mode: str, scrapes: dict[str, Any]) -> dict[str, Any]:
    phase = level.phase
    paths = tuple(phase.ttft)
    phase.ttft.setdefault(NGINX, [])  # the CDF plots read every path's list, empty when nginx did not run
    paired = level.paired_ms
    inter_chunk = inter_chunk_ms(phase) if mode == PACED else None
    busy = core_busy(level, paths)
    return level.summary({
        "backend": mode,
        "overhead_ms": overhead_with_max(level, PROXIED),
        "paired_overhead_ms": paired[PAIR],
        "throughput": level.extra,
        "proxy_cpu_ms_per_stream": level.cpu_ms_per_stream(PROXIED, [PROXIED]),
        "proxy_cpu_us_per_event": level.cpu_us_per_event(PROXIED, [PROXIED]),
        "nginx": nginx_summary(level) if NGINX in paths else None,
        "inter_chunk_ms": inter_chunk,
        "inproduct": inproduct_summary(scrapes, phase, paired[PAIR], inter_chunk, saturated(busy)),
        # for scale: what the mock backend spends per stream it generates, on every path
        "mock_cpu_ms_per_stream": level.cpu_ms_per_stream("mock", paths),
        "streams_in_cpu_window": phase.window_streams,
        "events_in_cpu_window": phase.window_events,
        "streams_in_phase": phase.played,
        "cpu_source": CPU_SOURCE,
        # share of one core over the recording window; the second core runs the mock and the load generator
        "core_busy": busy,
        "cpu_s": phase.cpu_s,
        "wall_s": phase.wall_s,
        "proxy_upstream_connects": phase.upstream_connects,
    }, paired_raw=phase.paired, round_columns=["order", *paths])


def core_busy(level: Level, paths: tuple[str, ...]) -> dict[str, float | None]:
    """Share of one core that each process used over the window; when pinned, also each core as a whole."""
    busy = {"proxy": level.busy(PROXIED), "nginx": level.busy(NGINX) if NGINX in paths else None,
            "mock": level.busy("mock"), "loadgen": level.busy("loadgen")}
    if "mock_core_busy" in level.phase.cpu_s:  # whoever used it: other processes show up here
        busy.update(proxy_core=level.busy("proxy_core_busy"), mock_core=level.busy("mock_core_busy"))
    return busy


def overhead_with_max(level: Level, path: str) -> dict[str, float]:
    """Overhead percentiles of `path` over direct, and the difference of the maxima."""
    ttft, nan = level.ttft_ms, float("nan")
    return {**level.overhead_ms(path), "max": ttft[path].get("max", nan) - ttft[DIRECT].get("max", nan)}


def nginx_summary(level: Level) -> dict[str, Any]:
    """nginx's overhead and CPU, and ours as ratios to them (above 1: ours is higher)."""
    ours, theirs = level.overhead_ms(PROXIED), overhead_with_max(level, NGINX)
    cpu = {path: level.cpu_ms_per_stream(path, [path]) for path in (PROXIED, NGINX)}
    return {
        "overhead_ms": theirs,
        "paired_overhead_ms": level.paired_ms[NGINX_PAIR],
        "proxied_minus_nginx_paired_ms": level.paired_ms[VS_NGINX],
        "cpu_ms_per_stream": cpu[NGINX],
        "cpu_us_per_event": level.cpu_us_per_event(NGINX, [NGINX]),
        # a ratio to an overhead at or below zero (nginx as fast as direct) says nothing
        "overhead_p50_ratio": ours["p50"] / theirs["p50"] if theirs["p50"] > 0 else float("nan"),
        "cpu_per_stream_ratio": cpu[PROXIED] / cpu[NGINX] if cpu[NGINX] > 0 else float("nan"),
    }


def inter_chunk_ms(phase: Phase) -> dict[str, Any]:
    """Gaps between consecutive events of the recorded streams, per path, and each path's over direct's.

    The gap before `data: [DONE]` is left out: through the proxy it also holds the backend's pacing of the
    usage-only event that the proxy asks for (stream_options.include_usage) and strips, one extra 5 ms.
    """
    gaps = {path: [later - earlier for stream in streams for earlier, later in itertools.pairwise(stream[:-1])]
            for path, streams in phase.arrivals.items()}
    summaries = {path: summary_ms(values) for path, values in gaps.items()}
    nan = float("nan")
    return {"gaps": summaries, **{
        f"{path}_overhead": {q: summaries[path].get(q, nan) - summaries[DIRECT].get(q, nan) for q in ("p50", "p99")}
        for path in summaries if path != DIRECT}}


# --- headline -------------------------------------------------------------------------------------


def dig(document: Any, *keys: str) -> Any:
    """document[k1][k2]... or None where a level is missing; NaN (not measured) becomes None too."""
    for key in keys:
        if not isinstance(document, dict) or document.get(key) is None:
            return None
        document = document[key]
    return None if isinstance(document, float) and document != document else document


# headline name -> where it is in a level; `c{C}_{backend}` is appended to each name
HEADLINE = {
    "overhead_p50_ms": ("overhead_ms", "p50"), "overhead_p90_ms": ("overhead_ms", "p90"),
    "overhead_p99_ms": ("overhead_ms", "p99"), "overhead_max_ms": ("overhead_ms", "max"),
    "paired_p50_ms": ("paired_overhead_ms", "p50"),
    "cpu_ms_per_stream": ("proxy_cpu_ms_per_stream",), "cpu_us_per_event": ("proxy_cpu_us_per_event",),
    "inproduct_first_byte_mean_ms": ("inproduct", "first_byte", "mean_ms"),
    "inproduct_request_mean_ms": ("inproduct", "request", "mean_ms"),
    "nginx_overhead_p50_ms": ("nginx", "overhead_ms", "p50"), "nginx_overhead_p99_ms": ("nginx", "overhead_ms", "p99"),
    "nginx_cpu_ms_per_stream": ("nginx", "cpu_ms_per_stream"),
}
HEADLINE_PACED = {
    "throughput_ratio": ("throughput", "ratio"),
    "inter_chunk_overhead_p50_ms": ("inter_chunk_ms", f"{PROXIED}_overhead", "p50"),
    "inter_chunk_overhead_p99_ms": ("inter_chunk_ms", f"{PROXIED}_overhead", "p99"),
    "inproduct_chunk_mean_ms": ("inproduct", "chunk", "mean_ms"),
}


def headline(levels: list[dict[str, Any]], concurrencies: list[int], backends: list[str]) -> dict[str, Any]:
    """The flat summary the suite reads: every key for every level and mode asked for, None where not measured."""
    measured = {(level["concurrency"], level["backend"]): level for level in levels}
    out: dict[str, Any] = {}
    for concurrency, mode in itertools.product(concurrencies, backends):
        level = measured.get((concurrency, mode))
        wanted = {**HEADLINE, **HEADLINE_PACED} if mode == PACED else HEADLINE
        out.update({f"{name}_c{concurrency}_{mode}": dig(level, *keys) for name, keys in wanted.items()})
        # the mock + load generator core was saturated: TTFTs there are queueing on the rig, for every path
        out[f"rig_saturated_c{concurrency}_{mode}"] = None if level is None else saturated(level["core_busy"])
    out["errors"] = sum(level_errors(level) for level in levels)
    return out


def level_errors(level: dict[str, Any]) -> int:
    """Failed streams of a level: every path, the warm-up and the throughput phase."""
    throughput = level["throughput"]["errors"]["count"] if level["throughput"] else 0
    return sum(errs["count"] for errs in level["errors"].values()) + level["warmup_errors"]["count"] + throughput


# --- main -----------------------------------------------------------------------------------------


async def run_all(env: Env, args: argparse.Namespace) -> list[dict[str, Any]]:
    # one request per proxy first: one that cannot serve at all should fail loudly, not as 100% errors
    for path in env.paths[1:]:
        probe = await env.lane(path).send()
        if not probe.ok:
            raise RuntimeError(f"probe request through {path} failed: {probe.error}")
    services = [env.proxy, env.mock, *([env.nginx] if env.nginx else [])]
    levels, _ = await interleave.run_levels(
        list(itertools.product(args.concurrency, args.backends)),
        lambda level: run_level(env, args, *level), services, log, label=lambda level: f"c={level[0]} {level[1]}")
    return levels


def start_nginx(args: argparse.Namespace, tmp: str, mock_port: int, proxy_cpu: int | None) -> tuple[Nginx | None, str]:
    """nginx in front of the mock on the proxy's CPU, or None, with what the report says about it."""
    if args.nginx == "off":
        return None, "off (--nginx off)"
    binary = find_nginx()
    if binary is None:
        return None, "nginx not installed; skipped"
    nginx = Nginx(binary, tmp, mock_port, proxy_cpu)
    nginx.start()
    return nginx, f"{binary}, 1 worker, on the proxy's CPU, `proxy_buffering off`, upstream keep-alive"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started_at = time.monotonic()
    command, pins, info = start_run("bench.ttft", argv, args.no_pin, log)
    mock = mock_service(args, pins)
    proxy: Service | None = None
    nginx: Nginx | None = None
    nginx_note = "not started"
    levels: list[dict[str, Any]] = []
    failure = None
    with tempfile.TemporaryDirectory(prefix="bench-ttft-") as tmp:
        try:
            mock_port = mock.start()
            config = write_configs(tmp, "ttft", {"proxy": proxy_config(mock_port)})["proxy"]
            proxy = proxy_service("proxy", config, pins)
            ports = {DIRECT: mock_port, PROXIED: proxy.start()}
            nginx, nginx_note = start_nginx(args, tmp, mock_port, pins[0] if pins else None)
            if nginx:
                ports[NGINX] = nginx.port
            log(f"mock backend pid {mock.pid} on :{mock_port}, proxy pid {proxy.pid} on :{ports[PROXIED]}"
                + (f", nginx pid {nginx.pid} on :{nginx.port}" if nginx else f"; nginx: {nginx_note}"))
            requests = {mode: {path: chat_request(port, MODE_HEADERS[mode]) for path, port in ports.items()}
                        for mode in MODES}
            env = Env(mock, proxy, nginx, ports, requests, args.timeout, random.Random(args.seed), pins)
            levels = uvloop.run(run_all(env, args))
        except (RuntimeError, OSError) as exc:
            failure = str(exc)
        finally:
            children_output = stop_children([nginx, proxy, mock])
    wall_s = time.monotonic() - started_at
    log(f"run time {wall_s:.0f}s")
    print(report(command, info, args, levels, nginx_note), flush=True)
    failed = failed_checks(levels)
    troubled = print_problems(failure, error_report(levels), failed, children_output)
    write_json(args.json, {"command": command, "machine": info, "args": vars(args), "nginx": nginx_note,
                           "wall_s": wall_s, "headline": headline(levels, args.concurrency, args.backends),
                           "levels": levels}, log)
    return 1 if troubled else 0


if __name__ == "__main__":
    sys.exit(main())
