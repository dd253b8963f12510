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
import functools
import hashlib
import json
import re
import struct
import zlib
from collections.abc import Sequence
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
    image_tokens: int = 0  # what one image block costs (0: images are not counted, as text-only engines drop them)


PLAIN = ChatTemplate("none", 0, 0, 0)
# Qwen2.5 (the vLLM mock's default model): ChatML, and a system prompt of its own when the request has none.
CHATML_QWEN = ChatTemplate("ChatML (Qwen2.5)", 0, 5, 3,
                           "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", 30)
ZEPHYR = ChatTemplate("Zephyr", 0, 4, 2)  # the TGI mock's zephyr-7b-beta: <|user|>\n ... </s>\n
LLAMA3 = ChatTemplate("Llama 3.2", 1, 5, 4, None, 40)  # the Ollama mock's llama3.2: <|start_header_id|>...
# Claude (the anthropic dialect): no BOS, a few tokens per turn; with tools, the system prompt Anthropic documents
# for tool use (346 tokens on Claude 4 models). The mock does not decode images: each counts as the largest square
# Anthropic takes without resizing, 1092x1092 pixels, at its width * height / 750 tokens.
CLAUDE = ChatTemplate("Claude", 0, 3, 2, None, 346, image_tokens=1092 * 1092 // 750)
# llama.cpp's llama-server runs a Qwen2.5 GGUF (its embedded template is the same ChatML, default system prompt
# included); SGLang serves Qwen2.5 from Hugging Face like the vLLM mock.
TEMPLATES = {"vllm": CHATML_QWEN, "tgi": ZEPHYR, "ollama": LLAMA3, "llamacpp": CHATML_QWEN,
             "sglang": CHATML_QWEN, "anthropic": CLAUDE}  # by mock dialect


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


# A text at least this long is tokenized once per request, not twice: with the prefix-cache model on, the mock
# renders the prompt as tokens before the dialect's handler counts it (a 100k-character prompt takes ~13 ms to split).
_MEMO_MIN_CHARS = 1024


@functools.lru_cache(maxsize=512)  # an agent conversation holds many long messages, each resent every turn
def _long_text_tokens(text: str) -> tuple[str, ...]:
    return tuple(tokenize(text))


def text_tokens(text: str) -> Sequence[str]:
    """`tokenize(text)`, remembered for the last 512 long texts (do not mutate the result)."""
    return _long_text_tokens(text) if len(text) >= _MEMO_MIN_CHARS else tokenize(text)


def count_tokens(text: str) -> int:
    return len(text_tokens(text))


def token_id(piece: str) -> int:
    """A stable id in a plausible vocabulary range for one token's text."""
    return zlib.crc32(piece.encode()) % 150_000


def generated_token_id(i: int) -> int:
    return 1000 + i


def _content_text(content: Any) -> str:
    # OpenAI content is a string or a list of parts; only text parts count. Anthropic blocks count too: a
    # tool_result by its content, a tool_use by its input as JSON (what the engines render into the prompt).
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_part_text(p) for p in content if isinstance(p, dict))
    return ""


def _part_text(part: dict[str, Any]) -> str:
    kind = part.get("type")
    if kind == "tool_result":
        return _content_text(part.get("content"))
    if kind == "tool_use":
        return json.dumps(part.get("input") or {}, separators=(",", ":"), ensure_ascii=False)
    text = part.get("text", "")
    return text if isinstance(text, str) else ""


def count_images(content: Any) -> int:
    """The image blocks of a message's content, those inside tool_result blocks included."""
    if not isinstance(content, list):
        return 0
    count = 0
    for part in content:
        if isinstance(part, dict):
            if part.get("type") == "image":
                count += 1
            elif part.get("type") == "tool_result":
                count += count_images(part.get("content"))
    return count


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
        system = body.get("system")  # Anthropic Messages: a top-level system prompt (a string or text blocks)
        if system is not None:
            messages = [{"role": "system", "content": system}, *messages]
        return chat_prompt_tokens(messages, chat_tools(body.get("tools")), template)
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
            if template.image_tokens:
                count += template.image_tokens * count_images(message.get("content"))
            calls = message.get("tool_calls")
            if calls:
                count += count_tokens(json.dumps(calls, separators=(",", ":")))
    if isinstance(tools, list) and tools:
        count += template.tools_preamble + count_tokens(json.dumps(tools, separators=(",", ":")))
    return count


# --- the prompt as a sequence of tokens (what a prefix cache matches) --------------------------------------
# The same tokens prompt_tokens counts, in the order the template renders them: a message's role marker and
# separators before its text, the generation prompt last, tool definitions at the end of the leading system turn
# (where ChatML puts them). A template token is written "<|name|>", which no text token can be (the pre-tokenizer
# never joins punctuation and letters); a token id n of a token-id prompt is written "#n" (no text token either).


def _template_tokens(name: str, count: int) -> list[str]:
    return [f"<|{name}|>", *["<|sep|>"] * (count - 1)] if count > 0 else []


def prompt_sequence(body: Any, template: ChatTemplate = PLAIN) -> list[str]:
    """The prompt of a request body as tokens, as many as prompt_tokens(body, template) counts."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if isinstance(messages, list):
        system = body.get("system")
        if system is not None:
            messages = [{"role": "system", "content": system}, *messages]
        return chat_sequence(messages, chat_tools(body.get("tools")), template)
    pieces = prompt_pieces(body)
    if not pieces:
        return []
    out = _template_tokens("bos", template.bos)
    for piece in pieces:
        out += [f"#{t}" for t in piece] if isinstance(piece, list) else text_tokens(piece)
    return out


def chat_sequence(messages: list[Any], tools: Any, template: ChatTemplate) -> list[str]:
    """A conversation as `template` renders it, as tokens (as many as chat_prompt_tokens counts)."""
    out = _template_tokens("bos", template.bos)
    leading = 0  # messages in the leading system turn, after which the tool definitions go
    if template.default_system and not any(
            isinstance(m, dict) and m.get("role") in ("system", "developer") for m in messages):
        out += _template_tokens("system", template.per_message)
        out += text_tokens(template.default_system)
    elif messages and isinstance(messages[0], dict) and messages[0].get("role") in ("system", "developer"):
        leading = 1
    tool_tokens: list[str] = []
    if isinstance(tools, list) and tools:
        tool_tokens = [*_template_tokens("tools", template.tools_preamble),
                       *text_tokens(json.dumps(tools, separators=(",", ":")))]
    if not leading:
        out += tool_tokens
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        out += _template_tokens(role if isinstance(role, str) else "message", template.per_message)
        content = message.get("content")
        out += text_tokens(_content_text(content))
        if template.image_tokens:
            out += ["<|image|>"] * (template.image_tokens * count_images(content))
        calls = message.get("tool_calls")
        if calls:
            out += text_tokens(json.dumps(calls, separators=(",", ":")))
        if leading and i == 0:
            out += tool_tokens
    # the generation prompt opens an assistant turn, so the next request of the conversation matches it
    return out + _template_tokens("assistant", template.generation)


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


# --- Anthropic Messages and OpenAI Responses requests ----------------------------------------------
# Both are rendered by the engines as chat requests (vLLM converts them to a ChatCompletionRequest, Ollama to
# an api.ChatRequest, llama.cpp to its OpenAI chat form), so they are counted with the same chat template;
# their tools are counted in the chat form {"type": "function", "function": {name, description, parameters}}.


def chat_tools(tools: Any) -> Any:
    """Tools in the OpenAI chat shape: Anthropic tools (input_schema) and flat Responses function tools are
    converted, chat tools pass unchanged."""
    if not isinstance(tools, list):
        return tools
    out = []
    for tool in tools:
        schema_key = "input_schema" if isinstance(tool, dict) and "input_schema" in tool else "parameters"
        if isinstance(tool, dict) and (schema_key == "input_schema" or (
                tool.get("type") == "function" and "function" not in tool)):
            function = {"name": tool.get("name"), "description": tool.get("description"),
                        "parameters": tool.get(schema_key)}
            out.append({"type": "function", "function": function})
        else:
            out.append(tool)
    return out


def anthropic_tool_calls(body: Any) -> list[tuple[str, str]]:
    """The calls the mock makes for an Anthropic Messages request ([] for a plain text turn).

    tool_choice {"type": "auto"|"any"} calls every tool (disable_parallel_tool_use: the first only), "tool"
    calls the named one, "none" (or no tools) answers with text, as the engines map them onto chat tool_choice.
    """
    if not isinstance(body, dict) or not isinstance(body.get("tools"), list) or not body["tools"]:
        return []
    choice = body.get("tool_choice") if isinstance(body.get("tool_choice"), dict) else {"type": "auto"}
    kind = choice.get("type", "auto")
    tools = chat_tools(body["tools"])
    if kind == "none":
        return []
    if kind == "tool":
        tools = [t for t in tools if t.get("function", {}).get("name") == choice.get("name")][:1]
    chat = {"tools": tools, "tool_choice": "auto"}
    if choice.get("disable_parallel_tool_use"):
        chat["parallel_tool_calls"] = False
    return tool_calls(chat)


def responses_tool_calls(body: Any) -> list[tuple[str, str]]:
    """The calls the mock makes for a Responses request: one per function tool unless tool_choice is "none";
    a named function tool_choice ({"type": "function", "name": ...}) calls that one only."""
    if not isinstance(body, dict) or not isinstance(body.get("tools"), list) or not body["tools"]:
        return []
    choice = body.get("tool_choice", "auto")
    tools = chat_tools(body["tools"])
    if choice == "none":
        return []
    if isinstance(choice, dict):
        tools = [t for t in tools if t.get("function", {}).get("name") == choice.get("name")][:1]
    chat = {"tools": tools, "tool_choice": "auto", "parallel_tool_calls": body.get("parallel_tool_calls", True)}
    return tool_calls(chat)


def responses_messages(body: Any) -> list[dict[str, Any]]:
    """The chat messages a Responses request stands for: instructions as the system message, then `input`
    (a string is one user message; items are messages, function_call and function_call_output items)."""
    if not isinstance(body, dict):
        return []
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str) and body["instructions"]:
        messages.append({"role": "system", "content": body["instructions"]})
    value = body.get("input")
    if isinstance(value, str):
        messages.append({"role": "user", "content": value})
    elif isinstance(value, list):
        for item in value:
            if not isinstance(item, dict):
                continue
            kind = item.get("type", "message")
            if kind == "message":
                messages.append({"role": item.get("role", "user"), "content": item.get("content")})
            elif kind == "function_call":
                messages.append({"role": "assistant", "content": "", "tool_calls": [
                    {"id": item.get("call_id"), "type": "function",
                     "function": {"name": item.get("name"), "arguments": item.get("arguments")}}]})
            elif kind == "function_call_output":
                messages.append({"role": "tool", "content": item.get("output", "")})
    return messages


def responses_prompt_tokens(body: Any, template: ChatTemplate = PLAIN,
                            history: list[dict[str, Any]] | None = None) -> int:
    """The prompt tokens of a Responses request rendered by `template`: `history` (the conversation of the
    response named by previous_response_id, its output included) comes before this request's messages."""
    messages = [*(history or []), *responses_messages(body)]
    tools = chat_tools(body.get("tools")) if isinstance(body, dict) else None
    return chat_prompt_tokens(messages, tools, template)


def ollama_estimated_input_tokens(body: Any) -> int:
    """Ollama's estimate of a Messages request's input tokens (anthropic.EstimateInputTokens): the byte length
    of the system prompt, each message's role and text (a tool_use or tool_result block: its JSON), and each
    tool's name, description and input_schema, divided by 4; at least 1 when there is any message or system.

    Ollama measures input_schema as the raw bytes the client sent; the mock measures it as compact JSON,
    which is what the anthropic SDK sends.
    """
    if not isinstance(body, dict):
        return 0
    total = _estimate_content(body.get("system"), system=True)
    messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    for message in messages:
        if isinstance(message, dict):
            total += len(str(message.get("role", "")).encode()) + _estimate_content(message.get("content"))
    for tool in body.get("tools") or []:
        if isinstance(tool, dict):
            schema = tool.get("input_schema")
            total += len(str(tool.get("name", "")).encode()) + len(str(tool.get("description") or "").encode())
            total += len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False).encode()) if schema else 0
    tokens = total // 4
    if tokens == 0 and (messages or body.get("system") is not None):
        tokens = 1
    return tokens


def _estimate_content(content: Any, system: bool = False) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content.encode())
    if not isinstance(content, list):
        return len(json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode())
    total = 0
    for block in content:
        if not isinstance(block, dict):
            continue
        if isinstance(block.get("text"), str):
            total += len(block["text"].encode())
        if isinstance(block.get("thinking"), str):
            total += len(block["thinking"].encode())
        if not system and block.get("type") in ("tool_use", "tool_result"):
            total += len(json.dumps(block, separators=(",", ":"), ensure_ascii=False).encode())
    return total
