"""Ten thousand concurrent slow streams through the proxy, and a newcomer's first token meanwhile.

    python -m bench.connections [--streams 10000] [--tokens 20] [--delay-ms 200] [--load-procs 1]
                                [--workers auto|N] [--json out.json]

Starts the mock backend and the proxy as child processes, pins the proxy to one CPU and the mock, the
load processes (bench.holder) and this process to another. The load processes open every connection,
then start the streams over a short ramp, so that all of them are in flight together; meanwhile this
process sends a short probe stream through the proxy and one straight to the mock at the same moments,
and reports both first-token times.

The proxy is one process when it may hold the two descriptors each stream needs; when the open-files
limit is lower (and cannot be raised), it runs as `server.workers: N` on the same CPU, N the fewest that
fit (bench.rig.FdPlan). Its CPU and memory are then the sums over the supervisor and the workers.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

from bench.harness import (
    HOST,
    Pins,
    add_run_args,
    chat_request,
    failure_lines,
    logger,
    md_row,
    ms,
    num,
    print_problems,
    report_head,
    start_run,
    write_json,
)
from bench.interleave import Failures
from bench.loadgen import Lane
from bench.memory import rss_kib, snapshot
from bench.rig import (
    FD_HEADROOM,
    FdPlan,
    Holder,
    Rig,
    check_affinity,
    cpu_delta,
    cpu_text,
    gauges,
    run_rig,
    wide_proxy_config,
)
from bench.stats import summary_ms

PINNING = ("proxy (all its processes) on CPU {proxy}; mock backend, load processes (bench.holder) and the "
           "benchmark (probes) on CPU {mock}")
NOFILE = 65536  # the open-files limit asked for (more if the proxy needs more); a hard limit needs CAP_SYS_RESOURCE
STRETCHED = 1.5  # streams this many times their nominal length mean the load core, not the pacing, set the pace
PROBE_GRACE_S = 30.0
DIRECT, PROXIED = "direct", "proxied"
PROBE_PATHS = (DIRECT, PROXIED)
GAUGES = {"inflight": "llmproxy_inflight_requests", "client_connections": "llmproxy_client_connections",
          "upstream_checked_out": "llmproxy_upstream_connections_checked_out"}

log = logger("bench.connections")


def workers_arg(value: str) -> int | None:
    """argparse type: `auto` (None) or a positive number of proxy worker processes."""
    if value == "auto":
        return None
    try:
        workers = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number, got {value!r}") from None
    if workers < 1:
        raise argparse.ArgumentTypeError("--workers must be >= 1")
    return workers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.connections", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=10000, help="concurrent streams (default 10000)")
    parser.add_argument("--tokens", type=int, default=20, help="tokens per stream (default 20)")
    parser.add_argument("--delay-ms", type=float, default=200.0, help="backend pause between tokens (default 200)")
    parser.add_argument("--load-procs", type=int, default=1,
                        help="load processes the streams are split across (default 1; they share one CPU)")
    parser.add_argument("--batch", type=int, default=256, help="connects in flight at a time per load process")
    parser.add_argument("--workers", type=workers_arg, default=None, metavar="auto|N",
                        help="proxy processes (server.workers), all on the proxy's CPU; auto (the default): one, or "
                             "the fewest whose open-files limits hold two descriptors per stream")
    parser.add_argument("--ramp-s", type=float, default=1.0,
                        help="once connected, the requests are spread over this many seconds (default 1)")
    parser.add_argument("--probe-interval-ms", type=float, default=150.0,
                        help="one probe pair (direct, proxied, in random order) this often (default 150)")
    parser.add_argument("--probe-tokens", type=int, default=4, help="tokens per probe stream (default 4)")
    parser.add_argument("--probe-delay-ms", type=float, default=5.0, help="pause between probe tokens (default 5)")
    parser.add_argument("--interval-ms", type=float, default=100.0, help="proxy RSS sampling period (default 100)")
    parser.add_argument("--scrape-interval-ms", type=float, default=500.0,
                        help="how often the proxy's /metrics gauges are read during the run (default 500)")
    add_run_args(parser)
    parser.set_defaults(timeout=120.0)
    args = parser.parse_args(argv)
    if min(args.streams, args.tokens, args.load_procs, args.batch, args.probe_tokens) < 1 or min(
            args.delay_ms, args.probe_delay_ms) < 0 or min(args.probe_interval_ms, args.interval_ms,
                                                           args.scrape_interval_ms) <= 0:
        parser.error("counts must be >= 1, delays >= 0 and intervals > 0")
    if args.load_procs > args.streams or args.ramp_s < 0:
        parser.error("--load-procs cannot exceed --streams; --ramp-s must be >= 0")
    return args


# --- environment ----------------------------------------------------------------------------------


@dataclass
class Env:
    args: argparse.Namespace
    rig: Rig
    rng: random.Random
    workers: int  # server.workers of the proxy config

    @property
    def ports(self) -> dict[str, int]:  # probe path -> port
        return {DIRECT: self.rig.mock.port, PROXIED: self.rig.port}

    def start_holders(self) -> list[Holder]:
        args = self.args
        share, extra = divmod(args.streams, args.load_procs)
        return [self.rig.start_holder(f"holder-{i}", "streams", share + (i < extra), "--tokens", str(args.tokens),
                                      "--delay-ms", f"{args.delay_ms:g}", "--timeout", f"{args.timeout:g}",
                                      "--batch", str(args.batch), "--ramp-s", f"{args.ramp_s:g}")
                for i in range(args.load_procs)]


async def all_holders(holders: list[Holder], event: str, timeout: float) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(holder.wait(event, timeout) for holder in holders)))


# --- background measurements ----------------------------------------------------------------------


class Probes:
    """One short stream on each path every --probe-interval-ms until stopped, started on that schedule
    whether or not the earlier ones have ended: under load a probe stream lasts longer than the interval,
    and waiting for it would send fewer probes just when they matter.

    Both of a pair start at the same moment, in random order, on keep-alive connections: PRE_OPEN per path
    are opened before the run, more only when that many probes are still running.
    """

    PRE_OPEN = 16  # per path: probes last longer than the interval when the load core is saturated

    def __init__(self, env: Env) -> None:
        args = env.args
        headers = {"x-mock-tokens": str(args.probe_tokens), "x-mock-delay-ms": f"{args.probe_delay_ms:g}"}
        self.payloads = {path: chat_request(port, headers) for path, port in env.ports.items()}
        self.ports = env.ports
        self.timeout = args.timeout
        self.idle: dict[str, list[Lane]] = {path: [self._lane(path) for _ in range(self.PRE_OPEN)]
                                            for path in PROBE_PATHS}
        self.lanes = [lane for lanes in self.idle.values() for lane in lanes]
        self.ttft_ns: dict[str, list[int]] = {path: [] for path in PROBE_PATHS}
        self.errors = {path: Failures() for path in PROBE_PATHS}
        self.rng = env.rng
        self.interval_s = args.probe_interval_ms / 1000
        self.stopping = asyncio.Event()

    def _lane(self, path: str) -> Lane:
        return Lane(HOST, self.ports[path], self.payloads[path], self.timeout)

    async def open(self) -> None:
        await asyncio.gather(*(lane.open() for lane in self.lanes))

    async def one(self, path: str) -> bool:
        idle = self.idle[path]
        if idle:
            lane = idle.pop()
        else:
            lane = self._lane(path)
            self.lanes.append(lane)
        result = await lane.send()
        idle.append(lane)
        if result.ok:
            self.ttft_ns[path].append(result.ttft_ns)
        else:
            self.errors[path].add(result.error or "failed")
        return result.ok

    async def run(self) -> None:
        running: set[asyncio.Task[bool]] = set()
        next_at = time.monotonic()
        while not self.stopping.is_set():
            for path in self.rng.sample(PROBE_PATHS, len(PROBE_PATHS)):
                task = asyncio.ensure_future(self.one(path))
                running.add(task)
                task.add_done_callback(running.discard)
            next_at += self.interval_s
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*running)

    def close(self) -> None:
        for lane in self.lanes:
            lane.close()

    def summary(self) -> dict[str, Any]:
        return {"ttft_ms": {path: summary_ms(self.ttft_ns[path]) for path in PROBE_PATHS},
                "errors": {path: failures.as_dict() for path, failures in self.errors.items()},
                "connections": len(self.lanes), "raw_ttft_ns": self.ttft_ns}


async def watch_gauges(port: int, interval_s: float, peaks: dict[str, Any], stop: asyncio.Event) -> None:
    """Keep the highest value of each of GAUGES seen in the proxy's /metrics; failed scrapes are counted by
    kind (a proxy out of descriptors closes the scrape's connection at once)."""
    failed = peaks["failed_scrapes"] = Failures()
    peaks["scrapes"] = 0
    while not stop.is_set():
        try:
            live = await gauges(port)
        except (OSError, RuntimeError, asyncio.TimeoutError, ValueError) as exc:
            failed.add(f"{type(exc).__name__}: {exc}")
        else:
            peaks["scrapes"] += 1
            for key, name in GAUGES.items():
                peaks[key] = max(peaks.get(key, 0.0), live.get(name, 0.0))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


class ProxyRss:
    """VmRSS of each of the proxy's processes every `interval_s`, read one after the other so that their sum
    is one moment's; the headline peak is the peak of that sum. Summed RSS counts the pages the processes
    share (the interpreter, libraries) once per process: the PSS at the end does not."""

    def __init__(self, processes: dict[str, int], interval_s: float) -> None:
        self.processes = processes  # name -> pid, as found once the proxy accepted
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []  # (seconds since start, KiB summed)
        self.by_process: dict[str, list[int]] = {name: [] for name in processes}  # KiB, one per sample
        self._started = 0.0
        self._task: asyncio.Task[None] | None = None

    def _sample(self) -> None:
        total = 0
        for name, pid in self.processes.items():
            kib = rss_kib(pid)
            self.by_process[name].append(kib)
            total += kib
        self.samples.append((round(time.monotonic() - self._started, 3), total))

    def start(self) -> None:
        self._started = time.monotonic()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(self.interval_s)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._sample()

    @property
    def peak_mb(self) -> float:
        return max((kib for _, kib in self.samples), default=0) / 1024

    def peaks_mb(self) -> dict[str, float]:
        return {name: max(kibs, default=0) / 1024 for name, kibs in self.by_process.items()}

    def end(self) -> dict[str, Any]:
        """Each process's snapshot (RSS, VmHWM, PSS, USS) now, and their sums (VmHWM, a peak per process, left out)."""
        each = {name: snapshot(pid) for name, pid in self.processes.items()}
        total = {key: sum(snap.get(key, 0.0) for snap in each.values())
                 for key in ("rss_mb", "pss_mb", "uss_mb") if all(key in snap for snap in each.values())}
        return {**total, "processes": each}


def tcp_counters() -> dict[str, int]:
    """The kernel's listen-queue overflows and SYN retransmits so far (TcpExt in /proc/net/netstat).

    They are counted for the whole network namespace, other processes included. A connect whose SYN finds
    the listener's queue full is retried after 1 s, then 2 s more, and so on: a first token seconds late
    with an idle proxy core is usually this, and these counters say so.
    """
    with contextlib.suppress(OSError, ValueError), open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
        for names, values in zip(lines[::2], lines[1::2], strict=False):  # name rows, value rows
            if names.startswith("TcpExt:"):
                table = dict(zip(names.split()[1:], map(int, values.split()[1:]), strict=True))
                return {name: table.get(name, 0) for name in ("ListenOverflows", "ListenDrops", "TCPSynRetrans")}
    return {}


# --- the run --------------------------------------------------------------------------------------


async def run(env: Env, result: dict[str, Any]) -> None:
    """Fill `result` as the run goes, so that a failure part-way still leaves what was measured."""
    args = env.args
    env.rig.start_proxy()
    processes = env.rig.proxy_processes()
    workers = [name for name in processes if name.startswith("worker-")]
    result["processes"] = {"pids": processes, "workers": max(len(workers), 1)}
    if env.workers > 1 and len(workers) != env.workers:
        raise RuntimeError(f"the proxy was started with server.workers {env.workers}, but {len(workers)} worker "
                           f"processes were found: {processes}")
    if env.rig.pins is not None:
        result["processes"]["affinity"] = affinity = check_affinity(processes, env.rig.pins[0])
        if affinity["repinned"]:
            log(f"pinned {', '.join(affinity['repinned'])} to CPU {affinity['cpu']}: they had {affinity['found']}")
    probes = Probes(env)
    await probes.open()
    if not await probes.one(PROXIED):
        raise RuntimeError(f"a probe through the proxy failed before the run: {probes.errors[PROXIED].kinds}")
    probes.ttft_ns[PROXIED].clear()
    sampler = ProxyRss(processes, args.interval_ms / 1000)
    stop, peaks = asyncio.Event(), {}
    cpu_before, tcp_before, started = env.rig.cpu(), tcp_counters(), time.monotonic()
    sampler.start()
    watcher = asyncio.ensure_future(watch_gauges(env.ports[PROXIED], args.scrape_interval_ms / 1000, peaks, stop))
    holders = env.start_holders()
    prober: asyncio.Future[None] | None = None
    try:
        result["opened"] = await all_holders(holders, "opened", 120.0)
        log(f"{sum(o['open'] for o in result['opened'])} connections open after {time.monotonic() - started:.1f}s")
        prober = asyncio.ensure_future(probes.run())  # the streams start now
        result["sent"] = await all_holders(holders, "sent", 60.0)
        result["done"] = await all_holders(holders, "done", args.timeout + 60.0)
    finally:
        result["wall_s"] = time.monotonic() - started
        result["cpu_s"] = cpu_delta(cpu_before, env.rig.cpu())
        result["tcp"] = {name: value - tcp_before.get(name, 0) for name, value in tcp_counters().items()}
        probes.stopping.set()
        stop.set()
        sampler.stop()
        # probes still running when the last stream ends are let finish, within reason
        _, late = await asyncio.wait([task for task in (prober, watcher) if task is not None], timeout=PROBE_GRACE_S)
        for task in late:
            task.cancel()
        probes.close()
        # here too when the run failed part-way: the report shows what was measured up to then
        peaks["failed_scrapes"] = peaks["failed_scrapes"].as_dict()
        result.update(probes=probes.summary(), gauge_peaks=peaks, rss_peak_mb=sampler.peak_mb,
                      rss_peak_mb_by_process=sampler.peaks_mb(), rss_samples=sampler.samples,
                      rss_samples_by_process=sampler.by_process, rss_end=sampler.end())
        # a worker that died was restarted by the supervisor under another pid: what it used before is missing
        result["processes"]["at_end"] = env.rig.proxy_processes()
    result["closed"] = [holder.stop() for holder in holders]


# --- summary and report ---------------------------------------------------------------------------


def _merge(dicts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for kinds in dicts:
        for kind, count in kinds.items():
            out[kind] = out.get(kind, 0) + count
    return out


def summarise(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    """The headline and the counts the report shows, from the holders' lines and the probes."""
    # a holder's `done` counts its failed connects too; `opened` is all there is of one that never got there
    lines = result.get("done") or result.get("opened", [])
    completed = sum(d.get("completed", 0) for d in lines)
    stream_errors = _merge([d["errors"] for d in lines])
    # streams that never ended (a holder that died or timed out) are errors too, of their own kind
    missing = args.streams - completed - sum(stream_errors.values())
    if missing > 0 and "opened" in result:
        stream_errors["did not end (load process gone or timed out)"] = missing
    probes = result.get("probes", {"ttft_ms": {p: {} for p in PROBE_PATHS}, "errors": {}})
    probe_errors = sum(e["count"] for e in probes["errors"].values())
    ttft = probes["ttft_ms"]
    return {
        "headline": {
            "streams": args.streams, "completed": completed, "errors": sum(stream_errors.values()) + probe_errors,
            "probe_ttft_p50_ms": ttft[PROXIED].get("p50"), "probe_ttft_p99_ms": ttft[PROXIED].get("p99"),
            "probe_direct_ttft_p50_ms": ttft[DIRECT].get("p50"), "rss_peak_mb": result.get("rss_peak_mb"),
            "proxy_cpu_s": result.get("cpu_s", {}).get("proxy"), "wall_s": result.get("wall_s"),
            "workers": result.get("processes", {}).get("workers")},
        "stream_errors": stream_errors,
        "probe_errors": probe_errors,
        "max_streaming_client": sum(d["max_streaming"] for d in result.get("done", [])),
        "max_in_flight_client": sum(d["max_in_flight"] for d in result.get("done", [])),
        "peak_inflight_proxy": result.get("gauge_peaks", {}).get("inflight"),
    }


def table(summary: dict[str, Any], probes: dict[str, Any]) -> str:
    head = summary["headline"]
    ttft = probes["ttft_ms"]
    columns = ["streams", "completed", "errors", "peak in flight: proxy gauge / clients",
               "probe TTFT proxied p50 / p99 / max",
               "probe TTFT direct p50 / p99 / max", "proxy RSS peak, MiB", "proxy CPU, s", "wall, s", "workers"]
    cells = [f"{head['streams']:,}", f"{head['completed']:,}", str(head["errors"]),
             f"{num(summary['peak_inflight_proxy'], ',.0f')} / {summary['max_in_flight_client']:,}",
             " / ".join(ms(ttft[PROXIED].get(q)) for q in ("p50", "p99", "max")),
             " / ".join(ms(ttft[DIRECT].get(q)) for q in ("p50", "p99", "max")),
             num(head["rss_peak_mb"], ".1f"), num(head["proxy_cpu_s"], ".2f"), num(head["wall_s"], ".1f"),
             str(head["workers"])]
    return "\n".join([md_row(columns), "|" + "---:|" * len(columns), md_row(cells)])


def stream_lines(args: argparse.Namespace, result: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """How the streams went: the ramp, how many ran at once, how long they took against their nominal length."""
    opened, sent, done = result.get("opened", []), result.get("sent", []), result.get("done", [])
    lines = [f"- ramp: {sum(o['open'] for o in opened):,} connections opened in "
             f"{max((o['seconds'] for o in opened), default=0):.2f}s, then the requests written over "
             f"{max((s['seconds'] for s in sent), default=0):.2f}s"]
    if not done:
        return lines

    def per_holder(key: str, q: str) -> str:  # summaries of several load processes do not merge
        return " / ".join(num(d[key].get(q), ",.0f") for d in done)

    nominal_ms = args.tokens * args.delay_ms
    lines.append(f"- at most {summary['max_streaming_client']:,} streams were streaming at once (client side); "
                 f"stream duration p50 {per_holder('stream_ms', 'p50')} ms, max {per_holder('stream_ms', 'max')} "
                 f"ms (nominal {nominal_ms:,.0f} ms); first event p50 {per_holder('ttft_ms', 'p50')} ms, max "
                 f"{per_holder('ttft_ms', 'max')} ms")
    if nominal_ms and max(d["stream_ms"].get("p50", 0) for d in done) > STRETCHED * nominal_ms:
        rate = args.streams * (args.tokens + 2) / (nominal_ms / 1000)
        lines.append(f"  WARNING: streams took over {STRETCHED:g}x their nominal length: the core of the mock and "
                     f"the load processes could not generate and parse the {rate:,.0f} events/s the pacing asks "
                     "for (see its share of the CPU below), so every event came late on both paths")
    return lines


def _mib(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.1f}" for name, value in values.items())


def process_lines(result: dict[str, Any]) -> list[str]:
    """With workers: each process's RSS peak and at the end, and whether the set of workers held."""
    processes = result["processes"]
    if len(processes["pids"]) == 1:
        return []
    end = result["rss_end"]
    lines = [f"- proxy processes: {_mib(result['rss_peak_mb_by_process'])} MiB RSS at their peaks (the table's "
             "peak is that of the sum, read together every sample); at the end "
             + _mib({name: snap["rss_mb"] for name, snap in end["processes"].items()})
             + (f" MiB, PSS summed {end['pss_mb']:.1f} MiB (RSS counts the pages they share once per process)"
                if "pss_mb" in end else " MiB")]
    if processes["at_end"] != processes["pids"]:
        lines.append(f"  WARNING: the proxy's processes changed during the run, {processes['pids']} -> "
                     f"{processes['at_end']}: a worker was restarted, and its CPU and RSS before that are missing")
    return lines


def measurement_lines(args: argparse.Namespace, result: dict[str, Any]) -> list[str]:
    """The proxy's gauges, CPU on both cores, the probes and the RSS at the end."""
    peaks = result.get("gauge_peaks", {})
    probes = result["probes"]
    probe_n = {path: probes["ttft_ms"][path].get("n", 0) for path in PROBE_PATHS}
    merged = ("; /metrics merges the workers: each worker's live gauges as of its last second, summed" if len(
        result["processes"]["pids"]) > 1 else "")
    return [
        f"- proxy gauges (peaks over {peaks.get('scrapes', 0)} scrapes of /metrics, "
        f"{peaks.get('failed_scrapes', {}).get('count', 0)} failed, so the true peak may have been missed): "
        "in-flight requests "
        f"{num(peaks.get('inflight'), ',.0f')}, client connections {num(peaks.get('client_connections'), ',.0f')}, "
        f"upstream connections in use {num(peaks.get('upstream_checked_out'), ',.0f')}{merged}",
        f"- CPU over {result['wall_s']:.1f}s: " + cpu_text(result["cpu_s"], result["wall_s"]),
        f"- probes: {probe_n[PROXIED]} proxied and {probe_n[DIRECT]} direct streams of {args.probe_tokens} tokens "
        f"{args.probe_delay_ms:g} ms apart, a pair every {args.probe_interval_ms:g} ms from the moment every "
        f"connection was open until the last stream ended, on {probes['connections']} keep-alive connections",
        f"- proxy RSS at the end (streams done, their connections still open): {result['rss_end']['rss_mb']:.1f} MiB",
        *process_lines(result),
        "- TCP on this machine during the run (all processes): " + ", ".join(
            f"{name} {value:,}" for name, value in result["tcp"].items()) + " (a SYN dropped at a full listen "
        "queue is retried after 1 s, 3 s, 7 s: first tokens that late are connects to a backlogged listener)",
    ]


def fd_lines(plan: FdPlan, pins: Pins, result: dict[str, Any]) -> list[str]:
    """The open-files limit, what the proxy needs, how many processes it ran as and why, and where they ran."""
    hard = "none" if plan.limit == sys.maxsize else f"{plan.limit:,}"
    lines = [f"- open-files limit of every process: {plan.soft:,} (soft; hard {hard}); the proxy needs a client and "
             f"an upstream socket per stream and per probe connection, plus {FD_HEADROOM} (listener, event loop, "
             "logs, metrics files, scrapes)",
             f"- proxy processes: {plan.why(pins[0] if pins else None)}"]
    affinity = result.get("processes", {}).get("affinity")
    if plan.workers > 1 and affinity:
        lines[-1] += ("; the supervisor is pinned as it starts, the workers inherit its mask: found "
                      + ", ".join(f"{name} {cpus}" for name, cpus in affinity["found"].items()))
        if affinity["repinned"]:
            lines[-1] += f"; {', '.join(affinity['repinned'])} pinned afterwards"
    return lines + [f"  {warning}" for warning in plan.warnings()]


def report(command: str, info: dict[str, Any], plan: FdPlan, pins: Pins, config: dict[str, Any],
           args: argparse.Namespace, result: dict[str, Any], summary: dict[str, Any]) -> str:
    server, pool = config["server"], config["backends"][0]
    per = " per worker" if plan.workers > 1 else ""
    parts = [*report_head("bench.connections", command, info), *fd_lines(plan, pins, result),
             f"- proxy config: server.workers {server.get('workers', 1)}, server.max_connections "
             f"{server['max_connections']:,}{per}, backend pool max_connections {pool['max_connections']:,}{per}, "
             f"timeouts {server['timeouts']} (s); access log off",
             f"- streams: {args.tokens} tokens {args.delay_ms:g} ms apart from {args.load_procs} load process(es); "
             f"each opens all its connections, then spreads the requests over {args.ramp_s:g}s", ""]
    if "cpu_s" in result:
        parts += [table(summary, result["probes"]), "", *stream_lines(args, result, summary),
                  *measurement_lines(args, result)]
    return "\n".join(parts)


def problems(summary: dict[str, Any], result: dict[str, Any]) -> str:
    sources = [("streams", {"count": sum(summary["stream_errors"].values()), "kinds": summary["stream_errors"]})]
    sources += [(f"probe {path}", errors) for path, errors in result.get("probes", {}).get("errors", {}).items()]
    sources.append(("/metrics scrapes (not counted as errors)", result.get("gauge_peaks", {}).get(
        "failed_scrapes", {"count": 0})))
    return failure_lines(sources)


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = FdPlan.make(args.streams, Probes.PRE_OPEN, args.workers, NOFILE)
    command, pins, info = start_run("bench.connections", argv, args.no_pin, log, PINNING)
    log(f"proxy processes: {plan.why(pins[0] if pins else None)}")
    result: dict[str, Any] = {}

    async def body(rig: Rig) -> None:
        await run(Env(args, rig, random.Random(args.seed), plan.workers), result)

    def make_config(mock_port: int) -> dict[str, Any]:
        return wide_proxy_config(mock_port, args.streams, args.streams, workers=plan.workers)

    config, failure, children_output = run_rig("connections", args, pins, log, make_config, body)
    summary = summarise(args, result)
    print(report(command, info, plan, pins, config, args, result, summary), flush=True)
    troubled = print_problems(failure, problems(summary, result), [], children_output)
    write_json(args.json, {"command": command, "machine": info, "args": vars(args), "nofile": plan.soft,
                           "workers": {**plan.as_dict(), "why": plan.why(pins[0] if pins else None),
                                       **result.get("processes", {})},
                           "config": config, "headline": summary["headline"], "summary": summary,
                           "result": result}, log)
    return 1 if troubled else 0


if __name__ == "__main__":
    sys.exit(main())
