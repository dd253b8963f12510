"""SGLang's HTTP server (docs/protocols.md §11): native /generate, /get_model_info, /get_server_info, its
OpenAI-compatible routes and the Prometheus gauges a router balances on.

Sources: sgl-project/sglang python/sglang/srt/entrypoints/http_server.py (routes, the /generate stream),
python/sglang/srt/managers/tokenizer_manager.py (meta_info), python/sglang/srt/entrypoints/openai/ (the /v1
routes), python/sglang/srt/metrics/collector.py (metric names). Every generation stops at the token budget:
finish_reason {"type": "length", "length": n}.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

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
    generated_token_id,
    prompt_sequence,
    prompt_tokens,
    word,
)

TEMPLATE = TEMPLATES["sglang"]
VERSION = "0.5.6"
CONTEXT_LENGTH = 32768
MAX_TOTAL_TOKENS = 480_000
E2E_SECONDS_PER_TOKEN = 0.015625  # deterministic e2e_latency, exact in binary


def error(status: int, message: str, path: str) -> Reply:
    """The /v1 routes answer OpenAI's ErrorResponse (object "error", code the status); native routes
    {"error": {"message": ...}}."""
    if path.startswith("/v1/"):
        etype = {400: "BadRequest", 404: "NotFound", 500: "InternalServerError"}.get(status, "Error")
        return json_reply({"object": "error", "message": message, "type": etype, "param": None, "code": status},
                          status)
    return json_reply({"error": {"message": message}}, status)


def _rid(call: Call) -> str:
    rid = call.json().get("rid")
    return rid if isinstance(rid, str) and rid else hashlib.sha256(call.body).hexdigest()[:32]


def _prompt(req: dict[str, Any]) -> dict[str, Any]:
    """/generate takes `text` (a string or a batch) or `input_ids`; no chat template is applied."""
    if "input_ids" in req:
        return {"prompt": req["input_ids"]}
    if "text" in req:
        return {"prompt": req["text"]}
    raise BadRequest("Either text or input_ids should be provided.")


def _meta(rid: str, p: int, n: int, cached: int, done: bool) -> dict[str, Any]:
    return {"id": rid, "finish_reason": {"type": "length", "length": n} if done else None, "prompt_tokens": p,
            "weight_version": "default", "total_retractions": 0, "completion_tokens": n, "cached_tokens": cached,
            "e2e_latency": n * E2E_SECONDS_PER_TOKEN}


# After a failure mid-stream: one {"error": {"message": ...}} event, then [DONE] (http_server.stream_results).
STREAM_ERROR = (sse(dumps({"error": {"message": "mock generation failure (x-mock-error-after)"}})), DONE)


def generate(call: Call) -> Reply:
    req = call.json()
    params = req.get("sampling_params") if isinstance(req.get("sampling_params"), dict) else {}
    n = capped(call.tokens, params.get("max_new_tokens"))
    p = prompt_tokens(_prompt(req), TEMPLATE)
    cached = call.cached(p)
    rid = _rid(call)
    if not req.get("stream"):
        body = {"text": completion_text(n), "output_ids": [generated_token_id(i) for i in range(n)],
                "meta_info": _meta(rid, p, n, cached, True)}
        return generated(json_reply(body), p, n)

    def events() -> Iterator[bytes]:
        # text and output_ids are cumulative (SGLang's default, without --incremental-streaming-output)
        for i in range(1, n + 1):
            yield sse(dumps({"text": completion_text(i), "output_ids": [generated_token_id(k) for k in range(i)],
                             "meta_info": _meta(rid, p, i, cached, i == n)}))
        yield DONE

    return stream_reply(error_after(events(), call.error_after, STREAM_ERROR), b"text/event-stream",
                        prompt_tokens=p, completion_tokens=n)


def model_info(call: Call) -> Reply:
    return json_reply({"model_path": call.model, "tokenizer_path": call.model, "is_generation": True,
                       "preferred_sampling_params": None, "weight_version": "default",
                       "has_image_understanding": False, "has_audio_understanding": False, "model_type": "qwen2",
                       "architectures": ["Qwen2ForCausalLM"]})


def server_info(call: Call) -> Reply:
    running, _waiting, _p, _g = call.gauges()
    return json_reply({
        "model_path": call.model, "tokenizer_path": call.model, "host": "127.0.0.1", "port": 30000,
        "served_model_name": call.model, "context_length": CONTEXT_LENGTH, "mem_fraction_static": 0.88,
        "max_running_requests": 256, "max_total_tokens": MAX_TOTAL_TOKENS, "chunked_prefill_size": 8192,
        "schedule_policy": "fcfs", "tp_size": 1, "dp_size": 1, "enable_metrics": True,
        "internal_states": [{"last_gen_throughput": 80.0, "memory_usage": {"weight": 14.3, "kvcache": 24.1},
                             "max_total_num_tokens": MAX_TOTAL_TOKENS, "num_running_reqs": running,
                             "token_usage": call.kv_usage()}],
        "version": VERSION,
    })


def _chunk_base(call: Call, prefix: str, obj: str) -> dict[str, Any]:
    return {"id": prefix + hashlib.sha256(call.body).hexdigest()[:32], "object": obj, "created": CREATED,
            "model": call.request_model()}


def _usage(p: int, n: int, cached: int) -> dict[str, Any]:
    # prompt_tokens_details as with --enable-cache-report: only for a hit (UsageProcessor._details_if_cached)
    return {"prompt_tokens": p, "total_tokens": p + n, "completion_tokens": n,
            "prompt_tokens_details": {"cached_tokens": cached} if cached else None, "reasoning_tokens": 0}


def chat(call: Call) -> Reply:
    req = call.json()
    n = capped(call.tokens, req.get("max_completion_tokens"), req.get("max_tokens"))
    p = prompt_tokens(req, TEMPLATE)
    cached = call.cached(p)
    base = _chunk_base(call, "", "chat.completion.chunk")
    if not req.get("stream"):
        body = {**base, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": completion_text(n), "reasoning_content": None,
                                    "tool_calls": None},
            "logprobs": None, "finish_reason": "length", "matched_stop": None}], "usage": _usage(p, n, cached),
                "metadata": {"weight_version": "default"}}
        return generated(json_reply(body), p, n)
    include = call.include_usage()

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish,
                                     "matched_stop": None}], "usage": None}

    def events() -> Iterator[bytes]:
        yield sse(dumps(chunk({"role": "assistant", "content": "", "reasoning_content": None, "tool_calls": None},
                              None)))
        template = Template(chunk({"role": None, "content": SLOT, "reasoning_content": None, "tool_calls": None},
                                  None))
        for i in range(n):
            yield template.fill(word(i))
        yield sse(dumps(chunk({"role": None, "content": None, "reasoning_content": None, "tool_calls": None},
                              "length")))
        if include:
            yield sse(dumps({**base, "choices": [], "usage": _usage(p, n, cached)}))
        yield DONE

    return stream_reply(error_after(events(), call.error_after, STREAM_ERROR), b"text/event-stream",
                        prompt_tokens=p, completion_tokens=n)


def completions(call: Call) -> Reply:
    req = call.json()
    n = capped(call.tokens, req.get("max_tokens"))
    p = prompt_tokens(req, TEMPLATE)
    cached = call.cached(p)
    base = _chunk_base(call, "", "text_completion")
    if not req.get("stream"):
        body = {**base, "choices": [{"index": 0, "text": completion_text(n), "logprobs": None,
                                     "finish_reason": "length", "matched_stop": None}],
                "usage": _usage(p, n, cached)}
        return generated(json_reply(body), p, n)
    include = call.include_usage()

    def events() -> Iterator[bytes]:
        template = Template({**base, "choices": [{"index": 0, "text": SLOT, "logprobs": None, "finish_reason": None,
                                                  "matched_stop": None}], "usage": None})
        for i in range(n - 1):
            yield template.fill(word(i))
        yield sse(dumps({**base, "choices": [{"index": 0, "text": word(n - 1) if n else "", "logprobs": None,
                                              "finish_reason": "length", "matched_stop": None}], "usage": None}))
        if include:
            yield sse(dumps({**base, "choices": [], "usage": _usage(p, n, cached)}))
        yield DONE

    return stream_reply(error_after(events(), call.error_after, STREAM_ERROR), b"text/event-stream",
                        prompt_tokens=p, completion_tokens=n)


def models(call: Call) -> Reply:
    cards = [{"id": name, "object": "model", "created": CREATED, "owned_by": "sglang", "root": name,
              "max_model_len": CONTEXT_LENGTH} for name in call.served]
    return json_reply({"object": "list", "data": cards})


def metrics(call: Call) -> Reply:
    """The scheduler's gauges and the tokenizer's counters, labelled with the served model.

    cache_hit_rate is that of the last prefill batch (scheduler_metrics_mixin.log_prefill_stats): with the
    prefix-cache model on, the last generation's hit / prompt tokens; 0.0 without it."""
    running, waiting, prompt_total, generation_total = call.gauges()
    prefix = call.prefix_metrics()
    escaped = call.model.replace("\\", "\\\\").replace('"', '\\"')
    return prometheus_reply([
        ("sglang:num_running_reqs", "gauge", "The number of running requests.", running),
        ("sglang:num_queue_reqs", "gauge", "The number of requests in the waiting queue.", waiting),
        ("sglang:token_usage", "gauge", "The token usage.", call.kv_usage()),
        ("sglang:cache_hit_rate", "gauge", "The prefix cache hit rate.", prefix[2] if prefix else 0.0),
        ("sglang:prompt_tokens_total", "counter", "Number of prefill tokens processed.", prompt_total),
        ("sglang:generation_tokens_total", "counter", "Number of generation tokens processed.", generation_total),
    ], f'{{model_name="{escaped}"}}')


def flush_cache(call: Call) -> Reply:
    """GET or POST /flush_cache: empty the radix cache, refused (400) while requests run or wait (http_server.py)."""
    if not call.flush_cache():
        return Reply(status=400, content_type=None, body=b"Flush cache failed.\n")
    return Reply(content_type=None, body=b"Cache flushed.\nPlease check backend logs for more details. (When there "
                                         b"are running or waiting requests, the operation will not be performed.)\n")


def check_model(call: Call) -> Reply | None:
    """SGLang serves one model and does not check the name a request gives."""
    return None


def unhealthy(status: int) -> Reply:
    """/health when the scheduler does not answer: a bare status."""
    return Reply(status=status, content_type=None)


HEALTH_PATHS = frozenset({"/health", "/health_generate"})


def _prompt_sequence(call: Call) -> list[str]:
    return prompt_sequence(call.json(), TEMPLATE)


# the generation routes whose prompt the prefix-cache model looks up (server.py), each with its prompt as tokens
PREFIX_PROMPTS = {
    "/generate": lambda call: prompt_sequence(_prompt(call.json()), TEMPLATE),
    "/v1/chat/completions": _prompt_sequence,
    "/v1/completions": _prompt_sequence,
}

OPENAPI_PATH = "/openapi.json"  # its routes, as the engine documents them
ROUTES = {
    "/generate": ("POST", generate),
    "/get_model_info": ("GET", model_info),
    "/model_info": ("GET", model_info),
    "/get_server_info": ("GET", server_info),
    "/server_info": ("GET", server_info),
    "/health": ("GET", empty_reply),
    "/health_generate": ("GET", empty_reply),
    "/v1/chat/completions": ("POST", chat),
    "/v1/completions": ("POST", completions),
    "/v1/models": ("GET", models),
    "/metrics": ("GET", metrics),
    "/flush_cache": ("GET,POST", flush_cache),
}
