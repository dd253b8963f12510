"""Before/after: this checkout's proxy against another revision's, in the same run.

    python -m bench.ab --baseline REV [--concurrency 64] [--slice-seconds 4] [--rounds 3] [--json out.json]

Two runs of bench.ttft minutes apart differ by more than a small change to the hot path does (CPU per
stream moved by 15 % between two runs of the same code here). So this starts both proxies at once, the
baseline from a temporary `git worktree` of REV, both pinned to the proxy CPU, with the same config in
front of one paced mock backend (64 tokens, 5 ms apart) on the other CPU, and alternates slices of load
between them in the order new, old, old, new (a linear drift cancels). In a slice C workers stream back to
back through one proxy; the report gives each proxy's streams, CPU per stream (schedstat) and TTFT p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench.harness import (
    HOST,
    add_run_args,
    chat_request,
    logger,
    mock_service,
    process_cpu_seconds,
    proxy_config,
    start_run,
    stop_children,
    write_configs,
    write_json,
)
from bench.loadgen import Lane
from bench.procs import REPO_ROOT, Service

NEW, OLD = "new", "old"
ORDER = (NEW, OLD, OLD, NEW)
log = logger("bench.ab")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, metavar="REV", help="the git revision to compare with")
    parser.add_argument("--concurrency", type=int, default=64, help="workers streaming at once (default 64)")
    parser.add_argument("--slice-seconds", type=float, default=4.0, help="length of one slice (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of new, old, old, new slices (default 3)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream (default 64)")
    parser.add_argument("--delay-ms", type=float, default=5.0, help="pause between tokens (default 5)")
    add_run_args(parser)
    return parser.parse_args(argv)


async def run_slice(lanes: list[Lane], seconds: float) -> tuple[list[int], int]:
    """Every lane streams back to back for `seconds`; returns the TTFTs (ns) of good streams and the errors."""
    stop = time.perf_counter() + seconds
    ttfts: list[int] = []
    errors = 0

    async def worker(lane: Lane) -> None:
        nonlocal errors
        while time.perf_counter() < stop:
            result = await lane.send()
            if result.ok:
                ttfts.append(result.ttft_ns)
            else:
                errors += 1

    await asyncio.gather(*(worker(lane) for lane in lanes))
    return ttfts, errors


async def compare(proxies: dict[str, Service], args: argparse.Namespace) -> dict[str, Any]:
    lanes = {name: [Lane(HOST, proxy.port, chat_request(proxy.port), args.timeout)
                    for _ in range(args.concurrency)] for name, proxy in proxies.items()}
    for name in proxies:
        await run_slice(lanes[name], 1.0)  # connections open, pools filled
    totals: dict[str, dict[str, Any]] = {name: {"ttft_ns": [], "cpu_s": 0.0, "errors": 0} for name in proxies}
    for name in ORDER * args.rounds:
        pid = proxies[name].pid
        before = process_cpu_seconds([pid])
        ttfts, errors = await run_slice(lanes[name], args.slice_seconds)
        totals[name]["cpu_s"] += process_cpu_seconds([pid]) - before
        totals[name]["ttft_ns"] += ttfts
        totals[name]["errors"] += errors
    return {name: summarise(total) for name, total in totals.items()}


def summarise(total: dict[str, Any]) -> dict[str, Any]:
    ttfts = sorted(total["ttft_ns"])
    streams = len(ttfts)
    return {"streams": streams, "errors": total["errors"], "cpu_s": total["cpu_s"],
            "cpu_ms_per_stream": total["cpu_s"] * 1000 / streams if streams else None,
            "ttft_p50_ms": statistics.median(ttfts) / 1e6 if ttfts else None,
            "ttft_p99_ms": ttfts[int(0.99 * (streams - 1))] / 1e6 if ttfts else None}


def report(command: str, baseline: str, result: dict[str, Any]) -> str:
    lines = [f"## bench.ab: this checkout vs {baseline}", "", f"- command: `{command}`", "",
             "| proxy | streams | CPU ms/stream | TTFT p50 ms | TTFT p99 ms | errors |",
             "|:---|---:|---:|---:|---:|---:|"]
    for name, row in result.items():
        lines.append(f"| {name} | {row['streams']} | {row['cpu_ms_per_stream']:.3f} | {row['ttft_p50_ms']:.3f} | "
                     f"{row['ttft_p99_ms']:.3f} | {row['errors']} |")
    new, old = result[NEW]["cpu_ms_per_stream"], result[OLD]["cpu_ms_per_stream"]
    lines += ["", f"CPU per stream, new / old: {new / old:.3f}"]
    return "\n".join(lines)


def worktree(revision: str, directory: str) -> Path:
    path = Path(directory) / "baseline"
    subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", "-q", str(path), revision],
                   check=True, timeout=60)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command, pins, _ = start_run("bench.ab", argv, args.no_pin, log)
    mock = mock_service(args, pins)
    proxies: dict[str, Service] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        baseline = worktree(args.baseline, tmp)
        try:
            config = write_configs(tmp, "ab", {"proxy": proxy_config(mock.start())})["proxy"]
            for name, tree in ((NEW, REPO_ROOT), (OLD, baseline)):
                proxies[name] = Service(name, ["serve", "--config", config], pins[0] if pins else None)
                proxies[name].start(cwd=tree)
            result = uvloop.run(compare(proxies, args))
        finally:
            stop_children([*proxies.values(), mock])
            subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(baseline)],
                           check=False, timeout=60)
    print(report(command, args.baseline, result), flush=True)
    write_json(args.json, {"command": command, "baseline": args.baseline, "result": result}, log)
    return 1 if any(row["errors"] for row in result.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
