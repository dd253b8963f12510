"""A deterministic, fast fake of vLLM, TGI and Ollama for the proxy's tests, benchmarks and demo.

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
Control endpoints (any dialect, not counted): GET /_mock/stats, POST /_mock/release/<token>,
POST /_mock/reset-stats, and two whose state reset-stats keeps:
  POST /_mock/health/<status>       200..599; the health routes (vLLM/TGI /health and /ping, Ollama
                                    /api/version and /) answer it in the dialect's shape; 200 restores
  POST /_mock/gauges?waiting=N&running=M   pin the /metrics queue gauges (either or both); a gauge not
                                    given, or every gauge when there is no query, follows the live count

--model a,b serves several models (the first is the default); --strict-models answers a request naming
any other model with the real server's 404 (vLLM and Ollama; TGI ignores model names).
"""

from __future__ import annotations

from llmproxy.mockbackend.cli import main
from llmproxy.mockbackend.options import DEFAULT_MODELS, MockOptions
from llmproxy.mockbackend.server import MockBackend, start_mock_backend
from llmproxy.mockbackend.stats import MockStats
from llmproxy.mockbackend.textgen import TEMPLATES, completion_text, count_tokens, prompt_tokens, word

__all__ = [
    "DEFAULT_MODELS",
    "TEMPLATES",
    "MockBackend",
    "MockOptions",
    "MockStats",
    "completion_text",
    "count_tokens",
    "main",
    "prompt_tokens",
    "start_mock_backend",
    "word",
]
