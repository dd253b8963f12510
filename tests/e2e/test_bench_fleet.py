"""bench.fleet, run with tiny settings: it exits 0, every strategy asked for played the whole trace without a
failed request, the mocks counted the prompts as the trace does, and the kill phase killed a mock and says
which sessions moved."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.support import REPO

STRATEGIES = ("least_connections", "prefix_affinity")


def test_fleet_bench_compares_strategies_and_measures_the_kill(tmp_path):
    out, plot = tmp_path / "fleet.json", tmp_path / "fleet.png"
    run = subprocess.run([sys.executable, "-m", "bench.fleet", "--sessions", "6", "--turns", "3,4",
                          "--growth", "500,900", "--system-chars", "600", "--first-chars", "300", "--think-ms", "10,30",
                          "--stagger-s", "0.2", "--max-tokens", "4", "--delay-ms", "2",
                          "--strategies", ",".join(STRATEGIES), "--kill-at", "0.3", "--kill-tail-s", "0.6",
                          "--seed", "7", "--timeout", "10", "--json", str(out), "--plot", str(plot)],
                         cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed" in run.stdout, run.stdout
    assert "### Kill phase (prefix_affinity)" in run.stdout

    document = json.loads(out.read_text())
    assert sorted(p["strategy"] for p in document["phases"]) == sorted(STRATEGIES)
    requests = document["setup"]["trace"]["requests"]
    headline = document["headline"]
    assert headline["errors"] == 0
    for name in STRATEGIES:
        figures = document["figures"]["strategies"][name]
        assert figures["ok"] == requests
        assert figures["prompt_tokens_counted"] == figures["prompt_tokens"] > 0
        assert sum(figures["requests_per_backend"].values()) == requests  # the access log named every backend
        assert math.isfinite(headline[f"ttft_mean_ms_{name}"]) and headline[f"ttft_mean_ms_{name}"] > 0
        assert 0 <= headline[f"hit_rate_{name}"] <= 1
        assert headline[f"inflight_max_over_mean_{name}"] >= 1
    kill = document["figures"]["kill"]
    assert kill["victim"] == "b3" and kill["at_s"] is not None
    assert kill["ring_unchanged_others"] is True  # the proxy's ring: only the victim's keys have a new first backend
    across = kill["last_first"]
    assert across["victim_moved"] == across["on_victim"]  # nothing went to the dead backend after the kill
    assert plot.stat().st_size > 0
