"""Incremental SSE metering, and removal of the usage-only event the proxy asked for on a client's behalf.

Parsing follows WHATWG / openai-python (docs/protocols.md §1): lines end in CRLF, LF or CR; a blank line ends an event;
`data:` loses one optional space and several data lines join with LF; comments and other fields are ignored.
State between reads is the unfinished trailing line plus the data lines of the event being read, both capped
by `max_line`: past it the meter gives up on the stream (`overflowed`) but bytes keep flowing untouched.

A CRLF may be split between two reads. The CR already ended its line, so a LF that starts the next read is
not a line of its own; `_lf` remembers what that LF belongs to (dropped, held back, or forwarded).
"""

from __future__ import annotations

import orjson

from llmproxy.metering.dialects import Spec
from llmproxy.metering.usage import response_model

_EVENT_END = (b"\n\n", b"\r\n\r\n")  # bytes ending so end in a blank line: no event is left open
_LF_NONE = 0  # the last read did not end in a line-ending CR
_LF_SKIP = 1  # a LF next belongs to a line already handled (or, stripping, to a removed event): drop it
_LF_HOLD = 2  # stripping: a LF next belongs to the open event, which is held back
_LF_EMIT = 3  # stripping: a LF next ends an event already forwarded: forward it


def _data_value(line: bytes) -> bytes:
    value = line[5:]  # after "data:"; a bare "data" line is a data field with an empty value
    return value[1:] if value[:1] == b" " else value


def _is_data(line: bytes, n: int) -> bool:
    # The field name is everything before the first colon, so "data:..." or exactly "data".
    return line.startswith(b"data:") or (n == 4 and line.startswith(b"data"))


class SSEMeter:
    """Meter for the SSE dialects; see llmproxy.metering.Meter for the contract."""

    __slots__ = ("_carries", "_count", "_event", "_event_size", "_extract", "_held", "_identify", "_idle", "_lf",
                 "_marked", "_max", "_strip", "_tail", "_usage_at", "content_events", "overflowed", "response_id",
                 "response_model", "usage")

    def __init__(self, spec: Spec, strip: bool, max_line: int) -> None:
        self.usage = None
        self.response_id: str | None = None
        self.response_model: str | None = None
        self.content_events = 0
        self.overflowed = False
        self._carries = spec.usage_at.carries
        self._usage_at = spec.usage_at.find
        self._count = spec.count
        self._extract = spec.extract
        self._identify = spec.identify
        self._strip = strip
        self._max = max_line
        self._tail = bytearray()  # the unfinished trailing line
        self._event: list[bytes] = []  # data lines (without line end) of the event being read
        self._event_size = 0
        self._marked = False  # a data line of that event may carry usage: parse it when it ends
        self._held = bytearray()  # stripping: complete lines of the open event, not forwarded yet
        self._lf = _LF_NONE
        self._idle = True  # none of the above holds anything: the next read starts a fresh event

    def feed(self, data: bytes) -> bytes:
        if self.overflowed or not data:
            return data
        if self._idle and data.endswith(_EVENT_END) and len(data) <= self._max:
            # The usual read: whole events, nothing open before them and nothing left open after.
            self.content_events += self._count(data)
            hit = self._usage_at(data)
            if hit < 0:
                return data  # nothing to parse, nothing to remember: the same bytes object goes on
            if data.find(b"\r") < 0:  # LF line ends only, as every backend sends: events end at "\n\n"
                return self._read_marked_events(data, hit)
            out = self._walk_lines(data, True)
            return out if self._strip else data
        return self._feed_lines(data)

    def finish(self) -> bytes:
        """End of stream: read a last unterminated line and event; return what was held back, if anything."""
        if self.overflowed:
            return b""
        tail = bytes(self._tail)
        pending = bytes(self._held) + tail if self._strip else b""
        self._tail.clear()
        self._held.clear()
        self._lf = _LF_NONE
        self._idle = True
        if tail:
            self.content_events += self._count(tail)
            if _is_data(tail, len(tail)):
                self._add_data(tail, len(tail), True)
        # A client drops an unterminated event, but its usage was still reported: bill it.
        usage_only = bool(self._event) and self._dispatch()
        return b"" if usage_only else pending

    # internals ------------------------------------------------------------------------------------

    def _read_marked_events(self, data: bytes, hit: int) -> bytes:
        """Whole LF-terminated events, nothing open before them: parse only the events that may carry usage,
        the first of which holds offset `hit`.

        A fast backend puts dozens of events in one read, and the one with the usage among them; finding it
        with C-level scans costs a fraction of walking every line, or every event, in Python. Returns `data`
        itself unless a usage-only event is stripped from it.
        """
        kept, emit = [], 0
        while hit >= 0:
            boundary = data.rfind(b"\n\n", 0, hit)  # the blank line that ends the event before
            start = 0 if boundary < 0 else boundary + 2
            end = data.find(b"\n\n", hit) + 2  # found: `data` ends with a blank line
            if self._usage_only(data[start:end]) and self._strip:
                kept.append(data[emit:start])
                emit = end
            if self.overflowed:
                break  # metering gave up: the rest goes on untouched
            hit = self._usage_at(data, end)
        if not kept:
            return data
        kept.append(data[emit:])
        return b"".join(kept)

    def _usage_only(self, event: bytes) -> bool:
        """Read one whole event (its blank line included); True if it is a usage-only event."""
        for line in event.split(b"\n"):
            n = len(line)
            if n and _is_data(line, n):
                self._add_data(line, n, True)
                if self.overflowed:
                    return False
        return bool(self._event) and self._dispatch()

    def _feed_lines(self, data: bytes) -> bytes:
        body, prefix = self._after_cr(data) if self._lf else (data, b"")
        tail, size = self._tail, len(body)
        end = body.rfind(b"\n") + 1
        if end < size and (cr := body.rfind(b"\r", end)) >= 0:  # a CR after the last LF ends a line too
            end = cr + 1
        if end == 0:  # no line ends here: it all extends the trailing line
            tail += body
            self._idle = not (tail or self._event or self._held)
            if len(tail) + len(self._held) > self._max:
                prefix += self._overflow()
            return prefix if self._strip else data
        if tail:
            region = b"".join((tail, body[:end]))
            tail.clear()
        else:
            region = body if end == size else body[:end]
        out = self._read(region)
        if self.overflowed:
            return prefix + out + body[end:] if self._strip else data
        if end < size:
            tail += body[end:]
            self._lf = _LF_NONE  # the CR that ended the region was followed by more: a line end of its own
        if len(tail) + len(self._held) > self._max:  # the open event, held back whole when stripping
            out += self._overflow()
        self._idle = not (tail or self._event or self._held or self._lf)
        return prefix + out if self._strip else data

    def _after_cr(self, data: bytes) -> tuple[bytes, bytes]:
        """Take off a LF that completes a CRLF split between reads; return (the rest, bytes to forward first)."""
        lf, self._lf = self._lf, _LF_NONE
        if not lf or data[0] != 10:
            return data, b""
        if lf == _LF_HOLD:
            self._held.append(10)
        return data[1:], b"\n" if lf == _LF_EMIT else b""

    def _read(self, region: bytes) -> bytes:
        """Read complete lines; return (stripping) what to forward of the events completed in them."""
        self.content_events += self._count(region)
        carries = self._carries(region)
        if (not (carries or self._event or self._held) and region.endswith(_EVENT_END)
                and len(region) <= self._max):
            return region  # whole events again, only cut differently: nothing to parse or remember
        return self._walk_lines(region, carries)

    def _walk_lines(self, region: bytes, carries: bool) -> bytes:
        """Read complete lines one by one; `carries` says whether any of them may carry usage."""
        if self._strip:
            return self._walk_strip(region, carries)
        self._walk(region, carries)
        if region[-1] == 13:
            self._lf = _LF_SKIP
        return b""

    def _walk(self, region: bytes, carries: bool) -> None:
        """Read the complete lines of `region`, not stripping."""
        limit = self._max
        for line in region.splitlines():
            n = len(line)
            if not n:
                if self._event:
                    self._dispatch()
            elif n > limit:
                self._overflow()
                return
            elif _is_data(line, n):
                self._add_data(line, n, carries)
                if self.overflowed:
                    return

    def _walk_strip(self, region: bytes, carries: bool) -> bytes:
        """Read the complete lines of `region`; return the events completed in it, usage-only ones removed.

        The open event's lines go to `_held`, to be forwarded (or removed) when its blank line arrives.
        """
        held, parts, limit = self._held, [], self._max
        pos = start = emit = 0  # region offsets: current line, open event's first line, first byte not yet sent
        for line in region.splitlines(True):
            end = pos + len(line)
            n = len(line) - (2 if line.endswith(b"\r\n") else 1)
            if not n:
                if self._event and self._dispatch():  # usage-only: cut [start, end), with any held part
                    if held:
                        held.clear()
                    elif start > emit:
                        parts.append(region[emit:start])
                    emit = end
                elif held:  # the event begun in an earlier read is complete and stays
                    parts.append(bytes(held))
                    held.clear()
                start = end
            elif n > limit:
                self._overflow_in(parts, region[emit:])
                return b"".join(parts)
            elif _is_data(line, n):
                self._add_data(line[:n], n, carries)
                if self.overflowed:
                    self._overflow_in(parts, region[emit:])
                    return b"".join(parts)
            pos = end
        if start > emit:
            parts.append(region[emit:start])
        if start < len(region):
            held += memoryview(region)[start:]
        if region[-1] == 13:
            self._lf = _LF_HOLD if held else _LF_SKIP if emit == len(region) else _LF_EMIT
        return b"".join(parts)

    def _add_data(self, line: bytes, n: int, carries: bool) -> None:
        self._event.append(line)
        self._event_size += n
        if self._event_size > self._max:  # one event's data is bounded like one line
            self._overflow()
        elif carries and not self._marked:
            self._marked = self._carries(line)

    def _dispatch(self) -> bool:
        """Read the usage of the event just ended; return True if it is a usage-only event (no choices).

        Only an event holding a usage marker is parsed; a malformed one is ignored.
        """
        lines, marked = self._event, self._marked
        self._event = []
        self._event_size = 0
        self._marked = False
        if not marked:
            return False
        payload = _data_value(lines[0]) if len(lines) == 1 else b"\n".join(map(_data_value, lines))
        try:
            obj = orjson.loads(payload)
        except ValueError:
            return False
        usage = self._extract(obj)
        if usage is None:
            return False
        # Counts are cumulative (vLLM continuous stats, Ollama's zeros): each one reported replaces the last,
        # and one an event does not carry (a dialect that splits usage over events) is kept.
        self.usage = usage if self.usage is None else self.usage.merged(usage)
        if self._identify is not None:
            self.response_id = self._identify(obj) or self.response_id
        self.response_model = response_model(obj) or self.response_model
        return isinstance(obj, dict) and not obj.get("choices")

    def _overflow_in(self, parts: list[bytes], unsent: bytes) -> None:
        """Overflow while stripping a region: forward everything not yet sent, in order."""
        if self._held:
            parts.append(bytes(self._held))
        parts.append(unsent)
        self._overflow()

    def _overflow(self) -> bytes:
        """Stop metering this stream; return the bytes held back (stripping), which must now be forwarded."""
        self.overflowed = True
        pending = bytes(self._held) + bytes(self._tail) if self._strip else b""
        self._held.clear()
        self._tail.clear()
        self._event = []
        self._event_size = 0
        self._marked = False
        self._lf = _LF_NONE
        return pending
