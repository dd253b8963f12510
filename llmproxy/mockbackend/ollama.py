"""Ollama (docs/protocols.md §4): native NDJSON API plus the OpenAI-compatible /v1 routes (v0.32.6+ shapes).

Generations stop at the token budget: done_reason / finish_reason "length", and eval_count equals the
number of content lines, since no EOS token is generated.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator
from typing import Any

import llmproxy.mockbackend.messages as messages
import llmproxy.mockbackend.responses as responses
from llmproxy.mockbackend.reply import (
    CREATED,
    DONE,
    SLOT,
    SSE,
    Call,
    Reply,
    Template,
    dumps,
    error_after,
    generated,
    json_reply,
    sse,
    stream_reply,
)
from llmproxy.mockbackend.textgen import (
    TEMPLATES,
    capped,
    completion_text,
    embedding,
    embedding_inputs,
    encoded_embedding,
    generated_token_id,
    prompt_text,
    prompt_tokens,
    token_id,
    tokenize,
    word,
)

TEMPLATE = TEMPLATES["ollama"]  # how this engine's model counts a chat prompt (textgen.py)

VERSION = "0.33.0"
FINGERPRINT = "fp_ollama"
NDJSON = b"application/x-ndjson"
GO_JSON = b"application/json; charset=utf-8"
_BASE_EPOCH = 1779012600  # 2026-05-17T10:10:00Z, the recorded fixtures' clock
_NS_PER_TOKEN = 21_734_910
_LOAD_NS = 18_392_041
_PROMPT_EVAL_NS = 61_934_208
_MODIFIED_AT = "2026-05-01T09:00:00.123456789Z"
_DIGEST = "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72"

_OPENAI_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error"}
# A native stream that fails after its first line gets one more line, the error, and ends (§4.4).
NDJSON_ERROR = (dumps({"error": "mock generation failure (x-mock-error-after)"}) + b"\n",)


def error(status: int, message: str, path: str) -> Reply:
    """Native routes answer {"error": "..."}; the /v1 routes answer OpenAI's shape with code null, and
    /v1/messages Anthropic's (anthropic.NewError)."""
    if path.startswith("/v1/messages"):
        return messages.ollama_error(path.encode() + message.encode(), status, message)
    if path.startswith("/v1/"):
        etype = _OPENAI_ERROR_TYPES.get(status, "api_error")
        body: dict[str, Any] = {"error": {"message": message, "type": etype, "param": None, "code": None}}
        return json_reply(body, status)
    return json_reply({"error": message}, status, GO_JSON)


def _created_at(i: int) -> str:
    """RFC3339Nano as Go prints it (trailing zeros of the fraction trimmed), one step per token."""
    seconds, fraction = divmod(118_273_645 + i * _NS_PER_TOKEN, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(_BASE_EPOCH + seconds))
    digits = f"{fraction:09d}".rstrip("0")
    return f"{stamp}.{digits}Z" if digits else f"{stamp}Z"


def _metrics(p: int, n: int) -> dict[str, int]:
    eval_ns = n * _NS_PER_TOKEN
    metrics = {"total_duration": _LOAD_NS + _PROMPT_EVAL_NS + eval_ns + 54_396_356, "load_duration": _LOAD_NS,
               "prompt_eval_count": p, "prompt_eval_duration": _PROMPT_EVAL_NS, "eval_count": n,
               "eval_duration": eval_ns}
    return {k: v for k, v in metrics.items() if v}  # every metric is omitempty in Go (§4.2)


def _num_predict(req: dict[str, Any]) -> Any:
    options = req.get("options")
    return options.get("num_predict") if isinstance(options, dict) else None


def _native(call: Call, field: str, extra_done: dict[str, Any]) -> Reply:
    """/api/chat (field "message") and /api/generate (field "response"): NDJSON unless stream is false."""
    req = call.json()
    n = capped(call.tokens, _num_predict(req))
    p = prompt_tokens(req, TEMPLATE)
    model = call.request_model()

    def content(text: Any) -> Any:
        return {"role": "assistant", "content": text} if field == "message" else text

    done = {"model": model, "created_at": _created_at(n), field: content(""), "done": True,
            "done_reason": "length", **extra_done, **_metrics(p, n)}
    if req.get("stream", True) is False:
        return generated(json_reply({**done, field: content(completion_text(n))}, content_type=GO_JSON), p, n)

    def events() -> Iterator[bytes]:
        template = Template({"model": model, "created_at": SLOT, field: content(SLOT), "done": False},
                            prefix=b"", suffix=b"\n")
        for i in range(n):
            yield template.fill(_created_at(i), word(i))
        yield dumps(done) + b"\n"

    return stream_reply(error_after(events(), call.error_after, NDJSON_ERROR), NDJSON, prompt_tokens=p,
                        completion_tokens=n)


def api_chat(call: Call) -> Reply:
    return _native(call, "message", {})


def api_generate(call: Call) -> Reply:
    req = call.json()
    n = capped(call.tokens, _num_predict(req))
    # the final line carries the token ids of prompt and response, before the metrics (§4.2)
    context = [token_id(t) for t in tokenize(prompt_text(req))] + [generated_token_id(i) for i in range(n)]
    return _native(call, "response", {} if req.get("raw") else {"context": context})


def _openai_id(call: Call, prefix: str) -> str:
    return f"{prefix}{zlib.crc32(call.body) % 999}"  # Ollama: rand.Intn(999), not unique (§4.3)


def v1_chat(call: Call) -> Reply:
    req = call.json()
    n = capped(call.tokens, req.get("max_tokens"))
    p = prompt_tokens(req, TEMPLATE)
    base = {"id": _openai_id(call, "chatcmpl-"), "object": "chat.completion.chunk", "created": CREATED,
            "model": call.request_model(), "system_fingerprint": FINGERPRINT}
    usage = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
    if not req.get("stream"):
        body = {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": completion_text(n)},
                             "finish_reason": "length"}], "usage": usage}
        return generated(json_reply(body), p, n)

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    def events() -> Iterator[bytes]:
        template = Template(chunk({"content": SLOT}, None))
        # role only on the first delta, finish_reason in a chunk of its own (v0.32.6+)
        if n:
            yield sse(dumps(chunk({"role": "assistant", "content": word(0)}, None)))
        for i in range(1, n):
            yield template.fill(word(i))
        yield sse(dumps(chunk({}, "length")))
        if call.include_usage():
            yield sse(dumps({**base, "choices": [], "usage": usage}))
        yield DONE

    return stream_reply(events(), SSE, prompt_tokens=p, completion_tokens=n)


def v1_completions(call: Call) -> Reply:
    req = call.json()
    n = capped(call.tokens, req.get("max_tokens"))
    p = prompt_tokens(req, TEMPLATE)
    head = {"id": _openai_id(call, "cmpl-"), "object": "text_completion", "created": CREATED}
    model = call.request_model()
    usage = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
    if not req.get("stream"):
        body = {**head, "model": model, "system_fingerprint": FINGERPRINT,
                "choices": [{"text": completion_text(n), "index": 0, "finish_reason": "length"}],
                "usage": usage}
        return generated(json_reply(body), p, n)
    include = call.include_usage()
    # with include_usage every chunk carries a zero usage and the real one comes last (§4.3)
    zeros = {"usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}} if include else {}

    def chunk(text: Any, finish: str | None) -> dict[str, Any]:
        return {**head, "choices": [{"text": text, "index": 0, "finish_reason": finish}], "model": model,
                "system_fingerprint": FINGERPRINT, **zeros}

    def events() -> Iterator[bytes]:
        template = Template(chunk(SLOT, None))
        for i in range(n):
            yield template.fill(word(i))
        yield sse(dumps(chunk("", "length")))
        if include:
            yield sse(dumps({**head, "choices": [], "model": model, "system_fingerprint": FINGERPRINT,
                             "usage": usage}))
        yield DONE

    return stream_reply(events(), SSE, prompt_tokens=p, completion_tokens=n)


def v1_embeddings(call: Call) -> Reply:
    req = call.json()
    data = [{"object": "embedding", "embedding": encoded_embedding(item, req.get("encoding_format")),
             "index": index} for index, item in enumerate(embedding_inputs(req))]
    p = prompt_tokens(req, TEMPLATE)
    return json_reply({"object": "list", "data": data, "model": call.request_model(),
                       "usage": {"prompt_tokens": p, "total_tokens": p}})


def v1_responses(call: Call) -> Reply:
    try:
        return responses.ollama_responses(call)
    except responses.UnknownPreviousResponse as exc:
        return responses.ollama_not_found(exc.response_id)


def v1_models(call: Call) -> Reply:
    cards = [{"id": name, "object": "model", "created": CREATED, "owned_by": "library"} for name in call.served]
    return json_reply({"object": "list", "data": cards})


def api_embed(call: Call) -> Reply:
    req = call.json()
    vectors = [embedding(item) for item in embedding_inputs(req)]
    body = {"model": call.request_model(), "embeddings": vectors,
            "total_duration": _LOAD_NS + _PROMPT_EVAL_NS, "load_duration": _LOAD_NS,
            "prompt_eval_count": prompt_tokens(req, TEMPLATE)}
    return json_reply(body, content_type=GO_JSON)


def _details() -> dict[str, Any]:
    return {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
            "parameter_size": "3.2B", "quantization_level": "Q4_K_M"}


def api_tags(call: Call) -> Reply:
    cards = [{"name": name, "model": name, "modified_at": _MODIFIED_AT, "size": 2019393189, "digest": _DIGEST,
              "details": _details()} for name in call.served]
    return json_reply({"models": cards}, content_type=GO_JSON)


def _canonical(name: str) -> str:
    # Ollama fills in the "latest" tag, so "llama3.2" and "llama3.2:latest" are one model
    return name if ":" in name.rpartition("/")[2] else name + ":latest"


def check_model(call: Call) -> Reply | None:
    """A named model must be pulled (no name means the default); /v1 re-encodes the 404 OpenAI-style."""
    name = call.named_model()
    if name is None or _canonical(name) in {_canonical(served) for served in call.served}:
        return None
    return error(404, f'model "{name}" not found, try pulling it first', call.path)


def unhealthy(status: int) -> Reply:
    """Ollama has no /health; a failing liveness probe gets a native error object."""
    return json_reply({"error": f"server unhealthy (mock health {status})"}, status, GO_JSON)


def api_show(call: Call) -> Reply:
    body = {"license": "mock license", "modelfile": f"FROM {call.model}\n", "parameters": "num_ctx 4096",
            "template": "{{ .Prompt }}", "details": _details(),
            "model_info": {"general.architecture": "llama", "llama.context_length": 131072},
            "capabilities": ["completion", "tools"], "modified_at": _MODIFIED_AT}
    return json_reply(body, content_type=GO_JSON)


def api_version(call: Call) -> Reply:
    return json_reply({"version": VERSION}, content_type=GO_JSON)


def api_ps(call: Call) -> Reply:
    return json_reply({"models": []}, content_type=GO_JSON)


def root(call: Call) -> Reply:
    return Reply(content_type=b"text/plain; charset=utf-8", body=b"Ollama is running")


# Ollama's liveness probes: the Go client's heartbeat is HEAD /, monitors poll /api/version
HEALTH_PATHS = frozenset({"/api/version", "/"})

ROUTES = {
    "/api/chat": ("POST", api_chat),
    "/api/generate": ("POST", api_generate),
    "/api/embed": ("POST", api_embed),
    "/api/tags": ("GET", api_tags),
    "/api/show": ("POST", api_show),
    "/api/version": ("GET", api_version),
    "/api/ps": ("GET", api_ps),
    "/v1/chat/completions": ("POST", v1_chat),
    "/v1/completions": ("POST", v1_completions),
    "/v1/embeddings": ("POST", v1_embeddings),
    "/v1/models": ("GET", v1_models),
    "/v1/responses": ("POST", v1_responses),
    "/v1/messages": ("POST", messages.ollama_messages),
    "/": ("GET", root),
}
