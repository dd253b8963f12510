"""How much slower the same Python runs after the CPU has been idle: the cost behind first-token overhead at C = 1.

    python -m bench.coldcpu [--cpu 0] [--rounds 60] [--json out.json]

Pinned to one CPU, it times one request's worth of the proxy's own parsing (the request codec on a chat
completion request, the body's JSON, the upstream request bytes) right after sleeping for 0, 1, 5, 50
and 340 ms, the gap a proxy core sees between requests at concurrency 1 with a paced backend. On a VM whose
idle vCPU is halted, caches, TLB and branch predictors come back cold, and Python's large working set pays
for it: the same work takes several times longer after a gap of a few milliseconds. The report gives the
median and p90 per gap and the ratio to back-to-back.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import orjson

from bench.harness import write_json
from llmproxy.http11.request import CodecLimits, RequestCodec, RequestHead

GAPS_MS = (0.0, 1.0, 5.0, 50.0, 340.0)
BODY = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:8000\r\ncontent-type: application/json\r\n"
           b"accept: text/event-stream\r\nuser-agent: bench\r\ncontent-length: %d\r\n\r\n%b" % (len(BODY), BODY))


class _Sink:
    """Collects what the codec reports, as the client connection would."""

    def __init__(self) -> None:
        self.head: RequestHead | None = None
        self.body: list[bytes] = []

    def on_request_head(self, head: RequestHead) -> None:
        self.head = head

    def on_request_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_request_complete(self) -> None:
        pass


def one_request() -> bytes:
    """Parse a request and build its upstream bytes: a slice of the proxy's request path, without sockets."""
    sink = _Sink()
    RequestCodec(sink, CodecLimits()).feed(REQUEST)
    data = orjson.loads(b"".join(sink.body))
    body = orjson.dumps({**data, "stream_options": {"include_usage": True}})
    head = sink.head
    parts = [head.method, b" ", head.target, b" HTTP/1.1\r\n"]
    for name, value in head.headers:
        parts += (name, b": ", value, b"\r\n")
    return b"".join((*parts, b"content-length: %d\r\n\r\n" % len(body), body))


def measure(gap_ms: float, rounds: int) -> list[float]:
    """Microseconds for one_request(), each right after sleeping gap_ms."""
    samples = []
    for _ in range(rounds):
        if gap_ms:
            time.sleep(gap_ms / 1000.0)
        start = time.perf_counter_ns()
        one_request()
        samples.append((time.perf_counter_ns() - start) / 1000.0)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.coldcpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", type=int, default=0, help="the CPU to pin to (default 0, the proxy's in the suite)")
    parser.add_argument("--rounds", type=int, default=60, help="samples per gap (default 60)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {args.cpu})
    for _ in range(200):
        one_request()  # imports, caches and allocator pools first
    results: dict[str, Any] = {}
    print(f"One request's parsing and upstream bytes, pinned to CPU {args.cpu}, {args.rounds} samples per gap:\n")
    print("| idle gap before, ms | p50, µs | p90, µs | p50 / back-to-back |\n|---:|---:|---:|---:|")
    for gap in GAPS_MS:
        samples = sorted(measure(gap, args.rounds))
        p50, p90 = statistics.median(samples), samples[int(len(samples) * 0.9)]
        results[f"{gap:g}"] = {"p50_us": p50, "p90_us": p90}
        ratio = p50 / results["0"]["p50_us"]
        print(f"| {gap:g} | {p50:.1f} | {p90:.1f} | {ratio:.1f}x |", flush=True)
    write_json(args.json, {"command": "python -m bench.coldcpu", "gaps": results}, lambda message: None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
