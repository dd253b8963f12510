"""One request's metering, from the plan to the usage its record reports.

The pipeline plans a session for each attempt, from the endpoint and the backend chosen for it; the
request body carries the usage option when the session says so (`injects_usage`). The relay gives it
the response head and then only feeds it: every body chunk through the callable `response_started`
returned (the same bytes come back, unless the usage event the proxy asked for is removed), and the
bytes still held back at a clean end. The usage record only reads `final_usage()`: the backend's own
counts when they arrived; nothing for a request the backend refused; else an estimate from the request
and the content relayed so far.

    session = MeteringSession.plan(endpoint, backend.kind, inject_allowed, is_stream, body_data)
    feed = session.response_started(status, streaming)   # None: nothing to read in this response
    ... data = feed(data) ...                             # per upstream chunk
    tail = session.response_ended()
    prompt, completion, cache_read, cache_write, source = session.final_usage(backend_status)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from llmproxy.metering import DEFAULT_MAX_LINE, Meter, meter_for, read_json_body
from llmproxy.metering.dialects import OLLAMA_NDJSON, STRIPPABLE, TGI_GENERATE_SSE
from llmproxy.metering.estimate import estimate_prompt_tokens
from llmproxy.metering.usage import Usage, tgi_header_usage

# Ollama's /api/generate puts the whole `context` token array on its usage line: allow a long one.
OLLAMA_MAX_LINE = 8 * 1024 * 1024
MAX_METERED_JSON = 8 * 1024 * 1024  # non-streamed bodies larger than this are not parsed for usage
# A translated non-streamed body is mapped whole, so it is held: one larger than this fails the request (the
# client must never get the backend's API instead of its own).
MAX_TRANSLATED_JSON = 16 * 1024 * 1024


class TranslatedBodyTooLarge(ValueError):
    pass
# Where a record's counts come from: the backend's own; an estimate (the backend did work but reported none:
# a stream cut off, a backend that does not say); none (nothing to count: the backend refused the request,
# or the endpoint is not a generation).
REPORTED, ESTIMATED, NONE = "reported", "estimated", "none"


class Translation(Protocol):
    """What a session needs of a translation (llmproxy.translate.Translation): it maps every response."""

    dialect: str  # of the backend's responses

    @property
    def pings(self) -> bool: ...

    def stream(self, request: dict[str, Any]) -> Meter: ...

    def body(self, raw: bytes, request: dict[str, Any]) -> tuple[bytes, Usage | None]: ...

    def error(self, raw: bytes, status: int) -> bytes: ...


class MeteredUsage(NamedTuple):
    prompt_tokens: int  # all of them, cache reads and writes included
    completion_tokens: int
    cache_read_tokens: int | None  # as reported (None: the backend said nothing of a cache)
    cache_write_tokens: int | None
    source: str  # REPORTED, ESTIMATED or NONE


class MeteringSession:
    """What metering decided and read for one attempt at a request; see the module docstring."""

    __slots__ = ("_body", "_body_model", "_body_response_id", "_collected", "_collected_size", "_error_status",
                 "_head_usage", "_meter", "_usage", "dialect", "injects_usage", "rewrites", "translation")

    def __init__(self, dialect: str | None, injects_usage: bool, body: Any,
                 translation: Translation | None = None) -> None:
        self.dialect = dialect  # None: the response is not read; the record is estimated
        self.injects_usage = injects_usage  # the request asks for usage on the client's behalf
        # A stream is metered: the body relayed may differ from the backend's (a usage event removed, bytes
        # held back until an event ends), so its Content-Length cannot be trusted to hold.
        self.rewrites = False
        self._body = body  # the parsed request, for the estimate
        self._meter: Meter | None = None
        self._collected: list[bytes] | None = None  # a non-streamed body whose usage is read at its end
        self._collected_size = 0
        self._usage: Usage | None = None  # of a non-streamed body
        self._body_response_id: str | None = None  # of a non-streamed body
        self._body_model: str | None = None  # of a non-streamed body
        self._head_usage: Usage | None = None  # what the response head said (TGI's x-prompt-tokens...)
        # The client's API is not the backend's: every response is mapped (translate/), its translator meters it.
        self.translation = translation
        self._error_status = 0  # a translated error response, mapped whole at its end

    @classmethod
    def plan(cls, dialect: str | None, *, inject_allowed: bool, is_stream: bool, body: Any) -> MeteringSession:
        """The session for a request in `dialect` (None: not metered) whose parsed JSON body is `body`.

        The usage option is injected for a streamed request of a dialect that has one, when the backend
        allows it (`inject_allowed`) and the client did not ask for usage itself.
        """
        inject = (dialect in STRIPPABLE and is_stream and inject_allowed and not _client_asked_usage(body))
        return cls(dialect, inject, body)

    @classmethod
    def translated(cls, translation: Translation, body: Any) -> MeteringSession:
        """The session of a translated request: its translator maps every response and reads the usage (the
        translated request always asks the backend for it)."""
        return cls(translation.dialect, False, body, translation)

    def response_started(self, status: int, streaming: bool,
                         headers: list[tuple[bytes, bytes]] = ()) -> Callable[[bytes], bytes] | None:
        """The response head arrived: return what the relay passes each body chunk through, or None when
        this response is not read (not metered, or not a success)."""
        if self.translation is not None:
            return self._translating(status, streaming)
        if self.dialect is None or not 200 <= status < 300:
            return None
        if self.dialect == TGI_GENERATE_SSE:
            self._head_usage = tgi_header_usage(headers)  # TGI says its counts in headers too
        if streaming:
            # Metered by what the backend sends, whatever the request said: a client cannot dodge metering
            # with an odd "stream" value the backend still honours.
            max_line = OLLAMA_MAX_LINE if self.dialect == OLLAMA_NDJSON else DEFAULT_MAX_LINE
            self._meter = meter_for(self.dialect, strip_usage_event=self.injects_usage, max_line=max_line)
            self.rewrites = True
            return self._meter.feed
        self._collected = []
        return self._collect

    def _translating(self, status: int, streaming: bool) -> Callable[[bytes], bytes]:
        self.rewrites = True
        if streaming and 200 <= status < 300:
            self._meter = self.translation.stream(self._body)
            return self._meter.feed
        if not 200 <= status < 300:
            self._error_status = status
        self._collected = []
        return self._hold

    def pinger(self) -> Callable[[], bytes] | None:
        """What makes the keep-alive events of a translated stream whose client API has them, else None."""
        meter = self._meter
        if self.translation is None or not self.translation.pings or meter is None:
            return None
        ping: Callable[[], bytes] | None = getattr(meter, "ping", None)
        return ping

    def _hold(self, data: bytes) -> bytes:
        """A translated body is mapped whole at its end; one too large to hold fails (the relay answers 502)."""
        collected = self._collected
        if collected is None:
            return data
        collected.append(data)
        self._collected_size += len(data)
        if self._collected_size > MAX_TRANSLATED_JSON:
            self._collected = None
            raise TranslatedBodyTooLarge(f"a response over {MAX_TRANSLATED_JSON} bytes to translate")
        return b""

    def response_ended(self) -> bytes:
        """The response ended cleanly: return the bytes a meter still held back (usually b"")."""
        if self._meter is not None:
            return self._meter.finish()
        collected = self._collected
        if collected is not None and self.translation is not None:
            self._collected = None
            raw = b"".join(collected)
            if self._error_status:
                return self.translation.error(raw, self._error_status)
            out, self._usage = self.translation.body(raw, self._body)
            return out
        if collected is not None:
            self._collected = None
            self._usage, self._body_response_id, self._body_model = read_json_body(b"".join(collected),
                                                                                    self.dialect)
        return b""

    @property
    def streamed(self) -> bool:
        """The backend's response was a stream (whatever the request said)."""
        return self._meter is not None

    @property
    def reported(self) -> Usage | None:
        """The usage the backend reported so far (its response head's, then its body's), or None."""
        meter = self._meter
        usage = meter.usage if meter is not None else self._usage
        head = self._head_usage
        if head is None:
            return usage
        return head if usage is None else head.merged(usage)

    def final_usage(self, backend_status: int) -> MeteredUsage:
        """The counts of the record, given the status the backend answered (0: it never answered).

        The backend's own counts when they arrived, whatever the status. Else nothing (NONE) for a request
        the backend refused (status >= 400) or an endpoint that is not a generation; else an estimate from
        the request and the content events relayed: a stream cut off before its usage event, a request
        cut before the backend answered (it did the prefill), a backend that reports none.
        """
        usage = self.reported
        relayed = self._meter.content_events if self._meter is not None else 0
        if usage is not None:
            prompt, completion, source = usage.prompt, usage.completion_tokens, REPORTED
            if prompt is None:  # the backend said what it generated, not what it read: that part is estimated
                prompt, source = estimate_prompt_tokens(self._body), ESTIMATED
            if completion is None:  # what it read, not yet what it generated (a Messages stream cut off)
                completion, source = relayed, ESTIMATED
            return MeteredUsage(prompt, completion, usage.cache_read_tokens, usage.cache_write_tokens, source)
        if self.dialect is None or backend_status >= 400:
            return MeteredUsage(0, 0, None, None, NONE)
        return MeteredUsage(estimate_prompt_tokens(self._body), relayed, None, None, ESTIMATED)

    @property
    def response_id(self) -> str | None:
        """The id under which the backend stored the response (Responses API), when it said one."""
        meter = self._meter
        return meter.response_id if meter is not None else self._body_response_id

    @property
    def response_model(self) -> str | None:
        """The model the backend says generated the response (read with its usage), when it said one."""
        meter = self._meter
        return getattr(meter, "response_model", None) if meter is not None else self._body_model

    @property
    def prompt_reported(self) -> bool:
        """The backend reported the prompt's count (so its tokenizer need not be asked)."""
        usage = self.reported
        return usage is not None and usage.prompt is not None

    def _collect(self, data: bytes) -> bytes:
        collected = self._collected
        if collected is not None:
            collected.append(data)
            self._collected_size += len(data)
            if self._collected_size > MAX_METERED_JSON:
                self._collected = None  # too large to parse for usage: the record will be estimated
        return data


def _client_asked_usage(body: Any) -> bool:
    if not isinstance(body, dict):
        return True  # not JSON we understand: leave it alone
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True
