"""EagerRun: a request's coroutine run from the callback that received it, resumed from the futures it awaits."""

from __future__ import annotations

import asyncio

import pytest

from llmproxy.eager import EagerRun


def test_a_coroutine_that_never_waits_runs_to_its_end_inside_the_constructor():
    async def main() -> list[str]:
        steps: list[str] = []

        async def request() -> None:
            steps.append("ran")

        run = EagerRun(request(), asyncio.get_running_loop())
        steps.append("after")
        assert run.done
        return steps

    assert asyncio.run(main()) == ["ran", "after"]  # no loop iteration in between: no task hop


def test_it_resumes_from_the_done_callback_of_what_it_awaits():
    async def main() -> list[object]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        got: list[object] = []

        async def request() -> None:
            got.append(await future)

        run = EagerRun(request(), loop)
        assert not run.done and got == []
        future.set_result(7)
        await asyncio.sleep(0)  # the done callback runs on the next loop iteration
        assert run.done
        return got

    assert asyncio.run(main()) == [7]


def test_a_bare_yield_goes_round_the_loop_once():
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        order: list[str] = []

        async def request() -> None:
            order.append("before")
            await asyncio.sleep(0)
            order.append("after")

        EagerRun(request(), loop)
        order.append("constructor returned")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return order

    assert asyncio.run(main()) == ["before", "constructor returned", "after"]


@pytest.mark.parametrize("when", ["waiting", "future already done"])
def test_cancel_raises_cancelled_error_at_the_await_as_task_cancel_does(when: str):
    async def main() -> tuple[list[str], bool]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        seen: list[str] = []

        async def request() -> None:
            try:
                await future
                seen.append("resumed")
            except asyncio.CancelledError:
                seen.append("cancelled")

        run = EagerRun(request(), loop)
        if when == "future already done":
            future.set_result(None)  # its callback is scheduled, not run: cancel must still win
        run.cancel()
        for _ in range(3):
            await asyncio.sleep(0)
        return seen, future.cancelled()

    seen, future_cancelled = asyncio.run(main())
    assert seen == ["cancelled"]
    assert future_cancelled is (when == "waiting")  # the awaited future is cancelled, as Task.cancel does


def test_cancelling_a_finished_run_does_nothing():
    async def main() -> bool:
        async def request() -> None:
            pass

        run = EagerRun(request(), asyncio.get_running_loop())
        run.cancel()
        return run.done

    assert asyncio.run(main())
