"""bench.ab runs this checkout's proxy and another revision's side by side and cleans up its worktree."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import REPO


def _worktrees() -> set[str]:
    """The paths of the repository's worktrees (not their commits: other worktrees may move meanwhile)."""
    listing = subprocess.run(["git", "-C", str(REPO), "worktree", "list", "--porcelain"], capture_output=True,
                             text=True, timeout=30).stdout
    return {line.removeprefix("worktree ") for line in listing.splitlines() if line.startswith("worktree ")}


def test_ab_against_head_streams_through_both_proxies_and_removes_its_worktree(tmp_path):
    before = _worktrees()
    out = tmp_path / "ab.json"
    result = subprocess.run([sys.executable, "-m", "bench.ab", "--baseline", "HEAD", "--concurrency", "2",
                             "--slice-seconds", "0.5", "--rounds", "1", "--json", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["result"]
    for name in ("new", "old"):
        assert rows[name]["streams"] > 0 and rows[name]["errors"] == 0
        assert rows[name]["cpu_ms_per_stream"] > 0
    assert "CPU per stream, new / old:" in result.stdout
    assert _worktrees() == before
