"""Deterministic "model": what the mock generates and how it counts prompt tokens.

Tests of the proxy compute expected usage with these same functions, so they are part of the public
contract: token i of every completion is `word(i)` (" tok0", " tok1", ...), and a prompt is counted the way
an engine counts it, in two steps, so that a proxy's estimate of it is not trivially exact:

- the text is split as a byte-level BPE splits it before merging (`tokenize`): words with their leading
  space, digits one by one, runs of punctuation, runs of spaces; a long word is several tokens (one per 8
  characters), and every character outside ASCII is a token of its own (as CJK text mostly is);
- a chat request is counted as rendered by the model's chat template (`ChatTemplate`): the tokens around
  each message (role markers, separators), the prompt that opens the reply, a default system prompt where the
  template adds one, and tool definitions as the template writes them (their JSON).

The templates follow the public formats of the models the mock's dialects stand for (docs/protocols.md §2-4).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

CHARS_PER_WORD_PIECE = 8  # a word longer than this (its space included) is split: one token per 8 characters
EMBEDDING_DIMS = 8
# A GPT-2-style pre-tokenizer: contractions, a word with its leading space, one digit, punctuation runs,
# spaces (trailing ones kept apart from the word that follows, as GPT-2 does).
_PIECES = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d| ?[^\s\w]+|\s+(?!\S)|\s+""")


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """How a model's chat template adds tokens around a conversation."""

    name: str
    bos: int  # before anything (a beginning-of-sequence token)
    per_message: int  # around each message: its role marker and separators
    generation: int  # the prompt that opens the assistant's reply
    default_system: str | None = None  # the system prompt the template adds when the request has none
    tools_preamble: int = 0  # the template's words introducing tool definitions (their JSON is counted too)


PLAIN = ChatTemplate("none", 0, 0, 0)
# Qwen2.5 (the vLLM mock's default model): ChatML, and a system prompt of its own when the request has none.
CHATML_QWEN = ChatTemplate("ChatML (Qwen2.5)", 0, 5, 3,
                           "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", 30)
ZEPHYR = ChatTemplate("Zephyr", 0, 4, 2)  # the TGI mock's zephyr-7b-beta: <|user|>\n ... </s>\n
LLAMA3 = ChatTemplate("Llama 3.2", 1, 5, 4, None, 40)  # the Ollama mock's llama3.2: <|start_header_id|>...
TEMPLATES = {"vllm": CHATML_QWEN, "tgi": ZEPHYR, "ollama": LLAMA3}  # by mock dialect


def word(i: int) -> str:
    """Return the text of generated token `i` (0-based)."""
    return f" tok{i}"


def completion_text(n: int) -> str:
    """Return the full text of an n-token completion."""
    return "".join(word(i) for i in range(n))


def tokenize(text: str) -> list[str]:
    """Split `text` into its tokens (see the module docstring); joined, they give `text` back."""
    tokens: list[str] = []
    for piece in _PIECES.findall(text):
        if not piece.isascii():
            tokens.extend(piece)  # one token per character outside ASCII
        elif len(piece) <= CHARS_PER_WORD_PIECE:
            tokens.append(piece)
        else:
            tokens.extend(piece[i:i + CHARS_PER_WORD_PIECE] for i in range(0, len(piece), CHARS_PER_WORD_PIECE))
    return tokens


def count_tokens(text: str) -> int:
    return len(tokenize(text))


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


def prompt_tokens(body: Any, template: ChatTemplate = PLAIN) -> int:
    """The prompt tokens of a request body as an engine with `template` counts them: a chat request rendered
    by the template, any other prompt as its text (or its token ids) plus the template's BOS."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if isinstance(messages, list):
        return chat_prompt_tokens(messages, body.get("tools"), template)
    pieces = prompt_pieces(body)
    if not pieces:
        return 0
    return template.bos + sum(len(p) if isinstance(p, list) else count_tokens(p) for p in pieces)


SPECIAL_TOKEN_ID = 151_644  # the ids of template tokens (role markers, separators) in token lists


def prompt_token_ids(body: Any, template: ChatTemplate = PLAIN) -> list[int]:
    """Token ids of a request's prompt, as many as prompt_tokens(body, template) counts: its text's ids, then
    the template's own tokens (what /tokenize answers)."""
    ids: list[int] = []
    for piece in prompt_pieces(body):
        ids += piece if isinstance(piece, list) else [token_id(t) for t in tokenize(piece)]
    count = prompt_tokens(body, template)
    return ids[:count] + [SPECIAL_TOKEN_ID] * (count - len(ids))


def chat_prompt_tokens(messages: list[Any], tools: Any, template: ChatTemplate) -> int:
    """A conversation as `template` renders it, in tokens."""
    count = template.bos + template.generation
    has_system = any(isinstance(m, dict) and m.get("role") in ("system", "developer") for m in messages)
    if template.default_system and not has_system:
        count += template.per_message + count_tokens(template.default_system)
    for message in messages:
        if isinstance(message, dict):
            count += template.per_message + count_tokens(_content_text(message.get("content")))
            calls = message.get("tool_calls")
            if calls:
                count += count_tokens(json.dumps(calls, separators=(",", ":")))
    if isinstance(tools, list) and tools:
        count += template.tools_preamble + count_tokens(json.dumps(tools, separators=(",", ":")))
    return count


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
