"""bench.coldcpu times a real slice of the request path: it must produce a valid upstream request."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import orjson

from bench import coldcpu

REPO = Path(__file__).resolve().parents[2]


def test_one_request_parses_and_builds_the_upstream_request():
    sent = coldcpu.one_request()
    head, _, body = sent.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"content-length: %d" % len(body) in head
    assert orjson.loads(body)["stream_options"] == {"include_usage": True}


def test_the_report_has_a_row_per_gap(tmp_path):
    # A process of its own: the benchmark pins itself to a CPU, which must not stick to the test run.
    out = tmp_path / "cold.json"
    result = subprocess.run([sys.executable, "-m", "bench.coldcpu", "--rounds", "2", "--json", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "µs" not in line]
    assert len(rows) == len(coldcpu.GAPS_MS)
    gaps = json.loads(out.read_text())["gaps"]
    assert set(gaps) == {f"{gap:g}" for gap in coldcpu.GAPS_MS}
    assert all(value["p50_us"] > 0 for value in gaps.values())
