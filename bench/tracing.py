"""Tracing cost: proxy CPU per stream with OpenTelemetry tracing on at 100 % and at 0 % sampling, vs off, in one run.

    python -m bench.tracing [--concurrency 1,32] [--requests N] [--tokens 64] [--delay-ms 5]
                            [--export-interval 200ms] [--json out.json]

Starts one vLLM mock, an OTLP/HTTP receiver (bench/otlp_receiver.py) and three proxies in front of the mock,
the same config but for `tracing:`: "off" (no tracing section: opentelemetry is never imported), "sampled-0"
(enabled, sample_ratio 0: a request without a client traceparent gets no span) and "sampled-100" (enabled,
sample_ratio 1: every stream a recorded span, batched and exported to the receiver). Its exporter sends every
200 ms (--export-interval) rather than the default 5 s, so that the export work of a level's spans falls inside
its measuring window (smaller batches: an upper bound of the export's cost). The three proxies share one CPU;
the mock, the receiver and this load generator share the other. Each worker runs rounds of one stream on each
path (direct, off, sampled-0, sampled-100) in random order, so every path sees the same conditions.

Proxy CPU is each proxy process's own (all its threads, the exporter's included) over the window, from
/proc/<pid>/task/*/schedstat, per stream it served: robust to whatever else runs on the machine; and apart,
its main thread's (the event loop, where requests are served).
Checks: no stream fails, and after the run the receiver got exactly one span per request sent to sampled-100
and none from sampled-0.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import uvloop

from bench import features, interleave
from bench.harness import (
    BODY,
    CLK_TCK,
    SATURATED,
    SCHEDSTAT,
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
from bench.otlp_receiver import OtlpReceiver
from bench.procs import Service

OFF, ZERO, FULL = "off", "sampled-0", "sampled-100"
PROXIES = (OFF, ZERO, FULL)
PATHS = (DIRECT, *PROXIES)
RATIOS = {ZERO: 0.0, FULL: 1.0}
PAIRS = (("off-direct", OFF, DIRECT), ("sampled-0-off", ZERO, OFF), ("sampled-100-off", FULL, OFF))
INTERLEAVING = Interleaving(PATHS, PAIRS, count_upstream=True)
MOCK_CORE = {"mock": "mock", "receiver": "OTLP receiver", "loadgen": "load generator"}
EXPORT_INTERVAL = "200ms"
SPANS_WAIT_S = 15.0  # for the last batches after the run
SPANS_SETTLE_S = 0.5  # after the count is reached: time for a duplicate or a stray span to show up

log = logger("bench.tracing")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__.split("\n\n")[0])
    add_level_args(parser, [1, 32], 100, "measured streams per path per level; each worker runs max(3, ceil(N/C)) "
                   "rounds of four streams (default 100: about two minutes at C = 1)")
    parser.add_argument("--export-interval", default=EXPORT_INTERVAL,
                        help=f"sampled-100's tracing.export_interval (default {EXPORT_INTERVAL}: its exports fall "
                             "inside the window; the proxy's own default is 5s)")
    add_run_args(parser)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.tokens < 1:
        parser.error("--requests and --tokens must be >= 1")
    return args


@dataclass
class Env(features.Env):
    """bench.features' environment (an OTLP receiver in place of the webhook one), with each proxy's event loop
    (its main thread) counted apart from the exporter's thread."""

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each process (all threads), of each proxy's main thread, and of both cores."""
        out = super().cpu()
        out |= {loop_key(px): main_thread_seconds(self.proxies[px].pid) for px in PROXIES}
        return out


def loop_key(proxy: str) -> str:
    return f"{proxy}:loop"


def main_thread_seconds(pid: int) -> float:
    """CPU so far of a process's main thread alone: the proxy's event loop, where requests are served (the
    exporter runs in a thread of its own). NaN once it has gone."""
    try:
        if SCHEDSTAT:
            with open(f"/proc/{pid}/task/{pid}/schedstat", "rb") as f:
                return int(f.read().split()[0]) / 1e9
        with open(f"/proc/{pid}/task/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime and stime
    except (OSError, ValueError, IndexError):
        return math.nan


def write_proxy_configs(directory: str, mock_port: int, endpoint: str, export_interval: str) -> dict[str, str]:
    common = proxy_config(mock_port)
    configs: dict[str, dict[str, Any]] = {OFF: common}
    for name, ratio in RATIOS.items():
        configs[name] = {**common, "tracing": {"enabled": True, "endpoint": endpoint, "sample_ratio": ratio,
                                               "service_name": f"bench-{name}"}}
    # Short batches bring sampled-100's export work into the window it is measured in; sampled-0 exports
    # nothing, and keeps the default interval: its exporter thread wakes as seldom as in production.
    configs[FULL]["tracing"]["export_interval"] = export_interval
    return write_configs(directory, "tracing", configs)


async def run_level(env: Env, args: argparse.Namespace, concurrency: int) -> dict[str, Any]:
    return summarise(await interleave.run_level(env, INTERLEAVING, concurrency, args.requests, log))


def summarise(level: Level) -> dict[str, Any]:
    cpu = {px: level.cpu_ms_per_stream(px, [px]) for px in PROXIES}
    loop = {px: level.cpu_ms_per_stream(loop_key(px), [px]) for px in PROXIES}
    return level.summary({
        "overhead_ms": {px: level.overhead_ms(px) for px in PROXIES},
        "paired_ms": level.paired_ms,
        "proxy_cpu_ms_per_stream": {**cpu, "sampled-0-off": cpu[ZERO] - cpu[OFF],
                                    "sampled-100-off": cpu[FULL] - cpu[OFF]},
        # the event loop's share (the request path); the rest is the exporter's thread and the like
        "loop_cpu_ms_per_stream": {**loop, "sampled-0-off": loop[ZERO] - loop[OFF],
                                   "sampled-100-off": loop[FULL] - loop[OFF]},
        "receiver_cpu_ms_per_stream": level.cpu_ms_per_stream("receiver", [FULL]),
        "streams_in_cpu_window": level.phase.window_streams,
        "core_busy": {"proxies": level.busy(*PROXIES), **{px: level.busy(px) for px in PROXIES},
                      **{name: level.busy(name) for name in MOCK_CORE}},
        "wall_s": level.phase.wall_s,
        "proxy_upstream_connects": level.phase.upstream_connects,
        "cpu_s": level.phase.cpu_s,
    }, paired_raw=level.phase.paired, round_columns=["order", *PATHS])


async def wait_for_spans(env: Env) -> dict[str, Any]:
    """The receiver's tally once it has a span per request sent to sampled-100, or after SPANS_WAIT_S."""
    return await features.wait_for_receiver(env, FULL, lambda stats: stats["spans"].get(f"bench-{FULL}", 0),
                                            SPANS_WAIT_S, SPANS_SETTLE_S)


def span_failures(spans: dict[str, Any]) -> list[str]:
    got = spans["spans"]
    failed = []
    if got.get(f"bench-{FULL}", 0) != spans["expected"]:
        failed.append(f"spans: the receiver got {got.get(f'bench-{FULL}', 0)} spans from sampled-100 for "
                      f"{spans['expected']} requests sent to it (waited {spans['waited_s']:.1f}s)")
    if got.get(f"bench-{ZERO}", 0):
        failed.append(f"spans: sampled-0 exported {got[f'bench-{ZERO}']} spans; it should export none")
    if spans["unparsable"]:
        failed.append(f"spans: {spans['unparsable']} export requests did not decode")
    return failed


async def run_all(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"levels": [], "checks": {}, "failed": []}
    out["levels"], _ = await interleave.run_levels(args.concurrency,
                                                   lambda concurrency: run_level(env, args, concurrency),
                                                   [*env.proxies.values(), env.mock, env.receiver], log)
    if env.receiver.alive():
        log(f"waiting for the spans of {env.sent[FULL]} requests")
        out["checks"]["spans"] = await wait_for_spans(env)
        out["failed"] += span_failures(out["checks"]["spans"])
    else:
        out["failed"].append("spans: the receiver exited during the run")
    out["checks"]["requests_sent"] = dict(env.sent)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command, pins, info = start_run("bench.tracing", argv, args.no_pin, log,
                                    pinning="the three proxies on CPU {proxy}; mock backend + OTLP receiver + load "
                                            "generator on CPU {mock}")
    mock = mock_service(args, pins)
    receiver = OtlpReceiver(pins[1] if pins else None)
    proxies: dict[str, Service] = {}
    result: dict[str, Any] = {"levels": [], "checks": {}, "failed": []}
    failure = None
    with tempfile.TemporaryDirectory(prefix="bench-tracing-") as tmp:
        try:
            mock_port = mock.start()
            receiver.start()
            start_proxies(write_proxy_configs(tmp, mock_port, receiver.endpoint, args.export_interval), pins, proxies)
            ports = {DIRECT: mock_port, **{px: proxies[px].port for px in PROXIES}}
            log(f"mock backend pid {mock.pid} on :{mock_port}, OTLP receiver pid {receiver.pid} on "
                f":{receiver.port}, " + ", ".join(f"proxy {px} pid {proxies[px].pid} on :{ports[px]}"
                                                   for px in PROXIES))
            payload = {path: chat_request(port) for path, port in ports.items()}
            env = Env(mock, receiver, proxies, ports, payload, args.timeout, random.Random(args.seed), pins,
                      dict.fromkeys(PATHS, 0))
            result = uvloop.run(run_all(env, args))
        except (RuntimeError, OSError, asyncio.TimeoutError) as exc:
            failure = str(exc) or repr(exc)
        finally:
            children_output = stop_children([*(proxies.get(px) for px in PROXIES[::-1]), mock, receiver])
    print(report(command, info, args, result), flush=True)
    troubled = print_problems(failure, error_report(result["levels"]), result["failed"], children_output)
    write_json(args.json, {"command": command, "machine": info, "args": vars(args), "headline": headline(result),
                           **result}, log)
    return 1 if troubled else 0


# --- reporting ------------------------------------------------------------------------------------


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of the run, flat and keyed by concurrency."""
    out: dict[str, Any] = {}
    for level in result["levels"]:
        c, cpu = level["concurrency"], level["proxy_cpu_ms_per_stream"]
        out |= {f"{px}_cpu_ms_per_stream_c{c}": cpu[px] for px in PROXIES}
        loop = level["loop_cpu_ms_per_stream"]
        out |= {f"sampled_0_minus_off_loop_cpu_ms_c{c}": loop["sampled-0-off"],
                f"sampled_100_minus_off_loop_cpu_ms_c{c}": loop["sampled-100-off"]}
        out |= {f"sampled_0_minus_off_cpu_ms_c{c}": cpu["sampled-0-off"],
                f"sampled_100_minus_off_cpu_ms_c{c}": cpu["sampled-100-off"],
                f"sampled_100_minus_off_paired_p50_ms_c{c}": level["paired_ms"]["sampled-100-off"].get("p50")}
    spans = result["checks"].get("spans") or {}
    out["spans_received"] = spans.get("spans", {}).get(f"bench-{FULL}")
    out["spans_expected"] = spans.get("expected")
    out["errors"] = sum(failures["count"] for level in result["levels"] for _, failures in level_failures(level, PATHS))
    return out


def cpu_table(levels: list[dict[str, Any]]) -> str:
    head = ["concurrency", "CPU", "streams (each proxy)", "off ms/stream", "sampled-0 ms/stream",
            "sampled-100 ms/stream", "sampled-0 - off", "sampled-100 - off", "sampled-100 - off, % of off"]
    rows = [md_row(head), "|---:|:---|" + "---:|" * (len(head) - 2)]
    for level in levels:
        streams = level["streams_in_cpu_window"]
        for what, key in (("process", "proxy_cpu_ms_per_stream"), ("event loop", "loop_cpu_ms_per_stream")):
            cpu = level[key]
            share = 100.0 * cpu["sampled-100-off"] / cpu[OFF] if cpu[OFF] else float("nan")
            rows.append(md_row([str(level["concurrency"]), what, "/".join(str(streams[px]) for px in PROXIES),
                                *(f"{cpu[k]:.3f}" for k in (*PROXIES, "sampled-0-off", "sampled-100-off")),
                                f"{share:+.1f} %"]))
    return "\n".join(rows)


def ttft_table(levels: list[dict[str, Any]]) -> str:
    head = ["concurrency", "path", "streams", "TTFT p50", "TTFT p99", "overhead p50", "paired Δ p50 vs off",
            "errors"]
    rows = [md_row(head), "|---:|:---|" + "---:|" * (len(head) - 2)]
    for level in levels:
        ttft = level["ttft_ms"]
        for path in PATHS:
            cells = [str(level["concurrency"]), path, str(ttft[path]["n"]), ms(ttft[path].get("p50")),
                     ms(ttft[path].get("p99"))]
            cells.append("—" if path == DIRECT else ms(level["overhead_ms"][path]["p50"]))
            pair = level["paired_ms"].get(f"{path}-{OFF}")
            cells.append("—" if pair is None else ms(pair.get("p50")))
            rows.append(md_row([*cells, str(level["errors"][path]["count"])]))
    return "\n".join(rows)


def diagnostics(levels: list[dict[str, Any]]) -> str:
    lines = []
    for level in levels:
        busy = level["core_busy"]
        line = (f"- c={level['concurrency']}: window {level['wall_s']:.1f}s; "
                f"{core_busy_text(busy, PROXIES, MOCK_CORE)}; "
                f"OTLP receiver CPU {ms(level['receiver_cpu_ms_per_stream'])} ms per sampled-100 stream; "
                f"{stream_p50s(level['stream_ms'], PATHS)}; "
                f"{foreign_load(level['cpu_s'], level['wall_s'], PROXIES, MOCK_CORE)}")
        if sum(busy[name] for name in MOCK_CORE) >= SATURATED:
            line += "\n  WARNING: the mock + receiver + load generator core is saturated"
        lines.append(line)
    return "\n".join(lines)


def checks_section(checks: dict[str, Any], failed: list[str]) -> str:
    lines = []
    spans = checks.get("spans")
    if spans:
        lines.append(f"- spans: the receiver got {spans['spans']} spans in {spans['exports']} export requests, "
                     f"{spans['expected']} requests sent to sampled-100 (complete {spans['waited_s']:.2f}s after "
                     f"the last stream)")
    lines.append(result_line(failed))
    return "\n".join(lines)


def report(command: str, info: dict[str, Any], args: argparse.Namespace, result: dict[str, Any]) -> str:
    parts = [*report_head("bench.tracing", command, info),
             "- three proxies in front of the same vLLM mock, metering on, access log off: **off** = no `tracing:`; "
             "**sampled-0** = `tracing: {enabled: true, sample_ratio: 0}`; **sampled-100** = `sample_ratio: 1`, "
             f"OTLP/HTTP export every {args.export_interval} to a local receiver (sampled-0 at the default 5s: it "
             "exports nothing)",
             f"- backend: {args.tokens} tokens x {args.delay_ms:g} ms; request `{BODY.decode()}`, no traceparent", ""]
    if result["levels"]:
        parts += ["**Proxy CPU per stream** over the window: *process* = every thread of the proxy "
                  "(`/proc/<pid>/task/*/schedstat`), the exporter's included; *event loop* = its main thread "
                  "alone (`/proc/<pid>/task/<pid>/schedstat`), where requests are served.", "",
                  cpu_table(result["levels"]), "",
                  "TTFT in ms (request write -> first SSE `data:` event); paired Δ = median over rounds of "
                  "(path - off).", "", ttft_table(result["levels"]), "", diagnostics(result["levels"]), ""]
    parts += ["### Checks", "", checks_section(result["checks"], result["failed"])]
    return "\n".join(parts)


def error_report(levels: list[dict[str, Any]]) -> str:
    return failure_lines(source for level in levels for source in level_failures(level, PATHS))


if __name__ == "__main__":
    sys.exit(main())
