"""What every benchmark here does around its measurements, written once for bench.ttft, bench.metering and
bench.limits: the options they share, pinning and the SIGTERM guard, the mock backend and proxy children,
and the report header, problems and JSON they end with. The measurements themselves are in bench.interleave.
"""

from __future__ import annotations

import argparse
import bisect
import math
import os
import resource
import shlex
import signal
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

from bench.loadgen import build_request
from bench.procs import Service, choose_cpus, cpu_model, pin_self

HOST = "127.0.0.1"
CHAT_PATH = "/v1/chat/completions"
BODY = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
MAX_ERRORS_SHOWN = 5
SATURATED = 0.9  # busy share of the mock + load generator core above which it, not the proxy, sets the pace
PINNING = "proxy on CPU {proxy}; mock backend + load generator on CPU {mock}"

Log = Callable[[str], None]
Pins = tuple[int, int] | None


# --- command line ---------------------------------------------------------------------------------


def int_list(value: str) -> list[int]:
    """argparse type: comma-separated positive integers."""
    try:
        levels = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be positive integers")
    return levels


def add_level_args(parser: argparse.ArgumentParser, levels: list[int], requests: int, requests_help: str,
                   scope: str = "") -> None:
    """--concurrency, --requests, --tokens and --delay-ms: the first-token phase every benchmark runs.

    `scope` prefixes each help text, for a benchmark with more than one phase.
    """
    default = ",".join(map(str, levels))
    parser.add_argument("--concurrency", type=int_list, default=levels, metavar="C1,C2,...",
                        help=f"{scope}concurrency levels, each a number of concurrent workers (default {default})")
    parser.add_argument("--requests", type=int, default=requests, metavar="N", help=scope + requests_help)
    parser.add_argument("--tokens", type=int, default=64, help=f"{scope}tokens per stream (default 64)")
    parser.add_argument("--delay-ms", type=float, default=5.0,
                        help=f"{scope}backend pause between tokens (default 5)")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """--timeout, --no-pin, --seed and --json, the same in every benchmark."""
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds (default 60)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--seed", type=int, default=None, help="seed for the round order and start jitter")
    parser.add_argument("--json", metavar="PATH", help="write the raw numbers as JSON")


# --- this process ---------------------------------------------------------------------------------


def logger(name: str) -> Log:
    """A progress logger tagged with the benchmark's name; it writes to stderr, so stdout is the report alone."""
    def log(message: str) -> None:
        print(f"[{name}] {message}", file=sys.stderr, flush=True)
    return log


def raise_fd_limit() -> None:
    # 512 workers hold 1024 sockets here and as many in each child; children inherit the raised limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def machine(pins: Pins, pinning: str = PINNING) -> dict[str, Any]:
    """The machine as the report describes it; `pinning` is filled in with the proxy and mock CPUs."""
    if pins is None:
        described = f"none ({len(os.sched_getaffinity(0))} usable CPU(s); pinning needs 2)"
    else:
        described = pinning.format(proxy=pins[0], mock=pins[1])
    return {"nproc": os.cpu_count(), "usable_cpus": sorted(os.sched_getaffinity(0)), "cpu_model": cpu_model(),
            "python": sys.version.split()[0], "pinning": described}


def start_run(name: str, argv: list[str] | None, no_pin: bool, log: Log,
              pinning: str = PINNING) -> tuple[str, Pins, dict[str, Any]]:
    """Prepare this process for a run; return the command as typed, the CPU pins and the machine description.

    The order matters: the machine is described before pinning (which narrows what sched_getaffinity
    reports), and this process is pinned before any child or thread exists, so they all inherit the mask.
    """
    command = f"python -m {name} " + shlex.join(sys.argv[1:] if argv is None else argv)
    raise_fd_limit()
    # SIGTERM would otherwise end this process without its `finally`, orphaning the children
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    pins = None if no_pin else choose_cpus()
    info = machine(pins, pinning)
    if pins is not None:
        pin_self(pins[1])
    if no_pin:
        info["pinning"] = "none (--no-pin)"
    log(f"pinning: {info['pinning']}")
    return command, pins, info


# --- children -------------------------------------------------------------------------------------


def mock_service(args: argparse.Namespace, pins: Pins) -> Service:
    """The vLLM mock backend, pacing `--tokens` tokens `--delay-ms` apart, on the load generator's CPU."""
    return Service("mock-backend", ["mock-backend", "--dialect", "vllm", "--listen", f"{HOST}:0", "--model", "m",
                                    "--tokens", str(args.tokens), "--delay-ms", f"{args.delay_ms:g}"],
                   cpu=pins[1] if pins else None)


def proxy_service(name: str, config: str, pins: Pins) -> Service:
    """A proxy child serving `config`, on the proxy CPU."""
    return Service(name, ["serve", "--config", config, "--listen", f"{HOST}:0"], cpu=pins[0] if pins else None)


def start_proxies(configs: dict[str, str], pins: Pins, started: dict[str, Service]) -> None:
    """Start a `proxy-<name>` child per config, in order, into `started`.

    Each goes into `started` before it starts, so that the caller's `finally` stops every one that
    was launched even when a later one fails to come up.
    """
    for name, config in configs.items():
        started[name] = proxy_service(f"proxy-{name}", config, pins)
        started[name].start()


def proxy_config(mock_port: int) -> dict[str, Any]:
    """The least proxy config: the mock as its only backend and no access log (it would cost every path alike)."""
    return {"server": {"listen": f"{HOST}:0"}, "backends": [{"url": f"http://{HOST}:{mock_port}"}],
            "logging": {"access_log": "off"}}


def write_configs(directory: str, prefix: str, configs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Write each config as `<prefix>-<name>.yaml` in `directory`; return the paths by name."""
    paths = {}
    for name, config in configs.items():
        path = Path(directory) / f"{prefix}-{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        paths[name] = str(path)
    return paths


def chat_request(port: int, headers: dict[str, str] | None = None) -> bytes:
    """The streamed chat completion every benchmark sends, addressed to `port`."""
    return build_request(HOST, port, CHAT_PATH, BODY, headers)


def all_alive(services: Iterable[Service], where: str, log: Log) -> bool:
    """False, and says so, when a child has exited: later phases would only collect connection errors."""
    for service in services:
        if not service.alive():
            log(f"{service.name} exited during {where}; stopping")
            return False
    return True


def stop_children(services: list[Service | None]) -> str:
    """Stop the children in order and return their last output, each under a header with its exit status.

    Callers list proxies first, so that none sees its backend vanish mid-stream and logs errors that
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


# --- CPU and metrics of children -----------------------------------------------------------------


CLK_TCK = os.sysconf("SC_CLK_TCK")
SCHEDSTAT = os.path.exists("/proc/self/schedstat")  # kernels built without CONFIG_SCHEDSTATS lack it
CPU_SOURCE = "schedstat (ns)" if SCHEDSTAT else f"/proc/<pid>/stat ({1000 / CLK_TCK:g} ms ticks)"


def process_cpu_seconds(pids: Iterable[int]) -> float:
    """CPU time so far of every thread of `pids` together; NaN if one has gone (the run is failing anyway).

    From /proc/<pid>/task/*/schedstat, in nanoseconds, when the kernel has it: ticks of 10 ms are far too
    coarse for fractions of a millisecond per stream over a few hundred streams. Otherwise from the user +
    system ticks of /proc/<pid>/stat. Threads that exit drop out of the schedstat sum; the children here
    keep theirs for the whole run.
    """
    total = 0.0
    for pid in pids:
        total += _schedstat_seconds(pid) if SCHEDSTAT else _tick_seconds(pid)
    return total


def _schedstat_seconds(pid: int) -> float:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return math.nan
    total = 0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread exited meanwhile
    return total / 1e9


def _tick_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return math.nan
    fields = stat[stat.rindex(b")") + 2:].split()  # the command name may contain spaces or ')'
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime and stime, fields 14 and 15 of proc(5)


@dataclass
class Histogram:
    """A Prometheus histogram summed over its label sets: cumulative count per upper bound, sum and count."""

    buckets: dict[float, float] = field(default_factory=dict)
    sum: float = 0.0
    count: float = 0.0

    def minus(self, before: Histogram) -> Histogram:
        """What was observed between two scrapes (`before` the earlier one)."""
        return Histogram({le: n - before.buckets.get(le, 0.0) for le, n in self.buckets.items()},
                         self.sum - before.sum, self.count - before.count)

    def mean(self) -> float:
        return self.sum / self.count if self.count else math.nan

    def quantile(self, q: float) -> float:
        """The q-quantile (0..1), interpolated linearly within its bucket as Prometheus' histogram_quantile
        does; the highest finite bound when it falls in the +Inf bucket; NaN when empty."""
        bounds = sorted(self.buckets)
        if not self.count or not bounds:
            return math.nan
        cumulative = [self.buckets[le] for le in bounds]
        rank = q * cumulative[-1]
        i = bisect.bisect_left(cumulative, rank)
        if i >= len(bounds) or math.isinf(bounds[i]):
            return max((le for le in bounds if not math.isinf(le)), default=math.nan)
        lower, below = (bounds[i - 1], cumulative[i - 1]) if i else (0.0, 0.0)
        inside = cumulative[i] - below
        return lower + (bounds[i] - lower) * ((rank - below) / inside if inside else 1.0)


def parse_histograms(text: str, names: Iterable[str]) -> dict[str, Histogram]:
    """The histograms `names` found in a Prometheus text exposition (one not exported is left out)."""
    wanted = set(names)
    found: dict[str, Histogram] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        metric, _, labels = series.partition("{")
        for suffix in ("_bucket", "_sum", "_count"):
            name = metric.removesuffix(suffix)
            if name != metric and name in wanted:
                _add_sample(found.setdefault(name, Histogram()), suffix, labels, float(value))
    return found


def _add_sample(histogram: Histogram, suffix: str, labels: str, value: float) -> None:
    if suffix == "_sum":
        histogram.sum += value
    elif suffix == "_count":
        histogram.count += value
    else:
        le = float(labels.split('le="', 1)[1].split('"', 1)[0])  # float() reads "+Inf" too
        histogram.buckets[le] = histogram.buckets.get(le, 0.0) + value


# --- reporting ------------------------------------------------------------------------------------


def num(value: float | None, spec: str) -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, spec)


def ms(value: float | None) -> str:
    return num(value, ".3f")


def md_row(cells: Iterable[str]) -> str:
    """One row of a Markdown table."""
    return "| " + " | ".join(cells) + " |"


def report_head(name: str, command: str, info: dict[str, Any], machine_note: str = "",
                pinning_note: str = "") -> list[str]:
    """The first lines of every report: what was run, where, and how it was pinned."""
    return [f"## {name}", "", f"- command: `{command}`",
            f"- machine: nproc {info['nproc']}, {info['cpu_model']}, Python {info['python']}{machine_note}",
            f"- pinning: {info['pinning']}{pinning_note}"]


def foreign_load(cpu_s: dict[str, float], seconds: float, proxy_side: Iterable[str], mock_side: Iterable[str]) -> str:
    """How much of each pinned core went to processes other than ours, and to the hypervisor (steal).

    `proxy_side` and `mock_side` name our processes' CPU seconds in `cpu_s` on each core.
    """
    if "proxy_core_busy" not in cpu_s or not seconds:
        return "other load: unknown (not pinned)"
    proxy_other = cpu_s["proxy_core_busy"] - sum(cpu_s[name] for name in proxy_side)
    mock_other = cpu_s["mock_core_busy"] - sum(cpu_s[name] for name in mock_side)
    return (f"other processes on the proxies' core {max(proxy_other, 0) / seconds:.0%}, on the mock's core "
            f"{max(mock_other, 0) / seconds:.0%}; steal {cpu_s['proxy_core_steal'] / seconds:.0%} / "
            f"{cpu_s['mock_core_steal'] / seconds:.0%}")


def core_busy_text(busy: dict[str, float], proxies: Iterable[str], mock_core: dict[str, str]) -> str:
    """Our processes' shares of a core over the window: the proxies (total, then each), then those sharing
    the mock's core (`mock_core`: name in `busy` -> label), e.g. `core busy: proxies 9% (off 4%, on 5%),
    mock 6% + load generator 3%`."""
    return (f"core busy: proxies {busy['proxies']:.0%} (" + ", ".join(f"{px} {busy[px]:.0%}" for px in proxies)
            + "), " + " + ".join(f"{label} {busy[name]:.0%}" for name, label in mock_core.items()))


def stream_p50s(stream_ms: dict[str, dict[str, float]], paths: Iterable[str]) -> str:
    """Each path's median full-stream time, e.g. `stream p50 direct 335.969, off 341.840 ms`."""
    return "stream p50 " + ", ".join(f"{path} {ms(stream_ms[path].get('p50'))}" for path in paths) + " ms"


def level_failures(level: dict[str, Any], paths: Iterable[str]) -> list[tuple[str, dict[str, Any]]]:
    """(where, failures) of one summarised level: each path, then the warm-up."""
    where = f"c={level['concurrency']}"
    return [*((f"{where} {path}", level["errors"][path]) for path in paths),
            (f"{where} warm-up", level["warmup_errors"])]


def failure_lines(sources: Iterable[tuple[str, dict[str, Any]]]) -> str:
    """Each source that had failed streams, with its first few kinds of failure; empty when none failed."""
    lines = []
    for name, failures in sources:
        if failures["count"]:
            lines.append(f"- {name}: {failures['count']} failed streams, e.g.:")
            kinds = list(failures["kinds"].items())[:MAX_ERRORS_SHOWN]
            lines += [f"    {count} x {message}" for message, count in kinds]
    return "\n".join(lines)


def result_line(failed: list[str]) -> str:
    return "- result: " + ("all checks passed" if not failed else f"{len(failed)} check(s) FAILED (see stderr)")


def print_problems(failure: str | None, problems: str, failed: list[str], children_output: str) -> bool:
    """Print what went wrong to stderr, with the children's last output; True when anything did."""
    if not (failure or problems or failed):
        return False
    print("\n## Problems\n", file=sys.stderr)
    if failure:
        print(f"aborted: {failure}\n", file=sys.stderr)
    if problems:
        print(problems, file=sys.stderr)
    if failed:
        print("\n".join(f"- check failed: {line}" for line in failed), file=sys.stderr)
    print(f"\nLast output of the children:\n{children_output}", file=sys.stderr)
    return True


def write_json(path: str | None, document: dict[str, Any], log: Log) -> None:
    """Write the raw numbers when --json was given; NaN becomes null."""
    if path:
        Path(path).write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
        log(f"raw numbers written to {path}")
