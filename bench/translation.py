"""The cost of API translation: a translated stream vs a passed-through one, through one proxy, in one run.

    python -m bench.translation [--concurrency 1,16] [--tokens 2000,64] [--requests 40] [--paths ...]
                                [--slices 2] [--slice-seconds 1.5] [--json out.json]

Starts one vLLM mock (serving both /v1/chat/completions and /v1/messages) and one proxy with two backend
entries pointing at it: "native" (type vllm, model m-native, every API served as it is) and "chat-only"
(type vllm, `apis: [chat]`, model m-chat: a Messages or Responses request for it is translated to a chat
request, and each chat chunk of the answer parsed and written out again as Messages / Responses events).
The proxy has one CPU; the mock and this load generator share the other. The paths (bench/README.md):

- messages-native: POST /v1/messages, m-native, passed through;
- messages-translated: POST /v1/messages, m-chat, translated to chat and back;
- chat-native: POST /v1/chat/completions, m-native, the reference every other API is compared with;
- responses-native / responses-translated: POST /v1/responses (store false), likewise.

Then:
1. first event at concurrency 1 (paced backend): rounds of one stream per path in random order;
2. events/s and proxy CPU per event: burst streams (no pacing) at each token count and concurrency,
   one path at a time, in slices alternating forward and backward through the paths;
3. checks: each path reached the mock on the path and model it should have, and every stream had the
   expected number of events and ended with message_stop / [DONE] / response.completed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvloop

from bench import interleave
from bench.harness import (
    HOST,
    Pins,
    add_run_args,
    all_alive,
    int_list,
    logger,
    print_problems,
    process_cpu_seconds,
    start_run,
    stop_children,
    write_configs,
    write_json,
)
from bench.interleave import Failures, Interleaving, Worker, close_workers, cpu_delta, gc_paused, open_workers, warm_up
from bench.loadgen import Lane, StreamClient, StreamResult, build_request, fetch_json
from bench.metering import syscalls
from bench.procs import Service, pinned_core_seconds, self_cpu_seconds
from bench.stats import summary_ms
from bench.translation_report import error_report, report

NATIVE_MODEL, CHAT_MODEL = "m-native", "m-chat"
EVENT = b"data:"
PINNING = "proxy on CPU {proxy}; mock backend + load generator on CPU {mock}"
# every request asks the mock to end with an EOS token: chat's finish_reason is then "stop", so a translated
# Responses stream ends with response.completed (after "length" it would be response.incomplete)
EOS = {"x-mock-eos": "1"}
PROBE_TOKENS = 4  # the stream per path whose upstream request is checked

log = logger("bench.translation")


@dataclass(frozen=True)
class Api:
    """How one client API is asked for a stream and how its stream must end."""

    path: str  # the client's request path
    extra_events: int  # `data:` events of a stream besides one per token
    tail: bytes  # what the stream must end with (at most 16 bytes: StreamClient keeps those)
    # the name line of the event that must be last and come exactly once (None: the tail says enough)
    marker: bytes | None

    def body(self, model: str, tokens: int) -> bytes:
        if self.path == "/v1/messages":
            doc: dict[str, Any] = {"model": model, "max_tokens": tokens, "stream": True,
                                   "messages": [{"role": "user", "content": "hi"}]}
        elif self.path == "/v1/responses":
            doc = {"model": model, "stream": True, "store": False, "input": "hi"}
        else:
            doc = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        return orjson.dumps(doc)


# message_start, content_block_start, the tokens, content_block_stop, message_delta, message_stop
MESSAGES = Api("/v1/messages", 5, b'message_stop"}\n\n', b"event: message_stop\n")
CHAT = Api("/v1/chat/completions", 2, b"data: [DONE]\n\n", None)  # role chunk, the tokens, [DONE]
# response.created, .in_progress, .output_item.added, .content_part.added, the tokens, .output_text.done,
# .content_part.done, .output_item.done, .completed
RESPONSES = Api("/v1/responses", 8, b"}\n\n", b"event: response.completed\n")


@dataclass(frozen=True)
class Route:
    name: str
    api: Api
    model: str
    reference: str | None  # the passed-through path of the same API that this one is compared with


ROUTES = {route.name: route for route in (
    Route("messages-native", MESSAGES, NATIVE_MODEL, None),
    Route("messages-translated", MESSAGES, CHAT_MODEL, "messages-native"),
    Route("chat-native", CHAT, NATIVE_MODEL, None),
    Route("responses-native", RESPONSES, NATIVE_MODEL, None),
    Route("responses-translated", RESPONSES, CHAT_MODEL, "responses-native"),
)}
BASELINE = "chat-native"
# what the mock must receive for each path: (its path, the model named in the body)
UPSTREAM = {"messages-native": ("/v1/messages", NATIVE_MODEL), "messages-translated": (CHAT.path, CHAT_MODEL),
            "chat-native": (CHAT.path, NATIVE_MODEL), "responses-native": ("/v1/responses", NATIVE_MODEL),
            "responses-translated": (CHAT.path, CHAT_MODEL)}


# --- command line ---------------------------------------------------------------------------------


def path_list(value: str) -> list[str]:
    """argparse type: comma-separated path names, kept in ROUTES order."""
    names = {name.strip() for name in value.split(",") if name.strip()}
    unknown = names - set(ROUTES)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown path(s) {', '.join(sorted(unknown)) or value!r}; expected some "
                                         f"of {', '.join(ROUTES)}")
    return [name for name in ROUTES if name in names]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.translation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int_list, default=[1, 16], metavar="C1,C2,...",
                        help="burst phase: concurrent streams, each level run at every --tokens (default 1,16)")
    parser.add_argument("--tokens", type=int_list, default=[2000, 64], metavar="N1,N2,...",
                        help="burst phase: tokens per stream, no pacing (default 2000,64)")
    parser.add_argument("--paced-concurrency", type=int, default=64,
                        help="one more level of paced streams (--delay-ms apart), as a model sends them: each read "
                             "then holds one event (default 64; 0 skips it)")
    parser.add_argument("--paced-tokens", type=int, default=64, help="tokens per paced stream (default 64)")
    parser.add_argument("--slices", type=int, default=2,
                        help="burst phase: slices per path at each level, alternately forward and backward "
                             "through the paths (default 2)")
    parser.add_argument("--slice-seconds", type=float, default=1.5, help="burst phase: slice length (default 1.5)")
    parser.add_argument("--requests", type=int, default=40, metavar="N",
                        help="first-event phase: streams per path at concurrency 1 (default 40; 0 skips it)")
    parser.add_argument("--ttft-tokens", type=int, default=16, help="first-event phase: tokens per stream (16)")
    parser.add_argument("--delay-ms", type=float, default=5.0,
                        help="first-event phase: backend pause between tokens (default 5)")
    parser.add_argument("--paths", type=path_list, default=list(ROUTES), metavar="P1,P2",
                        help=f"the paths to run (default all: {', '.join(ROUTES)})")
    add_run_args(parser)
    args = parser.parse_args(argv)
    if (args.slices < 1 or args.slice_seconds <= 0 or args.requests < 0 or args.ttft_tokens < 1
            or args.delay_ms < 0 or args.paced_concurrency < 0 or args.paced_tokens < 1):
        parser.error("--slices, --ttft-tokens and --paced-tokens must be >= 1, --slice-seconds > 0, --requests, "
                     "--paced-concurrency and --delay-ms >= 0")
    return args


# --- a client that checks each API's end and counts what it received -------------------------------


@dataclass
class Tally:
    """What the clients of one path saw, over the whole run."""

    requests: int = 0  # requests written to a connection
    events: int = 0  # SSE `data:` events received
    bytes: int = 0  # de-chunked body bytes received
    pieces: int = 0  # body pieces parsed (one per HTTP chunk, split further where a read ends mid-chunk)
    events_per_stream: Counter[int] = field(default_factory=Counter)  # good streams: event count -> streams


def _straddling(pattern: bytes, carry: bytes, head: bytes) -> int:
    """Occurrences of `pattern` that begin in `carry` and end in `head` (the pattern cannot overlap itself)."""
    return (carry + head).count(pattern) - carry.count(pattern) - head.count(pattern)


class ApiClient(StreamClient):
    """StreamClient that fails a stream unless it has `expected` events and ends as its API ends one.

    For an API whose last event is named (Messages, Responses) the marker, that event's name line, must come
    exactly once and be followed by exactly one `data:` line, its own. The common case costs one C-level
    find per body piece; a marker split across two pieces is caught at the seam, as bench.metering does.
    """

    def __init__(self, api: Api, expected: int, tally: Tally) -> None:
        self.api = api
        self.expected = expected
        self.tally = tally
        super().__init__()

    def _reset(self) -> None:
        super()._reset()
        self._carry = b""
        self._marks = 0  # markers seen
        self._after = -1  # `data:` events from the start of the last marker on; -1 before it

    async def request(self, payload: bytes, timeout: float) -> StreamResult:
        if not self.closed and self.transport is not None:
            self.tally.requests += 1
        result = await super().request(payload, timeout)
        if result.ok:
            self.tally.events_per_stream[result.events] += 1
        return result

    def _body(self, buf: bytearray, pos: int, n: int, now: int) -> None:
        before = self._event_count
        super()._body(buf, pos, n, now)
        new = self._event_count - before
        tally = self.tally
        tally.events += new
        tally.bytes += n
        tally.pieces += 1
        marker = self.api.marker
        if marker is None:
            return
        end = pos + n
        at = buf.find(marker, pos, end)
        keep = len(marker) - 1
        if at >= 0:
            self._marks += buf.count(marker, at, end)
            self._after = buf.count(EVENT, at, end)
        elif self._carry and _straddling(marker, self._carry, bytes(buf[pos:pos + keep])):
            self._marks += 1
            self._after = new  # the marker began in the previous piece: every event of this one follows it
        elif self._after >= 0:
            self._after += new
        # the marker ends with its only line break, so none can straddle a seam after a line break
        if buf[end - 1] == 0x0A:
            self._carry = b""
        elif n >= keep:
            self._carry = bytes(buf[end - keep:end])
        else:
            self._carry = (self._carry + bytes(buf[pos:end]))[-keep:]

    def _end_problem(self) -> str | None:
        api = self.api
        if not self._tail.endswith(api.tail):
            return f"stream did not end with {api.tail!r} (last bytes {self._tail!r})"
        if api.marker is not None and (self._marks != 1 or self._after != 1):
            return (f"{self._marks} `{api.marker.decode().strip()}` events, {self._after} `data:` lines from the "
                    "last one on: expected 1 and 1")
        if self._event_count != self.expected:
            return f"{self._event_count} events, expected {self.expected}"
        return None


class ApiLane(Lane):
    def __init__(self, port: int, payload: bytes, timeout: float, api: Api, expected: int, tally: Tally) -> None:
        super().__init__(HOST, port, payload, timeout)
        self.api, self.expected, self.tally = api, expected, tally

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        _, self._client = await loop.create_connection(lambda: ApiClient(self.api, self.expected, self.tally),
                                                       self.host, self.port)


# --- environment ----------------------------------------------------------------------------------


@dataclass
class Env:
    mock: Service
    proxy: Service
    paths: list[str]
    timeout: float
    ttft_tokens: int
    rng: random.Random
    pins: Pins
    tallies: dict[str, Tally]
    ports: dict[str, int] = field(default_factory=dict)  # interleave.Env: every path is on the proxy's port

    def lane(self, path: str, tokens: int | None = None, burst: bool = False) -> ApiLane:
        """A lane to `path` for streams of `tokens` tokens (default: the mock's, --ttft-tokens), paced by the
        mock's --delay-ms unless `burst`."""
        route = ROUTES[path]
        headers = dict(EOS)
        if tokens is not None:
            headers["x-mock-tokens"] = str(tokens)
        if burst:
            headers["x-mock-delay-ms"] = "0"
        n = self.ttft_tokens if tokens is None else tokens
        payload = build_request(HOST, self.proxy.port, route.api.path, route.api.body(route.model, n), headers)
        return ApiLane(self.proxy.port, payload, self.timeout, route.api, n + route.api.extra_events,
                       self.tallies[path])

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the proxy (schedstat), the mock and this process; the proxy's read and write
        system calls; and, when pinned, the two cores' busy and stolen time."""
        reads, writes = syscalls(self.proxy.pid)
        return {"proxy": process_cpu_seconds([self.proxy.pid]), "mock": process_cpu_seconds([self.mock.pid]),
                "loadgen": self_cpu_seconds(), "proxy_syscr": reads, "proxy_syscw": writes,
                **pinned_core_seconds(self.pins)}


def proxy_config(mock_port: int) -> dict[str, Any]:
    url = f"http://{HOST}:{mock_port}"
    return {"server": {"listen": f"{HOST}:0"},
            "backends": [{"name": "native", "url": url, "type": "vllm", "models": [NATIVE_MODEL]},
                         {"name": "chat-only", "url": url, "type": "vllm", "apis": ["chat"], "models": [CHAT_MODEL]}],
            "logging": {"access_log": "off"}}


# --- routing check --------------------------------------------------------------------------------


async def check_upstream(env: Env) -> dict[str, Any]:
    """One short stream per path, each followed by a look at what the mock received last: its path and model."""
    seen: dict[str, Any] = {}
    for path in env.paths:
        lane = env.lane(path, PROBE_TOKENS, burst=True)
        try:
            result = await lane.send()
        finally:
            lane.close()
        if not result.ok:
            raise RuntimeError(f"probe stream on {path} failed: {result.error}")
        stats = await fetch_json(HOST, env.mock.port, "/_mock/stats")
        last = stats["requests"][-1] if isinstance(stats, dict) and stats.get("requests") else {}
        try:
            model = orjson.loads(last.get("body", "")).get("model")
        except orjson.JSONDecodeError:
            model = None
        seen[path] = {"path": last.get("path"), "model": model}
    return seen


# --- first-event phase ----------------------------------------------------------------------------


def pairs(paths: list[str]) -> tuple[tuple[str, str, str], ...]:
    """(name, translated, passed through) for each translated path run with its reference, then each other API
    against chat."""
    found = [(f"{path} - {route.reference}", path, route.reference) for path, route in ROUTES.items()
             if path in paths and route.reference in paths]
    found += [(f"{path} - {BASELINE}", path, BASELINE) for path, route in ROUTES.items()
              if path in paths and BASELINE in paths and route.reference is None and path != BASELINE]
    return tuple(found)


async def first_events(env: Env, requests: int) -> dict[str, Any]:
    spec = Interleaving(tuple(env.paths), pairs(env.paths))
    level = await interleave.run_level(env, spec, 1, requests, log)
    return {"concurrency": 1, "tokens": env.ttft_tokens, "rounds": level.rounds, "ttft_ms": level.ttft_ms,
            "paired_ms": level.paired_ms,
            "stream_ms": {path: summary_ms(samples) for path, samples in level.phase.total.items()},
            "proxy_busy": level.busy("proxy"), "errors": {p: f.as_dict() for p, f in level.phase.errors.items()},
            "warmup_errors": level.warmup_errors.as_dict(), "raw_ttft_ns": level.phase.ttft,
            "raw_paired_diff_ns": level.phase.paired}


# --- burst phase ----------------------------------------------------------------------------------


async def slices_level(env: Env, tokens: int, concurrency: int, burst: bool, slices: int,
                       seconds: float) -> dict[str, Any]:
    """Streams of `tokens` tokens (burst: no pacing) on one path at a time, `concurrency` at once, in slices.

    Each slice keeps every worker streaming on its path, back to back, for `seconds`; events and bytes
    received and the proxy's CPU are sampled at both ends, so they cover the same window. Streams still
    running at the end finish uncounted before the next slice, so no slice sees another path's traffic.
    The order runs forward through the paths, then backward, and so on: a linear drift cancels out.
    """
    paths = env.paths
    where = f"{'burst' if burst else 'paced'} {tokens} tokens, c={concurrency}"
    log(f"{where}: opening {len(paths) * concurrency} connections, warm-up")
    workers = await open_workers(lambda path: env.lane(path, tokens, burst), paths, concurrency)
    errors = {path: Failures() for path in paths}
    samples: list[dict[str, Any]] = []
    try:
        stream_ns, warm_errors = await warm_up(workers)
        order = [path for i in range(slices) for path in (paths if i % 2 == 0 else paths[::-1])]
        log(f"{where}: {len(order)} slices of {seconds:g}s "
            f"(median warm-up stream {stream_ns / 1e6:.1f} ms)")
        with gc_paused():
            for path in order:
                samples.append(await _slice(env, workers, path, seconds, errors[path]))
        lost = {path: interleave.reconnects(workers, path) for path in paths}
    finally:
        close_workers(workers)
    per_path = {path: _path_summary(path, tokens, [s for s in samples if s["path"] == path], errors[path])
                for path in paths}
    return {"tokens": tokens, "concurrency": concurrency, "burst": burst, "slice_s": seconds, "order": order,
            "per_path": per_path, "ratios": ratios(per_path), "reconnects": lost,
            "warmup_errors": warm_errors.as_dict(), "slices": samples}


async def _slice(env: Env, workers: list[Worker], path: str, seconds: float, errors: Failures) -> dict[str, Any]:
    tally = env.tallies[path]
    state = {"run": True, "counting": True, "streams": 0}

    async def one(lane: Lane) -> None:
        while state["run"]:
            result = await lane.send()
            if not result.ok:
                errors.add(result.error or "unknown error")
            elif state["counting"]:
                state["streams"] += 1

    events0, bytes0, cpu0, t0 = tally.events, tally.bytes, env.cpu(), time.perf_counter()
    tasks = [asyncio.ensure_future(one(worker.lanes[path])) for worker in workers]
    await asyncio.sleep(seconds)
    events1, bytes1, cpu1, t1 = tally.events, tally.bytes, env.cpu(), time.perf_counter()
    state["run"] = state["counting"] = False
    await asyncio.gather(*tasks)
    return {"path": path, "seconds": t1 - t0, "events": events1 - events0, "bytes": bytes1 - bytes0,
            "streams": state["streams"], "cpu_s": cpu_delta(cpu1, cpu0)}


def _per(numerator: float, denominator: float, scale: float = 1.0) -> float:
    return numerator * scale / denominator if denominator else float("nan")


def _path_summary(path: str, tokens: int, mine: list[dict[str, Any]], errors: Failures) -> dict[str, Any]:
    seconds = sum(s["seconds"] for s in mine)
    events = sum(s["events"] for s in mine)
    cpu = sum(s["cpu_s"]["proxy"] for s in mine)
    per_stream = tokens + ROUTES[path].api.extra_events
    us_per_event = _per(cpu, events, 1e6)
    return {
        "slices": len(mine), "seconds": seconds, "events": events, "bytes": sum(s["bytes"] for s in mine),
        "events_per_stream": per_stream, "streams_completed": sum(s["streams"] for s in mine),
        "events_per_s": _per(events, seconds), "events_per_s_by_slice": [_per(s["events"], s["seconds"]) for s in mine],
        "mb_per_s": _per(sum(s["bytes"] for s in mine), seconds, 1e-6),
        "proxy_cpu_s": cpu, "cpu_us_per_event": us_per_event,
        "cpu_us_per_event_by_slice": [_per(s["cpu_s"]["proxy"], s["events"], 1e6) for s in mine],
        "cpu_ms_per_stream": us_per_event * per_stream / 1000,
        "proxy_busy": _per(cpu, seconds),
        "mock_loadgen_busy": _per(sum(s["cpu_s"]["mock"] + s["cpu_s"]["loadgen"] for s in mine), seconds),
        "cpu_s": {key: sum(s["cpu_s"][key] for s in mine) for key in mine[0]["cpu_s"]} if mine else {},
        "proxy_reads_per_1k_events": _per(sum(s["cpu_s"]["proxy_syscr"] for s in mine), events, 1000),
        "proxy_writes_per_1k_events": _per(sum(s["cpu_s"]["proxy_syscw"] for s in mine), events, 1000),
        "errors": errors.as_dict(),
    }


def ratios(per_path: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each path against its passed-through reference (a translated path) and against chat-native (the others):
    CPU per event and events/s, this path's over the other's."""
    out = {}
    for path, route in ROUTES.items():
        other = route.reference or (BASELINE if path != BASELINE else None)
        if path in per_path and other in per_path:
            mine, theirs = per_path[path], per_path[other]
            out[path] = {"versus": other,
                         "cpu_per_event": _per(mine["cpu_us_per_event"], theirs["cpu_us_per_event"]),
                         "events_per_s": _per(mine["events_per_s"], theirs["events_per_s"])}
    return out


# --- checks ---------------------------------------------------------------------------------------


def correctness(env: Env, args: argparse.Namespace, upstream: dict[str, Any] | None) -> tuple[dict[str, Any],
                                                                                            list[str]]:
    """The figures the checks looked at, and a list of the checks that failed."""
    failed = []
    if upstream is None:
        failed.append("the upstream routing was not checked (the run did not get that far)")
    else:
        for path, got in upstream.items():
            want = UPSTREAM[path]
            if (got["path"], got["model"]) != want:
                failed.append(f"{path}: the mock received {got['path']} for model {got['model']}, expected "
                              f"{want[0]} for {want[1]}")
    streams = {}
    for path, tally in env.tallies.items():
        extra = ROUTES[path].api.extra_events
        allowed = {n + extra for n in (*args.tokens, args.paced_tokens, env.ttft_tokens, PROBE_TOKENS)}
        odd = {k: v for k, v in tally.events_per_stream.items() if k not in allowed}
        if odd:
            failed.append(f"{path}: good streams with an unexpected number of events {odd}; expected one of "
                          f"{sorted(allowed)}")
        streams[path] = {"requests": tally.requests, "events": tally.events, "bytes": tally.bytes,
                         "pieces": tally.pieces,
                         "events_per_stream": {str(k): v for k, v in sorted(tally.events_per_stream.items())}}
    return {"upstream": upstream, "streams": streams}, failed


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The figures a summary quotes, under flat keys: cpu_us_per_event_<path>_t<tokens>_c<C>, events_per_s_...,
    ratio_cpu_<path>_t<tokens>_c<C> (against the path named in `ratios`), ttft_paired_p50_ms_<pair>."""
    out: dict[str, Any] = {}
    for level in result["levels"]:
        cell = f"t{level['tokens']}_c{level['concurrency']}" + ("" if level["burst"] else "_paced")
        for path, p in level["per_path"].items():
            out[f"cpu_us_per_event_{path}_{cell}"] = p["cpu_us_per_event"]
            out[f"events_per_s_{path}_{cell}"] = p["events_per_s"]
        for path, r in level["ratios"].items():
            out[f"ratio_cpu_{path}_{cell}"] = r["cpu_per_event"]
    if result["first_event"]:
        for name, paired in result["first_event"]["paired_ms"].items():
            out[f"ttft_paired_p50_ms_{name.replace(' - ', '_minus_')}"] = paired.get("p50")
    errors = [p["errors"]["count"] for level in result["levels"] for p in level["per_path"].values()]
    if result["first_event"]:
        errors += [e["count"] for e in result["first_event"]["errors"].values()]
    out["errors"] = sum(errors)
    return out


# --- main -----------------------------------------------------------------------------------------


async def run_all(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"upstream": None, "first_event": None, "levels": []}
    out["upstream"] = await check_upstream(env)
    services = [env.proxy, env.mock]
    gc.collect()
    gc.freeze()  # what setup allocated lives for the whole run: keep it out of later collections
    if args.requests:
        out["first_event"] = await first_events(env, args.requests)
        if not all_alive(services, "the first-event phase", log):
            return out
    levels = [(tokens, concurrency, True) for tokens in args.tokens for concurrency in args.concurrency]
    if args.paced_concurrency:
        levels.append((args.paced_tokens, args.paced_concurrency, False))
    for tokens, concurrency, burst in levels:
        out["levels"].append(await slices_level(env, tokens, concurrency, burst, args.slices, args.slice_seconds))
        if not all_alive(services, f"the level {tokens} tokens c={concurrency}", log):
            return out
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command, pins, info = start_run("bench.translation", argv, args.no_pin, log, pinning=PINNING)
    mock = Service("mock-backend", ["mock-backend", "--dialect", "vllm", "--listen", f"{HOST}:0", "--model",
                                    f"{NATIVE_MODEL},{CHAT_MODEL}", "--tokens", str(args.ttft_tokens),
                                    "--delay-ms", f"{args.delay_ms:g}"], cpu=pins[1] if pins else None)
    proxy: Service | None = None
    result: dict[str, Any] = {"upstream": None, "first_event": None, "levels": []}
    failure = None
    env: Env | None = None
    with tempfile.TemporaryDirectory(prefix="bench-translation-") as tmp:
        try:
            mock_port = mock.start()
            config = write_configs(tmp, "translation", {"proxy": proxy_config(mock_port)})["proxy"]
            proxy = Service("proxy", ["serve", "--config", config, "--listen", f"{HOST}:0"],
                            cpu=pins[0] if pins else None)
            proxy.start()
            log(f"mock backend pid {mock.pid} on :{mock_port}, proxy pid {proxy.pid} on :{proxy.port}")
            env = Env(mock, proxy, args.paths, args.timeout, args.ttft_tokens, random.Random(args.seed), pins,
                      {path: Tally() for path in args.paths})
            env.ports = dict.fromkeys(args.paths, proxy.port)
            result = uvloop.run(run_all(env, args))
        except (RuntimeError, OSError) as exc:
            failure = str(exc)
        finally:
            children_output = stop_children([proxy, mock])
    checks, failed = correctness(env, args, result["upstream"]) if env is not None else ({}, [])
    print(report(command, info, args, result, checks, failed), flush=True)
    troubled = print_problems(failure, error_report(result), failed, children_output)
    write_json(args.json, {"command": command, "machine": info, "args": vars(args), "headline": headline(result),
                           **result, "checks": checks, "failed_checks": failed}, log)
    return 1 if troubled else 0


if __name__ == "__main__":
    sys.exit(main())
