"""llama.cpp's llama-server (docs/protocols.md §10): native /completion, its OpenAI- and Anthropic-compatible
routes, /props, /slots, /metrics (only with the mock's --metrics, as llama-server needs --metrics).

Shapes follow ggml-org/llama.cpp tools/server (server-task.cpp, server-context.cpp, server-http.cpp): keys in
insertion order (nlohmann ordered_json), compact JSON with raw UTF-8. Every generation stops at the token
budget (stop_type "limit", finish_reason "length"). Like the real server (cpp-httplib), every response says
`Keep-Alive: timeout=5, max=100`, yet the connection is closed after each streamed response.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import Any

import llmproxy.mockbackend.messages as messages
from llmproxy.mockbackend.options import BadRequest
from llmproxy.mockbackend.reply import (
    CREATED,
    DONE,
    Call,
    Reply,
    dumps,
    error_after,
    generated,
    json_reply,
    sse,
    stream_reply,
)
from llmproxy.mockbackend.textgen import (
    SPECIAL_TOKEN_ID,
    TEMPLATES,
    capped,
    completion_text,
    embedding,
    embedding_inputs,
    encoded_embedding,
    generated_token_id,
    prompt_sequence,
    prompt_text,
    prompt_token_ids,
    prompt_tokens,
    token_id,
    tokenize,
    word,
)

TEMPLATE = TEMPLATES["llamacpp"]  # Qwen2.5's ChatML, as embedded in the GGUF
JSON_UTF8 = b"application/json; charset=utf-8"
BUILD = "b6795-6d6f636b"  # llama_build_info(): b<build number>-<commit>
N_CTX = 32768  # per slot
TOTAL_SLOTS = 4
PROMPT_MS_PER_TOKEN = 0.5  # deterministic timings: exact in binary, so every printer writes the same digits
PREDICTED_MS_PER_TOKEN = 12.5
_HEADERS = [(b"server", b"llama.cpp"), (b"keep-alive", b"timeout=5, max=100")]

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 500: "server_error", 501: "not_supported_error", 503: "unavailable_error"}


def _error_body(status: int, message: str) -> dict[str, Any]:
    """format_error_response inside {"error": ...}; the status is the error's code."""
    return {"error": {"code": status, "message": message, "type": _ERROR_TYPES.get(status, "server_error")}}


def error(status: int, message: str, path: str) -> Reply:
    if status == 404 and message == "Not Found":  # httplib's error handler for an unknown route
        return decorate(json_reply({"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}},
                                   404, JSON_UTF8))
    return decorate(json_reply(_error_body(status, message), status, JSON_UTF8))


def decorate(reply: Reply) -> Reply:
    """What cpp-httplib and llama-server add to every response; a stream is closed once sent."""
    reply.headers = [*reply.headers, *_HEADERS]
    if reply.events is not None:
        reply.headers.append((b"x-accel-buffering", b"no"))
        reply.close_after = True
    return reply


def _completion_id(call: Call) -> str:
    return "chatcmpl-" + hashlib.sha256(call.body + b"cmpl").hexdigest()[:32]


def timings(prompt_n: int, predicted_n: int, cache_n: int = 0) -> dict[str, Any]:
    """result_timings::to_json: prompt_n counts only the evaluated (uncached) prompt tokens."""
    def rate(n: int, per_token: float) -> tuple[float, float, float]:
        ms = n * per_token
        return ms, (per_token if n else 0.0), (1e3 / per_token if n else 0.0)

    prompt_ms, prompt_tok_ms, prompt_per_s = rate(prompt_n, PROMPT_MS_PER_TOKEN)
    predicted_ms, predicted_tok_ms, predicted_per_s = rate(predicted_n, PREDICTED_MS_PER_TOKEN)
    return {"cache_n": cache_n, "prompt_n": prompt_n, "prompt_ms": prompt_ms, "prompt_per_token_ms": prompt_tok_ms,
            "prompt_per_second": prompt_per_s, "predicted_n": predicted_n, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_tok_ms, "predicted_per_second": predicted_per_s}


def _usage(p: int, n: int, cached: int) -> dict[str, Any]:
    return {"completion_tokens": n, "prompt_tokens": p, "total_tokens": p + n,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _settings(n_predict: int, stream: bool) -> dict[str, Any]:
    """task_params::to_json, abridged to its sampling defaults."""
    return {"seed": 4294967295, "temperature": 0.8, "dynatemp_range": 0.0, "dynatemp_exponent": 1.0, "top_k": 40,
            "top_p": 0.95, "min_p": 0.05, "xtc_probability": 0.0, "xtc_threshold": 0.1, "typical_p": 1.0,
            "repeat_last_n": 64, "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "mirostat": 0, "mirostat_tau": 5.0, "mirostat_eta": 0.1, "stop": [], "max_tokens": n_predict,
            "n_predict": n_predict, "n_keep": 0, "n_discard": 0, "ignore_eos": False, "stream": stream,
            "n_probs": 0, "min_keep": 0, "chat_format": "Content-only", "samplers": [
                "penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"],
            "timings_per_token": False, "post_sampling_probs": False, "lora": []}


# --- native /completion, /completions, /infill --------------------------------------------------------

STREAM_ERROR = (sse(dumps({"error": _error_body(500, "mock generation failure (x-mock-error-after)")["error"]})),)


def _native(call: Call, req: dict[str, Any], p: int, prompt: str) -> Reply:
    n = capped(call.tokens, req.get("n_predict"), req.get("max_tokens"))
    cached = call.cached(p)
    stream = bool(req.get("stream"))
    model = call.request_model()

    def final(content: str, tokens: list[int]) -> dict[str, Any]:
        return {"index": 0, "content": content, "tokens": tokens, "id_slot": 0, "stop": True, "model": model,
                "tokens_predicted": n, "tokens_evaluated": p, "generation_settings": _settings(n, stream),
                "prompt": prompt, "has_new_line": False, "truncated": False, "stop_type": "limit",
                "stopping_word": "", "tokens_cached": p + max(n - 1, 0), "timings": timings(p - cached, n, cached)}

    if not stream:
        ids = [generated_token_id(i) for i in range(n)]
        return decorate(generated(json_reply(final(completion_text(n), ids), content_type=JSON_UTF8), p, n))

    def events() -> Iterator[bytes]:
        for i in range(n):
            yield sse(dumps({"index": 0, "content": word(i), "tokens": [generated_token_id(i)], "stop": False,
                             "id_slot": 0, "tokens_predicted": i + 1, "tokens_evaluated": p}))
        yield sse(dumps(final("", [])))  # no [DONE] on the native route

    reply = stream_reply(error_after(events(), call.error_after, STREAM_ERROR), b"text/event-stream",
                         prompt_tokens=p, completion_tokens=n)
    return decorate(reply)


def completion(call: Call) -> Reply:
    req = call.json()
    if "prompt" not in req:
        raise BadRequest('"prompt" must be provided')
    return _native(call, req, prompt_tokens(req, TEMPLATE), prompt_text(req))


def _infill_text(req: dict[str, Any]) -> str:
    return f"{req.get('input_prefix', '')}{req.get('input_suffix', '')}{req.get('prompt', '')}"


FIM_TOKENS = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]


def infill(call: Call) -> Reply:
    """POST /infill: input_prefix, input_suffix and prompt, framed by the FIM prefix/suffix/middle tokens."""
    req = call.json()
    text = _infill_text(req)
    p = prompt_tokens({"prompt": text}, TEMPLATE) + len(FIM_TOKENS)
    return _native(call, req, p, text)


# --- OpenAI-compatible routes ----------------------------------------------------------------------------


def _chunk(call: Call, model: str, choice: dict[str, Any], obj: str = "chat.completion.chunk") -> dict[str, Any]:
    return {"choices": [choice], "created": CREATED, "id": _completion_id(call), "model": model,
            "system_fingerprint": BUILD, "object": obj}


def chat(call: Call) -> Reply:
    req = call.json()
    n = capped(call.tokens, req.get("max_completion_tokens"), req.get("max_tokens"), req.get("n_predict"))
    p = prompt_tokens(req, TEMPLATE)
    cached = call.cached(p)
    model = call.request_model()
    if not req.get("stream"):
        body = {"choices": [{"finish_reason": "length", "index": 0,
                             "message": {"role": "assistant", "content": completion_text(n)}}],
                "created": CREATED, "model": model, "system_fingerprint": BUILD, "object": "chat.completion",
                "usage": _usage(p, n, cached), "id": _completion_id(call), "timings": timings(p - cached, n, cached)}
        return decorate(generated(json_reply(body, content_type=JSON_UTF8), p, n))
    include = bool((req.get("stream_options") or {}).get("include_usage"))

    def delta(content: Any, finish: str | None = None) -> dict[str, Any]:
        return _chunk(call, model, {"finish_reason": finish, "index": 0, "delta": content})

    def events() -> Iterator[bytes]:
        # one HTTP chunk per token; the first also holds the role delta (content null)
        for i in range(n):
            head = sse(dumps(delta({"role": "assistant", "content": None}))) if i == 0 else b""
            yield head + sse(dumps(delta({"content": word(i)})))
        tail = [delta({}, "length")]
        if include:
            tail.append({**_chunk(call, model, {}), "choices": [], "usage": _usage(p, n, cached)})
        tail[-1]["timings"] = timings(p - cached, n, cached)
        yield b"".join(sse(dumps(c)) for c in tail)
        yield DONE

    reply = stream_reply(error_after(events(), call.error_after, STREAM_ERROR), b"text/event-stream",
                         prompt_tokens=p, completion_tokens=n)
    return decorate(reply)


def completions(call: Call) -> Reply:
    req = call.json()
    n = capped(call.tokens, req.get("max_tokens"), req.get("n_predict"))
    p = prompt_tokens(req, TEMPLATE)
    cached = call.cached(p)
    model = call.request_model()

    def body(text: str, finish: str | None, final: bool) -> dict[str, Any]:
        out = _chunk(call, model, {"text": text, "index": 0, "logprobs": None, "finish_reason": finish},
                     "text_completion")
        if final:
            out = {**{k: out[k] for k in ("choices", "created", "model", "system_fingerprint", "object")},
                   "usage": _usage(p, n, cached), "id": out["id"], "timings": timings(p - cached, n, cached)}
        return out

    if not req.get("stream"):
        return decorate(generated(json_reply(body(completion_text(n), "length", True), content_type=JSON_UTF8), p, n))

    def events() -> Iterator[bytes]:
        for i in range(n):
            yield sse(dumps(body(word(i), None, False)))
        yield sse(dumps(body("", "length", True)))
        yield DONE

    reply = stream_reply(error_after(events(), call.error_after, STREAM_ERROR), b"text/event-stream",
                         prompt_tokens=p, completion_tokens=n)
    return decorate(reply)


def embeddings_oai(call: Call) -> Reply:
    req = call.json()
    data = [{"embedding": encoded_embedding(item, req.get("encoding_format")), "index": i, "object": "embedding"}
            for i, item in enumerate(embedding_inputs(req))]
    p = prompt_tokens(req, TEMPLATE)
    body = {"model": call.request_model(), "object": "list", "usage": {"prompt_tokens": p, "total_tokens": p},
            "data": data}
    return decorate(json_reply(body, content_type=JSON_UTF8))


def embeddings_native(call: Call) -> Reply:
    """/embedding and /embeddings: one {"index", "embedding"} per input, the pooled vector as a one-row matrix."""
    req = call.json()
    items = embedding_inputs({"input": req.get("content", req.get("input"))})
    return decorate(json_reply([{"index": i, "embedding": [embedding(item)]} for i, item in enumerate(items)],
                               content_type=JSON_UTF8))


# --- Anthropic Messages --------------------------------------------------------------------------------


def anthropic_messages(call: Call) -> Reply:
    def tool_id(i: int) -> str:
        return hashlib.sha256(call.body + b"tool%d" % i).hexdigest()[:32]

    return decorate(messages.llamacpp_messages(call, _completion_id(call), tool_id))


def count_tokens(call: Call) -> Reply:
    return decorate(messages.llamacpp_count_tokens(call))


# --- tokenizer, template, information -------------------------------------------------------------------


_SPECIAL = re.compile(r"(<\|[a-z_]+\|>)")  # ChatML's <|im_start|>, <|im_end|>: one token each


def _pieces(text: str, parse_special: bool) -> list[str]:
    """The tokens of `text`; with `parse_special`, the template's markers are one token each (as rendered by
    /apply-template, they count what the chat route counts)."""
    if not parse_special:
        return tokenize(text)
    pieces: list[str] = []
    after_start = False
    for part in _SPECIAL.split(text):
        if _SPECIAL.fullmatch(part):
            pieces.append(part)
        elif after_start and (role := re.match(r"[a-z]+", part)):  # a role name is one token in the vocabulary
            pieces += [role.group(), *tokenize(part[role.end():])]
        else:
            pieces += tokenize(part)
        after_start = part == "<|im_start|>"
    return pieces


def tokenize_route(call: Call) -> Reply:
    """POST /tokenize: `content` (text or token ids); parse_special defaults to true, as in llama-server."""
    req = call.json()
    content = req.get("content", "")
    if isinstance(content, str):
        pieces = _pieces(content, req.get("parse_special", True) is not False)
        ids = [SPECIAL_TOKEN_ID if _SPECIAL.fullmatch(p) else token_id(p) for p in pieces]
        tokens: list[Any] = ([{"id": i, "piece": p} for i, p in zip(ids, pieces, strict=True)]
                             if req.get("with_pieces") else ids)
    else:
        tokens = prompt_token_ids({"prompt": content}) if isinstance(content, list) else []
    return decorate(json_reply({"tokens": tokens}, content_type=JSON_UTF8))


def detokenize(call: Call) -> Reply:
    """The generated tokens' ids (1000 + i) render as word(i); the mock cannot invert any other id."""
    ids = call.json().get("tokens") or []
    text = "".join(word(t - 1000) for t in ids if isinstance(t, int) and 1000 <= t < 1000 + 1_000_000)
    return decorate(json_reply({"content": text}, content_type=JSON_UTF8))


def apply_template(call: Call) -> Reply:
    """POST /apply-template: the conversation rendered as Qwen2.5's ChatML, generation prompt included."""
    req = call.json()
    msgs = [m for m in req.get("messages") or [] if isinstance(m, dict)]
    parts = []
    if not any(m.get("role") == "system" for m in msgs):
        parts.append(f"<|im_start|>system\n{TEMPLATE.default_system}<|im_end|>\n")
    for m in msgs:
        parts.append(f"<|im_start|>{m.get('role', 'user')}\n{prompt_text({'messages': [m]})}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return decorate(json_reply({"prompt": "".join(parts)}, content_type=JSON_UTF8))


def props(call: Call) -> Reply:
    """GET /props: what tells llama-server apart (default_generation_settings, total_slots, build_info)."""
    body = {
        "default_generation_settings": {"params": _settings(-1, False), "n_ctx": N_CTX},
        "total_slots": TOTAL_SLOTS, "model_alias": call.model, "model_path": f"/models/{call.model}",
        "modalities": {"vision": False, "audio": False}, "endpoint_slots": True, "endpoint_props": False,
        "endpoint_metrics": call.metrics_enabled, "webui": True,
        "chat_template": "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
                         "<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}",
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "build_info": BUILD, "is_sleeping": False,
    }
    return decorate(json_reply(body, content_type=JSON_UTF8))


def slots(call: Call) -> Reply:
    running = call.gauges()[0]
    body = [{"id": i, "id_task": -1, "n_ctx": N_CTX, "speculative": False, "is_processing": i < running,
             "params": _settings(-1, False), "prompt": "",
             "next_token": {"has_next_token": i < running, "has_new_line": False, "n_remain": -1, "n_decoded": 0,
                            "stopping_word": ""}} for i in range(TOTAL_SLOTS)]
    return decorate(json_reply(body, content_type=JSON_UTF8))


def health(call: Call) -> Reply:
    return decorate(json_reply({"status": "ok"}, content_type=JSON_UTF8))


def unhealthy(status: int) -> Reply:
    """What every route answers while the model loads: 503 unavailable_error "Loading model"."""
    return decorate(json_reply({"error": {"message": "Loading model", "type": "unavailable_error", "code": status}},
                               status, JSON_UTF8))


def models(call: Call) -> Reply:
    cards = [{"id": name, "aliases": [], "tags": [], "object": "model", "created": CREATED, "owned_by": "llamacpp",
              "meta": {"vocab_type": 2, "n_vocab": 151936, "n_ctx": N_CTX, "n_ctx_train": 32768, "n_embd": 3584,
                       "n_params": 7615616512, "size": 4677120000}} for name in call.served]
    listing = [{"name": name, "model": name, "modified_at": "", "size": "", "digest": "", "type": "model",
                "description": "", "tags": [""], "capabilities": ["completion"], "parameters": "",
                "details": {"parent_model": "", "format": "gguf", "family": "", "families": [""],
                            "parameter_size": "", "quantization_level": ""}} for name in call.served]
    return decorate(json_reply({"models": listing, "object": "list", "data": cards}, content_type=JSON_UTF8))


def _number(value: float) -> str:
    """A double as a C++ ostream prints it by default (%g, six significant digits)."""
    return f"{value:g}"


def metrics(call: Call) -> Reply:
    """GET /metrics (needs --metrics, else 501): counters, then gauges, each with HELP and TYPE lines."""
    if not call.metrics_enabled:
        return error(501, "This server does not support metrics endpoint. Start it with `--metrics`", call.path)
    running, waiting, prompt_total, generation_total = call.gauges()
    counters = [("prompt_tokens_total", "Number of prompt tokens processed.", prompt_total),
                ("prompt_seconds_total", "Prompt process time", prompt_total * PROMPT_MS_PER_TOKEN / 1e3),
                ("tokens_predicted_total", "Number of generation tokens processed.", generation_total),
                ("tokens_predicted_seconds_total", "Predict process time",
                 generation_total * PREDICTED_MS_PER_TOKEN / 1e3),
                ("n_decode_total", "Total number of llama_decode() calls", generation_total),
                ("n_tokens_max", "Largest observed n_tokens.", 0)]
    gauges = [("prompt_tokens_seconds", "Average prompt throughput in tokens/s.", 1e3 / PROMPT_MS_PER_TOKEN),
              ("predicted_tokens_seconds", "Average generation throughput in tokens/s.", 1e3 / PREDICTED_MS_PER_TOKEN),
              ("requests_processing", "Number of requests processing.", running),
              ("requests_deferred", "Number of requests deferred.", waiting),
              ("n_busy_slots_per_decode", "Average number of busy slots per llama_decode() call", 0)]
    lines = []
    for kind, rows in (("counter", counters), ("gauge", gauges)):
        for name, help_text, value in rows:
            lines.append(f"# HELP llamacpp:{name} {help_text}\n# TYPE llamacpp:{name} {kind}\n"
                         f"llamacpp:{name} {_number(value)}\n")
    return decorate(Reply(content_type=b"text/plain; version=0.0.4", body="".join(lines).encode()))


def check_model(call: Call) -> Reply | None:
    """llama-server answers whatever model a request names (a single-model server ignores the name)."""
    return None


def _prompt_sequence(call: Call) -> list[str]:
    return prompt_sequence(call.json(), TEMPLATE)


# the generation routes whose prompt the prefix-cache model looks up (server.py), each with its prompt as tokens
PREFIX_PROMPTS = {
    "/completion": _prompt_sequence,
    "/completions": _prompt_sequence,
    "/v1/completions": _prompt_sequence,
    "/v1/chat/completions": _prompt_sequence,
    "/chat/completions": _prompt_sequence,
    "/v1/messages": _prompt_sequence,
    "/infill": lambda call: [*FIM_TOKENS, *prompt_sequence({"prompt": _infill_text(call.json())}, TEMPLATE)],
}

HEALTH_PATHS = frozenset({"/health", "/v1/health"})
# While llama-server loads its model, a middleware answers every other path 503 "Loading model" (unknown ones
# included), its model lists excepted (server.cpp, middleware_server_state).
OPEN_WHILE_LOADING = frozenset({"/models", "/v1/models"})

ROUTES = {
    "/completion": ("POST", completion),
    "/completions": ("POST", completion),
    "/v1/completions": ("POST", completions),
    "/v1/chat/completions": ("POST", chat),
    "/chat/completions": ("POST", chat),
    "/v1/embeddings": ("POST", embeddings_oai),
    "/embedding": ("POST", embeddings_native),
    "/embeddings": ("POST", embeddings_native),
    "/infill": ("POST", infill),
    "/tokenize": ("POST", tokenize_route),
    "/detokenize": ("POST", detokenize),
    "/apply-template": ("POST", apply_template),
    "/v1/messages": ("POST", anthropic_messages),
    "/v1/messages/count_tokens": ("POST", count_tokens),
    "/props": ("GET", props),
    "/slots": ("GET", slots),
    "/health": ("GET", health),
    "/v1/health": ("GET", health),
    "/v1/models": ("GET", models),
    "/models": ("GET", models),
    "/metrics": ("GET", metrics),
}
