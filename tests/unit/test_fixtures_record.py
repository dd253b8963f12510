"""tests/fixtures/record.py: the committed streams are exactly what the mock backends send today.

The recorder starts the three mocks on 127.0.0.1, records every fixture again and compares byte for byte;
a difference means the mock changed a shape and the fixtures (and their expected usage) must be re-made.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.fixtures.record import SPECS, STREAMS, sse_payloads
from tests.support import REPO


def test_recorded_streams_are_reproduced_byte_for_byte_by_the_mocks():
    result = subprocess.run([sys.executable, "-m", "tests.fixtures.record", "--check"], cwd=REPO, timeout=90,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{2 * len(SPECS)} of {2 * len(SPECS)} files unchanged" in result.stdout


def test_every_fixture_says_how_it_was_made_and_hand_written_ones_say_why():
    for spec in SPECS:
        meta = json.loads((STREAMS / f"{spec.name}.json").read_text())
        assert meta["fixture"] == spec.name + spec.ext
        assert meta["body_bytes"] == (STREAMS / meta["fixture"]).stat().st_size
        assert meta["made"] in ("recorded", "hand-written")
        if meta["made"] == "hand-written":
            assert any("hand-written" in note for note in meta["notes"])


def test_sse_payloads_drops_comments_and_joins_data_lines():
    assert sse_payloads(b':\n\ndata: {"a":1}\n\ndata:x\ndata: y\n\n') == ['{"a":1}', "x\ny"]
