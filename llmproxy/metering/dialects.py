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


class _KeyThen:
    """Where usage may be: `key` followed, after optional spaces, by the byte `first` (not by `null`, which
    OpenAI's API puts on every chunk of a stream once include_usage is set). Two C-level scans, for the key
    written compact and with a space after it, find the first such place, however many chunks say null: no
    Python step per event."""

    __slots__ = ("_compact", "_first", "_key", "_spaced")

    def __init__(self, key: bytes, first: bytes) -> None:
        self._key, self._first = key, first
        self._compact, self._spaced = key + first, key + b" "

    def find(self, data: bytes, start: int = 0) -> int:
        """The offset of the next place at or after `start` that may carry usage, or -1."""
        compact = data.find(self._compact, start)
        end = compact if compact >= 0 else len(data)  # a spaced form counts only if it comes first
        spaced = data.find(self._spaced, start, end)
        while spaced >= 0:  # rare: a writer that puts spaces after colons
            i = spaced + len(self._key)
            while data[i : i + 1] == b" ":
                i += 1
            if data[i : i + 1] == self._first:
                return spaced
            spaced = data.find(self._spaced, i, end)
        return compact

    def carries(self, data: bytes) -> bool:
        """May these bytes report usage? Only then are they parsed."""
        return self.find(data) >= 0


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
    usage_at: _KeyThen  # where these bytes may report usage: only events holding such a place are parsed
    count: Callable[[bytes], int]  # content events in these complete lines
    extract: Callable[[Any], Usage | None]  # parsed event -> usage it reports, or None
    body: Callable[[Any], Usage | None] | None = None  # parsed non-streamed body -> usage; None: as `extract`
    # parsed event or body that carried usage -> the id of the response the backend stored, if it says one
    identify: Callable[[Any], str | None] | None = None

    @property
    def carries(self) -> Callable[[bytes], bool]:
        return self.usage_at.carries

    @property
    def body_usage(self) -> Callable[[Any], Usage | None]:
        return self.body if self.body is not None else self.extract


_USAGE = _KeyThen(b'"usage":', b"{")
SPECS = {
    OPENAI_CHAT_SSE: Spec(_USAGE, count_chat, openai_usage),
    OPENAI_COMPLETIONS_SSE: Spec(_USAGE, count_completions, openai_usage),
    # Embeddings never stream; were one streamed, it would carry no content events to count.
    OPENAI_EMBEDDINGS: Spec(_USAGE, _no_content, openai_usage),
    # Only response.completed (or .incomplete) embeds a response whose usage is an object; the others say null.
    OPENAI_RESPONSES_SSE: Spec(_USAGE, count_responses, responses_event_usage, responses_body_usage,
                               responses_id),
    # message_start (input, in its message) and message_delta (output, cumulative; Ollama's real input too).
    ANTHROPIC_MESSAGES_SSE: Spec(_USAGE, count_anthropic, anthropic_usage),
    TGI_GENERATE_SSE: Spec(_KeyThen(b'"details":', b"{"), count_tgi, tgi_usage),
    OLLAMA_NDJSON: Spec(_KeyThen(b'"done":', b"t"), count_ollama, ollama_usage),
    # Every chunk has running counts; only the last (`"stop":true`) is read. `"stop":[` (its settings) is not.
    LLAMACPP_COMPLETION_SSE: Spec(_KeyThen(b'"stop":', b"t"), count_llamacpp, llamacpp_usage),
    # meta_info is on every chunk, cumulative; only the last, whose finish_reason is an object, is read.
    SGLANG_GENERATE_SSE: Spec(_KeyThen(b'"finish_reason":', b"{"), count_sglang, sglang_usage),
}

DIALECTS = tuple(SPECS)


def resolve(dialect: str) -> str:
    """Return the canonical dialect name; raises ValueError for an unknown one."""
    name = ALIASES.get(dialect, dialect)
    if name not in SPECS:
        raise ValueError(f"unknown metering dialect {dialect!r}; expected one of {', '.join(DIALECTS)}")
    return name
