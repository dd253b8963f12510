"""Feature cost: first-token overhead and proxy CPU with auth, rate limits, metering and a webhook on, vs bare.

    python -m bench.features [--concurrency 1,64] [--requests N] [--json out.json]

Starts one mock backend, a small webhook receiver and two proxies in front of the mock: "bare" (no auth, no
limits, no metering, no access log) and "full" (auth with one key, every per-key rate limit in the memory
store at values never reached, metering with stream_options injection, usage delivery to the receiver by a
signed webhook, and a JSON access log to a file). Both proxies share one CPU; the mock, the receiver and this
load generator share another. Each worker runs rounds of one stream on each path (direct, bare, full) in
random order, as the other benchmarks do, so every path sees the same conditions.

Checks: no stream fails, a request without a key gets 401 from full, and after the run the receiver got
exactly one record (distinct webhook-id, valid signature) per request sent to full.
See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import random
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
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
from bench.limits import LIMITS, CountingLane, fetch_head, metric_sum
from bench.loadgen import fetch_json, http_get
from bench.procs import Service, pinned_core_seconds, self_cpu_seconds
from bench.webhook_receiver import WebhookReceiver

BARE, FULL = "bare", "full"
PATHS = (DIRECT, BARE, FULL)
PROXIES = (BARE, FULL)
PAIRS = (("bare-direct", BARE, DIRECT), ("full-direct", FULL, DIRECT), ("full-bare", FULL, BARE))
INTERLEAVING = Interleaving(PATHS, PAIRS, count_upstream=True)
# our processes on the second core: name -> label
MOCK_CORE = {"mock": "mock", "receiver": "webhook receiver", "loadgen": "load generator"}
WEBHOOK_PATH = "/usage"
WEBHOOK_WAIT_S = 30.0  # most wait for the last records after the run: the outbox commits every 100 ms
WEBHOOK_SETTLE_S = 0.3  # after the count is reached: time for a duplicate or a stray record to show up
# /metrics of full after the run, for the report: name in the report -> metric
FULL_METRICS = {"ratelimited": "llmproxy_ratelimited_total", "webhook_success": "llmproxy_webhook_success_total",
                "webhook_failure": "llmproxy_webhook_failure_total",
                "dead_letters": "llmproxy_usage_dead_letters_total", "outbox_pending": "llmproxy_usage_outbox_pending"}

log = logger("bench.features")


# --- command line ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.features", description=__doc__.split("\n\n")[0])
    add_level_args(parser, [1, 64], 50, "measured streams per path per level; each worker runs max(3, ceil(N/C)) "
                   "rounds of three streams (default 50: under a minute at C = 1)")
    add_run_args(parser)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.tokens < 1:
        parser.error("--requests and --tokens must be >= 1")
    return args


# --- environment ----------------------------------------------------------------------------------


@dataclass
class Env:
    mock: Service
    receiver: WebhookReceiver
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
        """CPU seconds so far of each process, from schedstat (nanoseconds), and of both pinned cores."""
        services = {**self.proxies, "mock": self.mock, "receiver": self.receiver}
        out = {name: process_cpu_seconds([service.pid]) for name, service in services.items()}
        out["loadgen"] = self_cpu_seconds()
        return {**out, **pinned_core_seconds(self.pins)}


def write_proxy_configs(directory: str, mock_port: int, receiver_port: int, api_key: str,
                        secret: str) -> dict[str, str]:
    common = proxy_config(mock_port)
    webhook = {"url": f"http://{HOST}:{receiver_port}{WEBHOOK_PATH}", "secret": secret}
    full = {**common, "logging": {"access_log": access_log_file(directory)},
            "auth": {"enabled": True, "keys": [{"key": api_key, "user_id": "bench"}]},
            "rate_limit": {"enabled": True, "store": "memory", "per_key": LIMITS},
            "usage": {"enabled": True, "spool_dir": str(Path(directory) / "spool"),
                      "reporters": [{"name": "billing", "type": "webhook", "webhook": webhook}]}}
    return write_configs(directory, "features", {BARE: {**common, "usage": {"metering": False}}, FULL: full})


def access_log_file(directory: str) -> str:
    return str(Path(directory) / "access.log")


# --- first-token phase ----------------------------------------------------------------------------


async def run_level(env: Env, args: argparse.Namespace, concurrency: int) -> dict[str, Any]:
    return summarise(await interleave.run_level(env, INTERLEAVING, concurrency, args.requests, log))


def summarise(level: Level) -> dict[str, Any]:
    cpu = {px: level.cpu_ms_per_stream(px, [px]) for px in PROXIES}
    return level.summary({
        "overhead_ms": {px: level.overhead_ms(px) for px in PROXIES},
        "full_minus_bare_ms": level.overhead_ms(FULL, BARE),
        "paired_ms": level.paired_ms,
        "proxy_cpu_ms_per_stream": {**cpu, "full-bare": cpu[FULL] - cpu[BARE]},
        "receiver_cpu_ms_per_stream": level.cpu_ms_per_stream("receiver", [FULL]),
        "mock_cpu_ms_per_stream": level.cpu_ms_per_stream("mock", PATHS),
        "streams_in_cpu_window": level.phase.window_streams,
        "core_busy": {"proxies": level.busy(*PROXIES), **{px: level.busy(px) for px in PROXIES},
                      **{name: level.busy(name) for name in MOCK_CORE}},
        "wall_s": level.phase.wall_s,
        "proxy_upstream_connects": level.phase.upstream_connects,
        "cpu_s": level.phase.cpu_s,
    }, paired_raw=level.phase.paired, round_columns=["order", *PATHS])


# --- checks ---------------------------------------------------------------------------------------


async def probe(env: Env, api_key: str) -> tuple[dict[str, Any], list[str]]:
    """Full with and without the key, bare without: auth is on where expected, and both proxies serve."""
    close = {"Connection": "close"}
    requests = {"full_keyed": (FULL, {**close, "Authorization": f"Bearer {api_key}"}, 200),
                "full_keyless": (FULL, close, 401), "bare_keyless": (BARE, close, 200)}
    found: dict[str, Any] = {}
    failed = []
    for name, (px, headers, want) in requests.items():
        found[name], _ = await fetch_head(env.ports[px], chat_request(env.ports[px], headers), env.timeout)
        if found[name] != want:
            failed.append(f"probe {name.replace('_', ' ')}: HTTP {found[name]}, expected {want}")
    if found["full_keyed"] != 200:
        raise RuntimeError(f"the full proxy answered a keyed request with HTTP {found['full_keyed']}")
    env.sent[FULL] += 1  # the keyed probe reached the backend: it has a usage record too
    return found, failed


async def receiver_stats(env: Env) -> dict[str, Any]:
    stats = await fetch_json(HOST, env.receiver.port, "/stats")
    assert isinstance(stats, dict)
    return stats


async def wait_for_receiver(env: Env, proxy: str, arrived: Callable[[dict[str, Any]], int], wait_s: float,
                            settle_s: float) -> dict[str, Any]:
    """The receiver's tally once `arrived(tally)` reaches the requests sent to `proxy`, after `wait_s` at most
    (or as soon as that proxy is gone), then `settle_s` more for stragglers; with what was expected and waited."""
    expected = env.sent[proxy]
    started = time.perf_counter()
    while True:
        stats = await receiver_stats(env)
        waited = time.perf_counter() - started
        if arrived(stats) >= expected or waited >= wait_s or not env.proxies[proxy].alive():
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(settle_s)
    return {**await receiver_stats(env), "expected": expected, "waited_s": waited}


async def wait_for_webhooks(env: Env) -> dict[str, Any]:
    """The receiver's tally once it has a record per request sent to full, or after WEBHOOK_WAIT_S."""
    return await wait_for_receiver(env, FULL, itemgetter("records"), WEBHOOK_WAIT_S, WEBHOOK_SETTLE_S)


def webhook_failures(webhooks: dict[str, Any]) -> list[str]:
    failed = []
    if webhooks["records"] != webhooks["expected"]:
        failed.append(f"webhook: the receiver got {webhooks['records']} distinct records for "
                      f"{webhooks['expected']} requests sent to full (waited {webhooks['waited_s']:.1f}s)")
    if webhooks["bad_signatures"] or webhooks["unparsable"]:
        failed.append(f"webhook: {webhooks['bad_signatures']} bad signatures, {webhooks['unparsable']} "
                      "unparsable records")
    not_reported = {k: v for k, v in webhooks["usage_source"].items() if k != "reported"}
    if not_reported:
        failed.append(f"webhook: records whose usage was not read off the stream: {not_reported}")
    return failed


async def full_metrics(env: Env) -> dict[str, float]:
    text = (await http_get(HOST, env.ports[FULL], "/metrics")).decode()
    return {name: metric_sum(text, metric) for name, metric in FULL_METRICS.items()}


async def run_all(env: Env, args: argparse.Namespace, api_key: str) -> dict[str, Any]:
    out: dict[str, Any] = {"levels": [], "checks": {}, "failed": []}
    out["checks"]["probe"], out["failed"] = await probe(env, api_key)
    out["levels"], _ = await interleave.run_levels(args.concurrency,
                                                   lambda concurrency: run_level(env, args, concurrency),
                                                   [*env.proxies.values(), env.mock, env.receiver], log)
    if env.receiver.alive():
        log(f"waiting for the webhook records of {env.sent[FULL]} requests")
        out["checks"]["webhook"] = await wait_for_webhooks(env)
        out["failed"] += webhook_failures(out["checks"]["webhook"])
    else:
        out["failed"].append("webhook: the receiver exited during the run")
    if env.proxies[FULL].alive():
        out["checks"]["full_metrics"] = await full_metrics(env)
    out["checks"]["requests_sent"] = dict(env.sent)
    return out


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command, pins, info = start_run("bench.features", argv, args.no_pin, log,
                                    pinning="both proxies on CPU {proxy}; mock backend + webhook receiver + load "
                                            "generator on CPU {mock}")
    api_key = "bench-" + secrets.token_urlsafe(24)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    mock = mock_service(args, pins)
    receiver = WebhookReceiver(secret, pins[1] if pins else None)
    proxies: dict[str, Service] = {}
    result: dict[str, Any] = {"levels": [], "checks": {}, "failed": []}
    failure = None
    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        try:
            mock_port, receiver_port = mock.start(), receiver.start()
            start_proxies(write_proxy_configs(tmp, mock_port, receiver_port, api_key, secret), pins, proxies)
            ports = {DIRECT: mock_port, **{px: proxies[px].port for px in PROXIES}}
            log(f"mock backend pid {mock.pid} on :{mock_port}, webhook receiver pid {receiver.pid} on "
                f":{receiver_port}, "
                + ", ".join(f"proxy {px} pid {proxies[px].pid} on :{ports[px]}" for px in PROXIES))
            payloads = {path: chat_request(port, {"Authorization": f"Bearer {api_key}"} if path == FULL else None)
                        for path, port in ports.items()}
            env = Env(mock, receiver, proxies, ports, payloads, args.timeout, random.Random(args.seed), pins)
            result = uvloop.run(run_all(env, args, api_key))
        except (RuntimeError, OSError, asyncio.TimeoutError) as exc:
            failure = str(exc) or repr(exc)
        finally:
            # proxies first (none sees its backend vanish mid-stream), then the mock, then the receiver
            children_output = stop_children([*(proxies.get(px) for px in PROXIES[::-1]), mock, receiver])
        result["checks"]["access_log_lines"] = count_lines(access_log_file(tmp))
    print(report(command, info, args, result), flush=True)
    troubled = print_problems(failure, error_report(result["levels"]), result["failed"], children_output)
    write_json(args.json, {"command": command, "machine": info, "args": vars(args), "limits": LIMITS,
                           "headline": headline(result), **result}, log)
    return 1 if troubled else 0


def count_lines(path: str) -> int:
    try:
        return Path(path).read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


# --- reporting ------------------------------------------------------------------------------------


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The figures `python -m bench` puts in its summary, flat and keyed by concurrency."""
    out: dict[str, Any] = {}
    for level in result["levels"]:
        c = level["concurrency"]
        cpu = level["proxy_cpu_ms_per_stream"]
        out |= {f"bare_overhead_p50_ms_c{c}": level["overhead_ms"][BARE]["p50"],
                f"full_overhead_p50_ms_c{c}": level["overhead_ms"][FULL]["p50"],
                f"full_minus_bare_paired_p50_ms_c{c}": level["paired_ms"]["full-bare"].get("p50"),
                f"bare_cpu_ms_per_stream_c{c}": cpu[BARE], f"full_cpu_ms_per_stream_c{c}": cpu[FULL],
                f"full_minus_bare_cpu_ms_per_stream_c{c}": cpu["full-bare"]}
    webhook = result["checks"].get("webhook") or {}
    out["webhook_records"] = webhook.get("records")
    out["webhook_expected"] = webhook.get("expected")
    out["errors"] = sum(failures["count"] for level in result["levels"] for _, failures in level_failures(level, PATHS))
    return out


def ttft_table(levels: list[dict[str, Any]]) -> str:
    head = ["concurrency", "path", "streams", "TTFT p50", "TTFT p99", "overhead p50", "overhead p99",
            "paired Δ p50 vs direct", "proxy CPU ms/stream", "errors"]
    rows = [md_row(head), "|---:|:---|" + "---:|" * (len(head) - 2)]
    for level in levels:
        ttft = level["ttft_ms"]
        for path in PATHS:
            cells = [str(level["concurrency"]), path, str(ttft[path]["n"]), ms(ttft[path].get("p50")),
                     ms(ttft[path].get("p99"))]
            if path == DIRECT:
                cells += ["—"] * 4
            else:
                over = level["overhead_ms"][path]
                cells += [ms(over["p50"]), ms(over["p99"]), ms(level["paired_ms"][f"{path}-{DIRECT}"].get("p50")),
                          ms(level["proxy_cpu_ms_per_stream"][path])]
            rows.append(md_row([*cells, str(level["errors"][path]["count"])]))
    return "\n".join(rows)


def cost_table(levels: list[dict[str, Any]]) -> str:
    head = ["concurrency", "paired full - bare p50", "paired full - bare p90", "full - bare TTFT p50",
            "full - bare TTFT p99", "full - bare proxy CPU ms/stream"]
    rows = [md_row(head), "|" + "---:|" * len(head)]
    for level in levels:
        paired, diff = level["paired_ms"]["full-bare"], level["full_minus_bare_ms"]
        rows.append(md_row([str(level["concurrency"]), ms(paired.get("p50")), ms(paired.get("p90")), ms(diff["p50"]),
                            ms(diff["p99"]), ms(level["proxy_cpu_ms_per_stream"]["full-bare"])]))
    return "\n".join(rows)


def diagnostics(levels: list[dict[str, Any]]) -> str:
    lines = []
    for level in levels:
        busy = level["core_busy"]
        line = (f"- c={level['concurrency']}: window {level['wall_s']:.1f}s; "
                f"{core_busy_text(busy, PROXIES, MOCK_CORE)}; "
                f"webhook receiver CPU {ms(level['receiver_cpu_ms_per_stream'])} ms per full stream; "
                f"{stream_p50s(level['stream_ms'], PATHS)}; "
                f"{foreign_load(level['cpu_s'], level['wall_s'], PROXIES, MOCK_CORE)}; the mock accepted "
                f"{level['proxy_upstream_connects']} connections from the proxies (with their health probes); "
                f"client reconnects {sum(level['reconnects'].values())}")
        if sum(busy[name] for name in MOCK_CORE) >= SATURATED:
            line += ("\n  WARNING: the mock + receiver + load generator core is saturated: TTFTs include queueing "
                     "on it, for every path")
        lines.append(line)
    return "\n".join(lines)


def checks_section(checks: dict[str, Any], failed: list[str]) -> str:
    lines = []
    probe_found = checks.get("probe")
    if probe_found:
        lines.append(f"- probe: full with the key HTTP {probe_found['full_keyed']}, without HTTP "
                     f"{probe_found['full_keyless']}; bare without a key HTTP {probe_found['bare_keyless']}")
    webhook = checks.get("webhook")
    if webhook:
        lines.append(f"- webhook: {webhook['records']} distinct records for {webhook['expected']} requests sent to "
                     f"full ({webhook['posts']} POSTs, {webhook['duplicates']} redeliveries, "
                     f"{webhook['bad_signatures']} bad signatures; complete {webhook['waited_s']:.2f}s after the "
                     f"last stream); usage_source {webhook['usage_source']}")
    metrics = checks.get("full_metrics")
    if metrics:
        lines.append("- full /metrics after the run: "
                     + ", ".join(f"{name} {value:g}" for name, value in metrics.items()))
    if "access_log_lines" in checks:
        lines.append(f"- full's access log: {checks['access_log_lines']} lines (streams, probes and /metrics reads)")
    lines.append(result_line(failed))
    return "\n".join(lines)


def report(command: str, info: dict[str, Any], args: argparse.Namespace, result: dict[str, Any]) -> str:
    parts = [*report_head("bench.features", command, info),
             "- proxies in front of the same vLLM mock: **bare** = no auth, no limits, `usage: {metering: false}`, "
             "access log off; **full** = auth (one key) + every per-key rate limit in the memory store (never "
             "reached) + metering with `stream_options` injection + usage delivery by signed webhook to a local "
             "receiver + JSON access log to a file",
             f"- backend: {args.tokens} tokens x {args.delay_ms:g} ms; request `{BODY.decode()}`, with "
             "`Authorization: Bearer <key>` on full", ""]
    if result["levels"]:
        parts += ["TTFT in ms (request write -> first bytes of the first SSE `data:` event). Overhead = path "
                  "percentile minus direct percentile; paired Δ = median over rounds of (path - direct). Proxy CPU "
                  "from `/proc/<pid>/task/*/schedstat` over the window, per stream the proxy served.", "",
                  ttft_table(result["levels"]), "", "**Feature cost**, full - bare: paired = median over rounds of "
                  "(full - bare); TTFT columns are differences of percentiles.", "", cost_table(result["levels"]),
                  "", diagnostics(result["levels"]), ""]
    parts += ["### Checks", "", checks_section(result["checks"], result["failed"])]
    return "\n".join(parts)


def error_report(levels: list[dict[str, Any]]) -> str:
    return failure_lines(source for level in levels for source in level_failures(level, PATHS))


if __name__ == "__main__":
    sys.exit(main())
