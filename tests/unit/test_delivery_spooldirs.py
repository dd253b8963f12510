"""One spool per worker: finding them, the dead-letters CLI across them, delivering what a former worker
count left behind."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import uvloop

from llmproxy.config.model import FileReporterConfig, ReporterConfig, UsageConfig
from llmproxy.delivery import dead_letters_main
from llmproxy.delivery.spool import SpoolDB
from llmproxy.delivery.spooldirs import LeftoverDelivery, existing_spools, leftover_spools, worker_spool_dir


def _spool(path: Path, *request_ids: str, cap: int = 1_000_000) -> None:
    """A spool with one pending row per request id (reporter "f"); beyond `cap` the oldest are dead letters."""
    db = SpoolDB(str(path))
    try:
        now = time.time()
        db.insert_batch([({"request_id": rid}, now) for rid in request_ids], ["f"], cap)
    finally:
        db.close()


def _cli(spool_dir: Path, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = dead_letters_main(list(argv), str(spool_dir), out, err)
    return code, out.getvalue(), err.getvalue()


def test_spools_are_the_base_one_then_workers_by_index(tmp_path: Path) -> None:
    assert existing_spools(str(tmp_path / "missing")) == []
    for name in ("worker-10", "worker-2", "worker-x"):
        _spool(tmp_path / name)
    (tmp_path / "worker-3").mkdir()  # no database: not a spool
    _spool(tmp_path)
    assert [name for name, _ in existing_spools(str(tmp_path))] == [".", "worker-2", "worker-10"]
    assert worker_spool_dir(str(tmp_path), 2) == str(tmp_path / "worker-2")


def test_leftovers_are_spools_of_another_worker_count_with_rows(tmp_path: Path) -> None:
    _spool(tmp_path, "a")
    _spool(tmp_path / "worker-0", "b")
    _spool(tmp_path / "worker-1", "c")
    _spool(tmp_path / "worker-2")  # empty: nothing to deliver
    _spool(tmp_path / "worker-3", "d", "e", cap=1)  # only a dead letter left: a replay would need a deliverer
    db = SpoolDB(str(tmp_path / "worker-3"))
    db.conn.execute("DELETE FROM pending")
    db.close()
    assert leftover_spools(str(tmp_path), 1) == [str(tmp_path / n) for n in ("worker-0", "worker-1", "worker-3")]
    assert leftover_spools(str(tmp_path), 2) == [str(tmp_path), str(tmp_path / "worker-3")]
    assert leftover_spools(str(tmp_path), 4) == [str(tmp_path)]


def test_dead_letters_cli_lists_and_replays_every_workers_spool(tmp_path: Path) -> None:
    _spool(tmp_path / "worker-0", "a1", "a2", cap=1)  # the size cap makes a1 a dead letter
    _spool(tmp_path / "worker-1", "b1", "b2", cap=1)
    code, out, _ = _cli(tmp_path, "list")
    letters = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert [(d["spool"], d["request_id"], d["reason"]) for d in letters] == [
        ("worker-0", "a1", "outbox_full"), ("worker-1", "b1", "outbox_full")]
    code, out, _ = _cli(tmp_path, "list", "--spool", "worker-1")
    assert [json.loads(line)["request_id"] for line in out.splitlines()] == ["b1"]

    code, _, err = _cli(tmp_path, "replay", "--id", str(letters[0]["id"]))
    assert code == 1 and "worker-0, worker-1" in err and "--spool" in err
    code, out, _ = _cli(tmp_path, "replay", "--id", str(letters[1]["id"]), "--spool", "worker-1")
    assert (code, json.loads(out)) == (0, {"replayed": 1})
    code, out, _ = _cli(tmp_path, "replay", "--all")
    assert (code, json.loads(out)) == (0, {"replayed": 1})
    assert _cli(tmp_path, "list")[1] == ""
    code, _, err = _cli(tmp_path, "list", "--spool", "worker-7")
    assert code == 1 and "worker-7" in err


def test_dead_letters_cli_without_any_spool_says_where_it_looked(tmp_path: Path) -> None:
    code, _, err = _cli(tmp_path / "nowhere", "list")
    assert code == 1 and "no usage spool at" in err


def test_leftover_delivery_sends_what_an_earlier_worker_count_left(tmp_path: Path) -> None:
    _spool(tmp_path / "spool", "old-1", "old-2")  # from a run with workers: 1
    out = tmp_path / "usage.jsonl"
    usage = UsageConfig(enabled=True, spool_dir=str(tmp_path / "spool"), flush_interval=0.02, reporters=[
        ReporterConfig(name="f", type="file", file=FileReporterConfig(path=str(out)))])

    async def main() -> None:
        leftovers = LeftoverDelivery(usage, None, workers=2)
        leftovers.start()
        try:
            deadline = time.monotonic() + 10
            while not out.exists() or len(out.read_text().splitlines()) < 2:
                assert time.monotonic() < deadline, "leftover rows not delivered"
                await asyncio.sleep(0.02)
        finally:
            await leftovers.close()

    uvloop.run(main())
    assert sorted(json.loads(line)["request_id"] for line in out.read_text().splitlines()) == ["old-1", "old-2"]
    assert leftover_spools(str(tmp_path / "spool"), 2) == []
