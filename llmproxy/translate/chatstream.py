"""The reading half every translator of a chat.completion.chunk stream shares (messages.py, responses.py).

It splits each read into events, parses each chunk once, keeps the backend's usage (the last reported wins),
and hands the subclass what it must write: the first chunk (`_start`), each choice 0 (`_choice`), an error
object sent in the stream (`_error`), and the end of a finished answer (`_end`: after a finish reason, at
[DONE] or a clean close; never for a stream that was cut). The subclass sets `_finish` from the choices.
"""

from __future__ import annotations

from typing import Any

import orjson

from llmproxy.metering.usage import Usage, openai_usage
from llmproxy.translate.events import EventReader


def first_choice(chat: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The first choice of a whole chat.completion and its message ({} for what is missing or malformed)."""
    choices = chat.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = choice.get("message")
    return choice, message if isinstance(message, dict) else {}


def json_object(body: bytes) -> dict[str, Any] | None:
    """A body's JSON object, or None when it is not one (then it is passed on as it is)."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class ChatStreamTranslator:
    """Implements the metering Meter contract; subclasses write the client's events."""

    __slots__ = ("_done", "_finish", "_reader", "_started", "_usage", "_usage_chunk", "content_events", "overflowed",
                 "response_id")

    def __init__(self) -> None:
        self._reader = EventReader()
        self._started = False  # the first chunk (or an early ping) started the client's stream
        self._finish: Any = None  # choice 0's finish_reason, once the backend said it
        self._done = False  # the client's stream ended (terminal events or an error): nothing more is written
        # The last chunk that carried usage, read into a Usage only when asked: with continuous usage stats
        # every chunk carries one, and only the last counts.
        self._usage_chunk: dict[str, Any] | None = None
        self._usage: Usage | None = None
        self.content_events = 0
        self.overflowed = False
        self.response_id = None

    @property
    def usage(self) -> Usage | None:
        """The backend's usage so far (the last reported)."""
        chunk = self._usage_chunk
        if chunk is not None:
            self._usage_chunk = None
            self._usage = openai_usage(chunk) or self._usage
        return self._usage

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        for _name, payload in self._reader.feed(data):
            self._event(payload, out)
        return b"".join(out)

    def finish(self) -> bytes:
        """The backend ended cleanly: the last events, and the terminal ones if it finished its answer."""
        out: list[bytes] = []
        for _name, payload in self._reader.finish():
            self._event(payload, out)
        if not self._done and self._finish is not None:
            self._finished(out)
        return b"".join(out)

    def _finished(self, out: list[bytes]) -> None:
        """The backend finished its answer: the client's terminal events, unless the engine aborted it (vLLM's
        `abort`: the request was dropped, not answered) and the client must see a failure."""
        if self._finish == "abort":
            self._error("the backend aborted the generation", {}, out)
        else:
            self._end(out)
        self._done = True

    def _event(self, payload: bytes, out: list[bytes]) -> None:
        if self._done:
            return
        if payload == b"[DONE]":
            if self._finish is not None:
                self._finished(out)
            self._done = True
            return
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(chunk, dict):
            return
        if "error" in chunk and not chunk.get("choices"):
            error = chunk["error"]
            self._error(error.get("message") if isinstance(error, dict) else error, chunk, out)
            self._done = True
            return
        if chunk.get("usage"):
            self._usage_chunk = chunk
        if not self._started:
            self._started = True
            self._start(chunk, out)
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict) and choice.get("index", 0) == 0:
                    self._choice(choice, out)

    def _start(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        raise NotImplementedError

    def _choice(self, choice: dict[str, Any], out: list[bytes]) -> None:
        raise NotImplementedError

    def _error(self, message: Any, chunk: dict[str, Any], out: list[bytes]) -> None:
        raise NotImplementedError

    def _end(self, out: list[bytes]) -> None:
        raise NotImplementedError
