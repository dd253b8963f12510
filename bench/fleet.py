"""Balancing strategies on a coding agent's trace over four prefix-caching backends, in one run.

    python -m bench.fleet [--sessions 64] [--turns 10,30] [--strategies ...] [--repeats 1] [--kill-at 0.4]
                          [--json out.json] [--plot out.png]

Starts four vLLM mocks with the prefix-cache model (each caching a third of the trace's working set at its peak, and
taking --prefill-us per prompt token it does not find cached before its first byte) and one proxy per strategy
in front of all four. Then, one strategy at a time (in a random order; each phase starts with every mock's
cache flushed), it plays the same trace through that strategy's proxy: sessions of a coding agent arriving
together, each a conversation resent whole every turn and growing by a few thousand characters a turn
(bench/fleet_trace.py). It records every turn's time to first token, the prefix-cache hits (the mocks' header
and counters), the backend that served it (the proxy's access log) and, every --sample-ms, each backend's
in-flight requests (the proxy's /health). Last, the kill phase: the trace again through prefix_affinity, with
one mock killed (SIGKILL) part way, to see which sessions move. The proxies run on one CPU; the mocks and
this load generator share the other. bench/README.md says how to read the report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvloop

from bench.fleet_report import error_report, report
from bench.fleet_stats import analyse, headline
from bench.fleet_trace import MODEL, Shape, Trace, describe, make_trace
from bench.harness import (
    CHAT_PATH,
    HOST,
    Pins,
    add_run_args,
    logger,
    print_problems,
    process_cpu_seconds,
    proxy_service,
    start_run,
    stop_children,
    write_configs,
    write_json,
)
from bench.interleave import cpu_delta, gc_paused
from bench.loadgen import Lane, StreamClient, build_request, exchange, fetch_json, http_get
from bench.procs import Service, pinned_core_seconds, self_cpu_seconds

STRATEGIES = ("round_robin", "least_connections", "latency_based", "queue_depth", "prefix_affinity")
AFFINITY = "prefix_affinity"
PINNING = "proxies on CPU {proxy}; the four mock backends + load generator on CPU {mock}"
HIT_HEADER = b"\r\nx-mock-prefix-cache-hit-tokens:"
ATTEMPTS = 3  # a failed turn is sent again (as an agent would) this many times in all, then the session gives up
RETRY_PAUSE_S = 0.05
WARMUP_REQUESTS = 16  # per proxy, before the first phase: every proxy opens connections to every backend

log = logger("bench.fleet")


# --- command line ---------------------------------------------------------------------------------


def pair(kind: type) -> Any:
    """argparse type: `A,B` (or one value for both), A <= B."""
    def parse(value: str) -> tuple[Any, Any]:
        try:
            parts = [kind(part) for part in value.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected N or N,M, got {value!r}") from None
        if len(parts) == 1:
            parts *= 2
        if len(parts) != 2 or parts[0] > parts[1] or parts[0] < 0:
            raise argparse.ArgumentTypeError(f"expected N or N,M with 0 <= N <= M, got {value!r}")
        return parts[0], parts[1]
    return parse


def strategy_list(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in STRATEGIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown strategies {', '.join(unknown) or value!r}; expected some of "
                                         f"{', '.join(STRATEGIES)}")
    return [name for name in STRATEGIES if name in names]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--sessions", type=int, default=64, help="concurrent conversations (default 64)")
    add("--turns", type=pair(int), default=(10, 30), metavar="MIN,MAX", help="turns per session (default 10,30)")
    add("--growth", type=pair(int), default=(1500, 3500), metavar="MIN,MAX",
        help="characters a turn adds to the conversation: the answer and the next user message (default 1500,3500)")
    add("--system-chars", type=int, default=3000, help="the shared system prompt (default 3000 characters)")
    add("--first-chars", type=int, default=1500, help="each session's first user message (default 1500)")
    add("--think-ms", type=pair(float), default=(100.0, 400.0), metavar="MIN,MAX",
        help="pause between a stream's end and the next turn (default 100,400)")
    add("--stagger-s", type=float, default=2.0, help="sessions start within this many seconds (default 2)")
    add("--max-tokens", type=int, default=16, help="tokens per answer (default 16)")
    add("--delay-ms", type=float, default=8.0, help="the mocks' pause between tokens (default 8)")
    add("--backends", type=int, default=4, help="mock backends (default 4)")
    add("--cache-share", type=float, default=1 / 3,
        help="each mock's prefix cache, as a share of the trace's working set at its peak: the live "
             "conversations' prompts at the busiest turn (default 1/3)")
    # A 7B model prefills some 15-30k tokens/s on one datacenter GPU (33-66 us a token), and the trace's words
    # are ~8 characters a token where code is 3-4: 25 us is at the low end of what a real engine charges.
    add("--prefill-us", type=float, default=25.0,
        help="the mocks' first-byte delay per prompt token not found in cache, µs (default 25)")
    add("--base-ttft-ms", type=float, default=2.0, help="the mocks' first-byte delay of every request (default 2)")
    add("--strategies", type=strategy_list, default=list(STRATEGIES), metavar="S1,S2",
        help=f"the strategies to compare (default all: {', '.join(STRATEGIES)})")
    add("--epsilon", type=float, default=0.25, help="prefix_affinity's bounded-load slack (default 0.25)")
    add("--session-header", action="store_true",
        help="send each session's id as x-session-id (default: none; prefix_affinity keys on the conversation's "
             "first user message)")
    add("--repeats", type=int, default=1, help="phases per strategy, each round in a new random order (default 1)")
    add("--kill-at", type=float, default=0.4,
        help="the kill phase: kill one mock this far into the trace, as a share of the prefix_affinity phase's "
             "duration (default 0.4; 0 skips the kill phase)")
    add("--kill-tail-s", type=float, default=5.0,
        help="the kill phase ends this long after the kill: no turn starts later (default 5)")
    add("--sample-ms", type=float, default=20.0, help="in-flight sampling period (default 20)")
    add("--plot", metavar="PATH", help="write the TTFT CDF per strategy as a PNG (needs matplotlib)")
    add_run_args(parser)
    args = parser.parse_args(argv)
    if (args.sessions < 1 or args.turns[0] < 1 or args.backends < 2 or args.repeats < 1 or args.max_tokens < 1
            or args.cache_share <= 0 or not 0 <= args.kill_at < 1 or args.kill_tail_s <= 0 or args.sample_ms <= 0
            or args.epsilon < 0):
        parser.error("--sessions, --turns, --repeats and --max-tokens must be >= 1, --backends >= 2, --cache-share "
                     "> 0, --kill-at in [0, 1), --kill-tail-s and --sample-ms > 0, --epsilon >= 0")
    if args.seed is None:
        args.seed = random.randrange(1 << 32)  # drawn here, so the report can name it
    return args


def shape(args: argparse.Namespace) -> Shape:
    return Shape(args.sessions, args.turns, args.growth, args.system_chars, args.first_chars, args.think_ms,
                 args.stagger_s)


# --- the client: one keep-alive connection per session --------------------------------------------


class HitClient(StreamClient):
    """StreamClient that also reads the mock's prefix-cache hit header (the proxy passes it on)."""

    def _reset(self) -> None:
        super()._reset()
        self.hit_tokens = -1

    def _head(self, head: bytes) -> None:
        super()._head(head)
        at = head.lower().find(HIT_HEADER)
        if at >= 0:
            end = head.find(b"\r\n", at + len(HIT_HEADER))
            with contextlib.suppress(ValueError):
                self.hit_tokens = int(head[at + len(HIT_HEADER):end if end >= 0 else None])


class SessionLane(Lane):
    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        _, self._client = await loop.create_connection(HitClient, self.host, self.port)

    @property
    def hit_tokens(self) -> int:
        client = self._client
        return client.hit_tokens if isinstance(client, HitClient) else -1


@dataclass(slots=True)
class Turn:
    """One request of a session, as the client saw it (the backend is filled in from the access log)."""

    id: str  # its X-Request-Id
    session: int
    turn: int
    attempt: int
    start_s: float  # from the phase's start
    ok: bool
    ttft_ms: float
    total_ms: float
    hit_tokens: int
    prompt_chars: int
    error: str | None = None
    backend: str | None = None
    status: int | None = None  # as the proxy logged it
    retries: int | None = None  # the proxy's further attempts on other backends (a dead backend's connect error)


# --- environment ----------------------------------------------------------------------------------


@dataclass
class Env:
    args: argparse.Namespace
    trace: Trace
    mocks: list[Service]
    proxies: dict[str, Service]
    logs: dict[str, Path]  # each proxy's access log
    pins: Pins
    dead: set[int] = field(default_factory=set)  # indexes of killed mocks

    def live_mocks(self) -> list[tuple[str, Service]]:
        return [(backend_name(i), mock) for i, mock in enumerate(self.mocks) if i not in self.dead]

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the proxies together, each mock and this process, and of the two cores."""
        # per mock: a killed one reads NaN from then on, and the report sums the others
        mocks = {f"mock_{backend_name(i)}": process_cpu_seconds([m.pid]) for i, m in enumerate(self.mocks)}
        return {"proxies": process_cpu_seconds(p.pid for p in self.proxies.values()), **mocks,
                "loadgen": self_cpu_seconds(), **pinned_core_seconds(self.pins)}


def backend_name(i: int) -> str:
    return f"b{i}"


def mock_service(i: int, args: argparse.Namespace, cache_tokens: int, pins: Pins) -> Service:
    return Service(f"mock-{backend_name(i)}", [
        "mock-backend", "--dialect", "vllm", "--listen", f"{HOST}:0", "--model", MODEL,
        "--tokens", str(args.max_tokens), "--delay-ms", f"{args.delay_ms:g}",
        "--prefix-cache-tokens", str(cache_tokens), "--prefill-us-per-token", f"{args.prefill_us:g}",
        "--base-ttft-ms", f"{args.base_ttft_ms:g}"], cpu=pins[1] if pins else None)


def proxy_config(strategy: str, ports: list[int], access_log: Path, epsilon: float) -> dict[str, Any]:
    routing: dict[str, Any] = {"load_balance": strategy}
    if strategy == AFFINITY:
        routing["prefix_affinity"] = {"epsilon": epsilon}
    return {"server": {"listen": f"{HOST}:0"},
            "backends": [{"name": backend_name(i), "url": f"http://{HOST}:{port}", "type": "vllm"}
                         for i, port in enumerate(ports)],
            "routing": routing, "logging": {"access_log": str(access_log)}}


async def post(port: int, path: str) -> bytes:
    request = f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    head, body = await exchange(HOST, port, request.encode())
    if not head.startswith(b"HTTP/1.1 200"):
        status_line = head.split(b"\r\n", 1)[0]
        raise RuntimeError(f"POST {path} on :{port}: {status_line!r}")
    return body


# --- one phase: the whole trace through one proxy -------------------------------------------------


async def run_session(env: Env, session_index: int, port: int, tag: str, t0: float, turns: list[Turn],
                      until: float | None = None) -> None:
    """Play one session: its turns in order, each after the previous stream ended and the session's pause; no
    turn starts later than `until` seconds into the phase, if given."""
    args, trace = env.args, env.trace
    session = trace.sessions[session_index]
    await asyncio.sleep(session.start_s)
    lane = SessionLane(HOST, port, b"", args.timeout)
    try:
        for turn in range(session.turns):
            if until is not None and time.perf_counter() - t0 > until:
                return
            body = session.body(trace.system, turn, args.max_tokens)
            for attempt in range(ATTEMPTS):
                rid = f"{tag}-s{session.id}-t{turn}-a{attempt}"
                headers = {"x-request-id": rid}
                if args.session_header:
                    headers["x-session-id"] = f"session-{session.id}"
                lane.payload = build_request(HOST, port, CHAT_PATH, body, headers)
                start = time.perf_counter() - t0
                result = await lane.send()
                turns.append(Turn(rid, session.id, turn, attempt, start, result.ok, result.ttft_ns / 1e6,
                                  result.total_ns / 1e6, lane.hit_tokens, session.prompt_chars(trace.system, turn),
                                  result.error))
                if result.ok:
                    break
                await asyncio.sleep(RETRY_PAUSE_S)
            else:
                return  # the session gives up
            await asyncio.sleep(session.think_s[turn])
    finally:
        lane.close()


async def sample_inflight(port: int, t0: float, period: float, samples: list[dict[str, Any]],
                          stop: asyncio.Event) -> int:
    """Every `period`, each backend's in-flight requests as the proxy's /health reports them; return the number
    of failed reads."""
    failures = 0
    while not stop.is_set():
        try:
            doc = orjson.loads(await http_get(HOST, port, "/health"))
            samples.append({"t": time.perf_counter() - t0,
                            "inflight": {b["name"]: b["inflight"] for b in doc["upstreams"]},
                            "available": [b["name"] for b in doc["upstreams"] if b["available"]]})
        except (OSError, RuntimeError, asyncio.TimeoutError, orjson.JSONDecodeError, KeyError):
            failures += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), period)
    return failures


async def prepare_mocks(env: Env) -> None:
    """Every live mock's prefix cache emptied and its counters zeroed: each phase starts cold."""
    for _, mock in env.live_mocks():
        await post(mock.port, "/_mock/flush-cache")
        await post(mock.port, "/_mock/reset-stats")


async def mock_counters(env: Env) -> dict[str, dict[str, int]]:
    out = {}
    for name, mock in env.live_mocks():
        stats = await fetch_json(HOST, mock.port, "/_mock/stats")
        assert isinstance(stats, dict)
        out[name] = {key: stats[key] for key in ("requests_total", "prefix_cache_queries_total",
                                                  "prefix_cache_hits_total")}
    return out


def read_access_log(path: Path, offset: int, tag: str) -> dict[str, dict[str, Any]]:
    """This phase's lines of a proxy's access log (from byte `offset`), by the client's request id."""
    out = {}
    with open(path, "rb") as f:
        f.seek(offset)
        for line in f:
            with contextlib.suppress(orjson.JSONDecodeError):
                record = orjson.loads(line)
                rid = record.get("client_request_id")
                if isinstance(rid, str) and rid.startswith(tag + "-"):
                    out[rid] = record
    return out


async def kill_mock(env: Env, index: int, after_s: float, t0: float, when: dict[str, float]) -> None:
    await asyncio.sleep(after_s)
    os.kill(env.mocks[index].pid, signal.SIGKILL)
    env.dead.add(index)
    when["t"] = time.perf_counter() - t0
    log(f"killed mock {backend_name(index)} (pid {env.mocks[index].pid}) at {when['t']:.2f}s")


async def run_phase(env: Env, strategy: str, tag: str, kill: tuple[int, float] | None = None) -> dict[str, Any]:
    """The whole trace through `strategy`'s proxy; with `kill` (mock index, seconds), that mock dies part way and
    the phase ends --kill-tail-s later (no turn starts after that)."""
    proxy, access_log = env.proxies[strategy], env.logs[strategy]
    await prepare_mocks(env)
    offset = access_log.stat().st_size
    turns: list[Turn] = []
    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()
    killed: dict[str, float] = {}
    with gc_paused():
        cpu0, t0 = env.cpu(), time.perf_counter()
        sampler = asyncio.ensure_future(sample_inflight(proxy.port, t0, env.args.sample_ms / 1000, samples, stop))
        killer = asyncio.ensure_future(kill_mock(env, kill[0], kill[1], t0, killed)) if kill else None
        until = kill[1] + env.args.kill_tail_s if kill else None
        await asyncio.gather(*(run_session(env, i, proxy.port, tag, t0, turns, until)
                               for i in range(len(env.trace.sessions))))
        elapsed = time.perf_counter() - t0
        cpu1 = env.cpu()
        stop.set()
        sample_failures = await sampler
        if killer is not None and not killer.done():
            killer.cancel()  # the trace ended before the kill
    counters = await mock_counters(env)
    logged = read_access_log(access_log, offset, tag)
    for turn in turns:
        record = logged.get(turn.id)
        if record is not None:
            turn.backend, turn.status, turn.retries = record.get("backend"), record.get("status"), record.get("retries")
    turns.sort(key=lambda t: t.start_s)
    ok = sum(t.ok for t in turns)
    log(f"{tag} {strategy}: {len(turns)} requests ({len(turns) - ok} failed) in {elapsed:.1f}s")
    return {"strategy": strategy, "tag": tag, "seconds": elapsed, "cpu_s": cpu_delta(cpu1, cpu0),
            "turns": [turn_row(t) for t in turns], "samples": samples, "sample_failures": sample_failures,
            "mocks": counters, "killed": ({"backend": backend_name(kill[0]), "at_s": killed.get("t")}
                                          if kill else None),
            "unlogged": sum(1 for t in turns if t.backend is None)}


def turn_row(turn: Turn) -> dict[str, Any]:
    return {"id": turn.id, "session": turn.session, "turn": turn.turn, "attempt": turn.attempt,
            "start_s": round(turn.start_s, 4), "ok": turn.ok, "ttft_ms": round(turn.ttft_ms, 3),
            "total_ms": round(turn.total_ms, 3), "hit_tokens": turn.hit_tokens, "prompt_chars": turn.prompt_chars,
            "backend": turn.backend, "status": turn.status, "retries": turn.retries, "error": turn.error}


# --- the run --------------------------------------------------------------------------------------


async def warm_up(env: Env) -> None:
    """A few short requests through every proxy, so each has connections open to every backend; then the
    caches are flushed by the first phase."""
    payload_body = orjson.dumps({"model": MODEL, "stream": True, "max_tokens": 1,
                                 "messages": [{"role": "user", "content": "warm up"}]})
    for proxy in env.proxies.values():
        lanes = [SessionLane(HOST, proxy.port, build_request(HOST, proxy.port, CHAT_PATH, payload_body,
                                                             {"x-session-id": f"warm-{i}"}), env.args.timeout)
                 for i in range(WARMUP_REQUESTS)]
        try:
            results = await asyncio.gather(*(lane.send() for lane in lanes))
        finally:
            for lane in lanes:
                lane.close()
        failed = [r.error for r in results if not r.ok]
        if failed:
            raise RuntimeError(f"warm-up through {proxy.name} failed: {failed[0]}")


def schedule(strategies: list[str], repeats: int, rng: random.Random) -> list[str]:
    """Every strategy once a round, each round in a new random order."""
    order = []
    for _ in range(repeats):
        round_ = list(strategies)
        rng.shuffle(round_)
        order += round_
    return order


async def run_all(env: Env, order: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"phases": [], "kill": None}
    await warm_up(env)
    for n, strategy in enumerate(order):
        out["phases"].append(await run_phase(env, strategy, f"p{n}"))
    if env.args.kill_at > 0:
        affinity = [p["seconds"] for p in out["phases"] if p["strategy"] == AFFINITY]
        reference = affinity[-1] if affinity else max(p["seconds"] for p in out["phases"]) if out["phases"] else 10.0
        victim = len(env.mocks) - 1
        out["kill"] = await run_phase(env, AFFINITY, "kill", (victim, env.args.kill_at * reference))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command, pins, info = start_run("bench.fleet", argv, args.no_pin, log, pinning=PINNING)
    trace = make_trace(shape(args), args.seed)
    peak, final = trace.working_set_tokens()
    cache_tokens = int(peak * args.cache_share)
    setup = {"trace": describe(trace, shape(args)), "working_set_tokens": peak, "final_working_set_tokens": final,
             "cache_tokens": cache_tokens, "backends": args.backends, "seed": args.seed}
    log(f"trace: {setup['trace']['sessions']} sessions, {trace.requests} requests, working set at its peak {peak:,} "
        f"tokens ({final:,} at the end); each mock caches {cache_tokens:,}")
    order = schedule(args.strategies, args.repeats, random.Random(args.seed))
    proxied = list(dict.fromkeys([*args.strategies, *([AFFINITY] if args.kill_at > 0 else [])]))
    mocks = [mock_service(i, args, cache_tokens, pins) for i in range(args.backends)]
    proxies: dict[str, Service] = {}
    result: dict[str, Any] = {"phases": [], "kill": None}
    failure = None
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        logs = {strategy: Path(tmp) / f"access-{strategy}.log" for strategy in proxied}
        try:
            ports = [mock.start() for mock in mocks]
            configs = write_configs(tmp, "fleet", {s: proxy_config(s, ports, logs[s], args.epsilon) for s in proxied})
            for strategy in proxied:
                proxies[strategy] = proxy_service(f"proxy-{strategy}", configs[strategy], pins)
                proxies[strategy].start()
                logs[strategy].touch()
            log("order: " + ", ".join(order) + (", then the kill phase" if args.kill_at > 0 else ""))
            env = Env(args, trace, mocks, proxies, logs, pins)
            result = uvloop.run(run_all(env, order))
        except (RuntimeError, OSError) as exc:
            failure = str(exc)
        finally:
            children_output = stop_children([*proxies.values(), *mocks])
    figures = analyse(result, trace, args)
    print(report(command, info, args, setup, order, figures), flush=True)
    if args.plot and figures["strategies"]:
        from bench.plots import fleet_ttft  # matplotlib only when a plot is asked for

        fleet_ttft(result, args.plot)
        log(f"plot written to {args.plot}")
    troubled = print_problems(failure, error_report(result), figures["failed"], children_output)
    write_json(args.json, {"command": command, "machine": info, "args": vars(args), "setup": setup, "order": order,
                           "headline": headline(figures), "figures": figures, **result}, log)
    return 1 if troubled else 0


if __name__ == "__main__":
    sys.exit(main())
