"""The proxy's memory: idle, per idle connection, and at hundreds to thousands of concurrent streams.

    python -m bench.memory [--levels 512,2000] [--idle-conns 10000] [--tokens 64] [--delay-ms 50] [--json out.json]

Starts the mock backend and the proxy as child processes, pins the proxy to one CPU and the mock, the
load processes (bench.holder) and this process to another, and reads the proxy's resident memory from
/proc while the holders open idle connections or drive paced streams through it. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from bench.harness import (
    HOST,
    add_run_args,
    chat_request,
    int_list,
    logger,
    md_row,
    num,
    print_problems,
    report_head,
    start_run,
    write_json,
)
from bench.loadgen import Lane, StreamResult
from bench.rig import Rig, cpu_delta, cpu_text, gauges, raise_nofile, run_rig, wide_proxy_config

PINNING = "proxy on CPU {proxy}; mock backend, load processes (bench.holder) and the benchmark on CPU {mock}"
NOFILE = 65536  # idle connections and streams each hold a descriptor in the proxy, the holder and the mock
WARMUP_STREAMS = 8
WARMUP_HEADERS = {"x-mock-tokens": "8", "x-mock-delay-ms": "1"}
POOL_IDLE_TIMEOUT = 1.0  # s: pooled upstream connections go soon after use, so "idle" means no connections at all
SETTLE_TIMEOUT = 15.0  # s: longest wait for the proxy's connections to close before a reading
TARGETS = {"rss_idle_mb": 40.0, "rss_peak_mb_2000": 100.0, "idle_conn_kib": 4.0}

log = logger("bench.memory")


# --- reading the proxy's memory -------------------------------------------------------------------


def _kib_fields(path: str, names: tuple[str, ...]) -> dict[str, int]:
    """`Name:   123 kB` lines of a /proc file, in KiB, for the names asked for; {} if it cannot be read."""
    out = {}
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in names:
                out[name] = int(rest.split()[0])
    return out


def rss_kib(pid: int) -> int:
    """Resident set size now (VmRSS), in KiB; 0 when the process is gone."""
    return _kib_fields(f"/proc/{pid}/status", ("VmRSS",)).get("VmRSS", 0)


def snapshot(pid: int) -> dict[str, float]:
    """RSS and its high-water mark, and PSS and USS when smaps_rollup is readable, in MiB.

    USS (private pages) is what the process alone holds; PSS adds its share of pages mapped by several
    processes (shared libraries); RSS counts shared pages whole.
    """
    status = _kib_fields(f"/proc/{pid}/status", ("VmRSS", "VmHWM"))
    rollup = _kib_fields(f"/proc/{pid}/smaps_rollup", ("Pss", "Private_Clean", "Private_Dirty"))
    out = {"rss_mb": status.get("VmRSS", 0) / 1024, "hwm_mb": status.get("VmHWM", 0) / 1024}
    if rollup:
        out["pss_mb"] = rollup["Pss"] / 1024
        out["uss_mb"] = (rollup["Private_Clean"] + rollup["Private_Dirty"]) / 1024
    return out


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (proc(5), clear_refs "5"); False when not permitted."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class RssSampler:
    """Reads a process's VmRSS every `interval_s` in a task, between start() and stop()."""

    def __init__(self, pid: int, interval_s: float) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []  # (seconds since start, KiB)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        started = time.monotonic()
        while True:
            self.samples.append((round(time.monotonic() - started, 3), rss_kib(self.pid)))
            await asyncio.sleep(self.interval_s)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.samples.append((self.samples[-1][0] if self.samples else 0.0, rss_kib(self.pid)))

    @property
    def peak_mb(self) -> float:
        return max((kib for _, kib in self.samples), default=0) / 1024


# --- command line ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=int_list, default=[512, 2000], metavar="N1,N2,...",
                        help="concurrent stream counts (default 512,2000)")
    parser.add_argument("--idle-conns", type=int, default=10000,
                        help="idle connections held for the per-connection figure (default 10000; 0 skips)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream (default 64)")
    parser.add_argument("--delay-ms", type=float, default=50.0,
                        help="backend pause between tokens (default 50: 64 tokens last 3.2 s or more)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds to settle before a reading (default 1)")
    parser.add_argument("--interval-ms", type=float, default=100.0, help="RSS sampling period (default 100)")
    add_run_args(parser)
    parser.set_defaults(timeout=120.0)
    args = parser.parse_args(argv)
    if args.idle_conns < 0 or args.tokens < 1 or args.delay_ms < 0 or args.settle < 0 or args.interval_ms <= 0:
        parser.error("--idle-conns must be >= 0, --tokens >= 1, --delay-ms and --settle >= 0, --interval-ms > 0")
    return args


# --- phases ---------------------------------------------------------------------------------------


@dataclass
class Findings:
    """What the run measured, kept outside the event loop: an aborted run still reports the phases it ended."""

    phases: dict[str, Any] = field(default_factory=dict)
    failed: int = 0  # failed streams and connects, and held connections the proxy cut
    problems: list[str] = field(default_factory=list)

    def fail(self, count: int, message: str) -> None:
        if count:
            self.failed += count
            self.problems.append(f"- {message}")


@dataclass
class Env:
    args: argparse.Namespace
    rig: Rig
    found: Findings

    @property
    def port(self) -> int:
        return self.rig.port

    @property
    def pid(self) -> int:
        return self.rig.proxy.pid


async def settle(env: Env, connections: int = 0) -> dict[str, float]:
    """Wait until the proxy holds `connections` client connections (beyond the scrape's own) and nothing
    upstream (pooled connections close POOL_IDLE_TIMEOUT after use), then --settle seconds more."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        live = await gauges(env.port)
        upstream = live.get("llmproxy_upstream_connections_idle", 0) + live.get(
            "llmproxy_upstream_connections_checked_out", 0)
        if live.get("llmproxy_client_connections", 0) - 1 == connections and not upstream:
            break
        if time.monotonic() > deadline:
            log(f"the proxy did not settle within {SETTLE_TIMEOUT:g}s: {live.get('llmproxy_client_connections')} "
                f"client connections (incl. the scrape), {upstream} upstream; reading anyway")
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(env.args.settle)
    return live


async def idle_phase(env: Env) -> dict[str, Any]:
    """A few streams, then no connection at all: the memory a started proxy sits at."""
    async def two_streams(lane: Lane) -> list[StreamResult]:
        try:  # one after the other: a Lane is one connection, and the second stream reuses it
            return [await lane.send(), await lane.send()]
        finally:
            lane.close()

    payload = chat_request(env.port, WARMUP_HEADERS)
    lanes = [Lane(HOST, env.port, payload, 10.0) for _ in range(WARMUP_STREAMS)]
    results = [result for pair in await asyncio.gather(*map(two_streams, lanes)) for result in pair]
    failures = [r.error for r in results if not r.ok]
    env.found.fail(len(failures), f"warm-up: {len(failures)} failed streams, e.g. {failures[:1]}")
    await settle(env)
    return {"warmup_streams": len(results), **snapshot(env.pid)}


async def idle_conns_phase(env: Env, count: int) -> dict[str, Any]:
    """RSS before and while `count` connections that send nothing are held; KiB per connection."""
    before = snapshot(env.pid)
    holder = env.rig.start_holder("holder-idle", "idle", count)
    opened = await holder.wait("opened", 60.0)
    await settle(env, opened["open"])
    held = snapshot(env.pid)
    status = holder.last("status") or opened
    closed = holder.stop()
    cut = (closed or status)["closed_by_peer"]
    env.found.fail(count - opened["open"], f"idle connections: {opened['open']} of {count} opened; {opened['errors']}")
    env.found.fail(cut, f"idle connections: the proxy closed {cut} of them while they were held")
    per_conn_kib = (held["rss_mb"] - before["rss_mb"]) * 1024 / opened["open"] if opened["open"] else None
    return {"requested": count, "held": opened["open"], "open_seconds": opened["seconds"], "closed_by_proxy": cut,
            "before": before, "held_snapshot": held, "per_conn_kib": per_conn_kib}


async def streams_phase(env: Env, streams: int) -> dict[str, Any]:
    """Peak RSS while `streams` paced streams run at once, and RSS after they end and after they close."""
    args = env.args
    peak_reset = reset_peak(env.pid)
    before = snapshot(env.pid)
    sampler = RssSampler(env.pid, args.interval_ms / 1000)
    holder = env.rig.start_holder(f"holder-{streams}", "streams", streams, "--tokens", str(args.tokens),
                        "--delay-ms", f"{args.delay_ms:g}", "--timeout", f"{args.timeout:g}")
    cpu_before, started = env.rig.cpu(), time.monotonic()
    sampler.start()
    try:
        opened = await holder.wait("opened", 60.0)
        done = await holder.wait("done", args.timeout + 30.0)
    finally:
        sampler.stop()
    cpu_s, seconds = cpu_delta(cpu_before, env.rig.cpu()), time.monotonic() - started
    at_done = snapshot(env.pid)  # the streams have ended; their connections are idle keep-alive ones now
    holder.stop()
    await settle(env)
    after = snapshot(env.pid)
    errors = done["failed"]  # failed connects included
    env.found.fail(errors, f"{streams} streams: {errors} failed: {done['errors']}")
    return {"streams": streams, "opened": opened["open"], "open_seconds": opened["seconds"],
            "completed": done["completed"], "errors": errors, "error_kinds": done["errors"],
            "events_per_stream": done["events_per_stream"], "max_in_flight": done["max_in_flight"],
            "max_streaming": done["max_streaming"], "stream_ms": done["stream_ms"], "ttft_ms": done["ttft_ms"],
            "seconds": seconds, "cpu_s": cpu_s, "before": before, "peak_mb": sampler.peak_mb,
            "hwm_mb": after["hwm_mb"] if peak_reset else None, "at_done": at_done, "after": after,
            "samples": sampler.samples}


async def run_phases(env: Env) -> None:
    args = env.args
    phases = env.found.phases
    env.rig.start_proxy()
    phases["idle"] = await idle_phase(env)
    log(f"idle: RSS {phases['idle']['rss_mb']:.1f} MiB")
    if args.idle_conns:
        phases["idle_conns"] = await idle_conns_phase(env, args.idle_conns)
        log(f"idle connections: {num(phases['idle_conns']['per_conn_kib'], '.2f')} KiB each")
        # Python keeps most of the heap the connections grew: streams measured in this process would
        # reuse it and look cheaper than they are. They get a fresh proxy, warmed up the same way.
        env.rig.start_proxy("proxy-streams")
        phases["idle_streams_proxy"] = await idle_phase(env)
    for streams in args.levels:
        phases[f"streams_{streams}"] = level = await streams_phase(env, streams)
        log(f"{streams} streams: peak RSS {level['peak_mb']:.1f} MiB, after {level['after']['rss_mb']:.1f} MiB, "
            f"{level['completed']} completed, {level['errors']} errors")


# --- reporting ------------------------------------------------------------------------------------


def headline(phases: dict[str, Any], errors: int) -> dict[str, Any]:
    idle_conns = phases.get("idle_conns", {})
    out: dict[str, Any] = {"rss_idle_mb": phases.get("idle", {}).get("rss_mb"),
                           "idle_conn_kib": idle_conns.get("per_conn_kib"),
                           "idle_conns_held": idle_conns.get("held", 0)}
    for name, level in phases.items():
        if name.startswith("streams_"):
            out[f"rss_peak_mb_{level['streams']}"] = level["peak_mb"]
            out[f"rss_after_mb_{level['streams']}"] = level["after"]["rss_mb"]
    out["errors"] = errors
    return out


def _mem(snap: dict[str, float]) -> str:
    extra = f" (PSS {snap['pss_mb']:.1f}, USS {snap['uss_mb']:.1f})" if "pss_mb" in snap else ""
    return f"{snap['rss_mb']:.1f}{extra}"


def _target(value: float | None, key: str) -> str:
    if key not in TARGETS:
        return ""
    verdict = "n/a" if value is None else "met" if value <= TARGETS[key] else "MISSED"
    return f"≤ {TARGETS[key]:g} ({verdict})"


def table(phases: dict[str, Any], head: dict[str, Any]) -> str:
    rows = [md_row(["measurement", "value", "target"]), "|---|---:|---|",
            md_row(["RSS idle, MiB", _mem(phases["idle"]), _target(head["rss_idle_mb"], "rss_idle_mb")])]
    if "idle_streams_proxy" in phases:
        rows.append(md_row(["RSS idle of the fresh proxy the streams ran through, MiB",
                            _mem(phases["idle_streams_proxy"]), ""]))
    if "idle_conns" in phases:
        conns = phases["idle_conns"]
        rows.append(md_row([f"per idle connection, KiB ({conns['held']:,} held: RSS {conns['before']['rss_mb']:.1f} "
                            f"→ {conns['held_snapshot']['rss_mb']:.1f} MiB)", num(conns["per_conn_kib"], ".2f"),
                            _target(conns["per_conn_kib"], "idle_conn_kib")]))
    for name, level in phases.items():
        if name.startswith("streams_"):
            n = level["streams"]
            rows.append(md_row([f"peak RSS at {n:,} streams, MiB", f"{level['peak_mb']:.1f}",
                                _target(level["peak_mb"], f"rss_peak_mb_{n}")]))
            rows.append(md_row([f"RSS after the {n:,} streams, closed and settled, MiB", _mem(level["after"]), ""]))
    return "\n".join(rows)


def level_lines(phases: dict[str, Any]) -> str:
    lines = []
    for name, level in phases.items():
        if not name.startswith("streams_"):
            continue
        stream = level["stream_ms"]
        lines.append(
            f"- {level['streams']:,} streams: {level['completed']:,} completed, {level['errors']} errors; at most "
            f"{level['max_streaming']:,} streaming at once ({level['max_in_flight']:,} in flight); connections "
            f"opened in {level['open_seconds']:.2f}s; stream p50 {num(stream.get('p50'), ',.0f')} ms, max "
            f"{num(stream.get('max'), ',.0f')} ms; RSS before {level['before']['rss_mb']:.1f}, peak "
            f"{level['peak_mb']:.1f} (VmHWM {num(level['hwm_mb'], '.1f')}), at the end with the connections still "
            f"open {_mem(level['at_done'])}, after {_mem(level['after'])} MiB")
        lines.append(f"  CPU over the {level['seconds']:.1f}s: " + cpu_text(level["cpu_s"], level["seconds"]))
    return "\n".join(lines)


def report(command: str, info: dict[str, Any], nofile: int, config: dict[str, Any], phases: dict[str, Any],
           head: dict[str, Any], args: argparse.Namespace) -> str:
    server, pool = config["server"], config["backends"][0]
    parts = [*report_head("bench.memory", command, info), f"- open-files limit of every process: {nofile}",
             f"- proxy config: server.max_connections {server['max_connections']}, timeouts.keepalive "
             f"{server['timeouts']['keepalive']} s and request_head {server['timeouts']['request_head']} s (held "
             f"idle connections are not cut), backend pool max_connections {pool['max_connections']}, idle_timeout "
             f"{pool['idle_timeout']:g} s; access log off",
             f"- streams: {args.tokens} tokens {args.delay_ms:g} ms apart, all opened, then all sent at once; RSS "
             f"sampled every {args.interval_ms:g} ms from /proc/<pid>/status; MiB = 2^20 bytes", ""]
    if "idle" in phases:
        parts += [table(phases, head), "", level_lines(phases)]
    return "\n".join(parts)


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    nofile = raise_nofile(NOFILE)
    command, pins, info = start_run("bench.memory", argv, args.no_pin, log, PINNING)
    found = Findings()

    def make_config(mock_port: int) -> dict[str, Any]:
        clients = max([args.idle_conns, *args.levels])
        return wide_proxy_config(mock_port, clients, max(args.levels), POOL_IDLE_TIMEOUT)

    async def body(rig: Rig) -> None:
        await run_phases(Env(args, rig, found))

    config, failure, children_output = run_rig("memory", args, pins, log, make_config, body)
    head = headline(found.phases, found.failed)
    print(report(command, info, nofile, config, found.phases, head, args), flush=True)
    troubled = print_problems(failure, "\n".join(found.problems), [], children_output)
    write_json(args.json, {"command": command, "machine": info, "args": vars(args), "nofile": nofile,
                           "config": config, "headline": head, "phases": found.phases}, log)
    return 1 if troubled else 0


if __name__ == "__main__":
    sys.exit(main())
