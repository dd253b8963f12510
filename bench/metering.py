"""The cost of metering: a proxy with metering off vs one with metering on, side by side in one run.

    python -m bench.metering [--concurrency 1,64] [--requests N] [--burst-concurrency 16] [--json out.json]

Starts one mock backend and two proxies in front of it: "off" (`usage: {metering: false}`) and "on"
(metering, plus a file usage reporter so every record goes through the spool and is written out). Both
proxies share one CPU; the mock and this load generator share another. Then:

1. first-token overhead: each worker runs rounds of direct, off and on streams in random order;
2. chunks/s: burst streams (2000 tokens, no pacing) through one proxy at a time, alternating slices,
   counting SSE events received and the active proxy's CPU time;
3. checks: no usage-only event (`"choices":[]`) reaches the client through "on", every stream has the
   expected number of events, and usage.jsonl ends up with exactly one record per request sent to "on".

See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvloop

from bench import interleave
from bench.harness import (
    BODY,
    HOST,
    SATURATED,
    add_level_args,
    add_run_args,
    all_alive,
    chat_request,
    core_busy_text,
    failure_lines,
    foreign_load,
    level_failures,
    logger,
    md_row,
    mock_service,
    ms,
    num,
    print_problems,
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
from bench.interleave import (
    DIRECT,
    Failures,
    Interleaving,
    Level,
    Worker,
    close_workers,
    cpu_delta,
    gc_paused,
    open_workers,
    reconnects,
    warm_up,
)
from bench.loadgen import Lane, StreamClient, StreamResult
from bench.procs import Service, pinned_core_seconds, self_cpu_seconds

OFF, ON = "off", "on"
PATHS = (DIRECT, OFF, ON)
PROXIES = (OFF, ON)
PAIRS = (("off-direct", OFF, DIRECT), ("on-direct", ON, DIRECT), ("on-off", ON, OFF))  # name, minuend, subtrahend
INTERLEAVING = Interleaving(PATHS, PAIRS)
MOCK_CORE = {"mock": "mock", "loadgen": "load generator"}  # our processes on the second core: name -> label
USAGE_ONLY = b'"choices":[]'  # the usage-only chunk the "on" proxy provokes upstream and must strip
EVENT = b"data:"
FINGERPRINT = b'"system_fingerprint"'  # vLLM puts it on the usage chunk when there is one, else on the finish chunk
# bytes kept across pieces of the body, so that a pattern split between two of them is still seen
_SEAM = max(len(EVENT), len(USAGE_ONLY), len(FINGERPRINT)) - 1
RECORD_SETTLE_S = 0.3  # group commit (flush_interval 0.1 s) + file batch: the least wait before counting lines
RECORD_WAIT_S = 10.0  # most wait for usage.jsonl to catch up before the proxy is stopped anyway

log = logger("bench.metering")


# --- command line ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.metering", description=__doc__.split("\n\n")[0])
    add_level_args(parser, [1, 64], 60, "measured streams per path per level; each worker runs max(3, ceil(N/C)) "
                   "rounds of three streams (default 60)", scope="first-token phase: ")
    parser.add_argument("--burst-tokens", type=int, default=2000, help="chunks phase: tokens per stream (2000)")
    parser.add_argument("--burst-concurrency", type=int, default=16, help="chunks phase: concurrent streams (16)")
    parser.add_argument("--slices", type=int, default=4,
                        help="chunks phase: slices per proxy, alternating off/on (default 4; 0 skips the phase)")
    parser.add_argument("--slice-seconds", type=float, default=2.0, help="chunks phase: slice length (default 2)")
    add_run_args(parser)
    args = parser.parse_args(argv)
    if (args.requests < 1 or args.tokens < 1 or args.burst_tokens < 1 or args.burst_concurrency < 1
            or args.slices < 0 or args.slice_seconds <= 0):
        parser.error("--requests, --tokens, --burst-tokens and --burst-concurrency must be >= 1, "
                     "--slices >= 0, --slice-seconds > 0")
    return args


# --- a client that also counts events and looks for usage-only events -----------------------------


@dataclass
class Tally:
    """What the clients of one path saw, over the whole run."""

    requests: int = 0  # requests written to a connection: each is one the server received
    events: int = 0  # SSE `data:` events received (including `data: [DONE]`)
    bytes: int = 0  # de-chunked body bytes received
    pieces: int = 0  # body pieces parsed (one per HTTP chunk, split further where a read ends mid-chunk)
    usage_only: int = 0  # `"choices":[]` occurrences in response bodies
    usage_only_streams: int = 0
    fingerprint_streams: int = 0  # good streams in which `"system_fingerprint"` appears (an observation, not a check)
    events_per_stream: Counter[int] = field(default_factory=Counter)  # good streams: event count -> streams


def _straddling(pattern: bytes, carry: bytes, head: bytes) -> int:
    """Occurrences of `pattern` that begin in `carry` and end in `head` (the pattern cannot overlap itself)."""
    return (carry + head).count(pattern) - carry.count(pattern) - head.count(pattern)


class CountingClient(StreamClient):
    """StreamClient that also counts `data:` events, body bytes and usage-only events into a Tally.

    `_body` runs once per body piece: one per HTTP chunk, which for the mock and the proxy means one per
    event. The counting there is three C-level `bytearray.count` calls, plus a look at the seam only when
    the previous piece did not end with a line break. In the burst phase that adds about 7 % to the load
    generator's CPU per event.
    """

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        super().__init__()

    def _reset(self) -> None:
        super()._reset()
        self._carry = b""
        self._events = 0
        self._usage_hits = 0
        self._fingerprints = 0

    async def request(self, payload: bytes, timeout: float) -> StreamResult:
        if self.closed or self.transport is None:
            return await super().request(payload, timeout)  # fails at once, nothing is sent
        tally = self.tally
        tally.requests += 1
        result = await super().request(payload, timeout)
        if self._usage_hits:
            tally.usage_only_streams += 1
        if result.ok:
            tally.events_per_stream[self._events] += 1
            if self._fingerprints:
                tally.fingerprint_streams += 1
        return result

    def _body(self, buf: bytearray, pos: int, n: int, now: int) -> None:
        # called once per HTTP chunk, i.e. about once per event: keep the common case to two C-level scans
        super()._body(buf, pos, n, now)
        end = pos + n
        events = buf.count(EVENT, pos, end)
        hits = buf.count(USAGE_ONLY, pos, end)
        fingerprints = buf.count(FINGERPRINT, pos, end)
        carry = self._carry
        if carry:  # the body so far did not end with a line break: a pattern may straddle this seam
            head = bytes(buf[pos:pos + _SEAM])
            events += _straddling(EVENT, carry, head)
            hits += _straddling(USAGE_ONLY, carry, head)
            fingerprints += _straddling(FINGERPRINT, carry, head)
        if buf[end - 1] == 0x0A:
            self._carry = b""  # neither pattern contains a line break, so none can straddle the next seam
        elif n >= _SEAM:
            self._carry = bytes(buf[end - _SEAM:end])
        else:
            self._carry = (carry + bytes(buf[pos:end]))[-_SEAM:]
        self._events += events
        self._fingerprints += fingerprints
        tally = self.tally
        tally.events += events
        tally.bytes += n
        tally.pieces += 1
        if hits:
            self._usage_hits += hits
            tally.usage_only += hits


class CountingLane(Lane):
    def __init__(self, host: str, port: int, payload: bytes, timeout: float, tally: Tally) -> None:
        super().__init__(host, port, payload, timeout)
        self.tally = tally

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        _, self._client = await loop.create_connection(lambda: CountingClient(self.tally), self.host, self.port)


# --- environment ----------------------------------------------------------------------------------


@dataclass
class Env:
    mock: Service
    proxies: dict[str, Service]
    ports: dict[str, int]
    paced: dict[str, bytes]  # request per path, paced backend (the mock's CLI defaults)
    burst: dict[str, bytes]  # request per path, x-mock-delay-ms: 0 and x-mock-tokens: burst_tokens
    tallies: dict[str, Tally]
    timeout: float
    rng: random.Random
    pins: tuple[int, int] | None = None

    def lane(self, path: str, payload: bytes | None = None) -> CountingLane:
        """A lane to `path` sending `payload`, by default the paced request of the first-token phase."""
        payload = self.paced[path] if payload is None else payload
        return CountingLane(HOST, self.ports[path], payload, self.timeout, self.tallies[path])

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far: of each process, and (when pinned) of the two cores, busy and stolen."""
        out = {OFF: self.proxies[OFF].cpu_seconds(), ON: self.proxies[ON].cpu_seconds(),
               "mock": self.mock.cpu_seconds(), "loadgen": self_cpu_seconds()}
        for px in PROXIES:  # read and write system calls: how finely the proxy's event loop batches the stream
            out[f"{px}_syscr"], out[f"{px}_syscw"] = syscalls(self.proxies[px].pid)
        return {**out, **pinned_core_seconds(self.pins)}


def syscalls(pid: int) -> tuple[float, float]:
    """(read, write) system calls so far of a process, from /proc/<pid>/io; NaN if unreadable."""
    fields = {}
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
        return float(fields["syscr"]), float(fields["syscw"])
    except (OSError, KeyError, ValueError):
        return math.nan, math.nan



def _sum_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(d[key] for d in dicts) for key in dicts[0]} if dicts else {}


def write_proxy_configs(directory: str, mock_port: int) -> dict[str, str]:
    common = proxy_config(mock_port)
    usage_on = {"enabled": True, "spool_dir": str(Path(directory) / "spool"),
                "reporters": [{"name": "file", "type": "file", "file": {"path": usage_file(directory)}}]}
    return write_configs(directory, "metering", {OFF: {**common, "usage": {"metering": False}},
                                                 ON: {**common, "usage": usage_on}})


def usage_file(directory: str) -> str:
    return str(Path(directory) / "usage.jsonl")


# --- first-token phase ----------------------------------------------------------------------------


async def run_level(env: Env, args: argparse.Namespace, concurrency: int) -> dict[str, Any]:
    return summarise(await interleave.run_level(env, INTERLEAVING, concurrency, args.requests, log))


def summarise(level: Level) -> dict[str, Any]:
    return level.summary({
        "overhead_ms": {px: level.overhead_ms(px) for px in PROXIES},
        "on_minus_off_ms": level.overhead_ms(ON, OFF),
        "paired_ms": level.paired_ms,
        "proxy_cpu_ms_per_stream": {px: level.cpu_ms_per_stream(px, [px]) for px in PROXIES},
        "mock_cpu_ms_per_stream": level.cpu_ms_per_stream("mock", PATHS),
        "streams_in_cpu_window": level.phase.window_streams,
        "core_busy": {"proxies": level.busy(*PROXIES), **{px: level.busy(px) for px in PROXIES},
                      "mock": level.busy("mock"), "loadgen": level.busy("loadgen")},
        "wall_s": level.phase.wall_s,
        "cpu_s": level.phase.cpu_s,
    }, paired_raw=level.phase.paired)


# --- chunks/s phase -------------------------------------------------------------------------------


async def measure_chunks(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    """Burst streams through one proxy at a time, in alternating slices (off, on, on, off, off, on, ...).

    In a slice every worker streams through that proxy, back to back, for `--slice-seconds`. Events
    and body bytes received, and each process's CPU time, are sampled at the start and the end of the
    slice, so they cover the same window, in which all workers were busy. Streams still running at the
    end are then finished, uncounted, before the next slice starts: no slice sees the other proxy's
    traffic. The ABBA order cancels a linear drift (thermal, a noisy neighbour) between the two.
    """
    concurrency = args.burst_concurrency
    log(f"chunks: opening {2 * concurrency} connections, warm-up")
    workers = await open_workers(lambda px: env.lane(px, env.burst[px]), PROXIES, concurrency)
    errors = {px: Failures() for px in PROXIES}
    slices: list[dict[str, Any]] = []
    try:
        stream_ns, warm_errors = await warm_up(workers)
        order = [px for i in range(args.slices) for px in (PROXIES if i % 2 == 0 else PROXIES[::-1])]
        log(f"chunks: {len(order)} slices of {args.slice_seconds:g}s at c={concurrency} "
            f"(median warm-up stream {stream_ns / 1e6:.0f} ms)")
        with gc_paused():
            for px in order:
                slices.append(await _slice(env, workers, px, args.slice_seconds, errors[px]))
        lost = {px: reconnects(workers, px) for px in PROXIES}
    finally:
        close_workers(workers)
    per_proxy: dict[str, dict[str, Any]] = {}
    for px in PROXIES:
        mine = [s for s in slices if s["proxy"] == px]
        seconds = sum(s["seconds"] for s in mine)
        events = sum(s["events"] for s in mine)
        cpu = sum(s["cpu_s"][px] for s in mine)
        other = OFF if px == ON else ON
        per_proxy[px] = {
            "slices": len(mine), "seconds": seconds, "events": events, "bytes": sum(s["bytes"] for s in mine),
            "streams_completed": sum(s["streams"] for s in mine),
            "events_per_s": events / seconds if seconds else float("nan"),
            "events_per_s_by_slice": [s["events"] / s["seconds"] for s in mine],
            "cpu_ms_per_1k_events_by_slice": [s["cpu_s"][px] * 1e6 / s["events"] if s["events"] else math.nan
                                              for s in mine],
            "mb_per_s": sum(s["bytes"] for s in mine) / seconds / 1e6 if seconds else float("nan"),
            "proxy_cpu_s": cpu,
            "cpu_s": _sum_dicts([s["cpu_s"] for s in mine]),
            "cpu_ms_per_1k_events": cpu * 1e6 / events if events else float("nan"),
            "proxy_core_busy": cpu / seconds if seconds else float("nan"),
            "events_per_cpu_s": events / cpu if cpu else float("nan"),  # the rate one saturated core could carry
            # the other proxy's CPU during this proxy's slices: background work (usage delivery) leaking out
            "idle_proxy_cpu_s": sum(s["cpu_s"][other] for s in mine),
            "mock_loadgen_core_busy": (sum(s["cpu_s"]["mock"] + s["cpu_s"]["loadgen"] for s in mine) / seconds
                                       if seconds else float("nan")),
            # what each event cost the other core, and how finely the proxy cut the stream into HTTP chunks
            "mock_cpu_ms_per_1k_events": sum(s["cpu_s"]["mock"] for s in mine) * 1e6 / events if events else math.nan,
            "loadgen_cpu_ms_per_1k_events": (sum(s["cpu_s"]["loadgen"] for s in mine) * 1e6 / events
                                             if events else math.nan),
            "body_pieces_per_1k_events": sum(s["pieces"] for s in mine) * 1000 / events if events else math.nan,
            "proxy_reads_per_1k_events": sum(s["cpu_s"][f"{px}_syscr"] for s in mine) * 1000 / events
            if events else math.nan,
            "proxy_writes_per_1k_events": sum(s["cpu_s"][f"{px}_syscw"] for s in mine) * 1000 / events
            if events else math.nan,
            "errors": errors[px].as_dict(),
        }
    off, on = per_proxy[OFF], per_proxy[ON]
    return {
        "concurrency": concurrency, "tokens": args.burst_tokens, "slice_s": args.slice_seconds,
        "order": order, "per_proxy": per_proxy,
        "ratio_events_per_s": on["events_per_s"] / off["events_per_s"] if off["events_per_s"] else float("nan"),
        "ratio_cpu_per_event": (on["cpu_ms_per_1k_events"] / off["cpu_ms_per_1k_events"]
                                if off["cpu_ms_per_1k_events"] else float("nan")),
        "reconnects": lost, "warmup_errors": warm_errors.as_dict(), "slices": slices,
    }


async def _slice(env: Env, workers: list[Worker], px: str, seconds: float, errors: Failures) -> dict[str, Any]:
    tally = env.tallies[px]
    state = {"run": True, "counting": True, "streams": 0}

    async def one(lane: CountingLane) -> None:
        while state["run"]:
            result = await lane.send()
            if not result.ok:
                errors.add(result.error or "unknown error")
            elif state["counting"]:
                state["streams"] += 1

    events0, bytes0, pieces0, cpu0, t0 = tally.events, tally.bytes, tally.pieces, env.cpu(), time.perf_counter()
    tasks = [asyncio.ensure_future(one(worker.lanes[px])) for worker in workers]
    await asyncio.sleep(seconds)
    events1, bytes1, pieces1, cpu1, t1 = tally.events, tally.bytes, tally.pieces, env.cpu(), time.perf_counter()
    state["run"] = state["counting"] = False
    await asyncio.gather(*tasks)  # let the streams in flight finish, uncounted, before the next slice
    return {"proxy": px, "seconds": t1 - t0, "events": events1 - events0, "bytes": bytes1 - bytes0,
            "pieces": pieces1 - pieces0, "streams": state["streams"], "cpu_s": cpu_delta(cpu1, cpu0)}


# --- correctness ----------------------------------------------------------------------------------


async def wait_for_records(path: str, expected: int) -> tuple[int, float]:
    """Wait (at least RECORD_SETTLE_S, at most RECORD_WAIT_S) until usage.jsonl has `expected` lines."""
    started = time.perf_counter()
    await asyncio.sleep(RECORD_SETTLE_S)
    while True:
        lines = count_lines(path)
        waited = time.perf_counter() - started
        if lines >= expected or waited >= RECORD_WAIT_S:
            return lines, waited
        await asyncio.sleep(0.05)


def count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def spool_counts(spool_dir: str) -> dict[str, int] | None:
    """Pending and dead-letter rows left in the outbox (read after the proxy has stopped)."""
    db = Path(spool_dir) / "usage.sqlite3"
    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return {name: n for name, n in conn.execute("SELECT name, n FROM counts")}
    except sqlite3.Error:
        return None


def _histogram(values: Iterable[object]) -> dict[str, int]:
    return {str(value): n for value, n in Counter(values).items()}


def check_usage(directory: str, expected: int, lines_before_stop: int, waited_s: float) -> dict[str, Any]:
    path = usage_file(directory)
    records = []
    bad_lines = 0
    if Path(path).exists():
        for line in Path(path).read_bytes().splitlines():
            try:
                records.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                bad_lines += 1
    ids = Counter(str(record.get("request_id")) for record in records)
    return {
        "expected": expected, "lines_before_stop": lines_before_stop, "waited_s": waited_s,
        "records": len(records), "unparsable_lines": bad_lines,
        "distinct_request_ids": len(ids), "duplicated_request_ids": sum(1 for n in ids.values() if n > 1),
        "usage_source": dict(Counter(str(record.get("usage_source")) for record in records)),
        "completion_tokens": _histogram(record.get("completion_tokens") for record in records),
        "status": _histogram(record.get("status") for record in records),
        "spool_after_stop": spool_counts(str(Path(directory) / "spool")),
    }


def correctness(env: Env, args: argparse.Namespace, usage: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """Stream and record checks; returns the figures and a list of failed checks."""
    expected_events = {args.tokens + 2, args.burst_tokens + 2}  # role, n tokens (last with finish), [DONE]
    tallies = {path: {"requests": t.requests, "events": t.events, "bytes": t.bytes, "usage_only": t.usage_only,
                      "usage_only_streams": t.usage_only_streams, "fingerprint_streams": t.fingerprint_streams,
                      "events_per_stream": {str(k): v for k, v in sorted(t.events_per_stream.items())}}
               for path, t in env.tallies.items()}
    failed = []
    for path, tally in env.tallies.items():
        if tally.usage_only:
            failed.append(f"{path}: {tally.usage_only} usage-only events (`\"choices\":[]`) in "
                          f"{tally.usage_only_streams} streams")
        odd = {k: v for k, v in tally.events_per_stream.items() if k not in expected_events}
        if odd:
            failed.append(f"{path}: streams with an unexpected number of events (events: streams) {odd}; "
                          f"expected {sorted(expected_events)}")
    if usage is None:
        failed.append("usage records were not checked (the run did not get that far)")
    else:
        if usage["records"] != usage["expected"]:
            failed.append(f"usage.jsonl has {usage['records']} records for {usage['expected']} requests sent to "
                          f"the on proxy ({usage['lines_before_stop']} before SIGTERM, after "
                          f"{usage['waited_s']:.2f}s; spool after stop: {usage['spool_after_stop']})")
        if usage["duplicated_request_ids"] or usage["unparsable_lines"]:
            failed.append(f"usage.jsonl: {usage['duplicated_request_ids']} duplicated request ids, "
                          f"{usage['unparsable_lines']} unparsable lines")
        not_reported = {k: v for k, v in usage["usage_source"].items() if k != "reported"}
        if not_reported:
            failed.append(f"usage records whose usage was not read off the stream: {not_reported}")
    return {"streams": tallies, "usage_records": usage}, failed


# --- main -----------------------------------------------------------------------------------------


async def run_all(env: Env, args: argparse.Namespace, directory: str) -> dict[str, Any]:
    out: dict[str, Any] = {"levels": [], "chunks": None, "usage_wait": None}
    for px in PROXIES:  # a proxy that cannot serve at all should fail loudly, not as 100% errors
        probe = await env.lane(px).send()
        if not probe.ok:
            raise RuntimeError(f"probe request through the {px} proxy failed: {probe.error}")
    services = [*env.proxies.values(), env.mock]
    out["levels"], alive = await interleave.run_levels(
        args.concurrency, lambda concurrency: run_level(env, args, concurrency), services, log)
    if not alive:
        return out
    if args.slices:
        out["chunks"] = await measure_chunks(env, args)
        if not all_alive(services, "the chunks phase", log):
            return out
    expected = env.tallies[ON].requests
    log(f"waiting for {expected} usage records in usage.jsonl")
    out["usage_wait"] = await wait_for_records(usage_file(directory), expected)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command, pins, info = start_run("bench.metering", argv, args.no_pin, log,
                                    pinning="both proxies on CPU {proxy}; mock backend + load generator on CPU {mock}")
    mock = mock_service(args, pins)
    proxies: dict[str, Service] = {}
    result: dict[str, Any] = {"levels": [], "chunks": None, "usage_wait": None}
    usage = None
    failure = None
    env: Env | None = None
    with tempfile.TemporaryDirectory(prefix="bench-metering-") as tmp:
        try:
            mock_port = mock.start()
            start_proxies(write_proxy_configs(tmp, mock_port), pins, proxies)
            ports = {DIRECT: mock_port, **{px: proxies[px].port for px in PROXIES}}
            log(f"mock backend pid {mock.pid} on :{mock_port}, proxy off pid {proxies[OFF].pid} on :{ports[OFF]}, "
                f"proxy on pid {proxies[ON].pid} on :{ports[ON]}")
            burst_headers = {"x-mock-delay-ms": "0", "x-mock-tokens": str(args.burst_tokens)}
            env = Env(mock, proxies, ports, {path: chat_request(port) for path, port in ports.items()},
                      {path: chat_request(port, burst_headers) for path, port in ports.items()},
                      {path: Tally() for path in PATHS}, args.timeout, random.Random(args.seed), pins)
            result = uvloop.run(run_all(env, args, tmp))
            if result["usage_wait"] is not None:
                lines, waited = result["usage_wait"]
                proxies[ON].stop()  # SIGTERM: commits whatever is still buffered to the spool
                usage = check_usage(tmp, env.tallies[ON].requests, lines, waited)
        except (RuntimeError, OSError) as exc:
            failure = str(exc)
        finally:
            children_output = stop_children([proxies.get(ON), proxies.get(OFF), mock])
    checks, failed = correctness(env, args, usage) if env is not None else ({}, [])
    print(report(command, info, args, result, checks, failed), flush=True)
    troubled = print_problems(failure, error_report(result), failed, children_output)
    write_json(args.json, {"command": command, "machine": info, "args": vars(args), "levels": result["levels"],
                           "chunks": result["chunks"], "checks": checks, "failed_checks": failed}, log)
    return 1 if troubled else 0


# --- reporting ------------------------------------------------------------------------------------


def ttft_table(levels: list[dict[str, Any]]) -> str:
    head = ["concurrency", "streams/path", "direct p50", "direct p99", "off p50", "off p99", "on p50", "on p99",
            "off - direct p50", "off - direct p99", "on - direct p50", "on - direct p99", "on - off p50",
            "on - off p99", "paired on - off p50", "proxy CPU ms/stream off", "proxy CPU ms/stream on", "errors"]
    rows = [md_row(head), "|" + "---:|" * len(head)]
    for level in levels:
        ttft, over, diff = level["ttft_ms"], level["overhead_ms"], level["on_minus_off_ms"]
        cpu = level["proxy_cpu_ms_per_stream"]
        errors = sum(errs["count"] for errs in level["errors"].values())
        n = "/".join(str(ttft[path]["n"]) for path in PATHS)
        cells = [str(level["concurrency"]), n,
                 *(ms(ttft[path].get(f"p{q}")) for path in PATHS for q in (50, 99)),
                 *(ms(over[px][f"p{q}"]) for px in PROXIES for q in (50, 99)),
                 ms(diff["p50"]), ms(diff["p99"]), ms(level["paired_ms"]["on-off"].get("p50")),
                 ms(cpu[OFF]), ms(cpu[ON]), str(errors)]
        rows.append(md_row(cells))
    return "\n".join(rows)


def ttft_diagnostics(levels: list[dict[str, Any]]) -> str:
    lines = []
    for level in levels:
        busy, stream, paired = level["core_busy"], level["stream_ms"], level["paired_ms"]
        line = (f"- c={level['concurrency']}: window {level['wall_s']:.1f}s; paired Δ p50: off - direct "
                f"{ms(paired['off-direct'].get('p50'))}, on - direct {ms(paired['on-direct'].get('p50'))}, "
                f"on - off {ms(paired['on-off'].get('p50'))} (p90 {ms(paired['on-off'].get('p90'))}) ms; "
                f"{core_busy_text(busy, PROXIES, MOCK_CORE)}; {stream_p50s(stream, PATHS)}; "
                f"{foreign_load(level['cpu_s'], level['wall_s'], PROXIES, MOCK_CORE)}; "
                f"client reconnects {level['reconnects']}")
        if sum(busy[name] for name in MOCK_CORE) >= SATURATED:
            line += "\n  WARNING: the mock + load generator core is saturated: TTFTs include queueing on it"
        lines.append(line)
    return "\n".join(lines)


def chunks_table(chunks: dict[str, Any]) -> str:
    head = ["proxy", "slices", "seconds", "events", "events/s", "events/s per slice", "MB/s", "proxy CPU s",
            "proxy CPU ms / 1k events", "per slice", "proxy core busy", "events per proxy CPU-second", "errors"]
    rows = [md_row(head), "|:---|" + "---:|" * (len(head) - 1)]
    for px in PROXIES:
        p = chunks["per_proxy"][px]
        cells = [f"metering {px}", str(p["slices"]), f"{p['seconds']:.2f}", str(p["events"]),
                 num(p["events_per_s"], ",.0f"),
                 " / ".join(num(v, ",.0f") for v in p["events_per_s_by_slice"]),
                 num(p["mb_per_s"], ".1f"), f"{p['proxy_cpu_s']:.2f}", num(p["cpu_ms_per_1k_events"], ".2f"),
                 " / ".join(num(v, ".2f") for v in p["cpu_ms_per_1k_events_by_slice"]),
                 num(p["proxy_core_busy"], ".0%"), num(p["events_per_cpu_s"], ",.0f"), str(p["errors"]["count"])]
        rows.append(md_row(cells))
    rows.append("| **on / off** | | | | " + num(chunks["ratio_events_per_s"], ".3f") + " | | | | "
                + num(chunks["ratio_cpu_per_event"], ".3f") + " | | | | |")
    return "\n".join(rows)


def chunks_diagnostics(chunks: dict[str, Any]) -> str:
    lines = []
    for px in PROXIES:
        p = chunks["per_proxy"][px]
        other = OFF if px == ON else ON
        line = (f"- {px} slices: {p['streams_completed']} streams completed inside them; mock + load generator "
                f"core {p['mock_loadgen_core_busy']:.0%} busy, CPU ms per 1k events: mock "
                f"{num(p['mock_cpu_ms_per_1k_events'], '.2f')}, load generator "
                f"{num(p['loadgen_cpu_ms_per_1k_events'], '.2f')}; the client parsed "
                f"{num(p['body_pieces_per_1k_events'], ',.0f')} body pieces per 1k events; the proxy made "
                f"{num(p['proxy_reads_per_1k_events'], '.0f')} read and "
                f"{num(p['proxy_writes_per_1k_events'], '.0f')} write system calls per 1k events; the {other} "
                f"proxy used {p['idle_proxy_cpu_s']:.2f}s CPU meanwhile; "
                f"{foreign_load(p['cpu_s'], p['seconds'], PROXIES, MOCK_CORE)}")
        if p["mock_loadgen_core_busy"] >= SATURATED:
            line += ("\n  WARNING: the mock + load generator core is saturated: events/s here is that core's limit, "
                     "not the proxy's; CPU per 1k events still holds")
        lines.append(line)
    lines.append(f"- order: {', '.join(chunks['order'])}; client reconnects {chunks['reconnects']}")
    return "\n".join(lines)


def checks_section(checks: dict[str, Any], failed: list[str]) -> str:
    lines = []
    streams = checks.get("streams") or {}
    for path, tally in streams.items():
        good = sum(tally["events_per_stream"].values())
        lines.append(f"- {path}: {tally['requests']} requests, {tally['events']:,} events, usage-only events "
                     f"{tally['usage_only']}; events per good stream {tally['events_per_stream']}; "
                     f"`system_fingerprint` in {tally['fingerprint_streams']}/{good} good streams")
    usage = checks.get("usage_records")
    if usage:
        lines.append(f"- usage.jsonl: {usage['records']} records for {usage['expected']} requests sent to the on "
                     f"proxy ({usage['lines_before_stop']} written {usage['waited_s']:.2f}s after the last one, "
                     f"before SIGTERM); usage_source {usage['usage_source']}; completion_tokens "
                     f"{usage['completion_tokens']}; spool after stop {usage['spool_after_stop']}")
    lines.append(result_line(failed))
    return "\n".join(lines)


def report(command: str, info: dict[str, Any], args: argparse.Namespace, result: dict[str, Any],
           checks: dict[str, Any], failed: list[str]) -> str:
    parts = [*report_head("bench.metering", command, info),
             "- proxies: **off** = `usage: {metering: false}`; **on** = default metering + usage file reporter "
             "(spool + usage.jsonl); both with access log off, in front of the same vLLM mock",
             f"- request: `{BODY.decode()}` (no stream_options: the on proxy injects include_usage and strips "
             "the usage-only event)", ""]
    if result["levels"]:
        parts += [f"### First-token overhead (paced backend: {args.tokens} tokens x {args.delay_ms:g} ms)", "",
                  "TTFT in ms (request write -> first bytes of the first SSE `data:` event); streams/path is "
                  "direct/off/on. `x - y` columns are differences of percentiles; paired on - off = median of "
                  "per-round (on - off).", "", ttft_table(result["levels"]), "", ttft_diagnostics(result["levels"]),
                  ""]
    if result["chunks"]:
        chunks = result["chunks"]
        parts += [f"### Chunks/s (burst backend: {chunks['tokens']} tokens, no pacing; c={chunks['concurrency']}, "
                  f"{chunks['slice_s']:g}s slices)", "",
                  "Events = SSE `data:` events received by the clients inside the slices; CPU = user + system "
                  "time of the proxy that served the slice.", "", chunks_table(chunks), "",
                  chunks_diagnostics(chunks), ""]
    parts += ["### Checks", "", checks_section(checks, failed)]
    return "\n".join(parts)


def error_report(result: dict[str, Any]) -> str:
    sources = []
    for level in result["levels"]:
        sources += level_failures(level, PATHS)
    chunks = result["chunks"]
    if chunks:
        sources += [(f"chunks {px}", chunks["per_proxy"][px]["errors"]) for px in PROXIES]
        sources.append(("chunks warm-up", chunks["warmup_errors"]))
    return failure_lines(sources)


if __name__ == "__main__":
    sys.exit(main())
