"""bench.ttft, run end to end with the smallest parameters: it exits 0, its JSON has every headline number
for the levels it ran, no failed stream, raw TTFT lists of the right lengths, and it leaves no nginx behind."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.nginx import find_nginx
from tests.support import REPO

LEVELS, BACKENDS, ROUNDS = (1,), ("paced", "burst"), 3  # 3 rounds: the fewest a worker records
# headline keys per level and backend, and those of the paced backend only (see bench/README.md)
MEASURED = ("overhead_p50_ms", "overhead_p90_ms", "overhead_p99_ms", "overhead_max_ms", "paired_p50_ms",
            "cpu_ms_per_stream", "cpu_us_per_event", "inproduct_first_byte_mean_ms", "inproduct_request_mean_ms")
NGINX = ("nginx_overhead_p50_ms", "nginx_overhead_p99_ms", "nginx_cpu_ms_per_stream")
PACED = ("inter_chunk_overhead_p50_ms", "inter_chunk_overhead_p99_ms", "inproduct_chunk_mean_ms")


def run_bench(tmp_path: Path, nginx: str) -> dict:
    out = tmp_path / "ttft.json"
    # TMPDIR puts the run's temp dir (nginx's prefix) under tmp_path, where leftovers can be looked for
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "bench.ttft", "--concurrency", ",".join(map(str, LEVELS)), "--requests", str(ROUNDS),
         "--burst-requests", str(ROUNDS), "--backends", ",".join(BACKENDS), "--slices", "0", "--nginx", nginx,
         "--timeout", "10", "--json", str(out)],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "### In-product overhead" in run.stdout
    return json.loads(out.read_text())


def processes_under(directory: Path) -> list[str]:
    """Command lines of live processes that mention `directory` (nginx is started with `-p <run's temp dir>`)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(directory) in cmdline:
            found.append(cmdline)
    return found


def check_headline(document: dict, with_nginx: bool) -> None:
    headline = document["headline"]
    assert headline["errors"] == 0
    for concurrency, backend in itertools.product(LEVELS, BACKENDS):
        names = MEASURED + (NGINX if with_nginx else ()) + (PACED if backend == "paced" else ())
        for name in names:
            value = headline[f"{name}_c{concurrency}_{backend}"]
            assert isinstance(value, (int, float)), (name, value)
        # no throughput phase at C = 1 (nor with --slices 0): present, and null
        assert headline.get(f"throughput_ratio_c{concurrency}_paced", "absent") is None
        for name in NGINX:
            assert (headline[f"{name}_c{concurrency}_{backend}"] is not None) == with_nginx


def check_levels(document: dict, with_nginx: bool) -> None:
    levels = document["levels"]
    assert [(level["concurrency"], level["backend"]) for level in levels] == list(itertools.product(LEVELS, BACKENDS))
    for level in levels:
        ttft = level["raw"]["ttft_ns"]
        assert len(ttft["direct"]) == len(ttft["proxied"]) == ROUNDS * level["concurrency"]
        assert len(ttft["nginx"]) == (ROUNDS * level["concurrency"] if with_nginx else 0)
        assert all(isinstance(ns, int) and ns > 0 for samples in ttft.values() for ns in samples)
        assert level["inproduct"]["exported"] and not level["inproduct"]["failed"]
        # every `data:` event through the proxy is counted: the same number on each stream
        events, streams = level["events_in_cpu_window"]["proxied"], level["streams_in_cpu_window"]["proxied"]
        assert streams and events % streams == 0 and events // streams > 64


def test_bench_ttft_smallest_run_without_nginx(tmp_path):
    document = run_bench(tmp_path, "off")
    assert document["nginx"] == "off (--nginx off)"
    check_headline(document, with_nginx=False)
    check_levels(document, with_nginx=False)


@pytest.mark.skipif(find_nginx() is None, reason="nginx is not installed")
def test_bench_ttft_smallest_run_with_nginx_leaves_no_nginx_running(tmp_path):
    document = run_bench(tmp_path, "auto")
    check_headline(document, with_nginx=True)
    check_levels(document, with_nginx=True)
    assert processes_under(tmp_path) == []
