"""Estimates for a request whose response reported no usage (cut off, failed, or a backend that does not say).

The prompt is estimated as a chat template renders it, without knowing the model: its text at about 4 bytes
of UTF-8 a token (English prose and code with today's BPE vocabularies; CJK text costs more per character,
and its 3 bytes a character count that way), plus what every template adds: a few tokens around each
message (role markers, separators), the tokens that open the reply, and tool definitions, which templates
write out as JSON. What a template adds on its own (a default system prompt, such as Qwen's) cannot be
known here: where the backend has a tokenizer endpoint, the record is counted exactly after the request
ended instead (recount.py). `python -m bench.estimates` measures both against the mocks' counts.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

BYTES_PER_TOKEN = 4
PER_MESSAGE = 4  # role markers and separators around one message (ChatML, Llama 3, Zephyr: 4 to 5)
REPLY_OPENING = 3  # the assistant's header that opens the reply
TOOLS_PREAMBLE = 10  # the words a template puts around tool definitions, beyond their JSON
# Where the text a model reads is, by API: chat/Anthropic messages, OpenAI completions and Responses input,
# TGI inputs, Ollama's prompt and system, the Responses API's instructions, SGLang's text, llama.cpp's
# content (embeddings) and infill parts.
_TEXT_KEYS = ("prompt", "input", "inputs", "system", "suffix", "instructions", "text", "content",
              "input_prefix", "input_suffix")
_CONTENT_KEYS = ("content", "text", "input_text", "output", "arguments")


def estimate_prompt_tokens(body: Any) -> int:
    """Estimate the prompt tokens of a request body (OpenAI, Anthropic, TGI, Ollama, llama.cpp or SGLang shape)."""
    if not isinstance(body, dict):
        return 0
    tokens = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        tokens += REPLY_OPENING
        for message in messages:
            tokens += PER_MESSAGE + text_tokens(message)
    for key in _TEXT_KEYS:
        if key in body:
            tokens += text_tokens(body[key])
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        tokens += TOOLS_PREAMBLE + math.ceil(len(orjson.dumps(tools)) / BYTES_PER_TOKEN)
    return tokens


def text_tokens(value: Any) -> int:
    """Tokens of the text in `value`: a string, or the text parts of a message or content list."""
    size = 0
    pending = [value]
    while pending:  # iterative: a hostile body may nest a million levels deep
        item = pending.pop()
        if isinstance(item, str):
            size += len(item.encode("utf-8", "surrogatepass"))
        elif type(item) is int:  # a token id (a prompt given as tokens): one token
            size += BYTES_PER_TOKEN
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):
            # A message or a content part: what the model reads, not the JSON around it; tool calls are
            # written out by the template, so their arguments count too.
            pending.extend(item.get(key) for key in _CONTENT_KEYS)
            calls = item.get("tool_calls")
            if calls is not None:
                pending.append(calls)
            function = item.get("function")
            if function is not None:
                pending.append(function)
    return math.ceil(size / BYTES_PER_TOKEN)
