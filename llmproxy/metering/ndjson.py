"""Incremental NDJSON metering (Ollama /api/chat and /api/generate, docs/protocols.md §4.2).

One JSON object per line, LF-terminated (a CR before it is JSON whitespace). Only the unfinished trailing line
is kept between reads, capped by `max_line`. Nothing is ever held back or removed: output is input.
"""

from __future__ import annotations

import orjson

from llmproxy.metering.dialects import Spec
from llmproxy.metering.usage import response_model


class NDJSONMeter:
    """Meter for ollama-ndjson; see llmproxy.metering.Meter for the contract."""

    __slots__ = ("_carries", "_count", "_extract", "_max", "_tail", "content_events", "overflowed", "response_id",
                 "response_model", "usage")

    def __init__(self, spec: Spec, max_line: int) -> None:
        self.usage = None
        self.response_id = None  # Ollama's native API has no stored responses
        self.response_model: str | None = None
        self.content_events = 0
        self.overflowed = False
        self._carries = spec.carries
        self._count = spec.count
        self._extract = spec.extract
        self._max = max_line
        self._tail = bytearray()  # the unfinished trailing line

    def feed(self, data: bytes) -> bytes:
        if self.overflowed or not data:
            return data
        tail = self._tail
        # Fast path, the usual read: whole lines, none of them the `done` line.
        if not tail and data[-1] == 10 and len(data) <= self._max and not self._carries(data):
            self.content_events += self._count(data)
            return data
        end = data.rfind(b"\n") + 1
        if end == 0:
            tail += data
            if len(tail) > self._max:
                self._overflow()
            return data
        if tail:
            region = b"".join((tail, data[:end]))
            tail.clear()
        else:
            region = data if end == len(data) else data[:end]
        self._read(region)
        if not self.overflowed and end < len(data):
            tail += data[end:]
            if len(tail) > self._max:
                self._overflow()
        return data

    def finish(self) -> bytes:
        """End of stream: read a last line that had no LF (a non-streamed body, or a cut-off stream)."""
        if self._tail and not self.overflowed:
            line = bytes(self._tail)
            self._tail.clear()
            self.content_events += self._count(line)
            if self._carries(line):
                self._line(line)
        return b""

    def _read(self, region: bytes) -> None:
        """Read the complete lines of `region`."""
        carries = self._carries
        if len(region) <= self._max:  # no line in it can be over the cap: count the region at once
            self.content_events += self._count(region)
            if carries(region):
                for line in region.split(b"\n"):
                    if carries(line):
                        self._line(line)
            return
        for line in region.split(b"\n"):  # in order, so that an overflow stops reading where it happens
            if len(line) > self._max:
                self._overflow()
                return
            self.content_events += self._count(line)
            if carries(line):
                self._line(line)

    def _line(self, line: bytes) -> None:
        try:
            obj = orjson.loads(line)
        except ValueError:
            return  # malformed: ignored
        usage = self._extract(obj)
        if usage is not None:
            # Counts are cumulative (vLLM continuous stats, Ollama's zeros): each one reported replaces the last,
            # and one an event does not carry (a dialect that splits usage over events) is kept.
            self.usage = usage if self.usage is None else self.usage.merged(usage)
            self.response_model = response_model(obj) or self.response_model

    def _overflow(self) -> None:
        self.overflowed = True
        self._tail.clear()
