"""Micro-benchmark: what a meter adds to the relay's per-chunk work.

    python -m llmproxy.metering.bench [--tokens 2000] [--repeat 7]

Streams are built like vLLM's (compact JSON chunk per token, one event per upstream read, as vLLM flushes
them), plus variants: reads cut at random points (events spanning reads), continuous usage on every chunk,
strip mode, TGI /generate_stream and Ollama NDJSON. The baseline is the relay's own per-chunk framing
(`b"%x\\r\\n%b\\r\\n" % ...`), with and without `meter.feed` in front of it. Best of `--repeat` runs.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from time import perf_counter_ns

import orjson

from llmproxy.metering import OLLAMA_NDJSON, OPENAI_CHAT_SSE, TGI_GENERATE_SSE, meter_for

_BASE = {"id": "chatcmpl-7f3c9a1e5b2d4c6f8e0a1b2c3d4e5f60", "object": "chat.completion.chunk",
         "created": 1779012345, "model": "Qwen/Qwen2.5-7B-Instruct"}
_WORDS = [" the", " capital", " of", " France", " is", " Paris", " —", " «la", " Ville", " Lumière»", "."]


def _sse(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def vllm_chat(tokens: int, continuous: bool = False) -> list[bytes]:
    """One event per chunk: role, `tokens` content deltas, finish, usage-only, [DONE]."""
    def usage(n: int) -> dict[str, int]:
        return {"prompt_tokens": 38, "total_tokens": 38 + n, "completion_tokens": n}

    def chunk(delta: dict, finish: str | None, n: int) -> bytes:
        body = {**_BASE, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish,
                                      "token_ids": None}]}
        return _sse({**body, "usage": usage(n)} if continuous else body)

    events = [chunk({"role": "assistant", "content": ""}, None, 0)]
    events += [chunk({"content": _WORDS[i % len(_WORDS)]}, None, i + 1) for i in range(tokens)]
    events.append(chunk({"content": ""}, "stop", tokens))
    events.append(_sse({**_BASE, "choices": [], "usage": usage(tokens)}))
    return [*events, b"data: [DONE]\n\n"]


def tgi_generate(tokens: int) -> list[bytes]:
    def event(i: int, special: bool, details: object) -> bytes:
        token = {"id": 1000 + i, "text": _WORDS[i % len(_WORDS)], "logprob": -0.25, "special": special}
        return _sse({"index": i + 1, "token": token, "generated_text": None if details is None else "x",
                     "details": details})

    events = [event(i, False, None) for i in range(tokens)]
    final = {"finish_reason": "eos_token", "generated_tokens": tokens + 1, "seed": None, "input_length": 6}
    return [*events, event(tokens, True, final)]


def ollama_chat(tokens: int) -> list[bytes]:
    def line(text: str, done: bool, **extra: object) -> bytes:
        return orjson.dumps({"model": "llama3.2", "created_at": "2026-05-17T10:10:00.118273645Z",
                             "message": {"role": "assistant", "content": text}, "done": done, **extra}) + b"\n"

    lines = [line(_WORDS[i % len(_WORDS)], False) for i in range(tokens)]
    return [*lines, line("", True, done_reason="stop", prompt_eval_count=33, eval_count=tokens)]


def resplit(chunks: list[bytes], seed: int = 7) -> list[bytes]:
    """The same bytes, cut at random points: reads of 1 to 3 events' worth, mostly not on event boundaries."""
    data, rng, out, pos = b"".join(chunks), random.Random(seed), [], 0
    mean = len(data) // len(chunks)
    while pos < len(data):
        step = rng.randint(mean // 3, 3 * mean)
        out.append(data[pos : pos + step])
        pos += step
    return out


def _time(chunks: list[bytes], make: Callable[[], object] | None, repeat: int) -> float:
    """Best-of-`repeat` ns per chunk of the relay's framing, preceded by `meter.feed` when `make` is given."""
    best = float("inf")
    for _ in range(repeat):
        meter = make() if make else None
        feed = meter.feed if meter is not None else None
        start = perf_counter_ns()
        if feed is None:
            for data in chunks:
                _framed = b"%x\r\n%b\r\n" % (len(data), data)
        else:
            for data in chunks:
                data = feed(data)
                _framed = b"%x\r\n%b\r\n" % (len(data), data)
            meter.finish()
        best = min(best, perf_counter_ns() - start)
    return best / len(chunks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    n, r = args.tokens, args.repeat
    cases = [
        ("vLLM chat, one event per read", vllm_chat(n), OPENAI_CHAT_SSE, False),
        ("vLLM chat, reads cut at random points", resplit(vllm_chat(n)), OPENAI_CHAT_SSE, False),
        ("vLLM chat, continuous usage on every chunk", vllm_chat(n, continuous=True), OPENAI_CHAT_SSE, False),
        ("vLLM chat, strip mode", vllm_chat(n), OPENAI_CHAT_SSE, True),
        ("vLLM chat, strip mode, random reads", resplit(vllm_chat(n)), OPENAI_CHAT_SSE, True),
        ("TGI /generate_stream", tgi_generate(n), TGI_GENERATE_SSE, False),
        ("Ollama /api/chat NDJSON", ollama_chat(n), OLLAMA_NDJSON, False),
    ]
    print(f"{'stream':<46} {'chunks':>6} {'bytes/chunk':>11} {'relay ns':>9} {'+meter ns':>10} {'meter ns':>9}")
    for label, chunks, dialect, strip in cases:
        bare = _time(chunks, None, r)
        metered = _time(chunks, lambda d=dialect, s=strip: meter_for(d, strip_usage_event=s), r)
        size = sum(map(len, chunks)) // len(chunks)
        print(f"{label:<46} {len(chunks):>6} {size:>11} {bare:>9.0f} {metered:>10.0f} {metered - bare:>9.0f}")


if __name__ == "__main__":
    main()
