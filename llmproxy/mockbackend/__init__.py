"""A deterministic, fast fake of vLLM, TGI, Ollama, llama.cpp, SGLang and Anthropic's API for the proxy's tests,
benchmarks and demo.

Embed it in a running loop with `await start_mock_backend(MockOptions(...))`, or run it as a
process with `llmproxy mock-backend` / `python -m llmproxy.mockbackend` (prints one line,
"mock-backend (<dialect>) listening on http://HOST:PORT", and exits 0 on SIGTERM/SIGINT).

Completions are `tokens` tokens long (capped by the request's max_tokens / max_new_tokens /
options.num_predict); token i is `word(i)` = " tok<i>", finish_reason is "length", and
prompt_tokens is `prompt_tokens(body, TEMPLATES[dialect])`: the prompt as the dialect's model counts it, its
chat template included (textgen.py).

What the request body asks for is honoured the way the real server does it (docs/protocols.md §2-4):
  stream_options.include_usage      a usage chunk (choices: []) before [DONE] (vLLM, TGI chat, Ollama /v1)
  stream_options.continuous_usage_stats   with include_usage, vLLM also puts the cumulative usage on
                                    every chunk, the role chunk included (completion_tokens 0 there)
  tools (vLLM chat)                 answered with one call per function tool, in order (`textgen.tool_calls`;
                                    tool_choice "none" or a named tool: plain text; parallel_tool_calls
                                    false: the first call only), streamed like vLLM's hermes parser: a
                                    delta with id, type and function.name, then argument fragments, and
                                    finish_reason "tool_calls" on an empty delta. The length is that of
                                    the call markup plus an EOS token (`textgen.tool_call_completion_tokens`);
                                    x-mock-tokens and max_tokens do not apply.

Anthropic Messages (POST /v1/messages, /v1/messages/count_tokens) on vllm, ollama and llamacpp, each as its
engine converts it (docs/protocols.md §8): vLLM puts the real input count in message_start and cumulative
counts in message_delta; Ollama puts its len/4 estimate (textgen.ollama_estimated_input_tokens) in
message_start and the real counts in message_delta; llama.cpp puts input in message_start and only output in
message_delta. The prompt is prompt_tokens(body, TEMPLATES[dialect]) of the Messages body (system, blocks and
tools included). stop_reason is "max_tokens" when the request's max_tokens cut the answer, else "end_turn";
tools (tool_choice not none) are answered with tool_use blocks (textgen.anthropic_tool_calls), "tool_use".
OpenAI Responses (POST /v1/responses) on vllm and ollama (§9): counted by textgen.responses_prompt_tokens,
function tools answered with function_call items; responses stored unless store is false, and an unknown
previous_response_id is the engine's 404 (a bounded map of ids per process).
llamacpp (§10): /completion, /infill, /tokenize, /props, /slots, its OpenAI routes with timings, /metrics only
with --metrics, and the connection closed after every streamed response. sglang (§11): /generate with
meta_info, /get_model_info, /get_server_info, /metrics.
anthropic (§13): Anthropic's own API as a client sees it: x-api-key (or Authorization: Bearer) checked against
--api-key (any non-empty key when none is given), anthropic-version required, request-id and anthropic-ratelimit-*
headers, Anthropic's error envelope; /v1/messages with ping, the cache split in both message_start and
message_delta, stop_sequences honoured (stop_reason "stop_sequence"), an overloaded_error event for
x-mock-error-after; /v1/messages/count_tokens; /v1/models and /v1/models/{id} (/_mock/health steers /v1/models).

Request headers steer one request (each overrides the CLI default):
  x-mock-tokens: N                  completion length
  x-mock-delay-ms: D                pause between two events
  x-mock-first-byte-delay-ms: D     pause before the response head (and first event)
  x-mock-status: S                  answer S with the dialect's JSON error instead
  x-mock-retry-after: V             add Retry-After: V
  x-mock-stall-after: N             send N events, then nothing, connection left open
  x-mock-error-after: N             send N events, then the dialect's in-band error instead of the rest:
                                    vLLM an error event (json.dumps spacing) and [DONE]; TGI /generate_stream
                                    an ErrorResponse event and the end; TGI chat {"error":{...,
                                    "http_status_code":422}} and [DONE]; Ollama /api/chat and /api/generate
                                    an {"error": ...} line and the end. Other routes ignore it.
  x-mock-reset-after-bytes: N       send N body (payload) bytes, then a TCP RST
  x-mock-close-delimited: 1         no Content-Length/chunking: Connection: close, body ends at EOF
  x-mock-fixture: NAME              replay a recorded stream verbatim from the fixtures directory
                                    ($LLMPROXY_FIXTURES_DIR, else tests/fixtures/streams in the checkout)
  x-mock-gate: TOKEN                each event after the first waits for POST /_mock/release/TOKEN
  x-mock-cache-read: N              N prompt tokens were a prefix-cache hit: Anthropic cache_read_input_tokens
                                    (input_tokens then excludes them), llama.cpp cache_n/cached_tokens, SGLang
                                    cached_tokens (and /v1 prompt_tokens_details when N > 0), vLLM
                                    prompt_tokens_details (when N > 0) and Responses input_tokens_details;
                                    it overrides what the prefix-cache model would report
  x-mock-cache-write: N             Anthropic cache_creation_input_tokens (excluded from input_tokens)
Control endpoints (any dialect, not counted): GET /_mock/stats, POST /_mock/release/<token>,
POST /_mock/reset-stats, and four whose state reset-stats keeps:
  POST /_mock/health/<status>       200..599; the health routes (vLLM/TGI /health and /ping, Ollama
                                    /api/version and /, llama.cpp /health, SGLang /health) answer it in the
                                    dialect's shape; 200 restores
  POST /_mock/gauges?waiting=N&running=M&kv=F   pin the /metrics load gauges (any of them): waiting and
                                    running in every dialect (llama.cpp requests_deferred/processing, SGLang
                                    num_queue_reqs/num_running_reqs), kv the KV-cache use 0..1 (vLLM
                                    kv_cache_usage_perc, SGLang token_usage); a gauge not given, or every
                                    gauge when there is no query, follows the live count
  POST /_mock/throttle?key=K&seconds=S   anthropic: requests with key K answer 429 rate_limit_error with
                                    retry-after (whole seconds left) until S seconds have passed; S=0 lifts it
  POST /_mock/loading/1             every route answers the dialect's 503 (as /_mock/health/503 shapes it),
                                    unknown paths too, as llama-server does while it loads its model (its
                                    /models and /v1/models stay open); /_mock/loading/0 ends it

--prefix-cache-tokens N (vllm, sglang, llamacpp; 0 = off, the default) models the engines' prefix cache
(prefixcache.py): N tokens in 16-token blocks, least recently used evicted. A generation's prompt, as the template
renders it (textgen.prompt_sequence), finds its longest cached prefix in whole blocks (never its last token); its first
byte waits --base-ttft-ms (2) + --prefill-us-per-token (50 us) x the tokens not found, on top of any first-byte delay;
it answers x-mock-prefix-cache-hit-tokens: H, and the body reports H where the engine does (vLLM chat/completions
prompt_tokens_details and Responses, SGLang cached_tokens, llama.cpp cache_n and Messages; not vLLM Messages).
/metrics adds vllm:prefix_cache_queries_total / hits_total (tokens) and sglang:cache_hit_rate, and the KV-cache
use becomes the blocks requests in flight hold; /_mock/stats shows the totals and the cache; reset-stats keeps the
cache, POST /_mock/flush-cache (and SGLang's /flush_cache, refused while requests run) empties it.

--model a,b serves several models (the first is the default); --strict-models answers a request naming
any other model with the real server's 404 (vLLM and Ollama; TGI ignores model names).
"""

from __future__ import annotations

from llmproxy.mockbackend.cli import main
from llmproxy.mockbackend.options import DEFAULT_MODELS, MockOptions
from llmproxy.mockbackend.server import MockBackend, start_mock_backend
from llmproxy.mockbackend.stats import MockStats
from llmproxy.mockbackend.textgen import (
    TEMPLATES,
    anthropic_tool_calls,
    completion_text,
    count_tokens,
    ollama_estimated_input_tokens,
    prompt_tokens,
    responses_prompt_tokens,
    responses_tool_calls,
    word,
)

__all__ = [
    "DEFAULT_MODELS",
    "TEMPLATES",
    "MockBackend",
    "MockOptions",
    "MockStats",
    "anthropic_tool_calls",
    "completion_text",
    "count_tokens",
    "main",
    "ollama_estimated_input_tokens",
    "prompt_tokens",
    "responses_prompt_tokens",
    "responses_tool_calls",
    "start_mock_backend",
    "word",
]
