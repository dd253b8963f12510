"""The CPU cost of the response cache per stream: caching off, on and missing, on and hitting, on and bypassed.

    python -m bench.cache [--requests 400] [--concurrency 16] [--tokens 200] [--slices 3] [--json out.json]

Starts one mock backend (vLLM dialect, `--tokens` events per stream, unpaced) and four proxies pinned to one
CPU, the mock and this load generator on the other:
- off: no `caching:` section;
- miss: caching on, every request distinct (a strategy matches, the answer is recorded and stored; the store
  soon full, evicting one answer per answer stored);
- hit: caching on, the same request every time (the first misses, the rest are replayed from the memory store);
- bypass: caching on, requests no strategy matches (temperature 0.7: the phase's lookup cost only).
Each proxy in turn gets `--requests` streams at `--concurrency`, in `--slices` rounds alternating the order;
the result is the proxy's CPU time per stream (schedstat, all its threads), and the streams per second.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from typing import Any

import uvloop

from bench.harness import HOST, logger, md_row, process_cpu_seconds, start_run, write_configs, write_json
from bench.loadgen import Lane, build_request
from bench.procs import Service

CHAT_PATH = "/v1/chat/completions"
MODES = ("off", "miss", "hit", "bypass")
log = logger("bench.cache")


def body(mode: str, n: int) -> bytes:
    content = f"question {n}" if mode == "miss" else "the same question"
    temperature = "0.7" if mode == "bypass" else "0.0"
    return (b'{"model":"m","stream":true,"temperature":%b,"messages":[{"role":"user","content":"%b"}]}'
            % (temperature.encode(), content.encode()))


def configs(mock_port: int, max_size_mb: float) -> dict[str, dict[str, Any]]:
    base = {"server": {"listen": f"{HOST}:0"}, "backends": [{"url": f"http://{HOST}:{mock_port}"}],
            "logging": {"access_log": "off"}}
    caching = {"enabled": True, "max_size_mb": max_size_mb, "strategies": [
        {"id": "det", "match": {"path": CHAT_PATH, "json_body": {"temperature": 0.0}}}]}
    return {mode: base if mode == "off" else {**base, "caching": caching} for mode in MODES}


async def drive(port: int, mode: str, requests: int, concurrency: int, counter: list[int]) -> int:
    """`requests` streams at `concurrency` over keep-alive connections; returns how many failed."""
    failed = 0

    async def worker() -> None:
        nonlocal failed
        lane = Lane(HOST, port, b"", timeout=30.0)
        try:
            while counter[0] < requests:
                counter[0] += 1
                lane.payload = build_request(HOST, port, CHAT_PATH, body(mode, counter[1] + counter[0]))
                result = await lane.send()
                failed += not result.ok
        finally:
            lane.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failed


async def measure(proxies: dict[str, Service], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    totals = {mode: {"cpu_s": 0.0, "wall_s": 0.0, "streams": 0, "failed": 0} for mode in MODES}
    distinct = 0
    for mode in MODES:  # warm-up: imports, pools, the hit proxy's one miss
        await drive(proxies[mode].port, mode, 20, 4, [0, distinct])
        distinct += 1000
    for slice_no in range(args.slices):
        order = MODES if slice_no % 2 == 0 else tuple(reversed(MODES))
        for mode in order:
            proxy = proxies[mode]
            cpu, wall = process_cpu_seconds([proxy.pid]), time.perf_counter()
            failed = await drive(proxy.port, mode, args.requests, args.concurrency, [0, distinct])
            distinct += args.requests
            total = totals[mode]
            total["cpu_s"] += process_cpu_seconds([proxy.pid]) - cpu
            total["wall_s"] += time.perf_counter() - wall
            total["streams"] += args.requests
            total["failed"] += failed
            log(f"slice {slice_no + 1} {mode}: {args.requests} streams, failed {failed}")
    return totals


def report(command: str, info: dict[str, Any], args: argparse.Namespace, totals: dict[str, dict[str, float]]) -> str:
    off = totals["off"]["cpu_s"] / totals["off"]["streams"]
    lines = ["# bench.cache: the CPU cost of caching per stream\n", f"`{command}`\n",
             f"{info['cpu_model']}; {info['pinning']}; {args.tokens} events per stream, "
             f"concurrency {args.concurrency}\n",
             md_row(["mode", "streams", "failed", "proxy CPU per stream (µs)", "vs off", "streams/s"]),
             md_row(["---"] * 6)]
    for mode in MODES:
        total = totals[mode]
        per = total["cpu_s"] / total["streams"]
        lines.append(md_row([mode, str(total["streams"]), str(total["failed"]), f"{per * 1e6:,.0f}",
                             f"{per / off:.2f}x", f"{total['streams'] / total['wall_s']:,.0f}"]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="streams per proxy per slice (default 400)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=200, help="events per stream (default 200)")
    parser.add_argument("--slices", type=int, default=3)
    parser.add_argument("--max-size-mb", type=float, default=16.0,
                        help="the store bound (default 16: misses soon fill it; it evicts, a steady state)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the proxies and the load generator")
    args = parser.parse_args(argv)
    command, pins, info = start_run("bench.cache", argv, args.no_pin, log)
    mock = Service("mock-backend", ["mock-backend", "--dialect", "vllm", "--listen", f"{HOST}:0", "--model", "m",
                                    "--tokens", str(args.tokens)], cpu=pins[1] if pins else None)
    proxies: dict[str, Service] = {}
    try:
        mock_port = mock.start()
        with tempfile.TemporaryDirectory(prefix="bench-cache-") as directory:
            for mode, path in write_configs(directory, "cache", configs(mock_port, args.max_size_mb)).items():
                proxies[mode] = Service(f"proxy-{mode}", ["serve", "--config", path],
                                        cpu=pins[0] if pins else None)
                proxies[mode].start()
            totals = uvloop.run(measure(proxies, args))
    finally:
        for service in [*proxies.values(), mock]:
            service.stop()
    print(report(command, info, args, totals))
    write_json(args.json, {"command": command, "machine": info, "results": totals}, log)
    return 0 if all(total["failed"] == 0 for total in totals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
