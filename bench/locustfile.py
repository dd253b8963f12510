"""Locust load test: streamed chat completions through any OpenAI-compatible API.

    pip install -e '.[bench]'        # or: pip install locust
    locust -f bench/locustfile.py --host http://127.0.0.1:8000 --headless -u 50 -r 10 -t 1m --csv results/llm

Drop `--headless ... --csv ...` for locust's web UI on http://localhost:8089. `--host` is any base URL that
serves `/v1/chat/completions` and `/v1/models` (llmproxy, or vLLM, TGI, Ollama, OpenAI directly); a base
URL that already ends in `/v1` works too.

Environment variables:

    LLM_MODEL          model to request (default: the first id listed by GET /v1/models, fetched once)
    LLM_PROMPT_TOKENS  approximate prompt size: the user message is about this many words (default 128)
    LLM_MAX_TOKENS     max_tokens of each request (default 128)
    LLM_WAIT           think time between a user's requests, in seconds: "0" (default), "2" or "1,5"
                       (uniformly random between 1 and 5)
    LLM_TIMEOUT        seconds to wait for the response head or for the next bytes of the stream (default 300)
    LLM_EXTRA_BODY     JSON object merged into every request body, e.g. '{"ignore_eos": true}' for vLLM;
                       a key set to null is removed, e.g. '{"stream_options": null}'
    LLMPROXY_API_KEY   sent as "Authorization: Bearer ..." (OPENAI_API_KEY is used when this is not set)

Every request streams (`"stream": true`) and asks for a usage chunk (`"stream_options": {"include_usage": true}`).
Each prompt starts with words in a new random order, so a server's prefix cache cannot answer it.

Each completed stream is reported as three locust entries:

    Type  Name         "response time" column          "Average size" column
    POST  chat stream  ms until `data: [DONE]`         bytes of the streamed body
    LLM   ttft         ms until the first event that   prompt tokens (from the usage chunk;
                       carries content (or reasoning,  0 when the server sends none)
                       or a tool call), from sending
    LLM   tokens/s     tokens per second, NOT ms       completion tokens
                       (see below)

Locust has no custom metric types: an entry only records a "response time" and a "size" per request. So the
tokens/s entry carries its value in the response-time field, and its Avg/Min/Max/Median/percentile columns
(in the table, the web UI and `--csv` files) are tokens per second. It is the decode speed of one stream,
(completion tokens - 1) / (time of the last content event - time of the first), i.e. 1 / time-per-output-
token: the token count comes from the usage chunk when the server sends one, otherwise it is the number of
content-bearing events. A stream with fewer than two tokens (or all of them in one read) has no tokens/s
sample. Locust stores medians and percentiles rounded (to whole numbers below 100, to 2 significant digits
above), so read the averages for finer detail.

The "Aggregated" row mixes all three entries (milliseconds with tokens per second, and counts every stream
three times): ignore it and read the rows. The `# reqs` of ttft and tokens/s count successful streams only.

A stream is a failure of "chat stream" (and adds no ttft or tokens/s sample) if the connection fails, the
status is not 200, an event is not JSON or carries an "error" object, no event carries content, or the body
ends without `data: [DONE]`. The failure message, in locust's failures table, says which.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Iterator
from typing import Any

from gevent.lock import Semaphore
from locust import HttpUser, between, constant, task
from locust.exception import StopUser

logger = logging.getLogger(__name__)

MODEL = os.environ.get("LLM_MODEL", "")
PROMPT_TOKENS = int(os.environ.get("LLM_PROMPT_TOKENS", "128"))
MAX_TOKENS = int(os.environ.get("LLM_MAX_TOKENS", "128"))
TIMEOUT = float(os.environ.get("LLM_TIMEOUT", "300"))
EXTRA_BODY: dict[str, Any] = json.loads(os.environ.get("LLM_EXTRA_BODY") or "{}")
API_KEY = os.environ.get("LLMPROXY_API_KEY") or os.environ.get("OPENAI_API_KEY") or ""


def _wait_time(spec: str):
    low, _, high = spec.replace(" ", "").partition(",")
    return between(float(low), float(high)) if high else constant(float(low or 0))


# Short common English words: about one token each in the usual BPE vocabularies.
_WORD_TEXT = (
    "the of and to in is it you that he was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do their "
    "time if will way about many then them write would like so these her long make thing see him two has look "
    "more day could go come did number sound no most people my over know water than call first who may down "
    "side been now find"
)
WORDS = _WORD_TEXT.split()
INSTRUCTION = "Continue this list of words for as long as you can:"


def make_prompt(words: int) -> str:
    """A user message of about `words` words (at least the instruction), in a new random order every call."""
    filler = max(words - len(INSTRUCTION.split()), 0)
    return " ".join(random.choices(WORDS, k=filler)) + "\n\n" + INSTRUCTION


class StreamError(Exception):
    """The response is not a complete, well-formed completion stream."""


def _body_chunks(response) -> Iterator[bytes]:
    """The body as it arrives. urllib3 2's read1 returns whatever bytes are there (de-chunked and decoded)
    without waiting to fill a buffer, so a token is seen when it arrives even on a non-chunked stream."""
    raw = response.raw
    if hasattr(raw, "read1"):
        while data := raw.read1(65536, decode_content=True):
            yield data
    else:  # urllib3 1.x
        yield from response.iter_content(512)


def _has_content(choice: dict) -> bool:
    delta = choice.get("delta") or {}
    return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
                or delta.get("tool_calls") or choice.get("text"))


class ChatStreamUser(HttpUser):
    """Sends one streamed chat completion after another (with LLM_WAIT seconds between them)."""

    wait_time = _wait_time(os.environ.get("LLM_WAIT", "0"))
    model: str = MODEL
    _model_lock = Semaphore()

    def on_start(self) -> None:
        self.api_prefix = "" if (self.host or "").rstrip("/").endswith("/v1") else "/v1"
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"
        with self._model_lock:  # the first user looks the model up; the others wait for it
            if not ChatStreamUser.model:
                ChatStreamUser.model = self._first_model()

    def _first_model(self) -> str:
        with self.client.get(self.api_prefix + "/models", name="/v1/models", catch_response=True,
                             timeout=TIMEOUT) as response:
            try:
                response.raise_for_status()
                return response.json()["data"][0]["id"]
            except Exception as error:
                response.failure(f"no model from GET /v1/models ({error!r}); set LLM_MODEL to skip this lookup")
                raise StopUser from error

    @task
    def chat_stream(self) -> None:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": make_prompt(PROMPT_TOKENS)}],
            "max_tokens": MAX_TOKENS,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        body.update(EXTRA_BODY)
        body = {key: value for key, value in body.items() if value is not None}

        start = time.perf_counter()
        with self.client.post(self.api_prefix + "/chat/completions", json=body, stream=True, catch_response=True,
                              name="chat stream", timeout=TIMEOUT) as response:
            try:
                if getattr(response, "error", None) is not None:  # no response: the connection error
                    response.failure(response.error)
                    return
                if response.status_code != 200:
                    raise StreamError(f"HTTP {response.status_code}: {response.text[:200]!r}")
                result = self._read_stream(response, start)
            except Exception as error:  # StreamError, or the connection failing or timing out mid-stream
                response.failure(error)
                return
            finally:
                response.close()  # after a complete stream the connection is already back in the pool
            ttft_ms, last_ms, total_ms, received, prompt_tokens, completion_tokens = result
            # The automatic entry would time only the response head: time it to [DONE] instead.
            response.request_meta["response_time"] = total_ms
            response.request_meta["response_length"] = received
            response.success()

        fire = self.environment.events.request.fire
        context = self.context()
        fire(request_type="LLM", name="ttft", response_time=ttft_ms, response_length=prompt_tokens,
             exception=None, context=context)
        if completion_tokens >= 2 and last_ms > ttft_ms:
            # No custom metric types in locust: the tokens/s value rides in response_time (see the docstring),
            # and response_length carries the completion tokens, so "Average size" is tokens per completion.
            tokens_per_s = (completion_tokens - 1) / ((last_ms - ttft_ms) / 1000)
            fire(request_type="LLM", name="tokens/s", response_time=tokens_per_s,
                 response_length=completion_tokens, exception=None, context=context)

    @staticmethod
    def _read_stream(response, start: float) -> tuple[float, float, float, int, int, int]:
        """Read the SSE stream to its end. Returns ms to the first and to the last content event, ms to [DONE],
        body bytes, prompt tokens and completion tokens."""
        ttft_ms = last_ms = total_ms = None
        received = content_events = 0
        usage: dict = {}
        buffer = b""
        for data in _body_chunks(response):
            received += len(data)
            if total_ms is not None:
                continue  # after [DONE]: drain the body so the connection can be reused
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                line = line.rstrip(b"\r")
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments (keep-alives), event:/id: fields
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    total_ms = (time.perf_counter() - start) * 1000
                    break
                try:
                    event = json.loads(payload)
                except ValueError as error:
                    raise StreamError(f"event is not JSON: {payload[:200]!r}") from error
                if not isinstance(event, dict):
                    raise StreamError(f"event is not a JSON object: {payload[:200]!r}")
                if event.get("error"):
                    raise StreamError(f"error event: {json.dumps(event['error'])[:200]}")
                if any(_has_content(choice) for choice in event.get("choices") or ()):
                    content_events += 1
                    last_ms = (time.perf_counter() - start) * 1000
                    if ttft_ms is None:
                        ttft_ms = last_ms
                usage = event.get("usage") or usage
        if total_ms is None:
            raise StreamError("stream ended without data: [DONE]")
        if ttft_ms is None:
            raise StreamError("no event carried content")
        completion_tokens = usage.get("completion_tokens") or content_events
        return ttft_ms, last_ms, total_ms, received, usage.get("prompt_tokens") or 0, completion_tokens
