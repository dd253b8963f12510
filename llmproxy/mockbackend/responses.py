"""OpenAI's Responses API (POST /v1/responses) as vLLM and Ollama serve it (docs/protocols.md §9).

The answer is the mock's usual one (x-mock-tokens capped by max_output_tokens), or one function_call item per
function tool (textgen.responses_tool_calls). Prompts are counted by `textgen.responses_prompt_tokens`, with the
conversation of the response named by previous_response_id in front, as the engines rebuild it.

Every response produced with `store` not false is remembered (ResponseStore: its conversation, in a bounded
map per process); a request naming a previous_response_id the mock does not know gets the engine's 404, so a
proxy that sends a follow-up to another backend than the first is caught.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from llmproxy.mockbackend.options import BadRequest
from llmproxy.mockbackend.reply import CREATED, Call, Reply, dumps, generated, json_reply, named_sse, stream_reply
from llmproxy.mockbackend.textgen import (
    TEMPLATES,
    capped,
    chat_sequence,
    chat_tools,
    completion_text,
    responses_messages,
    responses_prompt_tokens,
    responses_tool_calls,
    tool_call_completion_tokens,
    word,
)

MAX_STORED = 10_000  # responses remembered per process; the oldest are forgotten first


class ResponseStore:
    """The ids of the responses this process produced, each with its conversation (for follow-up counts)."""

    def __init__(self, limit: int = MAX_STORED) -> None:
        self.limit = limit
        self._items: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()

    def get(self, response_id: str) -> list[dict[str, Any]] | None:
        return self._items.get(response_id)

    def put(self, response_id: str, conversation: list[dict[str, Any]]) -> None:
        self._items[response_id] = conversation
        self._items.move_to_end(response_id)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class UnknownPreviousResponse(Exception):
    def __init__(self, response_id: str) -> None:
        super().__init__(response_id)
        self.response_id = response_id


@dataclass(slots=True)
class Answer:
    """What the mock's model answers to one Responses request."""

    response_id: str
    prompt: int
    output: int
    calls: list[tuple[str, str]]
    incomplete: bool  # max_output_tokens cut the text
    cached: int
    history: list[dict[str, Any]]  # the conversation so far, this request's messages included


def answer(call: Call, dialect: str) -> Answer:
    req = call.json()
    if "input" not in req:
        raise BadRequest("input: Field required")
    history: list[dict[str, Any]] = []
    previous = req.get("previous_response_id")
    if isinstance(previous, str) and previous:
        known = call.responses.get(previous) if call.responses is not None else None
        if known is None:
            raise UnknownPreviousResponse(previous)
        history = known
    p = responses_prompt_tokens(req, TEMPLATES[dialect], history)
    calls = responses_tool_calls(req)
    limit = req.get("max_output_tokens")
    if calls:
        n, incomplete = tool_call_completion_tokens(calls), False
    else:
        n = capped(call.tokens, limit)
        incomplete = n < call.tokens
    digest = hashlib.sha256(call.body + (previous or "").encode()).hexdigest()
    return Answer("resp_" + digest[:32], p, n, calls, incomplete, call.cached(p),
                  [*history, *responses_messages(req)])


def prompt_sequence(call: Call, dialect: str) -> list[str]:
    """The prompt of a Responses request as tokens (textgen.chat_sequence), the stored conversation it continues
    first, as responses_prompt_tokens counts it (an unknown previous_response_id: this request's messages only)."""
    req = call.json()
    previous = req.get("previous_response_id")
    history = call.responses.get(previous) if isinstance(previous, str) and call.responses is not None else None
    return chat_sequence([*(history or []), *responses_messages(req)], chat_tools(req.get("tools")), TEMPLATES[dialect])


def remember(call: Call, a: Answer) -> None:
    """Store the response (unless the request said store: false), its answer appended to the conversation."""
    if call.responses is None or call.json().get("store") is False:
        return
    if a.calls:
        reply = {"role": "assistant", "content": "", "tool_calls": [
            {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}}
            for i, (name, args) in enumerate(a.calls)]}
    else:
        reply = {"role": "assistant", "content": completion_text(a.output)}
    call.responses.put(a.response_id, [*a.history, reply])


def usage(a: Answer) -> dict[str, Any]:
    return {"input_tokens": a.prompt, "input_tokens_details": {"cached_tokens": a.cached},
            "output_tokens": a.output, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": a.prompt + a.output}


def _item_ids(a: Answer, kind: str, count: int) -> list[str]:
    return [f"{kind}_" + hashlib.sha256(f"{a.response_id}/{kind}/{i}".encode()).hexdigest()[:24]
            for i in range(count)]


# --- vLLM: vllm/entrypoints/openai/responses/{serving,protocol}.py ------------------------------------
# Events are the openai package's pydantic models dumped whole (keys in the SDK's field order), framed as
# `event: <type>` + `data:`; sequence_number counts from 0; the stream ends with response.completed (the
# response's status says "incomplete" when max_output_tokens cut it) and no [DONE].

VLLM_EVENT_STREAM = b"text/event-stream; charset=utf-8"


def _vllm_response(call: Call, a: Answer, status: str, output: list[Any], with_usage: bool) -> dict[str, Any]:
    req = call.json()
    return {
        "id": a.response_id, "created_at": CREATED,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.get("instructions"), "metadata": req.get("metadata"), "model": call.request_model(),
        "object": "response", "output": output, "parallel_tool_calls": req.get("parallel_tool_calls", True),
        "temperature": req.get("temperature", 1.0), "tool_choice": req.get("tool_choice", "auto"),
        "tools": req.get("tools") or [], "top_p": req.get("top_p", 1.0), "background": bool(req.get("background")),
        "max_output_tokens": req.get("max_output_tokens"), "max_tool_calls": req.get("max_tool_calls"),
        "previous_response_id": req.get("previous_response_id"), "prompt": None, "reasoning": req.get("reasoning"),
        "service_tier": req.get("service_tier") or "auto", "status": status, "text": req.get("text"),
        "top_logprobs": req.get("top_logprobs"), "truncation": req.get("truncation") or "disabled",
        "usage": usage(a) if with_usage else None, "user": req.get("user"),
    }


def _vllm_output(a: Answer, msg_id: str, call_ids: list[str], fc_ids: list[str], status: str) -> list[Any]:
    if a.calls:
        return [{"arguments": args, "call_id": call_ids[i], "name": name, "type": "function_call", "id": fc_ids[i],
                 "status": "completed"} for i, (name, args) in enumerate(a.calls)]
    text = {"annotations": [], "text": completion_text(a.output), "type": "output_text", "logprobs": None}
    return [{"id": msg_id, "content": [text], "role": "assistant", "status": status, "type": "message"}]


def vllm_responses(call: Call) -> Reply:
    a = answer(call, "vllm")
    remember(call, a)
    status = "incomplete" if a.incomplete else "completed"
    msg_id = _item_ids(a, "msg", 1)[0]
    call_ids, fc_ids = _item_ids(a, "call", len(a.calls)), _item_ids(a, "fc", len(a.calls))
    output = _vllm_output(a, msg_id, call_ids, fc_ids, status)
    if not call.json().get("stream"):
        return generated(json_reply(_vllm_response(call, a, status, output, True)), a.prompt, a.output)

    def events() -> Iterator[bytes]:
        seq = iter(range(1 << 30))

        def event(obj: dict[str, Any]) -> bytes:
            kind = obj.pop("type")
            return named_sse(kind, dumps({**obj, "sequence_number": next(seq), "type": kind}))

        pending = _vllm_response(call, a, "in_progress", [], False)
        yield event({"response": pending, "type": "response.created"})
        yield event({"response": pending, "type": "response.in_progress"})
        if a.calls:
            for i, (name, args) in enumerate(a.calls):
                item = {"arguments": "", "call_id": call_ids[i], "name": name, "type": "function_call",
                        "id": fc_ids[i], "status": "in_progress"}
                yield event({"item": item, "output_index": i, "type": "response.output_item.added"})
                yield event({"delta": args, "item_id": fc_ids[i], "output_index": i,
                             "type": "response.function_call_arguments.delta"})
                yield event({"arguments": args, "item_id": fc_ids[i], "output_index": i,
                             "type": "response.function_call_arguments.done"})
                yield event({"item": output[i], "output_index": i, "type": "response.output_item.done"})
        else:
            added = {"id": msg_id, "content": [], "role": "assistant", "status": "in_progress", "type": "message"}
            empty = {"annotations": [], "text": "", "type": "output_text", "logprobs": []}
            yield event({"item": added, "output_index": 0, "type": "response.output_item.added"})
            yield event({"content_index": 0, "item_id": msg_id, "output_index": 0, "part": empty,
                         "type": "response.content_part.added"})
            for i in range(a.output):
                yield event({"content_index": 0, "delta": word(i), "item_id": msg_id, "logprobs": [],
                             "output_index": 0, "type": "response.output_text.delta"})
            text = completion_text(a.output)
            yield event({"content_index": 0, "item_id": msg_id, "logprobs": [], "output_index": 0, "text": text,
                         "type": "response.output_text.done"})
            yield event({"content_index": 0, "item_id": msg_id, "output_index": 0,
                         "part": {**empty, "text": text}, "type": "response.content_part.done"})
            yield event({"item": output[0], "output_index": 0, "type": "response.output_item.done"})
        yield event({"response": _vllm_response(call, a, status, output, True), "type": "response.completed"})

    return stream_reply(events(), VLLM_EVENT_STREAM, prompt_tokens=a.prompt, completion_tokens=a.output)


def vllm_not_found(response_id: str) -> Reply:
    """_make_not_found_error: 404, invalid_request_error, param response_id."""
    return json_reply({"error": {"message": f"Response with id '{response_id}' not found.",
                                 "type": "invalid_request_error", "param": "response_id", "code": 404}}, 404)


# --- Ollama: openai/responses.go (ResponsesStreamConverter), middleware/openai.go -----------------------
# Everything is a Go map[string]any, so keys come out sorted; every event carries sequence_number; the
# stream ends with response.completed, whose status is "completed" even when num_predict cut the text.


def _go_sorted(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def _ollama_response(call: Call, a: Answer, status: str, output: list[Any], with_usage: bool) -> dict[str, Any]:
    req = call.json()
    return {
        "id": a.response_id, "object": "response", "created_at": CREATED,
        "completed_at": CREATED if status == "completed" else None, "status": status, "incomplete_details": None,
        "model": req.get("model") or call.model, "previous_response_id": None, "instructions": req.get("instructions"),
        "output": output, "error": None, "tools": req.get("tools") or [], "tool_choice": "auto",
        "truncation": req.get("truncation") or "disabled", "parallel_tool_calls": True,
        "text": {"format": {"type": "text"}}, "top_p": req.get("top_p", 1.0), "presence_penalty": 0,
        "frequency_penalty": 0, "top_logprobs": 0, "temperature": req.get("temperature", 1.0),
        "reasoning": None, "usage": usage(a) if with_usage else None, "max_output_tokens": req.get("max_output_tokens"),
        "max_tool_calls": None, "store": False, "background": bool(req.get("background")), "service_tier": "default",
        "metadata": {}, "safety_identifier": None, "prompt_cache_key": None,
    }


def ollama_responses(call: Call) -> Reply:
    a = answer(call, "ollama")
    remember(call, a)
    a.cached = 0  # Ollama reports cached_tokens 0 whatever the cache did
    msg_id = "msg_" + str(int(_item_ids(a, "msg", 1)[0][4:12], 16) % 999999)
    fc_ids = [f"fc_{int(h[3:11], 16) % 999999}_{i}" for i, h in enumerate(_item_ids(a, "fc", len(a.calls)))]
    call_ids = ["call_" + h[5:13] for h in _item_ids(a, "call", len(a.calls))]
    text = completion_text(a.output)
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    if a.calls:
        output = [{"id": fc_ids[i], "type": "function_call", "status": "completed", "call_id": call_ids[i],
                   "name": name, "arguments": args} for i, (name, args) in enumerate(a.calls)]
    else:
        output = [{"id": msg_id, "type": "message", "status": "completed", "role": "assistant", "content": [part]}]
    if not call.json().get("stream"):
        body = _go_sorted(_ollama_response(call, a, "completed", output, True))
        return generated(Reply(content_type=b"application/json; charset=utf-8", body=body), a.prompt, a.output)

    def events() -> Iterator[bytes]:
        seq = iter(range(1 << 30))

        def event(kind: str, obj: dict[str, Any]) -> bytes:
            return named_sse(kind, _go_sorted({**obj, "type": kind, "sequence_number": next(seq)}))

        yield event("response.created", {"response": _ollama_response(call, a, "in_progress", [], False)})
        yield event("response.in_progress", {"response": _ollama_response(call, a, "in_progress", [], False)})
        if a.calls:  # tool calls arrive whole in one native chunk
            for i, item in enumerate(output):
                yield event("response.output_item.added", {"output_index": i, "item": {
                    **item, "status": "in_progress", "arguments": ""}})
                yield event("response.function_call_arguments.delta", {"item_id": item["id"], "output_index": i,
                                                                       "delta": item["arguments"]})
                yield event("response.function_call_arguments.done", {"item_id": item["id"], "output_index": i,
                                                                      "arguments": item["arguments"]})
                yield event("response.output_item.done", {"output_index": i, "item": item})
        else:
            yield event("response.output_item.added", {"output_index": 0, "item": {
                "id": msg_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}})
            yield event("response.content_part.added", {"item_id": msg_id, "output_index": 0, "content_index": 0,
                                                        "part": {**part, "text": ""}})
            for i in range(a.output):
                yield event("response.output_text.delta", {"item_id": msg_id, "output_index": 0, "content_index": 0,
                                                           "delta": word(i), "logprobs": []})
            yield event("response.output_text.done", {"item_id": msg_id, "output_index": 0, "content_index": 0,
                                                      "text": text, "logprobs": []})
            yield event("response.content_part.done", {"item_id": msg_id, "output_index": 0, "content_index": 0,
                                                       "part": part})
            yield event("response.output_item.done", {"output_index": 0, "item": output[0]})
        yield event("response.completed", {"response": _ollama_response(call, a, "completed", output, True)})

    return stream_reply(events(), b"text/event-stream", prompt_tokens=a.prompt, completion_tokens=a.output)


def ollama_not_found(response_id: str) -> Reply:
    return json_reply({"error": {"message": f"response '{response_id}' not found", "type": "not_found_error",
                                 "param": None, "code": None}}, 404)
