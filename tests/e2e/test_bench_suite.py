"""`python -m bench`: the suite runs its sections as children and writes summary.json and report.md; a failing
section is reported with its log and fails the run; and the report, targets table and README section are
generated from a results directory alone (here a synthetic one), touching nothing outside the README markers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import report
from bench.__main__ import main
from tests.support import REPO

X = report.TIMES  # the multiplication sign of "(2.05x)"
TINY_FEATURES = "features=--concurrency 1 --requests 3"


def run_suite(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench", "--no-readme", *args], cwd=REPO,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def test_suite_runs_a_section_and_writes_summary_and_report(tmp_path):
    run = run_suite("--only", "features", "--section-args", TINY_FEATURES, "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr

    summary = json.loads((tmp_path / "summary.json").read_text())
    features = summary["sections"]["features"]
    assert features["status"] == "ok" and features["seconds"] > 0, features
    assert features["headline"]["webhook_records"] == features["headline"]["webhook_expected"]
    assert {summary["sections"][name]["status"] for name in ("ttft", "memory", "connections")} == {"skipped"}
    assert summary["machine"]["kernel"] and "pinned" in summary["machine"]["pinning"]
    assert all(row["status"] == "not measured" for row in summary["targets"])  # all from skipped sections

    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# llmproxy benchmark suite")
    assert "## Targets" in text and "| RSS idle | ≤ 40 MB | — | not measured (section skipped) |" in text
    assert "## bench.features" in text and "full - bare paired p50, ms" in text
    assert (tmp_path / "features.md").read_text().strip() in text  # the section's report, verbatim
    assert "webhook: " in (tmp_path / "features.md").read_text()


def test_a_failing_section_is_reported_with_its_log_and_fails_the_run(tmp_path):
    run = run_suite("--only", "features", "--section-args", "features=--concurrency 0", "--out", str(tmp_path))
    assert run.returncode == 1, run.stderr

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sections"]["features"]["status"] == "failed"
    text = (tmp_path / "report.md").read_text()
    assert "**features failed**: exit status 2" in text
    assert "concurrency levels must be positive integers" in text  # the tail of features.log


# --- generation from a synthetic results directory --------------------------------------------------------

README_BEFORE = "# Project\n\nIntro, untouched.\n\n## Performance\n\n"
README_AFTER = "\n\n## Next section\n\nAlso untouched: `<!-- not a marker -->`.\n"


def write_json(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document))


def ttft_document() -> dict:
    headline = {"overhead_p50_ms_c1_paced": 0.41, "overhead_p99_ms_c1_paced": 0.45,
                "overhead_p90_ms_c1_paced": 0.43, "overhead_p50_ms_c64_paced": 0.3,
                "overhead_p99_ms_c64_paced": 1.5, "throughput_ratio_c64_paced": 0.9,
                "overhead_p50_ms_c1_burst": 0.5, "overhead_p99_ms_c1_burst": 0.9,
                "cpu_ms_per_stream_c64_paced": 0.8, "nginx_cpu_ms_per_stream_c64_paced": 0.4, "errors": 0,
                "overhead_p99_ms_c512_paced": 6.0, "cpu_ms_per_stream_c512_paced": 2.0,
                "throughput_ratio_c512_paced": 0.9,
                "rig_saturated_c1_paced": False, "rig_saturated_c512_paced": True}
    ms = 1_000_000
    levels = [{"concurrency": c, "backend": mode,
               "raw": {"ttft_ns": {"direct": [ms + i * 1000 for i in range(50)],
                                   "proxied": [ms + 400_000 + i * 1000 for i in range(50)],
                                   **({"nginx": [ms + 100_000 + i * 1000 for i in range(50)]} if c == 64 else {})}}}
              for mode in ("paced", "burst") for c in (1, 64)]
    return {"headline": headline, "levels": levels}


def synthetic_results(directory: Path) -> None:
    sections = {"ttft": {"status": "ok", "seconds": 100.0, "command": "python -m bench.ttft --json x"},
                "memory": {"status": "failed", "seconds": 5.0, "reason": "exit status 1"},
                "connections": {"status": "skipped"}, "features": {"status": "skipped"}}
    write_json(directory / "summary.json", {
        "command": "python -m bench", "started": "2026-11-23T05:12:00+00:00", "ended": "2026-11-23T05:20:00+00:00",
        "seconds": 480.0, "sections": sections,
        "machine": {"nproc": 2, "cpu_model": "Test CPU", "python": "3.11.7", "kernel": "6.1.0",
                    "pinning": "proxy pinned to CPU 0; load generator and mock backend on CPU 1"}})
    write_json(directory / "ttft.json", ttft_document())
    (directory / "ttft.md").write_text("## bench.ttft\n\nthe ttft report, verbatim\n")
    write_json(directory / "memory.json", {"headline": {"rss_idle_mb": 31.5, "rss_peak_mb_2000": 120.0}})
    (directory / "memory.md").write_text("## bench.memory\n")
    (directory / "memory.log").write_text("starting\nTraceback: something broke\n")


def test_report_targets_and_readme_come_from_the_results_directory(tmp_path):
    synthetic_results(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(README_BEFORE + report.BEGIN + "\nold numbers\n" + report.END + README_AFTER)
    logged: list[str] = []

    targets = report.write_outputs(tmp_path, readme, logged.append)

    by_key = {row["key"]: row for row in targets}
    assert by_key["overhead_p50_ms_c1_paced"]["text"] == f"0.41 ms vs ≤ 0.2 ms: missed by 0.21 ms (2.05{X})"
    assert by_key["overhead_p99_ms_c1_paced"]["text"] == "0.45 ms vs ≤ 0.5 ms: met"
    assert by_key["throughput_ratio_c64_paced"]["text"] == f"0.900 vs ≥ 0.95: missed by 0.050 (0.95{X})"
    assert by_key["overhead_p50_ms_c1_burst"]["status"] == "untargeted"
    # a first-token tail on a level where the rig's own core was saturated says so; a CPU figure is still the proxy's
    assert by_key["overhead_p99_ms_c512_paced"]["text"].endswith("(the mock + load generator core was saturated)")
    assert by_key["throughput_ratio_c512_paced"]["text"].endswith("(the mock + load generator core was saturated)")
    assert by_key["cpu_ms_per_stream_c512_paced"]["text"] == f"2.000 ms vs ≤ 1.2 ms: missed by 0.800 ms (1.67{X})"
    assert by_key["rss_idle_mb"]["status"] == "met" and by_key["idle_conn_kib"]["status"] == "not measured"
    assert by_key["streams"]["status"] == "not measured"

    text = (tmp_path / "report.md").read_text()
    assert f"| TTFT overhead p50, c=1, paced | ≤ 0.2 ms | 0.41 ms | missed by 0.21 ms (2.05{X}) |" in text
    assert (f"| RSS at 2,000 streams (peak) | ≤ 100 MB | 120.0 MB | missed by 20.0 MB (1.20{X}) (section failed) |"
            in text)
    assert "the ttft report, verbatim" in text
    assert "**memory failed**: exit status 1" in text and "Traceback: something broke" in text
    assert "| llmproxy / nginx CPU per stream (paced) | — | 2.00 | — |" in text
    assert "|  | c=1 | c=64 | c=512 † |" in text and "† The core running the mock backend" in text
    for image in ("ttft_cdf_paced.png", "ttft_cdf_burst.png", "overhead_by_concurrency.png", "memory.png"):
        assert f"]({image})" in text and (tmp_path / image).stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text())["targets"] == json.loads(json.dumps(targets))

    updated = readme.read_text()
    assert updated.startswith(README_BEFORE + report.BEGIN + "\n") and updated.endswith(report.END + README_AFTER)
    assert "old numbers" not in updated and f"missed by 0.21 ms (2.05{X})" in updated
    assert "[bench/README.md](bench/README.md)" in updated and "2026-11-23 05:12 UTC" in updated

    # the same directory gives the same README, through the command line too
    assert main(["--readme-from", str(tmp_path), "--readme", str(readme)]) == 0
    assert readme.read_text() == updated


def test_readme_without_markers_is_left_alone(tmp_path):
    synthetic_results(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(README_BEFORE + report.END + "\n" + report.BEGIN + README_AFTER)  # out of order
    before = readme.read_text()
    logged: list[str] = []

    report.write_outputs(tmp_path, readme, logged.append)

    assert readme.read_text() == before
    assert any("WARNING" in line and "markers" in line for line in logged), logged
