"""Token usage, and how each dialect spells it once a payload has been parsed.

Every function here takes whatever `orjson.loads` produced (any JSON type: upstreams are not trusted to
send objects) and returns a Usage or None. None means "this payload reports no usage"; it never raises.
A payload that reports usage but omits one of the two counts means 0 for it (a JSON omitempty).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Ollama bills nothing for these: they only load or unload a model (docs/protocols.md §4.2).
_OLLAMA_NO_USAGE = ("load", "unload")


@dataclass(slots=True)
class Usage:
    """Token counts as reported. A dialect that reports them across several events (input in one, output in
    another) reports None for a count an event does not carry; `merged` folds events together."""

    prompt_tokens: int | None  # every prompt token, those served from a cache included (OpenAI's meaning)
    completion_tokens: int | None
    total_tokens: int | None  # as reported; prompt + completion when the backend omits it
    cache_read_tokens: int | None = None  # prompt tokens served from a prefix cache (OpenAI cached_tokens)
    cache_write_tokens: int | None = None  # prompt tokens written to a cache (Anthropic cache_creation)
    # Anthropic's input_tokens: the prompt tokens neither read from nor written to a cache. A dialect that
    # reports this instead of prompt_tokens leaves prompt_tokens None: prompt = this + reads + writes.
    uncached_prompt_tokens: int | None = None

    def merged(self, later: Usage) -> Usage:
        """These counts updated by a later event's: each count the later one reports replaces this one's
        (counts are cumulative in every dialect), the others are kept."""
        return Usage(*(mine if theirs is None else theirs for mine, theirs in zip(self.counts(), later.counts(),
                                                                                   strict=True)))

    def counts(self) -> tuple[int | None, ...]:
        return (self.prompt_tokens, self.completion_tokens, self.total_tokens, self.cache_read_tokens,
                self.cache_write_tokens, self.uncached_prompt_tokens)

    @property
    def prompt(self) -> int | None:
        """All prompt tokens: as reported, or Anthropic's uncached input plus cache reads and writes."""
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        if self.uncached_prompt_tokens is None:
            return None
        return self.uncached_prompt_tokens + (self.cache_read_tokens or 0) + (self.cache_write_tokens or 0)


def _count(value: Any) -> int | None:
    # bool is an int subclass; a `true` where a count belongs is garbage, not 1.
    return value if type(value) is int and value >= 0 else None


def _from_counts(obj: Any, prompt_key: str, completion_key: str, details_key: str) -> Usage | None:
    if not isinstance(obj, dict):
        return None  # a missing key and an explicit null are the same thing (docs/protocols.md §1)
    prompt = _count(obj.get(prompt_key))
    completion = _count(obj.get(completion_key))
    if prompt is None and completion is None:
        return None
    prompt = prompt or 0
    completion = completion or 0
    total = _count(obj.get("total_tokens"))
    details = obj.get(details_key)
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
    return Usage(prompt, completion, prompt + completion if total is None else total, cache_read_tokens=cached)


def openai_usage(obj: Any) -> Usage | None:
    """`usage` of a chat/completions chunk or body: prompt_tokens, completion_tokens[, total_tokens].

    Cache reads: `prompt_tokens_details.cached_tokens`, else llama.cpp's `timings.cache_n` beside the usage.
    """
    if not isinstance(obj, dict):
        return None
    usage = _from_counts(obj.get("usage"), "prompt_tokens", "completion_tokens", "prompt_tokens_details")
    if usage is not None and usage.cache_read_tokens is None:
        usage.cache_read_tokens = _cache_n(obj)
    return usage


def _cache_n(obj: dict) -> int | None:
    timings = obj.get("timings")
    return _count(timings.get("cache_n")) if isinstance(timings, dict) else None


def llamacpp_usage(obj: Any) -> Usage | None:
    """The final object of llama.cpp's native /completion (or /infill), streamed or not (docs/protocols.md
    §10.2): `tokens_evaluated` is the whole prompt, `tokens_predicted` the completion, `timings.cache_n` the
    prompt tokens read from the slot's cache. Partial chunks carry running counts too, but only the final
    one (`stop: true`) is read."""
    if not isinstance(obj, dict) or obj.get("stop") is not True:
        return None
    prompt = _count(obj.get("tokens_evaluated"))
    completion = _count(obj.get("tokens_predicted"))
    if prompt is None and completion is None:
        return None
    prompt, completion = prompt or 0, completion or 0
    return Usage(prompt, completion, prompt + completion, cache_read_tokens=_cache_n(obj))


def _summed(parts: list[Usage]) -> Usage:
    def add(counts: tuple[int | None, ...]) -> int | None:
        known = [count for count in counts if count is not None]
        return sum(known) if known else None

    return Usage(*map(add, zip(*(usage.counts() for usage in parts), strict=True)))


def sglang_usage(obj: Any) -> Usage | None:
    """`meta_info` of SGLang's /generate answer or stream chunk (§11.2): prompt_tokens, completion_tokens
    (so far, in a stream), cached_tokens. A batch answer (a list, one object per prompt) is summed."""
    if isinstance(obj, list):
        parts = [usage for usage in map(sglang_usage, obj) if usage is not None]
        return _summed(parts) if parts else None
    meta = obj.get("meta_info") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        return None
    usage = _from_counts(meta, "prompt_tokens", "completion_tokens", "")
    if usage is not None:
        usage.cache_read_tokens = _count(meta.get("cached_tokens"))
    return usage


def responses_body_usage(obj: Any) -> Usage | None:
    """`usage` of a Responses API object: input_tokens, output_tokens, total_tokens."""
    if not isinstance(obj, dict):
        return None
    return _from_counts(obj.get("usage"), "input_tokens", "output_tokens", "input_tokens_details")


def responses_event_usage(obj: Any) -> Usage | None:
    """Usage of a Responses API stream event: only events that embed the response (response.completed) have it."""
    return responses_body_usage(obj.get("response")) if isinstance(obj, dict) else None


def responses_id(obj: Any) -> str | None:
    """The id of a Responses API response: of the body, or of the response an event embeds (the completed one,
    which is the event metering parses). A follow-up names it in previous_response_id."""
    response = obj.get("response") if isinstance(obj, dict) else None
    if not isinstance(response, dict):
        response = obj
    if not isinstance(response, dict) or response.get("object") != "response":
        return None
    response_id = response.get("id")
    return response_id if isinstance(response_id, str) and response_id else None


def tgi_usage(obj: Any) -> Usage | None:
    """`details` of a TGI /generate(_stream) reply; None without `parameters.details`.

    generated_tokens is the completion. The prompt is `input_length` (stream, TGI >= 2.3), else the length of
    `prefill` (/generate with decoder_input_details), else unknown: None (the response headers may say it).
    """
    if isinstance(obj, list) and len(obj) == 1:
        obj = obj[0]  # the compat route `POST /` wraps a non-streamed reply in a list
    details = obj.get("details") if isinstance(obj, dict) else None
    if not isinstance(details, dict):
        return None
    completion = _count(details.get("generated_tokens"))
    if completion is None:
        return None
    prompt = _count(details.get("input_length"))
    if prompt is None:
        prefill = details.get("prefill")  # the prompt's tokens, with decoder_input_details; else empty
        prompt = len(prefill) if isinstance(prefill, list) and prefill else None
    return Usage(prompt, completion, None if prompt is None else prompt + completion)


def tgi_header_usage(headers: list[tuple[bytes, bytes]]) -> Usage | None:
    """TGI's x-prompt-tokens / x-generated-tokens response headers (non-streamed /generate and `/`)."""
    prompt = completion = None
    for name, value in headers:
        if name == b"x-prompt-tokens" and value.isdigit():
            prompt = int(value)
        elif name == b"x-generated-tokens" and value.isdigit():
            completion = int(value)
    if prompt is None and completion is None:
        return None
    return Usage(prompt, completion, None)


def ollama_usage(obj: Any) -> Usage | None:
    """The `done:true` object of /api/chat or /api/generate; metrics are omitempty, so missing means 0."""
    if not isinstance(obj, dict) or obj.get("done") is not True or obj.get("done_reason") in _OLLAMA_NO_USAGE:
        return None
    prompt = _count(obj.get("prompt_eval_count")) or 0
    completion = _count(obj.get("eval_count")) or 0
    return Usage(prompt, completion, prompt + completion)


def anthropic_usage(obj: Any) -> Usage | None:
    """Usage of an Anthropic Messages body or stream event (docs/protocols.md on the Messages API).

    `message_start` nests it in `message`, `message_delta` has it at the top, as a whole body does. Counts are
    cumulative, and an event reports only some of them (input in message_start, output in message_delta;
    Ollama's message_start input is an estimate its message_delta corrects): each is kept apart and merged.
    message_start's output count is not read: only message_delta says what was generated.
    `input_tokens` excludes cache reads and writes, which come as their own counts.
    """
    if not isinstance(obj, dict):
        return None
    message = obj.get("message")
    starting = isinstance(message, dict) and "usage" not in obj  # message_start
    usage = message.get("usage") if starting else obj.get("usage")
    if not isinstance(usage, dict):
        return None
    counts = [_count(usage.get(key)) for key in ("input_tokens", "output_tokens", "cache_read_input_tokens",
                                                   "cache_creation_input_tokens")]
    if all(count is None for count in counts):
        return None
    uncached, output, read, write = counts
    if starting:
        output = None  # message_start's output count is a placeholder (0 or 1): a stream cut here is estimated
    return Usage(None, output, None, cache_read_tokens=read, cache_write_tokens=write, uncached_prompt_tokens=uncached)


def response_model(obj: Any) -> str | None:
    """The model a response (or the event that carried its usage) says generated it: its `model`, or that of the
    message or response it embeds (Anthropic's message_start, the Responses API's response.completed)."""
    if not isinstance(obj, dict):
        return None
    model = obj.get("model")
    if model is None:
        inner = obj.get("message") or obj.get("response")
        model = inner.get("model") if isinstance(inner, dict) else None
    return model if isinstance(model, str) and model else None
