"""Deterministic "model": what the mock generates and how it counts prompt tokens.

Tests of the proxy compute expected usage with these same functions, so they are part of the public
contract: token i of every completion is `word(i)` (" tok0", " tok1", ...), and a prompt of text T
has `count_tokens(T)` = ceil(len(T) / 4) tokens, one per 4 characters.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import zlib
from typing import Any

CHARS_PER_TOKEN = 4
EMBEDDING_DIMS = 8


def word(i: int) -> str:
    """Return the text of generated token `i` (0-based)."""
    return f" tok{i}"


def completion_text(n: int) -> str:
    """Return the full text of an n-token completion."""
    return "".join(word(i) for i in range(n))


def tokenize(text: str) -> list[str]:
    """Split `text` into its tokens: consecutive slices of 4 characters."""
    return [text[i : i + CHARS_PER_TOKEN] for i in range(0, len(text), CHARS_PER_TOKEN)]


def count_tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)


def token_id(piece: str) -> int:
    """A stable id in a plausible vocabulary range for one token's text."""
    return zlib.crc32(piece.encode()) % 150_000


def generated_token_id(i: int) -> int:
    return 1000 + i


def _content_text(content: Any) -> str:
    # OpenAI content is a string or a list of parts; only text parts count.
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def prompt_pieces(body: Any) -> list[Any]:
    """Return the prompt of a request body as a list of strings or token-id lists."""
    if not isinstance(body, dict):
        return []
    messages = body.get("messages")
    if isinstance(messages, list):
        return ["\n".join(_content_text(m.get("content")) for m in messages if isinstance(m, dict))]
    for key in ("prompt", "inputs", "input"):
        value = body.get(key)
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            if value and all(isinstance(v, int) for v in value):
                return [value]
            return [v for v in value if isinstance(v, (str, list))]
    return []


def prompt_tokens(body: Any) -> int:
    """Deterministic prompt token count of a request body (chat: message contents joined by '\\n')."""
    return sum(len(p) if isinstance(p, list) else count_tokens(p) for p in prompt_pieces(body))


def prompt_text(body: Any) -> str:
    return "\n".join(p for p in prompt_pieces(body) if isinstance(p, str))


def embedding(item: Any) -> list[float]:
    """A deterministic vector for one input. Values are k/128 so float32 and JSON round-trip exactly."""
    digest = hashlib.sha256(repr(item).encode()).digest()
    return [(b - 128) / 128 for b in digest[:EMBEDDING_DIMS]]


def encoded_embedding(item: Any, encoding_format: Any) -> list[float] | str:
    """The vector of `item`, as a list or, for `encoding_format: base64`, as little-endian float32.

    The openai SDK asks for base64 unless told otherwise, so both forms must work.
    """
    vector = embedding(item)
    if isinstance(encoding_format, str) and encoding_format.lower() == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def embedding_inputs(body: Any) -> list[Any]:
    """The list of items to embed: a string, a list of strings, a token list or a list of token lists."""
    value = body.get("input") if isinstance(body, dict) else None
    if isinstance(value, list) and value and not all(isinstance(v, int) for v in value):
        return value
    return [value if value is not None else ""]


def capped(tokens: int, *limits: Any) -> int:
    """Return `tokens` limited by the first integer request limit (max_tokens and friends), if any."""
    for limit in limits:
        if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0:
            return min(tokens, limit)
    return tokens


# --- tool calls --------------------------------------------------------------------------------------
# A request whose `tools` the mock answers with calls (vLLM with a hermes-style parser) gets one call per
# function tool, in order. The "model" writes each call as hermes markup, tokenised like any text, and
# ends with one EOS token that renders as nothing:
#   <tool_call>\n{"name": "NAME", "arguments": ARGS}\n</tool_call>\n
# ARGS has every property of the tool's JSON schema, in schema order: an enum's first value, "tok<k>"
# for a string, k for an integer, k + 0.5 for a number, true for a boolean, null otherwise (k is the
# property's position). Key order and separators are json.dumps' defaults with raw UTF-8.
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"


def _argument(schema: Any, k: int) -> Any:
    if not isinstance(schema, dict):
        return None
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    return {"string": f"tok{k}", "integer": k, "number": k + 0.5, "boolean": True}.get(kind)


def tool_calls(body: Any) -> list[tuple[str, str]]:
    """Return the calls the mock makes for a chat request, as (name, arguments JSON text); [] for none.

    No calls when the request has no function tools or sets tool_choice "none" (or names one tool:
    vLLM streams forced calls differently, and the mock does not imitate that). With
    parallel_tool_calls false only the first call is kept.
    """
    if not isinstance(body, dict) or not isinstance(body.get("tools"), list):
        return []
    choice = body.get("tool_choice", "auto")
    if choice not in ("auto", "required"):
        return []
    calls = []
    for tool in body["tools"]:
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        params = function.get("parameters")
        props = params.get("properties") if isinstance(params, dict) else None
        props = props if isinstance(props, dict) else {}
        args = {name: _argument(schema, k) for k, (name, schema) in enumerate(props.items())}
        calls.append((function["name"], json.dumps(args, ensure_ascii=False)))
    return calls[:1] if body.get("parallel_tool_calls") is False else calls


def tool_call_markup(calls: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int, int]]]:
    """The raw model output behind `calls` (EOS excluded) and, per call, where in it its name ends
    (after the closing quote) and where its arguments start and end."""
    parts, spans, offset = [], [], 0
    for name, args in calls:
        head = f'{TOOL_CALL_START}\n{{"name": {json.dumps(name, ensure_ascii=False)}'
        middle = ', "arguments": '
        spans.append((offset + len(head), offset + len(head) + len(middle),
                      offset + len(head) + len(middle) + len(args)))
        part = f"{head}{middle}{args}}}\n{TOOL_CALL_END}\n"
        parts.append(part)
        offset += len(part)
    return "".join(parts), spans


def tool_call_text(calls: list[tuple[str, str]]) -> str:
    """The raw model output (hermes markup) behind `calls`, EOS excluded."""
    return tool_call_markup(calls)[0]


def tool_call_completion_tokens(calls: list[tuple[str, str]]) -> int:
    """completion_tokens of a tool-call answer: the markup's tokens plus the EOS token."""
    return count_tokens(tool_call_text(calls)) + 1
