"""Server-sent events read incrementally off a backend's stream, for the translators.

A translator must understand every event (unlike a meter, which only looks for usage), so it splits what
each read brought into complete events and keeps only the unfinished tail for the next read. Lines end in
LF, CRLF or CR; a blank line ends an event; `data:` loses one leading space, several data lines join with LF;
comments and other fields are ignored (WHATWG, as the SDKs parse it).
"""

from __future__ import annotations

MAX_EVENT = 8 << 20  # bytes held for one unfinished event: past this the stream is not an SSE stream we follow


class EventTooLarge(ValueError):
    pass


class EventReader:
    __slots__ = ("_cr", "_held", "_pieces")

    def __init__(self) -> None:
        # The unfinished event, its line ends already made LF, as the reads brought it: joined only once an
        # event completes, so a large event costs its size once, not once per read.
        self._pieces: list[bytes] = []
        self._held = 0
        self._cr = False  # the last read ended in CR: a LF starting the next one is the same line end

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """The events completed by `data`, each (event name or b"", data); events without data are skipped."""
        if self._cr:
            self._cr = False
            if data[:1] == b"\n":
                data = data[1:]
        # find(), not `in`: on Python 3.11 `bytes in bytes` formats and discards a TypeError first (http11/path.py)
        if data.find(b"\r") >= 0:
            self._cr = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        pieces = self._pieces
        straddles = bool(pieces) and data[:1] == b"\n" and pieces[-1].endswith(b"\n")  # a blank line across reads
        if data.find(b"\n\n") < 0 and not straddles:
            if data:
                self._hold(data)
            return []
        text = b"".join((*pieces, data)) if pieces else data
        pieces.clear()
        self._held = 0
        end = text.rfind(b"\n\n")
        if end + 2 < len(text):
            self._hold(text[end + 2:])
        return parse_events(text[:end])

    def finish(self) -> list[tuple[bytes, bytes]]:
        """The end of the stream: a last event left without its blank line still counts."""
        tail = b"".join(self._pieces)
        self._pieces.clear()
        self._held = 0
        return parse_events(tail) if tail.strip() else []

    def _hold(self, data: bytes) -> None:
        self._held += len(data)
        if self._held > MAX_EVENT:
            raise EventTooLarge("an SSE event over 8 MiB")
        self._pieces.append(data)


def parse_events(text: bytes) -> list[tuple[bytes, bytes]]:
    """The events of complete LF-separated SSE text."""
    events = []
    for block in text.split(b"\n\n"):
        if not block:
            continue
        if block.startswith(b"data: ") and block.find(b"\n") < 0:  # what every engine sends: one data line
            events.append((b"", block[6:]))
            continue
        name = b""
        data: list[bytes] = []
        for line in block.split(b"\n"):
            if line.startswith(b"data"):
                if line == b"data":
                    data.append(b"")
                elif line[4:5] == b":":
                    value = line[5:]
                    data.append(value[1:] if value[:1] == b" " else value)
            elif line.startswith(b"event:"):
                name = line[6:].strip()
        if data:
            events.append((name, data[0] if len(data) == 1 else b"\n".join(data)))
    return events
