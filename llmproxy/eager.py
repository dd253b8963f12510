"""Run a request's coroutine eagerly: start it inside the callback that received the request.

`loop.create_task()` would only start the pipeline on the next loop iteration, and a Task costs an
allocation and a scheduling hop per request. On the common path (body already read, an idle pooled
connection) the pipeline runs straight to the upstream write without ever suspending, so we run it
synchronously, and resume it from the done-callback of whatever future it awaits. This is Python 3.12's
eager task factory, minus the Task object, and it keeps Task's cancellation rule: cancelling cancels the
awaited future, so whatever produces it (a connect, a pool wait) is cleaned up by its owner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class EagerRun:
    """Drives one coroutine from callbacks. The coroutine must handle its own exceptions."""

    __slots__ = ("_coro", "_loop", "_must_cancel", "_waiting", "done")

    def __init__(self, coro: Coroutine[Any, Any, None], loop: asyncio.AbstractEventLoop) -> None:
        self._coro = coro
        self._loop = loop
        self._waiting: asyncio.Future[Any] | None = None
        self._must_cancel = False
        self.done = False
        self._step()

    def cancel(self) -> None:
        """Raise CancelledError inside the coroutine at its current await (as Task.cancel does)."""
        if self.done:
            return
        waiting = self._waiting
        if waiting is None or not waiting.cancel():
            self._must_cancel = True  # the future is already done: throw on the next step instead

    def _step(self, _future: object = None) -> None:
        self._waiting = None
        coro = self._coro
        try:
            if self._must_cancel:
                self._must_cancel = False
                awaited = coro.throw(asyncio.CancelledError())
            else:
                awaited = coro.send(None)
        except StopIteration:
            self.done = True
            return
        except BaseException:
            self.done = True
            raise
        if awaited is None:  # a bare `yield` (asyncio.sleep(0)): just go round the loop once
            self._loop.call_soon(self._step)
            return
        awaited._asyncio_future_blocking = False
        self._waiting = awaited
        awaited.add_done_callback(self._step)
