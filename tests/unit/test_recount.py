"""The recounter: background prompt counts, bounded in time, concurrency and backlog; `done` exactly once."""

from __future__ import annotations

import asyncio

import pytest

from llmproxy.config.model import RecountConfig
from llmproxy.recount import Recounter


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_a_count_reaches_done_once():
    async def main() -> list:
        recounter, got = Recounter(RecountConfig()), []

        async def count() -> int:
            return 42

        assert recounter.submit(count, got.append)
        await recounter.close()
        return got

    assert run(main()) == [42]


@pytest.mark.parametrize("failure", ["timeout", "error", "none"])
def test_a_count_that_fails_or_is_late_gives_none(failure: str):
    async def main() -> list:
        recounter, got = Recounter(RecountConfig(timeout=0.05)), []

        async def count() -> int | None:
            if failure == "timeout":
                await asyncio.sleep(5)
            if failure == "error":
                raise ConnectionRefusedError("no tokenizer")
            return None

        recounter.submit(count, got.append)
        await recounter.close()
        return got

    assert run(main()) == [None]


def test_counts_run_at_most_concurrency_at_once():
    async def main() -> int:
        recounter = Recounter(RecountConfig(concurrency=2))
        running, peak, got = [0], [0], []

        async def count() -> int:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            await asyncio.sleep(0.01)
            running[0] -= 1
            return 1

        for _ in range(10):
            recounter.submit(count, got.append)
        await recounter.close()
        assert got == [1] * 10
        return peak[0]

    assert run(main()) == 2


def test_beyond_max_pending_or_when_off_nothing_is_started():
    async def main() -> tuple[list[bool], list[bool]]:
        async def count() -> int:
            await asyncio.sleep(0.01)
            return 1

        bounded, got = Recounter(RecountConfig(max_pending=3)), []
        accepted = [bounded.submit(count, got.append) for _ in range(5)]
        off = Recounter(RecountConfig(enabled=False))
        refused = [off.submit(count, got.append)]
        await bounded.close()
        assert got == [1, 1, 1]  # the two refused were never started: their caller delivers them
        return accepted, refused

    accepted, refused = run(main())
    assert accepted == [True, True, True, False, False] and refused == [False]


def test_close_gives_up_on_counts_after_their_timeout_and_still_calls_done():
    async def main() -> list:
        recounter, got = Recounter(RecountConfig(timeout=0.05)), []

        async def stuck() -> int:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                await asyncio.sleep(60)  # ignores the timeout's cancellation once: close() must still end
            return 1

        recounter.submit(stuck, got.append)
        await recounter.close()
        return got

    assert run(main()) == [None]


def test_a_bug_in_done_is_logged_not_raised(caplog):
    async def main() -> None:
        recounter = Recounter(RecountConfig())

        async def count() -> int:
            return 1

        def done(_: int | None) -> None:
            raise RuntimeError("outbox bug")

        recounter.submit(count, done)
        await recounter.close()

    run(main())
    assert "delivering a recounted record failed" in caplog.text
