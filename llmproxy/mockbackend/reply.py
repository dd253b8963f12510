"""What a dialect handler receives (`Call`) and returns (`Reply`): no I/O on either side."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from llmproxy.mockbackend.options import BadRequest

JSON = b"application/json"
SSE = b"text/event-stream"
DONE = b"data: [DONE]\n\n"

# Fixed so that two identical requests get byte-identical answers (tests compare hashes).
CREATED = 1779012345


@dataclass(slots=True)
class Reply:
    """A response: `events` (streamed, chunked, one HTTP chunk per event) or a sized `body`."""

    status: int = 200
    content_type: bytes | None = JSON
    body: bytes = b""
    events: Iterator[bytes] | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    generation: bool = False  # counts in the num_requests_running/waiting gauges
    # close the connection once the response is sent, without announcing it (llama.cpp after a stream)
    close_after: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    on_done: Callable[[], None] | None = None  # called once when the response ends, however it ends


@dataclass(slots=True)
class Call:
    """One request as a handler sees it. `tokens` is the x-mock-tokens knob or the CLI default."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    tokens: int
    model: str  # the served model (CLI --model or the dialect default)
    gauges: Callable[[], tuple[int, int, int, int]]  # (running, waiting, prompt total, generation total)
    models: tuple[str, ...] = ()  # every served model, `model` first; empty means just `model`
    error_after: int | None = None  # the x-mock-error-after knob
    cache_read: int | None = None  # the x-mock-cache-read knob: prompt tokens that were a prefix-cache hit
    cache_write: int = 0  # the x-mock-cache-write knob: prompt tokens written to the cache
    kv_usage: Callable[[], float] = lambda: 0.0  # KV-cache use, 0..1 (pinned by /_mock/gauges?kv=F)
    responses: Any = None  # the per-process map of Responses ids (responses.ResponseStore)
    metrics_enabled: bool = False  # llama.cpp's --metrics
    api_keys: tuple[str, ...] = ()  # the keys an API-key dialect accepts (--api-key); empty: any
    throttled: Callable[[str], float] = lambda key: 0.0  # seconds an API key stays throttled (/_mock/throttle)
    prefix_hit: int | None = None  # prompt tokens the prefix-cache model found cached (None: the model is off)
    # (queries, hits) in tokens and the last prompt's hit rate, while the prefix-cache model is on
    prefix_metrics: Callable[[], tuple[int, int, float] | None] = lambda: None
    flush_cache: Callable[[], bool] = lambda: True  # empty the prefix cache; False: requests in flight, not done
    _json: Any = None

    def cached(self, prompt: int, engine_reports: bool = True) -> int:
        """The prompt tokens to report as read from the prefix cache, at most `prompt`: the x-mock-cache-read
        knob when given, else the prefix-cache model's hit where the engine reports its own (`engine_reports`)."""
        if self.cache_read is not None:
            return min(self.cache_read, prompt)
        return min(self.prefix_hit or 0, prompt) if engine_reports else 0

    def json(self) -> dict[str, Any]:
        """Return the body as a JSON object. Raises BadRequest if it is not one."""
        if self._json is None:
            try:
                value = orjson.loads(self.body or b"{}")
            except orjson.JSONDecodeError as exc:
                raise BadRequest(f"request body is not valid JSON: {exc}") from None
            if not isinstance(value, dict):
                raise BadRequest("request body must be a JSON object")
            self._json = value
        return self._json

    @property
    def request_id(self) -> str | None:
        return self.headers.get("x-request-id")

    @property
    def served(self) -> tuple[str, ...]:
        return self.models or (self.model,)

    def named_model(self) -> str | None:
        """The model the request body names, if it names one (a missing or empty name means the default)."""
        model = self.json().get("model")
        return model if isinstance(model, str) and model else None

    def request_model(self, placeholder: str | None = None) -> str:
        """The model the request names (echoed like the real servers do), else the served one.

        `placeholder` is a name that means "whatever is served" (TGI's "tgi").
        """
        model = self.named_model()
        return model if model is not None and model != placeholder else self.model

    def include_usage(self) -> bool:
        options = self.json().get("stream_options")
        return isinstance(options, dict) and bool(options.get("include_usage"))

    def digest(self) -> str:
        """A stable per-body hex id, used where real servers put a random uuid."""
        return hashlib.sha256(self.body).hexdigest()[:32]


def empty_reply(call: Call) -> Reply:
    """200 with an empty body and no content type, like /health on vLLM and TGI."""
    return Reply(content_type=None)


def json_reply(obj: Any, status: int = 200, content_type: bytes = JSON) -> Reply:
    return Reply(status=status, content_type=content_type, body=orjson.dumps(obj))


def generated(reply: Reply, prompt: int, completion: int) -> Reply:
    """Mark a sized reply as a generation, so it counts in the gauges and token counters."""
    reply.generation, reply.prompt_tokens, reply.completion_tokens = True, prompt, completion
    return reply


def stream_reply(events: Iterable[bytes], content_type: bytes = SSE, **kwargs: Any) -> Reply:
    return Reply(content_type=content_type, events=iter(events), generation=True, **kwargs)


def dumps(obj: Any) -> bytes:
    """Compact JSON with raw UTF-8, as pydantic, serde and Go all emit."""
    return orjson.dumps(obj)


def sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def named_sse(event: str, payload: bytes) -> bytes:
    """An SSE event with an `event:` line, as the Anthropic Messages and Responses APIs frame them."""
    return b"event: " + event.encode() + b"\ndata: " + payload + b"\n\n"


# A placeholder value inside a template object; orjson escapes the control character, so the dumped
# form cannot occur in real content.
SLOT = "\x00slot\x00"
_SLOT_JSON = orjson.dumps(SLOT)


class Template:
    """An event precomputed once per response: the JSON of `obj` with each SLOT left open.

    Streams only vary in a token's text (and, with continuous usage, a counter), so building the
    dict, walking it and escaping every key again for each event is wasted work.
    """

    __slots__ = ("_parts",)

    def __init__(self, obj: Any, prefix: bytes = b"data: ", suffix: bytes = b"\n\n") -> None:
        self._parts = (prefix + orjson.dumps(obj) + suffix).split(_SLOT_JSON)

    def fill(self, *values: Any) -> bytes:
        """Return the event with the slots, in document order, replaced by the JSON of `values`."""
        parts = self._parts
        out = [parts[0]]
        for value, part in zip(values, parts[1:], strict=True):
            out.append(orjson.dumps(value))
            out.append(part)
        return b"".join(out)


def prometheus_reply(rows: Iterable[tuple[str, str, str, float]], labels: str = "") -> Reply:
    """Prometheus text exposition of (name, type, help, value) rows."""
    lines = []
    for name, kind, help_text, value in rows:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{labels} {float(value)}"]
    return Reply(content_type=b"text/plain; version=0.0.4; charset=utf-8",
                 body=("\n".join(lines) + "\n").encode())


def error_after(events: Iterable[bytes], after: int | None, error: Iterable[bytes]) -> Iterator[bytes]:
    """Pass the first `after` events through, then the dialect's in-band `error` events instead of the rest.

    None passes the stream whole, and so does a stream of no more than `after` events: nothing was left
    to fail.
    """
    if after is None:
        yield from events
        return
    for sent, event in enumerate(events):
        if sent == after:
            yield from error
            return
        yield event


def json_lines(objs: Iterable[Any]) -> Iterator[bytes]:
    """NDJSON: one object per line, as Ollama's native API streams."""
    for obj in objs:
        yield orjson.dumps(obj) + b"\n"
