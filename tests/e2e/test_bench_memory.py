"""bench.memory, run with small counts: it exits 0, its headline has a number for every figure, every
stream completed, the held idle connections all stayed open, and each stream level ran all its streams at once."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.support import REPO


def test_memory_bench_reports_idle_per_connection_and_stream_peaks_without_errors(tmp_path):
    out = tmp_path / "memory.json"
    run = subprocess.run([sys.executable, "-m", "bench.memory", "--levels", "20,50", "--idle-conns", "300",
                          "--tokens", "8", "--delay-ms", "50", "--settle", "0.2", "--json", str(out)],
                         cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=40)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| RSS idle, MiB |" in run.stdout and "peak RSS at 50 streams" in run.stdout, run.stdout

    document = json.loads(out.read_text())
    headline = document["headline"]
    for name in ("rss_idle_mb", "idle_conn_kib", "rss_peak_mb_20", "rss_after_mb_20", "rss_peak_mb_50",
                 "rss_after_mb_50"):
        assert isinstance(headline[name], float) and math.isfinite(headline[name]), (name, headline)
    assert headline["rss_idle_mb"] > 1, headline
    assert headline["idle_conns_held"] == 300 and headline["errors"] == 0, headline
    assert document["phases"]["idle_conns"]["closed_by_proxy"] == 0
    for streams in (20, 50):
        level = document["phases"][f"streams_{streams}"]
        assert level["completed"] == streams and level["events_per_stream"] == {"10": streams}, level
        assert level["max_in_flight"] == streams, level  # all of them at once, which is the point
        assert level["peak_mb"] >= level["before"]["rss_mb"] * 0.9, level
