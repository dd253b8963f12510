"""Instructions per request and per event, counted by callgrind: performance measured without noise.

    python -m bench.instructions [--requests 100] [--warmup 10] [--repeat 2] [--nginx auto|off]
                                 [--baseline PATH] [--update-baseline] [--tree DIR] [--json out.json]

Starts the mock backend natively and the proxy under `valgrind --tool=callgrind` with collection off, warms
it up, then drives a fixed workload from this process, one request at a time on one keep-alive connection so
that the count is the same every run: `--requests` requests of each shape (SHAPES), each counted in a dump of
its own. The proxy runs twice, with metering on (the default) and off (`usage: {metering: false}`); nginx, as
the reference, once. Every proxy run is repeated (`--repeat`, a fresh process each time) and the spread of the
counts reported. The counts are compared with a committed baseline (bench/instructions_baseline.json).
See bench/README.md for what the figures are and how the phases are derived.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.callgrind import Collector, Profile, callgrind_argv, find_valgrind, real_python
from bench.harness import CHAT_PATH, HOST, logger, mock_service, proxy_config, start_run, write_configs, write_json
from bench.instructions_report import TOP_FUNCTIONS, report, summarise
from bench.loadgen import build_request
from bench.nginx import CONFIG as NGINX_CONFIG
from bench.nginx import find_nginx, free_port
from bench.procs import REPO_ROOT, Service

BASELINE = REPO_ROOT / "bench" / "instructions_baseline.json"
START_TIMEOUT_S = 240.0  # the proxy imports everything under valgrind before its banner: ~20x slower
STOP_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 60.0
# An idle proxy still runs its timers (the deadline tick and the pool sweep, each once a second: ~20,000
# instructions a second under callgrind), and a shape's count includes them for as long as it runs, which
# follows the machine's load. So each process's idle rate is counted over this long (some 20 ticks), and
# subtracted for each shape's wall time.
IDLE_S = 10.0
TARGETS = ("metering_on", "metering_off")  # the proxy's two configs; nginx is the third target
log = logger("bench.instructions")


@dataclass(frozen=True)
class Shape:
    """One kind of request: streamed or not, how many tokens, and how the mock paces them."""

    stream: bool
    tokens: int
    delay_ms: float
    about: str
    model: str = "m"
    status: int = 200  # what the proxy must answer


# The paced stream's 20 ms leave the proxy time to relay each event before the next arrives even under
# callgrind (~50x slower, 2-3 ms an event) on a busy core, so each event is one read of its own, every run.
SHAPES = {
    "stream64": Shape(True, 64, 0, "64-token stream, all in one write"),
    "stream1": Shape(True, 1, 0, "1-token stream, all in one write"),
    "paced8": Shape(True, 8, 20, "8-token stream, one event every 20 ms"),
    "json": Shape(False, 64, 0, "non-streaming JSON answer (64 tokens)"),
    # parsed and routed, then answered by the proxy itself: no upstream request, no relay
    "local404": Shape(True, 1, 0, "a stream for a model nobody serves: the proxy's own 404", "nobody-serves-this", 404),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100, help="measured requests per shape (default 100)")
    parser.add_argument("--warmup", type=int, default=10, help="uncounted requests per shape first (default 10)")
    parser.add_argument("--idle-seconds", type=float, default=IDLE_S,
                        help=f"how long each process is counted idle, for the background (default {IDLE_S:g})")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each proxy config, for the spread (default 2)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--nginx", choices=("auto", "off"), default="auto", help="nginx as reference (default auto)")
    parser.add_argument("--baseline", default=str(BASELINE), help="the baseline to compare with")
    parser.add_argument("--update-baseline", action="store_true", help="write this run's counts as the baseline")
    parser.add_argument("--tree", default=str(REPO_ROOT), help="the checkout whose proxy is measured")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--json", metavar="PATH", help="write the raw numbers as JSON")
    args = parser.parse_args(argv)
    args.shapes = [name.strip() for name in args.shapes.split(",") if name.strip()]
    unknown = [name for name in args.shapes if name not in SHAPES]
    if unknown or not args.shapes or min(args.requests, args.repeat) < 1 or args.warmup < 0 or args.idle_seconds <= 0:
        parser.error(f"unknown shapes {unknown}" if unknown else
                     "--requests and --repeat must be >= 1, --warmup >= 0, --idle-seconds > 0")
    return args


# --- the client -----------------------------------------------------------------------------------


class Client:
    """One blocking keep-alive HTTP/1.1 connection: one request at a time, each response read to its end."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=REQUEST_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def exchange(self, payload: bytes) -> tuple[int, bytes]:
        """Send `payload`; return the status and the (de-chunked) body."""
        self.sock.sendall(payload)
        head = self._until(b"\r\n\r\n")
        status = int(head[9:12])
        fields = {line.split(b":", 1)[0].strip().lower(): line.split(b":", 1)[1].strip()
                  for line in head.split(b"\r\n")[1:] if b":" in line}
        if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
            return status, self._chunked()
        return status, self._exactly(int(fields.get(b"content-length", b"0")))

    def _chunked(self) -> bytes:
        body = []
        while True:
            size = int(self._until(b"\r\n").split(b";", 1)[0], 16)
            if size == 0:
                self._until(b"\r\n")  # no trailers: the empty line
                return b"".join(body)
            body.append(self._exactly(size))
            self._exactly(2)

    def _until(self, marker: bytes) -> bytes:
        while (end := self.buf.find(marker)) < 0:
            self._fill()
        found, self.buf = self.buf[:end], self.buf[end + len(marker):]
        return found

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        found, self.buf = self.buf[:n], self.buf[n:]
        return found

    def _fill(self) -> None:
        data = self.sock.recv(262144)
        if not data:
            raise RuntimeError("connection closed mid-response")
        self.buf += data


def shape_request(port: int, shape: Shape) -> bytes:
    body = {"model": shape.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": shape.tokens}
    if shape.stream:
        body["stream"] = True
    return build_request(HOST, port, CHAT_PATH, orjson.dumps(body),
                         {"x-mock-tokens": str(shape.tokens), "x-mock-delay-ms": f"{shape.delay_ms:g}"})


def check(status: int, body: bytes, shape: Shape) -> int:
    """The response's SSE events (1 for a JSON answer or a local error); RuntimeError if it is not a whole answer
    with the status the shape expects."""
    if status != shape.status:
        raise RuntimeError(f"status {status}, expected {shape.status}: {body[:300]!r}")
    if status != 200:
        return 1
    if shape.stream:
        if not body.rstrip().endswith(b"data: [DONE]"):
            raise RuntimeError(f"stream without a final data: [DONE]: ...{body[-200:]!r}")
        return body.count(b"data:")
    if b'"choices"' not in body:
        raise RuntimeError(f"not a chat completion: {body[:300]!r}")
    return 1


def drive(client: Client, payload: bytes, shape: Shape, count: int) -> int:
    """`count` requests, one after the other; the events of the last."""
    events = 0
    for _ in range(count):
        events = check(*client.exchange(payload), shape)
    return events


# --- the targets ----------------------------------------------------------------------------------


def proxy_under_callgrind(name: str, config: str, out_dir: Path, tree: str, cpu: int | None) -> Service:
    service = Service(name, [], cpu)
    service.argv = callgrind_argv(out_dir, [real_python(), "-m", "llmproxy", "serve", "--config", config,
                                            "--listen", f"{HOST}:0"])
    service.start(timeout=START_TIMEOUT_S, cwd=tree)
    return service


def nginx_under_callgrind(binary: str, directory: Path, upstream_port: int, cpu: int | None) -> Service:
    """nginx as bench.nginx configures it, but one process (master_process off) so that callgrind sees it all."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (directory / "nginx.conf").write_text(NGINX_CONFIG.format(
        dir=directory, host=HOST, port=port, upstream_port=upstream_port, connections=1024, nofile=4096,
        keepalive=16))
    service = Service("nginx", [], cpu)
    service.port = port  # no banner: set before spawn, which turns the scan off
    service.argv = callgrind_argv(directory, [binary, "-p", str(directory), "-c", str(directory / "nginx.conf"),
                                              "-e", str(directory / "error.log"),
                                              "-g", "daemon off; master_process off;"])
    service.spawn(cwd=directory)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _accepts(port):
        if not service.alive() or time.monotonic() > deadline:
            service.stop()
            raise RuntimeError(f"nginx under callgrind did not start:\n{service.output()}")
        time.sleep(0.2)
    return service


def _accepts(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1.0).close()
        return True
    except OSError:
        return False


def measure(service: Service, out_dir: Path, shapes: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Warm `service` up, count each shape, then its idle background; {shape: {"ir", "raw_ir", "events", ...}}.

    The warm-up runs twice: before instrumentation is on, then once more (two requests a shape, counted and
    thrown away) after, since the first window counted after switching it on carries one-off costs.
    """
    client = Client(service.port)
    try:
        payloads = {name: shape_request(service.port, SHAPES[name]) for name in shapes}

        def warm(count: int) -> None:
            for name in shapes:
                drive(client, payloads[name], SHAPES[name], count)

        warm(args.warmup)
        collector = Collector(service.pid, out_dir)
        collector.start()
        collector.measure(lambda: warm(2))
        profiles: dict[str, tuple[Profile, int]] = {}
        for name in shapes:
            events: list[int] = []
            profile = collector.measure(lambda name=name, events=events: events.append(
                drive(client, payloads[name], SHAPES[name], args.requests)))
            profiles[name] = (profile, events[0])
        idle = collector.measure(lambda: time.sleep(args.idle_seconds))
        background = idle.total / idle.seconds
        counted: dict[str, Any] = {}
        for name, (profile, events_per_request) in profiles.items():
            counted[name] = {"ir": profile.total - background * profile.seconds, "raw_ir": profile.total,
                             "seconds": profile.seconds, "background_per_s": background,
                             "events": events_per_request, "by_object": profile.by_object(),
                             "top": profile.top(TOP_FUNCTIONS)}
            log(f"  {service.name} {name}: {counted[name]['ir'] / args.requests:,.0f} instructions a request "
                f"({background * profile.seconds / args.requests:,.0f} of background subtracted)")
        return counted
    finally:
        client.close()


def run_target(name: str, start: Callable[[Path], Service], tmp: Path, args: argparse.Namespace,
               shapes: list[str]) -> dict[str, Any]:
    """Start a target under callgrind in a directory of its own, measure `shapes` on it, stop it."""
    out_dir = tmp / name
    out_dir.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    service = start(out_dir)
    log(f"{name}: started under callgrind in {time.monotonic() - began:.0f}s (pid {service.pid})")
    try:
        return measure(service, out_dir, shapes, args)
    finally:
        service.stop(timeout=STOP_TIMEOUT_S)


def proxy_configs(mock_port: int) -> dict[str, dict[str, Any]]:
    """Metering on (the default) and off; no periodic probes, whose count would follow the run's wall time, and
    no idle connection closed by the pool (the idle window is longer than its default idle_timeout of 4 s)."""
    configs = {}
    for target in TARGETS:
        config = proxy_config(mock_port)
        config["health_check"] = {"interval": 3600, "models_interval": 3600}
        config["backends"][0]["idle_timeout"] = "1h"
        if target == "metering_off":
            config["usage"] = {"metering": False}
        configs[target] = config
    return configs


def run_all(args: argparse.Namespace, tmp: Path, pins: tuple[int, int] | None) -> dict[str, Any]:
    mock_args = argparse.Namespace(tokens=64, delay_ms=0.0)
    mock = mock_service(mock_args, pins)
    proxy_cpu = pins[0] if pins else None
    runs: dict[str, list[dict[str, Any]]] = {target: [] for target in TARGETS}
    nginx_runs: list[dict[str, Any]] = []
    try:
        mock_port = mock.start()
        configs = write_configs(str(tmp), "instructions", proxy_configs(mock_port))
        for run in range(args.repeat):
            for target in TARGETS:
                runs[target].append(run_target(
                    f"{target}-{run + 1}",
                    lambda out, t=target: proxy_under_callgrind(f"proxy-{t}", configs[t], out, args.tree, proxy_cpu),
                    tmp, args, args.shapes))
        binary = find_nginx() if args.nginx == "auto" else None
        nginx_shapes = [name for name in args.shapes if SHAPES[name].status == 200]  # it answers nothing itself
        if binary and nginx_shapes:
            def start_nginx(out: Path) -> Service:
                return nginx_under_callgrind(binary, out, mock_port, proxy_cpu)
            for run in range(args.repeat):
                nginx_runs.append(run_target(f"nginx-{run + 1}", start_nginx, tmp, args, nginx_shapes))
    finally:
        mock.stop()
    nginx_note = ("off (--nginx off)" if args.nginx == "off" else "not installed; skipped" if not nginx_runs
                  else "nginx " + _nginx_version(find_nginx()))
    return {"runs": runs, "nginx_runs": nginx_runs, "nginx": nginx_note}


def _nginx_version(binary: str | None) -> str:
    if not binary:
        return "?"
    result = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    return (result.stderr or result.stdout).strip().rsplit("/", 1)[-1]


def load_baseline(path: str) -> dict[str, Any] | None:
    try:
        return orjson.loads(Path(path).read_bytes())
    except FileNotFoundError:
        return None


def git_commit(tree: str) -> str:
    result = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            timeout=10)
    return result.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if find_valgrind() is None:
        print("bench.instructions needs valgrind (callgrind and callgrind_control): apt-get install valgrind",
              file=sys.stderr)
        return 2
    os.environ["PYTHONHASHSEED"] = "0"  # the children's str hashes, and so their dicts' layouts, are the same every run
    started = time.monotonic()
    command, pins, info = start_run("bench.instructions", argv, args.no_pin, log)
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        measured = run_all(args, Path(tmp), pins)
    baseline = load_baseline(args.baseline)
    result = summarise(measured, args, baseline)
    result.update(command=command, machine=info, commit=git_commit(args.tree), wall_s=time.monotonic() - started,
                  valgrind=subprocess.run(["valgrind", "--version"], capture_output=True, text=True,
                                          timeout=10).stdout.strip())
    result["baseline_entry"]["commit"] = result["commit"]
    print(report(result, {name: SHAPES[name].about for name in args.shapes}), flush=True)
    if args.update_baseline:
        Path(args.baseline).write_bytes(orjson.dumps(result["baseline_entry"], option=orjson.OPT_INDENT_2) + b"\n")
        log(f"baseline written to {args.baseline}")
    write_json(args.json, result, log)
    log(f"run time {result['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
