"""bench.instructions, run with tiny counts: the proxy under callgrind, counted per shape with metering on and off,
twice, gives positive counts that repeat, a report of the documented shape and deltas against the baseline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.callgrind import find_valgrind
from tests.support import REPO

pytestmark = pytest.mark.skipif(
    find_valgrind() is None,
    reason="valgrind (callgrind and callgrind_control) is not installed: apt-get install valgrind")

SHAPES = ("stream1", "json", "local404")
# A few requests a shape are too few to amortise a garbage collection or a timer tick the way the default
# hundred do (where the spread stays under 0.5 %): this only checks that the counts repeat at all. With three,
# one young collection falling in one run's window of local404 (about 25,000 instructions) made a spread of
# 5.2 % on a clean CI run; eight make such a collection under 2 %.
TINY_RUN_REQUESTS = 8
TINY_RUN_SPREAD = 0.05


def test_instructions_bench_counts_each_shape_positively_and_repeatably(tmp_path):
    out = tmp_path / "instructions.json"
    run = subprocess.run([sys.executable, "-m", "bench.instructions", "--requests", str(TINY_RUN_REQUESTS),
                          "--warmup", "1", "--repeat", "2", "--shapes", ",".join(SHAPES), "--nginx", "off",
                          "--idle-seconds", "1", "--json", str(out)],
                         cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    for heading in ("### Instructions per request", "### Phases, from differences between shapes",
                    "### Repeatability", "### Against the baseline", "top function (self)"):
        assert heading in run.stdout, run.stdout

    document = json.loads(out.read_text())
    targets = document["targets"]
    assert set(targets) == {"metering_on", "metering_off"}  # nginx off
    for target, figures in targets.items():
        assert set(figures) == set(SHAPES)
        for shape, figure in figures.items():
            first, second = figure["per_request"]
            assert first > 10_000 and second > 10_000, (target, shape, figure)  # a request is never free
            assert figure["spread"] < TINY_RUN_SPREAD, (target, shape, figure)
        assert figures["stream1"]["events"] == 3 and figures["json"]["events"] == 1
        # a proxied request costs more than one the proxy answers itself after parsing and routing it
        assert document["derived"][target]["upstream"] > 0
    # metering costs instructions: the one difference between the two configs
    assert targets["metering_on"]["stream1"]["mean"] > targets["metering_off"]["stream1"]["mean"]
    assert document["derived"]["metering_on"]["fixed"] == targets["metering_on"]["stream1"]["mean"]
    # the committed baseline covers these shapes: a delta for each
    assert set(document["deltas"]["metering_on"]) == set(SHAPES), document["deltas"]
    assert document["headline"]["ir_per_request_stream1_metering_on"] > 0
