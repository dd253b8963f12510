"""Hugging Face TGI (docs/protocols.md §3): native /generate(_stream) plus its OpenAI-compatible routes.

Generations stop at the token budget: finish_reason "length", the last token is an ordinary one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from llmproxy.mockbackend.reply import (
    CREATED,
    DONE,
    SLOT,
    SSE,
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
    generated_token_id,
    prompt_text,
    prompt_tokens,
    token_id,
    tokenize,
    word,
)

TEMPLATE = TEMPLATES["tgi"]  # how this engine's model counts a chat prompt (textgen.py)

VERSION = "3.3.7"
FINGERPRINT = "3.3.7-native"  # "<version>-<docker_label|native>"
MAX_INPUT_TOKENS = 4095
MAX_TOTAL_TOKENS = 4096
PLACEHOLDER_MODEL = "tgi"  # a request naming this model means the served one (§3.3)

_ERROR_TYPES = {404: "not_found", 422: "validation", 424: "generation", 429: "overloaded",
                500: "incomplete_generation", 503: "unhealthy"}


# What a failed generation sends in-band once the stream has begun (§3.5): the native route ends after an
# ErrorResponse event; the chat route sends OpenAI-ish error (always 422) and still ends with [DONE].
_FAILURE = "Request failed during generation: mock generation failure (x-mock-error-after)"
NATIVE_STREAM_ERROR = (sse(dumps({"error": _FAILURE, "error_type": "generation"})),)
CHAT_STREAM_ERROR = (sse(dumps({"error": {"message": _FAILURE, "http_status_code": 422}})), DONE)


def error(status: int, message: str, path: str) -> Reply:
    """TGI's ErrorResponse; `error` is a plain string, so the openai SDK's `.body` is the message."""
    return json_reply({"error": message, "error_type": _ERROR_TYPES.get(status, "error")}, status)


def _stream_headers(call: Call) -> list[tuple[bytes, bytes]]:
    # TGI sets both anti-buffering headers itself (§3.5); x-compute-characters is the input length.
    return [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
            (b"x-compute-type", b"gpu+optimized"),
            (b"x-compute-characters", str(len(prompt_text(call.json()))).encode())]


def _logprob(i: int) -> float:
    return -((i % 8) + 1) / 8  # exact in f32, so serde and orjson print the same digits


def _token(i: int) -> dict[str, Any]:
    return {"id": generated_token_id(i), "text": word(i), "logprob": _logprob(i), "special": False}


def _parameters(req: dict[str, Any]) -> dict[str, Any]:
    params = req.get("parameters")
    return params if isinstance(params, dict) else {}


def generate(call: Call) -> Reply:
    req = call.json()
    params = _parameters(req)
    n = max(1, capped(call.tokens, params.get("max_new_tokens")))  # TGI rejects max_new_tokens=0
    p = prompt_tokens(req, TEMPLATE)
    body: dict[str, Any] = {"generated_text": completion_text(n)}
    if params.get("details"):
        body["details"] = {"finish_reason": "length", "generated_tokens": n, "seed": None, "prefill": [],
                           "tokens": [_token(i) for i in range(n)]}
    reply = generated(json_reply(body), p, n)
    reply.headers = [(b"x-compute-type", b"gpu+optimized"),
                     (b"x-compute-characters", str(len(prompt_text(req))).encode()),
                     (b"x-prompt-tokens", str(p).encode()), (b"x-generated-tokens", str(n).encode())]
    return reply


def generate_stream(call: Call) -> Reply:
    req = call.json()
    params = _parameters(req)
    n = max(1, capped(call.tokens, params.get("max_new_tokens")))
    p = prompt_tokens(req, TEMPLATE)
    details = bool(params.get("details"))
    events = error_after(_generate_events(n, p, details), call.error_after, NATIVE_STREAM_ERROR)
    return stream_reply(events, SSE, headers=_stream_headers(call), prompt_tokens=p, completion_tokens=n)


def compat_generate(call: Call) -> Reply:
    """POST / (TGI's compat route, what the `text-generation` and `huggingface_hub` clients call): the body's
    `stream` picks /generate_stream, else /generate with its reply wrapped in a one-element list."""
    if call.json().get("stream") is True:
        return generate_stream(call)
    reply = generate(call)
    reply.body = b"[" + reply.body + b"]"
    return reply


def _generate_events(n: int, p: int, details: bool) -> Iterator[bytes]:
    template = Template({"index": SLOT, "token": SLOT, "generated_text": None, "details": None})
    for i in range(n - 1):
        yield template.fill(i + 1, _token(i))
    final = {"finish_reason": "length", "generated_tokens": n, "seed": None, "input_length": p}
    # no [DONE]: the stream just ends after the event that carries generated_text (§3.2)
    yield sse(dumps({"index": n, "token": _token(n - 1), "generated_text": completion_text(n),
                     "details": final if details else None}))


def chat(call: Call) -> Reply:
    req = call.json()
    n = capped(call.tokens, req.get("max_tokens"))
    p = prompt_tokens(req, TEMPLATE)
    base = {"object": "chat.completion.chunk", "id": "", "created": CREATED,
            "model": call.request_model(PLACEHOLDER_MODEL), "system_fingerprint": FINGERPRINT}
    usage = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
    if req.get("stream"):
        events = error_after(_chat_events(base, n, usage, call.include_usage()), call.error_after,
                             CHAT_STREAM_ERROR)
        return stream_reply(events, SSE, headers=_stream_headers(call), prompt_tokens=p, completion_tokens=n)
    body = {**base, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion_text(n)},
                         "logprobs": None, "finish_reason": "length"}],
            "usage": usage}
    return generated(json_reply(body), p, n)


def _chat_events(base: dict[str, Any], n: int, usage: dict[str, int], include: bool) -> Iterator[bytes]:
    def chunk(content: Any, finish: str | None) -> dict[str, Any]:
        # role repeats in every delta and usage is an explicit null (§3.3)
        return {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": content},
                                     "logprobs": None, "finish_reason": finish}], "usage": None}

    template = Template(chunk(SLOT, None))
    for i in range(n - 1):
        yield template.fill(word(i))
    yield sse(dumps(chunk(word(n - 1) if n else "", "length")))
    if include:
        yield sse(dumps({**base, "choices": [], "usage": usage}))
    yield DONE


def completions(call: Call) -> Reply:
    req = call.json()
    n = capped(call.tokens, req.get("max_tokens"))
    p = prompt_tokens(req, TEMPLATE)
    model = call.request_model(PLACEHOLDER_MODEL)
    usage = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}

    def final(text: str) -> dict[str, Any]:
        # CompletionFinal field order; usage rides on the last non-empty chunk, whatever stream_options says
        return {"object": "text_completion", "id": "", "created": CREATED, "model": model,
                "system_fingerprint": FINGERPRINT,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
                "usage": usage}

    if not req.get("stream"):
        return generated(json_reply(final(completion_text(n))), p, n)
    template = Template({"object": "text_completion", "id": "", "created": CREATED,
                         "choices": [{"index": 0, "text": SLOT, "logprobs": None, "finish_reason": ""}],
                         "model": model, "system_fingerprint": FINGERPRINT})

    def events() -> Iterator[bytes]:
        for i in range(n - 1):
            yield template.fill(word(i))
        yield sse(dumps(final(word(n - 1) if n else "")))
        yield DONE

    return stream_reply(events(), SSE, headers=_stream_headers(call), prompt_tokens=p, completion_tokens=n)


def info(call: Call) -> Reply:
    return json_reply({
        "model_id": call.model, "model_sha": None, "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": 128, "max_best_of": 2, "max_stop_sequences": 4,
        "max_input_tokens": MAX_INPUT_TOKENS, "max_total_tokens": MAX_TOTAL_TOKENS, "validation_workers": 2,
        "max_client_batch_size": 4, "router": "text-generation-router", "version": VERSION, "sha": None,
        "docker_label": None,
    })


def models(call: Call) -> Reply:
    cards = [{"id": name, "object": "model", "created": 0, "owned_by": name} for name in call.served]
    return json_reply({"object": "list", "data": cards})


def check_model(call: Call) -> Reply | None:
    """TGI serves one model and ignores the name a request gives, so it never refuses one (§3.3)."""
    return None


def unhealthy(status: int) -> Reply:
    """/health when the router's health check fails: TGI's ErrorResponse with error_type healthcheck."""
    return json_reply({"error": "unhealthy", "error_type": "healthcheck"}, status)


def tokenize_route(call: Call) -> Reply:
    """POST /tokenize {"inputs": text}: the tokens of the text, no template."""
    return json_reply(_token_list(prompt_text(call.json())))


def chat_tokenize(call: Call) -> Reply:
    """POST /chat_tokenize {"messages": [...]}: the conversation rendered by the chat template, tokenized."""
    req = call.json()
    tokens = _token_list(prompt_text(req))
    count = prompt_tokens(req, TEMPLATE)  # the template's own tokens are not in the text
    tokens += [{"id": 2, "text": "</s>", "start": 0, "stop": 0}] * max(0, count - len(tokens))
    return json_reply({"tokenize_response": tokens[:count], "templated_text": prompt_text(req)})


def _token_list(text: str) -> list[dict[str, Any]]:
    tokens, start = [], 0
    for piece in tokenize(text):
        tokens.append({"id": token_id(piece), "text": piece, "start": start, "stop": start + len(piece)})
        start += len(piece)
    return tokens


def metrics(call: Call) -> Reply:
    running, waiting, prompt_total, generation_total = call.gauges()
    return prometheus_reply([
        ("tgi_batch_current_size", "gauge", "Current batch size", running),
        ("tgi_queue_size", "gauge", "Current queue size", waiting),
        ("tgi_request_input_length_total", "counter", "Input tokens of all requests", prompt_total),
        ("tgi_request_generated_tokens_total", "counter", "Generated tokens of all requests",
         generation_total),
    ])


# the routes that answer the /_mock/health state (TGI routes /ping to the same handler as /health)
HEALTH_PATHS = frozenset({"/health", "/ping"})

OPENAPI_PATH = "/api-doc/openapi.json"  # its routes, as the engine documents them
ROUTES = {
    "/": ("POST", compat_generate),
    "/generate": ("POST", generate),
    "/generate_stream": ("POST", generate_stream),
    "/v1/chat/completions": ("POST", chat),
    "/v1/completions": ("POST", completions),
    "/info": ("GET", info),
    "/health": ("GET", empty_reply),
    "/ping": ("GET", empty_reply),
    "/v1/models": ("GET", models),
    "/tokenize": ("POST", tokenize_route),
    "/chat_tokenize": ("POST", chat_tokenize),
    "/metrics": ("GET", metrics),
}
