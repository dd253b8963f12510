"""A stored answer: the response the client saw (status, type, the body bytes or the raw event bytes of a
stream) and the usage it was metered at, so a hit is recorded with the original usage."""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

Usage = tuple[int, int, "int | None", "int | None", str]  # prompt, completion, cache read, cache write, source
# The version of `encode`'s format: a value another version wrote is a miss (and is deleted), never misread.
FORMAT = 2
USAGE_SOURCES = ("reported", "estimated", "none")  # metering/session.py's REPORTED, ESTIMATED, NONE
_HEADER_VALUE = re.compile(r"[\x20-\x7e\t]*")  # visible ASCII, space and tab: no CR or LF to split a head
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
        """One value for a shared store: a JSON line of the metadata (with the format's version), then the body
        as it is."""
        meta = {"v": FORMAT, "s": self.status, "t": self.content_type.decode("latin-1"), "st": self.streaming,
                "u": self.usage, "b": self.backend}
        return orjson.dumps(meta) + b"\n" + self.body

    @staticmethod
    def decode(data: bytes) -> Entry:
        """The entry `encode` wrote; raises InvalidEntry (a ValueError) for anything else: a shared store holds
        what any process (of any version) wrote there, and its content type goes into response heads."""
        line, _, body = data.partition(b"\n")
        try:
            meta = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise InvalidEntry("metadata is not JSON") from None
        if not isinstance(meta, dict) or meta.get("v") != FORMAT:
            raise InvalidEntry("not this format's version")
        status, content_type, streaming, backend = meta.get("s"), meta.get("t"), meta.get("st"), meta.get("b")
        if type(status) is not int or not 200 <= status <= 599:
            raise InvalidEntry(f"status {status!r}")
        if not isinstance(content_type, str) or not _HEADER_VALUE.fullmatch(content_type):
            raise InvalidEntry("content type is not a header value")
        if type(streaming) is not bool or not isinstance(backend, str):
            raise InvalidEntry("streaming or backend")
        return Entry(status, content_type.encode("ascii"), streaming, body, _usage(meta.get("u")), backend)


class InvalidEntry(ValueError):
    pass


def _usage(value: object) -> Usage | None:
    """The stored usage, checked field by field (raises InvalidEntry)."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 5:
        raise InvalidEntry("usage")
    prompt, completion, cache_read, cache_write, source = value
    counts_ok = all(type(n) is int and n >= 0 for n in (prompt, completion)) and all(
        n is None or (type(n) is int and n >= 0) for n in (cache_read, cache_write))
    if not counts_ok or source not in USAGE_SOURCES:
        raise InvalidEntry("usage")
    return prompt, completion, cache_read, cache_write, source
