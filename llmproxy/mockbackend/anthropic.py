"""Anthropic's own API (api.anthropic.com) as its clients see it (docs/protocols.md §13).

A stand-in for the real thing when the proxy's upstream is Anthropic itself: `x-api-key` and
`anthropic-version` are checked before anything else, every response carries a `request-id`, errors are
Anthropic's envelope, and `/_mock/throttle` makes one key answer 429 with `retry-after` (a key-rotation test).

The "model" is the mock's usual one (messages.turn): the text is `word(i)` for i < n, n being x-mock-tokens
capped by max_tokens ("max_tokens" when the cap cut it, else "end_turn"), or tool_use blocks when the request
has tools ("tool_use"). A stop sequence found in that text ends it just before the sequence ("stop_sequence").
Prompts are counted with TEMPLATES["anthropic"], images at a fixed size.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

from llmproxy.mockbackend.messages import ANTHROPIC_ERROR_TYPES, Turn, tool_argument_fragments, turn
from llmproxy.mockbackend.options import BadRequest
from llmproxy.mockbackend.reply import Call, Reply, dumps, error_after, generated, named_sse, stream_reply
from llmproxy.mockbackend.stats import api_key
from llmproxy.mockbackend.textgen import TEMPLATES, prompt_tokens, word

TEMPLATE = TEMPLATES["anthropic"]
JSON = b"application/json"
EVENT_STREAM = b"text/event-stream; charset=utf-8"
VERSIONS = frozenset({"2023-01-01", "2023-06-01", "2026-10-21"})  # the values the API has published
# Sent by the SDK majors of October 2026; requests under it may no longer carry sampling parameters.
VERSION_2026 = "2026-10-21"
SAMPLING_PARAMETERS = ("temperature", "top_p", "top_k")
MAX_OUTPUT_TOKENS = 64_000  # max_tokens ceiling of Claude Sonnet 4.5, applied to every served name
MAX_INPUT_TOKENS = 200_000
IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
ORGANIZATION_ID = "6d6f636b-0000-4000-8000-616e7468726f"
# Per-minute limits of a high usage tier, as the anthropic-ratelimit-* headers state them.
REQUESTS_PER_MINUTE = 4_000
INPUT_TOKENS_PER_MINUTE = 2_000_000
OUTPUT_TOKENS_PER_MINUTE = 400_000
ERROR_TYPES = {**ANTHROPIC_ERROR_TYPES, 402: "billing_error", 409: "conflict_error", 504: "timeout_error"}
# Release dates of the aliases clients name; other names say theirs in a -YYYYMMDD suffix, or get the epoch,
# as the API does for a model whose date it does not know.
RELEASED = {"claude-sonnet-4-5": "2025-09-29", "claude-haiku-4-5": "2025-10-15", "claude-opus-4-5": "2025-11-24",
            "claude-opus-4-1": "2025-08-05", "claude-sonnet-4-0": "2025-05-22", "claude-opus-4-0": "2025-05-22"}
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_serial = itertools.count(1)  # request-ids differ per request, as the real ones do, across every mock in a process


def _b58(seed: bytes, length: int) -> str:
    n = int.from_bytes(hashlib.sha256(seed).digest(), "big")
    out = []
    for _ in range(length):
        n, digit = divmod(n, 58)
        out.append(_B58[digit])
    return "".join(out)


def new_request_id() -> str:
    """A fresh id in the real ones' form (req_011C + 20 base58 characters), distinct for every response."""
    return "req_011C" + _b58(b"request %d" % next(_serial), 20)


def _rfc3339(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


# --- errors and headers ------------------------------------------------------------------------------


def error(status: int, message: str, path: str) -> Reply:
    """Anthropic's error: {"type":"error","error":{type,message},"request_id"} and the same id in request-id."""
    etype = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    rid = new_request_id()
    body = {"type": "error", "error": {"type": etype, "message": message}, "request_id": rid}
    return Reply(status=status, content_type=JSON, body=dumps(body), headers=[(b"request-id", rid.encode())])


def unhealthy(status: int) -> Reply:
    """What GET /v1/models (the probe clients use: the API has no health route) answers while "unhealthy"."""
    message = {500: "Internal server error", 503: "Overloaded", 529: "Overloaded"}.get(status)
    return error(status, message or _phrase(status), "/v1/models")


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"status {status}"


def _rate_limit_headers(throttled: float) -> list[tuple[bytes, bytes]]:
    """anthropic-ratelimit-*: a key's buckets as if this request were its only one in the minute (the token
    counts are rounded to thousands, so a small request leaves them full); a throttled key has no requests left
    until the throttle ends. The tokens-* family repeats the most restrictive bucket, output tokens."""
    now = time.time()
    requests = (0, now + throttled) if throttled else (REQUESTS_PER_MINUTE - 1, now)
    rows = [("input-tokens", INPUT_TOKENS_PER_MINUTE, INPUT_TOKENS_PER_MINUTE, now),
            ("output-tokens", OUTPUT_TOKENS_PER_MINUTE, OUTPUT_TOKENS_PER_MINUTE, now),
            ("requests", REQUESTS_PER_MINUTE, *requests),
            ("tokens", OUTPUT_TOKENS_PER_MINUTE, OUTPUT_TOKENS_PER_MINUTE, now)]
    headers = []
    for name, limit, remaining, reset in rows:
        prefix = b"anthropic-ratelimit-" + name.encode()
        headers += [(prefix + b"-limit", b"%d" % limit), (prefix + b"-remaining", b"%d" % remaining),
                    (prefix + b"-reset", _rfc3339(reset).encode())]
    return headers


def _refuse(call: Call, limited: bool) -> Reply | None:
    """The checks the API makes before it reads a body, in its order: the key, the version, the key's limit.

    The key may come as x-api-key or as Authorization: Bearer (what anthropic-python 2.x sends; x-api-key wins).
    """
    key = api_key(call.headers)
    if not key:
        return error(401, "x-api-key header is required", call.path)
    if call.api_keys and key not in call.api_keys:
        return error(401, "invalid x-api-key", call.path)
    version = call.headers.get("anthropic-version")
    if version is None:
        return error(400, "anthropic-version: header is required", call.path)
    if version not in VERSIONS:
        return error(400, f"anthropic-version: {json.dumps(version)} is not a valid version", call.path)
    left = call.throttled(key) if limited else 0.0
    if left > 0:
        reply = error(429, f"This request would exceed your organization's rate limit of {REQUESTS_PER_MINUTE:,} "
                      "requests per minute. For details, refer to: https://docs.claude.com/en/api/rate-limits. "
                      "You can see the response headers for current usage.", call.path)
        # whole seconds, rounded up, as Anthropic sends them: retrying sooner would be refused again
        reply.headers += [(b"retry-after", b"%d" % math.ceil(left)), *_rate_limit_headers(left)]
        return reply
    return None


def _api(limited: bool) -> Callable[[Callable[[Call], Reply]], Callable[[Call], Reply]]:
    """A route behind _refuse; what it answers gets a request-id (and, when `limited`, the rate-limit headers)."""
    def wrap(handler: Callable[[Call], Reply]) -> Callable[[Call], Reply]:
        def route(call: Call) -> Reply:
            refused = _refuse(call, limited)
            if refused is not None:
                return refused
            reply = handler(call)
            head = [(b"request-id", new_request_id().encode()),
                    (b"anthropic-organization-id", ORGANIZATION_ID.encode())]
            reply.headers[:0] = [*(_rate_limit_headers(0.0) if limited else []), *head]
            return reply
        return route
    return wrap


# --- request validation ------------------------------------------------------------------------------


def _validate(call: Call, req: dict[str, Any], generation: bool) -> None:
    """Raise BadRequest with the API's wording for what it would refuse in `req` (a Messages or count_tokens
    body; `generation`: a Messages body, which needs max_tokens)."""
    if not isinstance(req.get("model"), str) or not req["model"]:
        raise BadRequest("model: Field required")
    if call.headers.get("anthropic-version") == VERSION_2026:
        for name in SAMPLING_PARAMETERS:
            if name in req:  # refused whatever the value, the default included
                raise BadRequest(f"{name}: Extra inputs are not permitted")
    if generation:
        max_tokens = req.get("max_tokens")
        if max_tokens is None:
            raise BadRequest("max_tokens: Field required")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise BadRequest("max_tokens: Input should be a valid integer greater than or equal to 1")
        if max_tokens > MAX_OUTPUT_TOKENS:
            raise BadRequest(f"max_tokens: {max_tokens} > {MAX_OUTPUT_TOKENS}, which is the maximum allowed number "
                             f"of output tokens for {req['model']}")
    messages = req.get("messages")
    if messages is None:
        raise BadRequest("messages: Field required")
    if not isinstance(messages, list):
        raise BadRequest("messages: Input should be a valid list")
    if not messages:
        raise BadRequest("messages: at least one message is required")
    for i, message in enumerate(messages):
        _validate_message(i, message)
    stops = req.get("stop_sequences")
    if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise BadRequest("stop_sequences: Input should be a valid list of strings")
    if stops and any(not s.strip() for s in stops):
        raise BadRequest("stop_sequences: each stop sequence must contain non-whitespace")


def _validate_message(i: int, message: Any) -> None:
    if not isinstance(message, dict):
        raise BadRequest(f"messages.{i}: Input should be a valid dictionary")
    role = message.get("role")
    if role == "system":
        raise BadRequest('messages: Unexpected role "system". The Messages API accepts a top-level `system` '
                         'parameter, not "system" as an input message role.')
    if role not in ("user", "assistant"):
        raise BadRequest(f"messages.{i}.role: Input should be 'user' or 'assistant'")
    content = message.get("content")
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise BadRequest(f"messages.{i}.content: Input should be a valid string or a valid list")
    for j, block in enumerate(content):
        if isinstance(block, dict) and block.get("type") == "image":
            _validate_image(f"messages.{i}.content.{j}.image.source", block.get("source"))


def _validate_image(where: str, source: Any) -> None:
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "url" and isinstance(source.get("url"), str):
        return
    if kind != "base64":
        raise BadRequest(f"{where}: Input tag {json.dumps(kind)} found using 'type' does not match any of the "
                         "expected tags: 'base64', 'url'")
    if source.get("media_type") not in IMAGE_MEDIA_TYPES:
        raise BadRequest(f"{where}.base64.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or "
                         "'image/webp'")
    if not isinstance(source.get("data"), str) or not source["data"]:
        raise BadRequest(f"{where}.base64.data: Field required")


# --- what the model answers --------------------------------------------------------------------------


@dataclass(slots=True)
class Answer:
    """One Messages turn: messages.turn's counts, the text as it is streamed, and why it stopped."""

    turn: Turn
    pieces: list[str]  # the text deltas ([] for a tool turn or an empty text)
    output: int  # output tokens, a matched stop sequence's included (it was generated, though not returned)
    stop_reason: str
    stop_sequence: str | None = None


def answer(call: Call, req: dict[str, Any]) -> Answer:
    """What the mock's model says to the (validated) Messages body `req`."""
    t = turn(call, "anthropic")
    if t.calls:
        return Answer(t, [], t.output, t.stop_reason)
    pieces = [word(i) for i in range(t.output)]
    text = "".join(pieces)
    # generation stops at the sequence completed first (the earliest end; at one end, the longest sequence)
    hits = [(text.find(s) + len(s), text.find(s), s) for s in req.get("stop_sequences") or () if s in text]
    if not hits:
        return Answer(t, pieces, t.output, t.stop_reason)
    end, cut, sequence = min(hits)
    kept: list[str] = []
    generated_tokens = offset = 0
    for piece in pieces:
        if offset < end:
            generated_tokens += 1  # the tokens up to the one that completed the sequence were all generated
        if offset < cut:
            kept.append(piece[:cut - offset])
        offset += len(piece)
    return Answer(t, [p for p in kept if p], generated_tokens, "stop_sequence", sequence)


def _usage(a: Answer, output: int) -> dict[str, Any]:
    # the full Usage of a message: the prompt split as Anthropic splits it, cache writes all at the default 5m TTL
    t = a.turn
    return {"input_tokens": t.uncached, "cache_creation_input_tokens": t.cache_write,
            "cache_read_input_tokens": t.cache_read,
            "cache_creation": {"ephemeral_5m_input_tokens": t.cache_write, "ephemeral_1h_input_tokens": 0},
            "output_tokens": output, "service_tier": "standard", "inference_geo": "not_available"}


def _delta_usage(a: Answer) -> dict[str, int]:
    # message_delta's usage: cumulative, and the input counts repeated (the real API sends them there too now)
    t = a.turn
    return {"input_tokens": t.uncached, "cache_creation_input_tokens": t.cache_write,
            "cache_read_input_tokens": t.cache_read, "output_tokens": a.output}


def _ids(call: Call, count: int) -> tuple[str, list[str]]:
    """The message id (msg_01...) and tool_use ids (toolu_01...), derived from the body so that the same request
    gets the same bytes."""
    return ("msg_01" + _b58(call.body + b"msg", 22),
            ["toolu_01" + _b58(call.body + b"toolu %d" % i, 22) for i in range(count)])


def _message(msg_id: str, model: str, content: list[Any], a: Answer | None, usage: dict[str, Any]) -> dict[str, Any]:
    # key order as the API writes it (model first); a None answer is message_start's, still open
    return {"model": model, "id": msg_id, "type": "message", "role": "assistant", "content": content,
            "stop_reason": a.stop_reason if a else None, "stop_sequence": a.stop_sequence if a else None,
            "usage": usage}


@_api(limited=True)
def messages(call: Call) -> Reply:
    req = call.json()
    _validate(call, req, generation=True)
    a = answer(call, req)
    msg_id, tool_ids = _ids(call, len(a.turn.calls))
    model = req["model"]  # echoed as given; the real API would resolve an alias to its dated name
    if not req.get("stream"):
        content: list[dict[str, Any]] = [{"type": "text", "text": "".join(a.pieces)}] if a.pieces else []
        content += [{"type": "tool_use", "id": tool_ids[i], "name": name, "input": json.loads(args)}
                    for i, (name, args) in enumerate(a.turn.calls)]
        body = _message(msg_id, model, content, a, _usage(a, a.output))
        return generated(Reply(content_type=JSON, body=dumps(body)), a.turn.prompt, a.output)
    events = error_after(_events(a, msg_id, tool_ids, model), call.error_after, STREAM_ERROR)
    return stream_reply(events, EVENT_STREAM, headers=[(b"cache-control", b"no-cache")],
                        prompt_tokens=a.turn.prompt, completion_tokens=a.output)


# What the API sends when a stream fails after it began (its usual mid-stream failure is overload); the
# stream then ends without message_stop.
STREAM_ERROR = (named_sse("error", dumps({"type": "error", "error": {"type": "overloaded_error",
                                                                      "message": "Overloaded"}})),)
PING = named_sse("ping", b'{"type":"ping"}')


def _event(obj: dict[str, Any]) -> bytes:
    return named_sse(obj["type"], dumps(obj))


def _events(a: Answer, msg_id: str, tool_ids: list[str], model: str) -> Iterator[bytes]:
    """message_start, ping, the content blocks, message_delta, message_stop; the ping follows the first block's
    start, where the API sends it."""
    # message_start counts the first output token already, as the API's does
    yield _event({"type": "message_start", "message": _message(msg_id, model, [], None, _usage(a, min(1, a.output)))})
    if a.turn.calls:
        yield from _tool_blocks(a.turn.calls, tool_ids)
    elif a.pieces:
        yield _event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        yield PING
        for piece in a.pieces:
            yield _event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}})
        yield _event({"type": "content_block_stop", "index": 0})
    else:
        yield PING  # nothing to say: no content block at all, as the API answers an empty turn
    yield _event({"type": "message_delta", "delta": {"stop_reason": a.stop_reason, "stop_sequence": a.stop_sequence},
                  "usage": _delta_usage(a)})
    yield _event({"type": "message_stop"})


def _tool_blocks(calls: list[tuple[str, str]], tool_ids: list[str]) -> Iterator[bytes]:
    """One tool_use block per call: its start (input {}), an empty input_json_delta, as the API opens every tool
    input with one, then the arguments as the model writes them, a fragment per token."""
    block = -1
    for step in tool_argument_fragments(calls):
        for i, name, fragment in step:
            if name is not None:
                if block >= 0:
                    yield _event({"type": "content_block_stop", "index": block})
                block = i
                yield _event({"type": "content_block_start", "index": i, "content_block": {
                    "type": "tool_use", "id": tool_ids[i], "name": name, "input": {}}})
                if i == 0:
                    yield PING
                yield _event({"type": "content_block_delta", "index": i,
                              "delta": {"type": "input_json_delta", "partial_json": ""}})
            elif fragment:
                yield _event({"type": "content_block_delta", "index": i,
                              "delta": {"type": "input_json_delta", "partial_json": fragment}})
    yield _event({"type": "content_block_stop", "index": block})


@_api(limited=True)
def count_tokens(call: Call) -> Reply:
    """POST /v1/messages/count_tokens: the whole prompt, cached or not, as a Messages request would count it."""
    req = call.json()
    _validate(call, req, generation=False)
    return Reply(content_type=JSON, body=dumps({"input_tokens": prompt_tokens(req, TEMPLATE)}))


# --- models ------------------------------------------------------------------------------------------


def _display_name(model: str) -> str:
    """"claude-sonnet-4-5-20250929" -> "Claude Sonnet 4.5": the date dropped, version digits joined by dots."""
    parts = model.split("-")
    if len(parts) > 1 and len(parts[-1]) == 8 and parts[-1].isdigit():
        parts = parts[:-1]
    words: list[str] = []
    for part in parts:
        if part.isdigit() and words and words[-1].replace(".", "").isdigit():
            words[-1] += "." + part
        else:
            words.append(part if part.isdigit() else part[:1].upper() + part[1:])
    return " ".join(words)


def _released(model: str) -> str:
    suffix = model.rsplit("-", 1)[-1]
    if len(suffix) == 8 and suffix.isdigit():
        return f"{suffix[:4]}-{suffix[4:6]}-{suffix[6:]}T00:00:00Z"
    day = RELEASED.get(model)
    return f"{day}T00:00:00Z" if day else "1970-01-01T00:00:00Z"


def _model_info(model: str) -> dict[str, Any]:
    return {"type": "model", "id": model, "display_name": _display_name(model), "created_at": _released(model),
            "max_input_tokens": MAX_INPUT_TOKENS, "max_tokens": MAX_OUTPUT_TOKENS, "lifecycle": "active"}


@_api(limited=False)
def models(call: Call) -> Reply:
    """GET /v1/models: one page holding every served model (the first is the default), in the order served."""
    data = [_model_info(name) for name in call.served]
    body = {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
    return Reply(content_type=JSON, body=dumps(body))


@_api(limited=False)
def model(call: Call) -> Reply:
    """GET /v1/models/{id}: the served model's card, else not_found_error."""
    name = unquote(call.path[len(MODELS_PREFIX):])
    if name not in call.served:
        raise BadRequest(f"model: {name}", 404)
    return Reply(content_type=JSON, body=dumps(_model_info(name)))


def check_model(call: Call) -> Reply | None:
    """With --strict-models: a Messages or count_tokens body naming an unserved model is a 404, once the key
    and version passed (the API authenticates before it reads a body)."""
    refused = _refuse(call, limited=False)
    if refused is not None:
        return refused
    name = call.named_model()
    if name is None or name in call.served:
        return None  # a missing model is the handler's 400
    return error(404, f"model: {name}", call.path)


MODELS_PREFIX = "/v1/models/"
# The API has no health route; clients and load balancers probe GET /v1/models, so /_mock/health steers that.
HEALTH_PATHS = frozenset({"/v1/models"})

ROUTES = {
    "/v1/messages": ("POST", messages),
    "/v1/messages/count_tokens": ("POST", count_tokens),
    "/v1/models": ("GET", models),
}


def route_for(path: str) -> tuple[str, Callable[[Call], Reply]] | None:
    """The routes with a parameter in the path: GET /v1/models/{id}."""
    if path.startswith(MODELS_PREFIX) and len(path) > len(MODELS_PREFIX):
        return ("GET", model)
    return None
