"""bench.features, run with tiny parameters: it exits 0, its headline has the feature-cost figures, and the
webhook receiver got exactly one record per request sent to the full proxy."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.support import REPO


def test_feature_cost_bench_reports_headline_and_delivers_every_webhook_record(tmp_path):
    out = tmp_path / "features.json"
    run = subprocess.run([sys.executable, "-m", "bench.features", "--concurrency", "1", "--requests", "3",
                          "--json", str(out)],
                         cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=40)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| 1 | full |" in run.stdout and "all checks passed" in run.stdout, run.stdout

    document = json.loads(out.read_text())
    headline = document["headline"]
    for name in ("bare_overhead_p50_ms_c1", "full_overhead_p50_ms_c1", "full_minus_bare_paired_p50_ms_c1",
                 "bare_cpu_ms_per_stream_c1", "full_cpu_ms_per_stream_c1"):
        assert isinstance(headline[name], float) and math.isfinite(headline[name]), (name, headline)
    assert headline["full_cpu_ms_per_stream_c1"] > 0 and headline["bare_cpu_ms_per_stream_c1"] > 0, headline
    assert headline["errors"] == 0
    # warm-up + 3 recorded rounds (+ any unrecorded one) + the keyed probe, each with one record
    assert headline["webhook_expected"] >= 5
    assert headline["webhook_records"] == headline["webhook_expected"], document["checks"]
    assert document["checks"]["probe"]["full_keyless"] == 401
    assert document["checks"]["webhook"]["bad_signatures"] == 0
