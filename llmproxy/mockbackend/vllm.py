"""vLLM's OpenAI-compatible server (docs/protocols.md §2): routes, chunk shapes and error shape.

Every text generation stops at the token budget, so finish_reason is "length" and sits on the last
content chunk, as vLLM does when max_tokens is reached (no separate EOS chunk). A chat request with
`tools` is answered with tool calls instead (textgen.tool_calls), streamed the way vLLM's hermes tool
parser streams them (§2.2).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any

import llmproxy.mockbackend.messages as messages
import llmproxy.mockbackend.responses as responses
from llmproxy.mockbackend.options import BadRequest
from llmproxy.mockbackend.reply import (
    CREATED,
    DONE,
    SLOT,
    Call,
    Reply,
    Template,
    dumps,
    empty_reply,
    error_after,
    generated,
    json_reply,
    prometheus_reply,
    sse,
    stream_reply,
)
from llmproxy.mockbackend.textgen import (
    TEMPLATES,
    capped,
    completion_text,
    embedding_inputs,
    encoded_embedding,
    prompt_sequence,
    prompt_token_ids,
    prompt_tokens,
    tokenize,
    tool_call_completion_tokens,
    tool_call_markup,
    tool_calls,
    word,
)

TEMPLATE = TEMPLATES["vllm"]  # how this engine's model counts a chat prompt (textgen.py)

VERSION = "0.21.0"
FINGERPRINT = "vllm-0.21.0-6d6f636b"
MAX_MODEL_LEN = 32768
EVENT_STREAM = b"text/event-stream; charset=utf-8"  # Starlette appends the charset to text/*

_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError",
                501: "NotImplementedError"}


def error(status: int, message: str, path: str) -> Reply:
    """vLLM's ErrorResponse: `code` is the integer status; unmapped statuses use the reason phrase. The
    Anthropic routes put the same type and message in Anthropic's envelope (translate_error_response)."""
    etype = _ERROR_TYPES.get(status)
    if etype is None:
        try:
            etype = HTTPStatus(status).phrase
        except ValueError:
            etype = "Error"
    if path.startswith("/v1/messages"):
        return messages.vllm_error(status, message, etype)
    return json_reply({"error": {"message": message, "type": etype, "param": None, "code": status}}, status)


def anthropic_messages(call: Call) -> Reply:
    return messages.vllm_messages(call)


def responses_route(call: Call) -> Reply:
    try:
        return responses.vllm_responses(call)
    except responses.UnknownPreviousResponse as exc:
        return responses.vllm_not_found(exc.response_id)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    # pydantic class order, which is also the wire order (§2.4)
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}


def _details(cached: int) -> dict[str, int] | None:
    """prompt_tokens_details as vLLM with --enable-prompt-tokens-details fills it: only for a prefix-cache hit."""
    return {"cached_tokens": cached} if cached else None


def _final_usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    """The usage chunk's usage: dumped with exclude_none, so the details only when there are some."""
    usage: dict[str, Any] = _usage(prompt, completion)
    if cached:
        usage["prompt_tokens_details"] = _details(cached)
    return usage


def _stream_flags(req: dict[str, Any]) -> tuple[bool, bool, bool]:
    """Return (stream, include_usage, continuous_usage_stats) the way vLLM's validators read them."""
    stream = bool(req.get("stream"))
    options = req.get("stream_options")
    if options and not stream:
        raise BadRequest("Stream options can only be defined when `stream=True`.")
    options = options if isinstance(options, dict) else {}
    include = bool(options.get("include_usage"))
    return stream, include, include and bool(options.get("continuous_usage_stats"))


def _request_id(call: Call, prefix: str) -> str:
    # vLLM builds the id from the incoming X-Request-Id when there is one (engine/serving.py).
    return prefix + (call.request_id or call.digest())


# vLLM's in-band error after a GenerationError: json.dumps of its ErrorResponse, hence the spaces (§2.5)
MIDSTREAM_ERROR = (sse(json.dumps({"error": {"message": "Internal server error", "type": "InternalServerError",
                                             "param": None, "code": 500}}).encode()), DONE)


def chat(call: Call) -> Reply:
    req = call.json()
    stream, include, continuous = _stream_flags(req)
    calls = tool_calls(req)
    if calls:
        n = tool_call_completion_tokens(calls)
    else:
        n = capped(call.tokens, req.get("max_completion_tokens"), req.get("max_tokens"))
    n, finish, matched = chat_finish(call, req, n)
    p = prompt_tokens(req, TEMPLATE)
    cached = call.cached(p)
    base = {"id": _request_id(call, "chatcmpl-"), "object": "chat.completion.chunk", "created": CREATED,
            "model": call.request_model()}
    if stream:
        if calls:
            events = _tool_call_events(base, _tool_call_ids(call, len(calls)), calls, p, include, continuous, cached)
        else:
            events = _chat_events(base, n, p, include, continuous, finish, matched, cached)
        return stream_reply(error_after(events, call.error_after, MIDSTREAM_ERROR), EVENT_STREAM,
                            prompt_tokens=p, completion_tokens=n)
    message = {"role": "assistant", "content": completion_text(n), "refusal": None, "annotations": None,
               "audio": None, "function_call": None, "tool_calls": [], "reasoning": None}
    if calls:
        ids = _tool_call_ids(call, len(calls))
        message["content"], finish = None, "tool_calls"
        message["tool_calls"] = [{"id": ids[i], "type": "function", "function": {"name": name, "arguments": args}}
                                 for i, (name, args) in enumerate(calls)]
    body = {**base, "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish,
                         "stop_reason": matched, "token_ids": None}],
            "service_tier": None, "system_fingerprint": FINGERPRINT,
            "usage": {**_usage(p, n), "prompt_tokens_details": _details(cached)},
            "prompt_logprobs": None, "prompt_token_ids": None, "kv_transfer_params": None}
    return generated(json_reply(body), p, n)


def chat_finish(call: Call, req: dict[str, Any], n: int) -> tuple[int, str, str | None]:
    """(tokens, finish_reason, stop_reason) of a text answer of at most `n` tokens.

    The mock's "model" runs out of its budget ("length") unless asked to end with an EOS token
    (x-mock-eos: 1, and max_tokens did not cut it first: "stop"). A stop string in the request ends it
    before the first token where the text would contain it: "stop", and vLLM's `stop_reason` names the string.
    """
    stops = req.get("stop")
    stops = [stops] if isinstance(stops, str) else stops if isinstance(stops, list) else []
    stops = [stop for stop in stops if isinstance(stop, str) and stop]
    if stops:
        words: list[str] = []
        for i in range(n):
            words.append(word(i))
            text = "".join(words[-64:])  # the tail is enough: a stop string spans a few tokens
            hit = next((stop for stop in stops if stop in text), None)
            if hit is not None:
                return i, "stop", hit
    eos = call.headers.get("x-mock-eos", "").strip().lower() in ("1", "true", "yes")
    return n, "stop" if eos and n == call.tokens else "length", None


def _chat_events(base: dict[str, Any], n: int, p: int, include: bool, continuous: bool, finish: str = "length",
                 matched: str | None = None, cached: int = 0) -> Iterator[bytes]:
    role: dict[str, Any] = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]}
    if continuous:
        role["usage"] = _usage(p, 0)
    yield sse(dumps({**role, "prompt_token_ids": None, "prompt_text": None}))
    chunk: dict[str, Any] = {**base, "choices": [{"index": 0, "delta": {"content": SLOT}, "logprobs": None,
                                                  "finish_reason": None, "token_ids": None}]}
    if continuous:
        chunk["usage"] = SLOT
    template = Template(chunk)
    for i in range(n - 1):
        yield template.fill(word(i), _usage(p, i + 1)) if continuous else template.fill(word(i))
    last: dict[str, Any] = {**base, "choices": [{"index": 0, "delta": {"content": word(n - 1) if n else ""},
                                                 "logprobs": None, "finish_reason": finish,
                                                 "stop_reason": matched, "token_ids": None}]}
    if continuous:
        last["usage"] = _usage(p, n)
    if not include:
        last["system_fingerprint"] = FINGERPRINT  # only when no usage chunk follows (§2.2)
    yield sse(dumps(last))
    if include:
        yield sse(dumps({**base, "choices": [], "usage": _final_usage(p, n, cached),
                         "system_fingerprint": FINGERPRINT}))
    yield DONE


def _tool_call_ids(call: Call, count: int) -> list[str]:
    # vLLM draws a random uuid per call (make_tool_call_id); the mock derives them from the body instead
    return ["chatcmpl-tool-" + hashlib.sha256(call.body + b"#%d" % i).hexdigest()[:32] for i in range(count)]


def _tool_call_steps(calls: list[tuple[str, str]], ids: list[str]) -> Iterator[list[dict[str, Any]]]:
    """The tool_calls deltas after each generated token ([]: nothing new), the final EOS step included.

    This is what the hermes parser makes of the markup as it grows: a call's first delta (id, type,
    index, function.name) once its name is complete, then each new stretch of its arguments text.
    """
    text, spans = tool_call_markup(calls)
    named, sent = [False] * len(calls), [0] * len(calls)
    seen = 0
    for piece in [*tokenize(text), ""]:  # "": the EOS token, which renders as nothing
        seen += len(piece)
        deltas: list[dict[str, Any]] = []
        for i, (name_end, args_start, args_end) in enumerate(spans):
            if not named[i]:
                if seen < name_end:
                    break  # a later call cannot start before this one is named
                named[i] = True
                deltas.append({"id": ids[i], "type": "function", "index": i, "function": {"name": calls[i][0]}})
            got = min(seen, args_end) - args_start
            if got > sent[i]:
                deltas.append({"index": i, "function": {"arguments": text[args_start + sent[i]:args_start + got]}})
                sent[i] = got
        yield deltas


def _tool_call_events(base: dict[str, Any], ids: list[str], calls: list[tuple[str, str]], p: int, include: bool,
                      continuous: bool, cached: int = 0) -> Iterator[bytes]:
    role: dict[str, Any] = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]}
    if continuous:
        role["usage"] = _usage(p, 0)
    yield sse(dumps({**role, "prompt_token_ids": None, "prompt_text": None}))
    steps = list(_tool_call_steps(calls, ids))
    n = len(steps)
    for t, deltas in enumerate(steps, 1):
        if not deltas and t < n:
            continue  # a step that only grew the markup sends no chunk
        # the parser's DeltaMessage sets content explicitly (to None), so it is dumped; an empty step is {}
        choice: dict[str, Any] = {"index": 0, "delta": {"content": None, "tool_calls": deltas} if deltas else {},
                                  "logprobs": None, "finish_reason": None}
        if t == n:
            choice.update(finish_reason="tool_calls", stop_reason=None)  # ended by EOS: no stop_reason
        choice["token_ids"] = None
        chunk: dict[str, Any] = {**base, "choices": [choice]}
        if continuous:
            chunk["usage"] = _usage(p, t)
        if t == n and not include:
            chunk["system_fingerprint"] = FINGERPRINT
        yield sse(dumps(chunk))
    if include:
        yield sse(dumps({**base, "choices": [], "usage": _final_usage(p, n, cached),
                         "system_fingerprint": FINGERPRINT}))
    yield DONE


def completions(call: Call) -> Reply:
    req = call.json()
    stream, include, continuous = _stream_flags(req)
    n = capped(call.tokens, req.get("max_tokens"))
    p = prompt_tokens(req, TEMPLATE)
    cached = call.cached(p)
    base = {"id": _request_id(call, "cmpl-"), "object": "text_completion", "created": CREATED,
            "model": call.request_model()}
    if stream:
        events = error_after(_completion_events(base, n, p, include, continuous, cached), call.error_after,
                             MIDSTREAM_ERROR)
        return stream_reply(events, EVENT_STREAM, prompt_tokens=p, completion_tokens=n)
    body = {**base, "choices": [{"index": 0, "text": completion_text(n), "logprobs": None,
                                 "finish_reason": "length", "stop_reason": None, "prompt_logprobs": None,
                                 "prompt_token_ids": None, "token_ids": None}],
            "service_tier": None, "system_fingerprint": FINGERPRINT,
            "usage": {**_usage(p, n), "prompt_tokens_details": _details(cached)}, "kv_transfer_params": None}
    return generated(json_reply(body), p, n)


def _completion_events(base: dict[str, Any], n: int, p: int, include: bool,
                       continuous: bool, cached: int = 0) -> Iterator[bytes]:
    def choice(text: Any, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None,
                "prompt_token_ids": None, "token_ids": None}

    template = Template({**base, "choices": [choice(SLOT, None)], **({"usage": SLOT} if continuous else {})})
    for i in range(n - 1):
        yield template.fill(word(i), _usage(p, i + 1)) if continuous else template.fill(word(i))
    last = {**base, "choices": [choice(word(n - 1) if n else "", "length")]}
    yield sse(dumps({**last, "usage": _usage(p, n)} if continuous else last))
    if include:
        # dumped with exclude_none, so it keeps "object" (§2.3)
        yield sse(dumps({**base, "choices": [], "usage": _final_usage(p, n, cached),
                         "system_fingerprint": FINGERPRINT}))
    yield DONE


def embeddings(call: Call) -> Reply:
    req = call.json()
    fmt = req.get("encoding_format")
    data = [{"index": index, "object": "embedding", "embedding": encoded_embedding(item, fmt)}
            for index, item in enumerate(embedding_inputs(req))]
    p = prompt_tokens(req, TEMPLATE)
    body = {"id": "embd-" + call.digest(), "object": "list", "created": CREATED,
            "model": call.request_model(), "data": data,
            "usage": {**_usage(p, 0), "prompt_tokens_details": None}}
    return json_reply(body)


def _model_card(name: str) -> dict[str, Any]:
    permission = {"id": "modelperm-6d6f636b", "object": "model_permission", "created": CREATED,
                  "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                  "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                  "organization": "*", "group": None, "is_blocking": False}
    return {"id": name, "object": "model", "created": CREATED, "owned_by": "vllm", "root": name,
            "parent": None, "max_model_len": MAX_MODEL_LEN, "permission": [permission]}


def models(call: Call) -> Reply:
    return json_reply({"object": "list", "data": [_model_card(name) for name in call.served]})


def check_model(call: Call) -> Reply | None:
    """vLLM's _check_model: a named model must be served (no name means the default), else 404."""
    name = call.named_model()
    if name is None or name in call.served:
        return None
    message = f"The model `{name}` does not exist."
    if call.path.startswith("/v1/messages"):
        return messages.vllm_error(404, message, "NotFoundError")
    return json_reply({"error": {"message": message, "type": "NotFoundError", "param": "model", "code": 404}}, 404)


def unhealthy(status: int) -> Reply:
    """/health when the engine is dead: a bare status (503 in vLLM), no body and no content type."""
    return Reply(status=status, content_type=None)


def version(call: Call) -> Reply:
    return json_reply({"version": VERSION})


def tokenize_route(call: Call) -> Reply:
    """POST /tokenize: `prompt` (text or ids), or `messages` rendered by the chat template as a chat request
    is (add_generation_prompt defaults to true), `tools` included."""
    ids = prompt_token_ids(call.json(), TEMPLATE)
    return json_reply({"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids, "token_strs": None})


def metrics(call: Call) -> Reply:
    running, waiting, prompt_total, generation_total = call.gauges()
    escaped = call.model.replace("\\", "\\\\").replace('"', '\\"')
    labels = f'{{engine="0",model_name="{escaped}"}}'
    rows: list[tuple[str, str, str, float]] = [
        ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", running),
        ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", waiting),
        ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", call.kv_usage()),
    ]
    prefix = call.prefix_metrics()
    if prefix is not None:  # counted in tokens (vllm/v1/metrics/loggers.py), while the prefix-cache model is on
        queries, hits, _rate = prefix
        rows += [("vllm:prefix_cache_queries_total", "counter",
                  "Prefix cache queries, in terms of number of queried tokens.", queries),
                 ("vllm:prefix_cache_hits_total", "counter",
                  "Prefix cache hits, in terms of number of cached tokens.", hits)]
    rows += [
        ("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", prompt_total),
        ("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
         generation_total),
    ]
    return prometheus_reply(rows, labels)


def _prompt_sequence(call: Call) -> list[str]:
    return prompt_sequence(call.json(), TEMPLATE)


# the generation routes whose prompt the prefix-cache model looks up (server.py), each with its prompt as tokens
PREFIX_PROMPTS = {
    "/v1/chat/completions": _prompt_sequence,
    "/v1/completions": _prompt_sequence,
    "/v1/messages": _prompt_sequence,
    "/v1/responses": lambda call: responses.prompt_sequence(call, "vllm"),
}

# the routes that answer the /_mock/health state (vLLM's /ping calls the same health check)
HEALTH_PATHS = frozenset({"/health", "/ping"})

OPENAPI_PATH = "/openapi.json"  # its routes, as the engine documents them
ROUTES = {
    "/v1/chat/completions": ("POST", chat),
    "/v1/completions": ("POST", completions),
    "/v1/embeddings": ("POST", embeddings),
    "/v1/models": ("GET", models),
    "/v1/messages": ("POST", anthropic_messages),
    "/v1/messages/count_tokens": ("POST", messages.vllm_count_tokens),
    "/v1/responses": ("POST", responses_route),
    "/health": ("GET", empty_reply),
    "/ping": ("GET", empty_reply),
    "/version": ("GET", version),
    "/tokenize": ("POST", tokenize_route),
    "/metrics": ("GET", metrics),
}
