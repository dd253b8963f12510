"""bench/locustfile.py, run headless for a few seconds against `llmproxy demo`: its ttft, tokens/s and
chat stream entries are in locust's CSV stats, with no failures."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys

from tests.support import REPO, Proc, wait_for


def test_locustfile_reports_ttft_tokens_per_second_and_latency(tmp_path, procs):
    demo = Proc(["demo", "--listen", "127.0.0.1:0"]).wait_listening()
    procs.append(demo)
    streamed = int(wait_for(lambda: re.search(r"streaming (\d+) tokens", demo.text())).group(1))
    # The run must not depend on the caller's shell: no model, prompt size, think time or key from it.
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("LLM_") and key not in ("LLMPROXY_API_KEY", "OPENAI_API_KEY")}
    run = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(REPO / "bench" / "locustfile.py"), "--headless",
         "-u", "4", "-r", "4", "-t", "4s", "--host", demo.url, "--csv", str(tmp_path / "run"), "--only-summary"],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output

    with open(tmp_path / "run_stats.csv", newline="") as file:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(file)}
    for key in (("POST", "chat stream"), ("LLM", "ttft"), ("LLM", "tokens/s")):
        assert key in rows, f"no {key} row in {list(rows)}\n{output}"
        assert int(rows[key]["Request Count"]) > 0, rows[key]
    assert all(int(row["Failure Count"]) == 0 for row in rows.values()), output

    stream, ttft, rate = rows["POST", "chat stream"], rows["LLM", "ttft"], rows["LLM", "tokens/s"]
    assert float(ttft["Median Response Time"]) < float(stream["Median Response Time"])
    # The demo streams its tokens 30 ms apart: about 33 tokens/s, carried in the response-time columns,
    # and its usage chunk gives the completion tokens, carried in the size column.
    assert 5 < float(rate["Average Response Time"]) < 50, rate
    assert float(rate["Average Content Size"]) == streamed, rate
    assert float(ttft["Average Content Size"]) > 0, ttft  # prompt tokens from the usage chunk
