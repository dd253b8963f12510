"""The metered dialects: their names, the paths that speak them, and the byte checks run on every read.

The byte checks are what keeps metering cheap: every scan is a C-level `bytes.find`/`count` (a fraction of a
nanosecond per byte), and a read in the usual shape costs three of them. A dialect has:

- `carries(data)`: may this line (or run of lines) report usage? Only then is it parsed as JSON. True when the
  one key that can hold usage is followed by an object: `"usage":{` (not TGI's `"usage":null` on every chunk),
  TGI's `"details":{`, Ollama's `"done":true`. Spaces after the colon are allowed.
- `count(data)`: how many events in these complete lines carried generated content, an estimate for a stream
  that ends without usage (cancelled, errored, option not honoured). Counts are of byte patterns within lines,
  so they add up the same however the stream was split. They assume the compact JSON the backends emit for
  stream chunks (pydantic `model_dump_json`, serde, Go `encoding/json`); a string value cannot fake a pattern
  since the quotes inside it are escaped.

What `count` counts, per dialect:

- openai-chat-sse: choice deltas with at least one key (`"delta":{"`) minus deltas whose content is the empty
  string (`"content":""`): role chunks and vLLM/TGI's EOS chunk carry `"content":""`, the finish chunk has
  `delta:{}`, while text, reasoning and tool-call deltas count. Off by one for a delta holding only `role`
  (+1), an empty `reasoning` (+1), or `"content":""` beside reasoning or tool calls (-1), which a producer
  that always writes `content` would send. Every choice counts, so n>1 gives deltas, not events.
- openai-completions-sse: non-empty `"text":"`.
- openai-responses-sse: `.delta"`, which ends the `type` of every delta event (output_text, reasoning_text,
  function_call_arguments, refusal...) and nothing else: the `delta` key itself is preceded by a quote.
- tgi-generate-sse: `"special":false},"`, the end of a StreamResponse's main token when it is not special
  (fields run index, token, top_tokens, generated_text, details); an entry of top_tokens is followed by `,{`
  or `]` instead, so it does not count.
- llamacpp-completion-sse: non-empty `"content":"` (the final chunk's content is empty when streamed).
- sglang-generate-sse: `"meta_info":{`, one per chunk: a chunk is one decoding step (text is cumulative).
- anthropic-messages-sse: `"type":"content_block_delta"` (text, thinking and tool-input fragments).
- ollama-ndjson: `"done":false` lines minus those whose only text is empty: `"content":""},"done":false`
  (/api/chat) and `"response":"","done":false` (/api/generate). Thinking and tool-call lines count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmproxy.metering.usage import (
    Usage,
    anthropic_usage,
    llamacpp_usage,
    ollama_usage,
    openai_usage,
    responses_body_usage,
    responses_event_usage,
    responses_id,
    sglang_usage,
    tgi_usage,
)

OPENAI_CHAT_SSE = "openai-chat-sse"
OPENAI_COMPLETIONS_SSE = "openai-completions-sse"
OPENAI_RESPONSES_SSE = "openai-responses-sse"
OPENAI_EMBEDDINGS = "openai-embeddings"  # JSON only: usage.prompt_tokens (and total_tokens)
TGI_GENERATE_SSE = "tgi-generate-sse"
OLLAMA_NDJSON = "ollama-ndjson"
ANTHROPIC_MESSAGES_SSE = "anthropic-messages-sse"
LLAMACPP_COMPLETION_SSE = "llamacpp-completion-sse"  # llama.cpp's native /completion and /infill
SGLANG_GENERATE_SSE = "sglang-generate-sse"  # SGLang's native /generate
# The names docs/protocols.md §5 and the recorded fixtures (§7) use for the two Ollama native endpoints.
ALIASES = {"ollama-chat-ndjson": OLLAMA_NDJSON, "ollama-generate-ndjson": OLLAMA_NDJSON}
# Dialects whose usage-only event a client may not expect (the proxy injected include_usage).
STRIPPABLE = (OPENAI_CHAT_SSE, OPENAI_COMPLETIONS_SSE)


def _key_then(key: bytes, first: bytes) -> Callable[[bytes], bool]:
    """A `carries` check: `key` followed, after optional spaces, by the byte `first`. One scan when absent."""
    size = len(key)

    def carries(data: bytes) -> bool:
        i = data.find(key)
        while i >= 0:
            i += size
            while data[i : i + 1] == b" ":
                i += 1
            if data[i : i + 1] == first:
                return True
            i = data.find(key, i)
        return False

    return carries


def _nonempty(data: bytes, key: bytes) -> int:
    """Occurrences of a string-valued key (`"key":"`) whose value is not the empty string."""
    n = data.count(key)
    return n - data.count(key + b'"') if n else 0


def count_chat(data: bytes) -> int:
    return data.count(b'"delta":{"') - data.count(b'"content":""')


def count_completions(data: bytes) -> int:
    return _nonempty(data, b'"text":"')


def count_responses(data: bytes) -> int:
    return data.count(b'.delta"')


def count_llamacpp(data: bytes) -> int:
    return _nonempty(data, b'"content":"')


def count_sglang(data: bytes) -> int:
    return data.count(b'"meta_info":{')


def _no_content(data: bytes) -> int:
    return 0


def count_tgi(data: bytes) -> int:
    return data.count(b'"special":false},"')


def count_anthropic(data: bytes) -> int:
    return data.count(b'"type":"content_block_delta"')


def count_ollama(data: bytes) -> int:
    n = data.count(b'"done":false')
    return n - data.count(b'"content":""},"done":false') - data.count(b'"response":"","done":false') if n else 0


@dataclass(frozen=True, slots=True)
class Spec:
    carries: Callable[[bytes], bool]  # may these bytes report usage? Only then are they parsed
    count: Callable[[bytes], int]  # content events in these complete lines
    extract: Callable[[Any], Usage | None]  # parsed event -> usage it reports, or None
    marker: bytes  # the key `carries` looks for: every event that carries usage contains it
    body: Callable[[Any], Usage | None] | None = None  # parsed non-streamed body -> usage; None: as `extract`
    # parsed event or body that carried usage -> the id of the response the backend stored, if it says one
    identify: Callable[[Any], str | None] | None = None

    @property
    def body_usage(self) -> Callable[[Any], Usage | None]:
        return self.body if self.body is not None else self.extract


_USAGE_KEY, _DETAILS_KEY, _DONE_KEY = b'"usage":', b'"details":', b'"done":'
_STOP_KEY, _FINISH_KEY = b'"stop":', b'"finish_reason":'
_USAGE = _key_then(_USAGE_KEY, b"{")
SPECS = {
    OPENAI_CHAT_SSE: Spec(_USAGE, count_chat, openai_usage, _USAGE_KEY),
    OPENAI_COMPLETIONS_SSE: Spec(_USAGE, count_completions, openai_usage, _USAGE_KEY),
    # Embeddings never stream; were one streamed, it would carry no content events to count.
    OPENAI_EMBEDDINGS: Spec(_USAGE, _no_content, openai_usage, _USAGE_KEY),
    # Only response.completed (or .incomplete) embeds a response whose usage is an object; the others say null.
    OPENAI_RESPONSES_SSE: Spec(_USAGE, count_responses, responses_event_usage, _USAGE_KEY, responses_body_usage,
                               responses_id),
    # message_start (input, in its message) and message_delta (output, cumulative; Ollama's real input too).
    ANTHROPIC_MESSAGES_SSE: Spec(_USAGE, count_anthropic, anthropic_usage, _USAGE_KEY),
    TGI_GENERATE_SSE: Spec(_key_then(_DETAILS_KEY, b"{"), count_tgi, tgi_usage, _DETAILS_KEY),
    OLLAMA_NDJSON: Spec(_key_then(_DONE_KEY, b"t"), count_ollama, ollama_usage, _DONE_KEY),
    # Every chunk has running counts; only the last (`"stop":true`) is read. `"stop":[` (its settings) is not.
    LLAMACPP_COMPLETION_SSE: Spec(_key_then(_STOP_KEY, b"t"), count_llamacpp, llamacpp_usage, _STOP_KEY),
    # meta_info is on every chunk, cumulative; only the last, whose finish_reason is an object, is read.
    SGLANG_GENERATE_SSE: Spec(_key_then(_FINISH_KEY, b"{"), count_sglang, sglang_usage, _FINISH_KEY),
}

DIALECTS = tuple(SPECS)


def resolve(dialect: str) -> str:
    """Return the canonical dialect name; raises ValueError for an unknown one."""
    name = ALIASES.get(dialect, dialect)
    if name not in SPECS:
        raise ValueError(f"unknown metering dialect {dialect!r}; expected one of {', '.join(DIALECTS)}")
    return name
