"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens) as vLLM, Ollama and llama.cpp serve
it (docs/protocols.md §8). Each engine converts the request to its own chat request and the answer back, so the
three differ in where the counts are, which keys they write and how events are grouped into HTTP chunks.

The "model" is the mock's usual one: the text is `word(i)` for i < n, n being x-mock-tokens capped by the
request's max_tokens (stop_reason "max_tokens" when max_tokens cut it, else "end_turn"); a request with tools
(and tool_choice not "none") is answered with tool_use blocks (textgen.anthropic_tool_calls), stop_reason
"tool_use". Prompts are counted by `prompt_tokens(body, TEMPLATES[dialect])`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from llmproxy.mockbackend.options import BadRequest
from llmproxy.mockbackend.reply import (
    Call,
    Reply,
    dumps,
    error_after,
    generated,
    json_reply,
    named_sse,
    stream_reply,
)
from llmproxy.mockbackend.textgen import (
    TEMPLATES,
    anthropic_tool_calls,
    capped,
    completion_text,
    ollama_estimated_input_tokens,
    prompt_tokens,
    tokenize,
    tool_call_completion_tokens,
    tool_call_markup,
    word,
)

ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}


@dataclass(slots=True)
class Turn:
    """What the mock's model answers to one Messages request."""

    prompt: int  # prompt tokens, cached ones included
    output: int  # generated tokens
    calls: list[tuple[str, str]]  # (name, arguments JSON) of each tool_use block; [] for a text answer
    stop_reason: str  # end_turn | max_tokens | tool_use
    cache_read: int
    cache_write: int

    @property
    def uncached(self) -> int:
        """input_tokens as Anthropic means it: the prompt less what was read from or written to the cache."""
        return self.prompt - self.cache_read - self.cache_write


def request(call: Call) -> dict[str, Any]:
    """The Messages request body, with the fields every engine requires checked."""
    req = call.json()
    if not isinstance(req.get("messages"), list) or not req["messages"]:
        raise BadRequest("messages: Field required")
    max_tokens = req.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0:
        raise BadRequest("max_tokens: Field required and must be a positive integer")
    return req


def turn(call: Call, dialect: str) -> Turn:
    req = request(call)
    p = prompt_tokens(req, TEMPLATES[dialect])
    # llama.cpp reports its prompt-cache hits here (n_prompt_tokens_cache); vLLM's converter never reports any (§8)
    read = call.cached(p, engine_reports=dialect == "llamacpp")
    write = min(call.cache_write, p - read)
    calls = anthropic_tool_calls(req)
    if calls:
        return Turn(p, tool_call_completion_tokens(calls), calls, "tool_use", read, write)
    n = capped(call.tokens, req["max_tokens"])
    return Turn(p, n, [], "max_tokens" if req["max_tokens"] < call.tokens else "end_turn", read, write)


def _id(call: Call, salt: bytes, length: int = 24) -> str:
    return hashlib.sha256(call.body + salt).hexdigest()[:length]


def tool_argument_fragments(calls: list[tuple[str, str]]) -> Iterator[list[tuple[int, str | None, str]]]:
    """Per generated token (the final EOS included), what a streaming tool parser makes of the growing markup:
    (call index, name when the call's name just became complete else None, new argument text)."""
    text, spans = tool_call_markup(calls)
    named, sent = [False] * len(calls), [0] * len(calls)
    seen = 0
    for piece in [*tokenize(text), ""]:
        seen += len(piece)
        step: list[tuple[int, str | None, str]] = []
        for i, (name_end, args_start, args_end) in enumerate(spans):
            if not named[i]:
                if seen < name_end:
                    break
                named[i] = True
                step.append((i, calls[i][0], ""))
            got = min(seen, args_end) - args_start
            if got > sent[i]:
                step.append((i, None, text[args_start + sent[i]:args_start + got]))
                sent[i] = got
        yield step


# --- vLLM: vllm/entrypoints/anthropic/{api_router,serving,protocol}.py --------------------------------


def _vllm_usage(t: Turn, output: int) -> dict[str, int]:
    # AnthropicUsage in class order; the cache fields only when the knobs set them (vLLM itself never does)
    usage = {"input_tokens": t.uncached, "output_tokens": output}
    if t.cache_write:
        usage["cache_creation_input_tokens"] = t.cache_write
    if t.cache_read:
        usage["cache_read_input_tokens"] = t.cache_read
    return usage


VLLM_EVENT_STREAM = b"text/event-stream; charset=utf-8"
# The converter meets the chat stream's in-band error chunk, fails to validate it as a chunk and ends the
# stream with one error event (message_stream_converter); the real message is pydantic's validation error.
VLLM_STREAM_ERROR = (named_sse("error", dumps({"type": "error", "error": {
    "type": "internal_error", "message": "1 validation error for ChatCompletionStreamResponse"}})),)


def vllm_messages(call: Call) -> Reply:
    req = request(call)
    t = turn(call, "vllm")
    msg_id = "chatcmpl-" + (call.request_id or call.digest())
    model = call.request_model()
    if not req.get("stream"):
        content: list[dict[str, Any]] = []
        if not t.calls:
            content.append({"type": "text", "text": completion_text(t.output)})
        ids = _vllm_tool_ids(call, len(t.calls))
        content += [{"type": "tool_use", "id": ids[i], "name": name, "input": json.loads(args)}
                    for i, (name, args) in enumerate(t.calls)]
        body = {"id": msg_id, "type": "message", "role": "assistant", "content": content, "model": model,
                "stop_reason": t.stop_reason, "usage": _vllm_usage(t, t.output)}
        return generated(json_reply(body), t.prompt, t.output)
    events = error_after(_vllm_events(call, t, msg_id, model), call.error_after, VLLM_STREAM_ERROR)
    return stream_reply(events, VLLM_EVENT_STREAM, prompt_tokens=t.prompt, completion_tokens=t.output)


def _vllm_tool_ids(call: Call, count: int) -> list[str]:
    # the chat layer's ids (vllm.py), which the converter copies into the tool_use blocks
    return ["chatcmpl-tool-" + hashlib.sha256(call.body + b"#%d" % i).hexdigest()[:32] for i in range(count)]


def _vllm_events(call: Call, t: Turn, msg_id: str, model: str) -> Iterator[bytes]:
    def event(name: str, obj: dict[str, Any]) -> bytes:
        return named_sse(name, dumps(obj))

    # message_start comes from the chat stream's role chunk, whose continuous usage has the prompt count
    yield event("message_start", {"type": "message_start", "message": {
        "id": msg_id, "content": [], "model": model, "stop_reason": None, "stop_sequence": None,
        "usage": _vllm_usage(t, 0)}})
    if not t.calls:
        yield event("content_block_start", {"type": "content_block_start",
                                            "content_block": {"type": "text", "text": ""}, "index": 0})
        for i in range(t.output):
            yield event("content_block_delta", {"type": "content_block_delta",
                                                "delta": {"type": "text_delta", "text": word(i)}, "index": 0})
        yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
    else:
        ids = _vllm_tool_ids(call, len(t.calls))
        block = -1
        for step in tool_argument_fragments(t.calls):
            for i, name, fragment in step:
                if name is not None:  # a new call: the previous block ends, a tool_use block starts
                    if block >= 0:
                        yield event("content_block_stop", {"type": "content_block_stop", "index": block})
                    block += 1
                    yield event("content_block_start", {"type": "content_block_start", "content_block": {
                        "type": "tool_use", "id": ids[i], "name": name, "input": {}}, "index": block})
                elif fragment:
                    yield event("content_block_delta", {"type": "content_block_delta", "delta": {
                        "type": "input_json_delta", "partial_json": fragment}, "index": block})
        yield event("content_block_stop", {"type": "content_block_stop", "index": block})
    yield event("message_delta", {"type": "message_delta", "delta": {"stop_reason": t.stop_reason},
                                  "usage": _vllm_usage(t, t.output)})
    yield event("message_stop", {"type": "message_stop"})


def vllm_count_tokens(call: Call) -> Reply:
    req = call.json()
    if not isinstance(req.get("messages"), list):
        raise BadRequest("messages: Field required")
    n = prompt_tokens(req, TEMPLATES["vllm"])
    return json_reply({"input_tokens": n, "context_management": {"original_input_tokens": n}})


def vllm_error(status: int, message: str, vllm_type: str) -> Reply:
    """translate_error_response: vLLM's own error type inside Anthropic's envelope."""
    return json_reply({"type": "error", "error": {"type": vllm_type, "message": message}}, status)


# --- Ollama (>= 0.14): anthropic/anthropic.go, middleware/anthropic.go --------------------------------

GO_JSON = b"application/json"


def _go_encode(obj: Any) -> bytes:
    return dumps(obj) + b"\n"  # json.NewEncoder(w).Encode: compact, then a newline


def ollama_error(call_body: bytes, status: int, message: str) -> Reply:
    """anthropic.NewError: the status mapped to Anthropic's error types, plus a request_id."""
    etype = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error",
             529: "overloaded_error"}.get(status, "api_error")
    rid = "req_" + hashlib.sha256(call_body + b"req").hexdigest()[:24]
    reply = Reply(status=status, content_type=GO_JSON, body=_go_encode(
        {"type": "error", "error": {"type": etype, "message": message}, "request_id": rid}))
    return reply


def ollama_messages(call: Call) -> Reply:
    req = request(call)
    t = turn(call, "ollama")
    msg_id = "msg_" + _id(call, b"msg")
    model = req.get("model") or call.model  # the request's model, as the converter echoes it
    ids = ["call_" + _id(call, b"call%d" % i, 8) for i in range(len(t.calls))]

    def usage(input_tokens: int, output: int) -> dict[str, int]:
        out = {"input_tokens": input_tokens, "output_tokens": output}
        if t.cache_write:  # not in Ollama's Usage: added by the knob only
            out["cache_creation_input_tokens"] = t.cache_write
        if t.cache_read:
            out["cache_read_input_tokens"] = t.cache_read
        return out

    if not req.get("stream"):
        content: list[dict[str, Any]] = []
        if not t.calls:
            content.append({"type": "text", "text": completion_text(t.output)})
        content += [{"type": "tool_use", "id": ids[i], "name": name, "input": json.loads(args)}
                    for i, (name, args) in enumerate(t.calls)]
        body = {"id": msg_id, "type": "message", "role": "assistant", "model": model, "content": content,
                "stop_reason": t.stop_reason, "usage": usage(t.uncached, t.output)}
        return generated(Reply(content_type=GO_JSON, body=_go_encode(body)), t.prompt, t.output)

    def event(name: str, obj: dict[str, Any]) -> bytes:
        return named_sse(name, dumps(obj))

    def events() -> Iterator[bytes]:
        # the first native chunk has no metrics yet, so message_start carries the len/4 estimate
        yield event("message_start", {"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "usage": {"input_tokens": ollama_estimated_input_tokens(req), "output_tokens": 0}}})
        if t.calls:  # Ollama's parser holds tool calls back and writes each one whole
            for i, (name, args) in enumerate(t.calls):
                yield event("content_block_start", {"type": "content_block_start", "index": i, "content_block": {
                    "type": "tool_use", "id": ids[i], "name": name, "input": {}}})
                yield event("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {
                    "type": "input_json_delta", "partial_json": dumps(json.loads(args)).decode()}})
                yield event("content_block_stop", {"type": "content_block_stop", "index": i})
        else:
            yield event("content_block_start", {"type": "content_block_start", "index": 0,
                                                "content_block": {"type": "text", "text": ""}})
            for i in range(t.output):
                yield event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                    "delta": {"type": "text_delta", "text": word(i)}})
            yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
        # the done chunk's metrics: the real counts
        yield event("message_delta", {"type": "message_delta", "delta": {"stop_reason": t.stop_reason},
                                      "usage": usage(t.uncached, t.output)})
        yield event("message_stop", {"type": "message_stop"})

    headers = [(b"cache-control", b"no-cache"), (b"connection", b"keep-alive")]
    return stream_reply(events(), b"text/event-stream", headers=headers, prompt_tokens=t.prompt,
                        completion_tokens=t.output)


# --- llama.cpp: tools/server/server-task.cpp (to_json_anthropic*), server-context.cpp ------------------


def llamacpp_messages(call: Call, msg_id: str, tool_id: Callable[[int], str]) -> Reply:
    req = request(call)
    t = turn(call, "llamacpp")
    model = call.request_model()
    read = t.cache_read  # n_prompt_tokens_cache; llama.cpp has no cache-write count

    def usage(output: int) -> dict[str, int]:
        return {"cache_read_input_tokens": read, "input_tokens": t.prompt - read, "output_tokens": output}

    if not req.get("stream"):
        content: list[dict[str, Any]] = []
        if not t.calls:
            content.append({"type": "text", "text": completion_text(t.output)})
        content += [{"type": "tool_use", "id": tool_id(i), "name": name, "input": json.loads(args)}
                    for i, (name, args) in enumerate(t.calls)]
        body = {"id": msg_id, "type": "message", "role": "assistant", "content": content, "model": model,
                "stop_reason": t.stop_reason, "stop_sequence": None, "usage": usage(t.output)}
        return generated(json_reply(body, content_type=b"application/json; charset=utf-8"), t.prompt, t.output)

    def event(name: str, obj: dict[str, Any]) -> bytes:
        return named_sse(name, dumps(obj))

    start = event("message_start", {"type": "message_start", "message": {
        "id": msg_id, "type": "message", "role": "assistant", "content": [], "model": model,
        "stop_reason": None, "stop_sequence": None, "usage": usage(0)}})

    def partials() -> Iterator[bytes]:
        # one HTTP chunk per generated token: each holds every event that token produced
        if not t.calls:
            for i in range(t.output):
                head = (start + event("content_block_start", {"type": "content_block_start", "index": 0,
                                                              "content_block": {"type": "text", "text": ""}})
                        if i == 0 else b"")
                yield head + event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                    "type": "text_delta", "text": word(i)}})
            final = [event("content_block_stop", {"type": "content_block_stop", "index": 0})] if t.output else []
        else:
            first = True
            for step in tool_argument_fragments(t.calls):
                out = [start] if first else []
                for i, name, fragment in step:
                    if name is not None:
                        out.append(event("content_block_start", {"type": "content_block_start", "index": i,
                                                                 "content_block": {"type": "tool_use",
                                                                                   "id": tool_id(i), "name": name}}))
                    elif fragment:
                        out.append(event("content_block_delta", {"type": "content_block_delta", "index": i,
                                                                 "delta": {"type": "input_json_delta",
                                                                           "partial_json": fragment}}))
                if len(out) > (1 if first else 0) or first:
                    yield b"".join(out)
                first = False
            final = [event("content_block_stop", {"type": "content_block_stop", "index": i})
                     for i in range(len(t.calls))]
        final.append(event("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": t.stop_reason, "stop_sequence": None}, "usage": {"output_tokens": t.output}}))
        final.append(event("message_stop", {"type": "message_stop"}))
        yield b"".join(final)

    return stream_reply(error_after(partials(), call.error_after, LLAMACPP_STREAM_ERROR), b"text/event-stream",
                        prompt_tokens=t.prompt, completion_tokens=t.output)


# A failed generation after the stream began: the error result as an `event: error` (format_error_response
# shape, not Anthropic's), and the stream ends.
LLAMACPP_STREAM_ERROR = (named_sse("error", dumps({"code": 500, "message": "mock generation failure "
                                                   "(x-mock-error-after)", "type": "server_error"})),)


def llamacpp_count_tokens(call: Call) -> Reply:
    req = call.json()
    if not isinstance(req.get("messages"), list):
        raise BadRequest("\"messages\" is required")
    return json_reply({"input_tokens": prompt_tokens(req, TEMPLATES["llamacpp"])},
                      content_type=b"application/json; charset=utf-8")
