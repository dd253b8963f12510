"""File reporter: appends one JSON line per record, one write + fsync per batch of rows.

The file is reopened for every batch so that log rotation (rename, then a new file) needs no signal.
A failed write is retried with back-off forever (bounded by the outbox size cap); a partially
written batch is written again in full, so a line may appear twice — each carries its request_id.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

from llmproxy.config.model import FileReporterConfig
from llmproxy.delivery.retry import AttemptResult, RetryPolicy, decide
from llmproxy.delivery.spool import Action, Row

BATCH_SIZE = 512


class FileSender:
    def __init__(self, config: FileReporterConfig, rng: random.Random) -> None:
        self.path = config.path
        self.rng = rng
        self.policy = RetryPolicy()
        # Its own thread: a slow disk here must not delay the outbox's group commits.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-file")

    async def deliver(self, rows: list[Row]) -> list[Action]:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._write, [row.body for row in rows])
            result = AttemptResult(200)
        except OSError as exc:
            result = AttemptResult(None, f"io: {exc}", failure="io_error")
        now = time.time()
        return [decide(row, result, now, self.policy, self.rng) for row in rows]

    def _write(self, bodies: list[bytes]) -> None:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        with open(self.path, "ab") as file:
            file.write(b"".join(body + b"\n" for body in bodies))
            file.flush()
            os.fsync(file.fileno())

    async def close(self) -> None:
        # wait=False: a write stuck on a dead disk must not hang shutdown; its rows stay pending.
        self._executor.shutdown(wait=False)
