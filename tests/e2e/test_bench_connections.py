"""bench.connections, run with a few hundred short streams: it exits 0, its headline has a number for every
figure, every stream completed with all its events, all were in flight together, and probes ran on both paths.
Run again with `--workers 2`: the proxy runs as a supervisor and two workers, all on the proxy's CPU, and its
CPU and RSS are summed over them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from bench.rig import auto_workers
from tests.support import REPO


def run_bench(tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path / "connections.json"
    run = subprocess.run([sys.executable, "-m", "bench.connections", "--streams", "200", "--tokens", "5",
                          "--delay-ms", "200", "--ramp-s", "0.2", *extra, "--json", str(out)],
                         cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=40)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| 200 | 200 | 0 |" in run.stdout, run.stdout
    return run, json.loads(out.read_text())


def test_connections_bench_completes_every_stream_and_probes_both_paths(tmp_path):
    _, document = run_bench(tmp_path, "--load-procs", "2")
    headline = document["headline"]
    assert (headline["streams"], headline["completed"], headline["errors"]) == (200, 200, 0), headline
    for name in ("probe_ttft_p50_ms", "probe_ttft_p99_ms", "probe_direct_ttft_p50_ms", "rss_peak_mb",
                 "proxy_cpu_s", "wall_s"):
        assert isinstance(headline[name], float) and math.isfinite(headline[name]), (name, headline)
    assert headline["rss_peak_mb"] > 1 and headline["wall_s"] > 1, headline  # 5 tokens 200 ms apart: >= 1 s
    assert headline["workers"] == 1 and document["workers"]["need"] < document["workers"]["limit"], document["workers"]
    done = document["result"]["done"]
    assert len(done) == 2 and sum(d["completed"] for d in done) == 200, done
    assert all(set(d["events_per_stream"]) == {"7"} for d in done), done  # role, 5 tokens, [DONE]
    assert sum(d["max_in_flight"] for d in done) == 200, done
    probes = document["result"]["probes"]["ttft_ms"]
    assert probes["proxied"]["n"] >= 3 and probes["direct"]["n"] >= 3, probes


def test_connections_bench_runs_the_proxy_as_workers_and_sums_them(tmp_path):
    run, document = run_bench(tmp_path, "--workers", "2")
    assert document["headline"]["workers"] == 2 and "2 workers" in run.stdout, run.stdout
    assert document["config"]["server"]["workers"] == 2
    workers = document["workers"]
    assert list(workers["pids"]) == ["supervisor", "worker-0", "worker-1"] and workers["at_end"] == workers["pids"]
    if len(os.sched_getaffinity(0)) >= 2:  # pinned: every process on the proxy's CPU
        assert all(cpus == [workers["affinity"]["cpu"]] for cpus in workers["affinity"]["found"].values()), workers
    result = document["result"]
    cpu = result["cpu_s"]
    assert math.isclose(cpu["proxy"], sum(cpu[f"proxy.{name}"] for name in workers["pids"])), cpu
    assert cpu["proxy.worker-0"] > 0 and cpu["proxy.worker-1"] > 0, cpu  # the kernel gave both connections
    peaks = result["rss_peak_mb_by_process"]
    assert set(peaks) == set(workers["pids"]) and result["rss_peak_mb"] >= max(peaks.values()), peaks
    assert result["gauge_peaks"]["inflight"] >= 200 and result["gauge_peaks"]["failed_scrapes"]["count"] == 0


def test_auto_workers_gives_each_worker_headroom_under_the_limit():
    assert auto_workers(632, 20_000) == 1
    assert auto_workers(20_000, 20_000) == 1
    assert auto_workers(20_232, 20_000) == 2  # 10,116 each, at most 80 % of the limit
    assert auto_workers(40_000, 20_000) == 3  # 2 would fill each to the brim
