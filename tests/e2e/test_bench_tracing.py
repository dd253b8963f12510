"""bench.tracing, run with tiny parameters: it exits 0, its headline has the CPU per stream of each proxy, and
the OTLP receiver got exactly one span per request sent to the 100 % proxy (none from the 0 % one)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.support import REPO


def test_tracing_cost_bench_reports_cpu_per_stream_and_receives_every_span(tmp_path):
    out = tmp_path / "tracing.json"
    run = subprocess.run([sys.executable, "-m", "bench.tracing", "--concurrency", "2", "--requests", "6",
                          "--tokens", "8", "--json", str(out)],
                         cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| 2 | sampled-100 |" in run.stdout and "all checks passed" in run.stdout, run.stdout

    document = json.loads(out.read_text())
    headline = document["headline"]
    for proxy in ("off", "sampled-0", "sampled-100"):
        value = headline[f"{proxy}_cpu_ms_per_stream_c2"]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (proxy, headline)
    assert headline["errors"] == 0
    assert headline["spans_expected"] >= 8  # warm-up + 3 recorded rounds, two workers
    assert headline["spans_received"] == headline["spans_expected"], document["checks"]
    assert "bench-sampled-0" not in document["checks"]["spans"]["spans"]
