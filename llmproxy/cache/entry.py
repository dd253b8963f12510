"""A stored answer: the response the client saw (status, type, the body bytes or the raw event bytes of a
stream) and the usage it was metered at, so a hit is recorded with the original usage."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

Usage = tuple[int, int, "int | None", "int | None", str]  # prompt, completion, cache read, cache write, source
ENTRY_OVERHEAD = 256  # bytes counted per entry besides its body and key: the memory store's bound is honest


@dataclass(frozen=True, slots=True)
class Entry:
    status: int
    content_type: bytes
    streaming: bool  # the body is a stream's events, replayed as a stream
    body: bytes
    usage: Usage | None  # None: the answer was not metered (usage.metering off)
    backend: str  # who answered it first

    @property
    def size(self) -> int:
        return len(self.body) + ENTRY_OVERHEAD

    def encode(self) -> bytes:
        """One value for a shared store: a JSON line of the metadata, then the body as it is."""
        meta = {"s": self.status, "t": self.content_type.decode("latin-1"), "st": self.streaming,
                "u": self.usage, "b": self.backend}
        return orjson.dumps(meta) + b"\n" + self.body

    @staticmethod
    def decode(data: bytes) -> Entry:
        """Raises ValueError (orjson's JSONDecodeError is one) or KeyError for what `encode` did not write."""
        line, _, body = data.partition(b"\n")
        meta = orjson.loads(line)
        usage = meta["u"]
        return Entry(meta["s"], meta["t"].encode("latin-1"), meta["st"], body,
                     tuple(usage) if usage is not None else None, meta["b"])
