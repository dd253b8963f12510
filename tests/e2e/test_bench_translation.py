"""bench.translation, run with tiny settings: it exits 0, every path reached the mock as it should (translated
ones as chat requests), and the report has positive CPU per event and events/s for each path at each level."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.support import REPO

PATHS = ("messages-native", "messages-translated", "chat-native", "responses-native", "responses-translated")
CELLS = ("t32_c2", "t8_c2_paced")


def test_translation_bench_reports_cpu_per_event_for_translated_and_passed_through_paths(tmp_path):
    out = tmp_path / "translation.json"
    run = subprocess.run([sys.executable, "-m", "bench.translation", "--concurrency", "2", "--tokens", "32",
                          "--paced-concurrency", "2", "--paced-tokens", "8", "--requests", "3", "--ttft-tokens", "4",
                          "--slices", "1", "--slice-seconds", "0.3", "--timeout", "10", "--json", str(out)],
                         cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed" in run.stdout, run.stdout
    for path in PATHS:
        assert f"- **{path}**:" in run.stdout  # its summary line

    document = json.loads(out.read_text())
    assert document["failed_checks"] == []
    upstream = document["upstream"]
    assert upstream["messages-translated"] == {"path": "/v1/chat/completions", "model": "m-chat"}
    assert upstream["responses-translated"] == {"path": "/v1/chat/completions", "model": "m-chat"}
    assert upstream["messages-native"] == {"path": "/v1/messages", "model": "m-native"}
    headline = document["headline"]
    assert headline["errors"] == 0
    for cell in CELLS:
        for path in PATHS:
            for key in (f"cpu_us_per_event_{path}_{cell}", f"events_per_s_{path}_{cell}"):
                assert math.isfinite(headline[key]) and headline[key] > 0, (key, headline[key])
        for path in ("messages-translated", "responses-translated"):
            assert headline[f"ratio_cpu_{path}_{cell}"] > 0
    assert {"messages-translated - messages-native", "responses-translated - responses-native"} \
        <= set(document["first_event"]["paired_ms"])
