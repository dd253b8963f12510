"""A Chat Completions client served by Anthropic's Messages API (`type: anthropic`: api.anthropic.com, or any
upstream that speaks only Messages).

The request: system and developer messages become `system`, user content parts become text and image
blocks (data URLs as base64), an assistant's tool_calls become `tool_use` blocks and `tool` messages
`tool_result` blocks (consecutive turns of one role are merged: Messages alternates); max_tokens (or
max_completion_tokens, else translation.default_max_tokens: Anthropic requires one), stop, temperature,
top_p, user, tools and tool_choice their Messages names. n > 1 and response formats are refused.

The stream (MessagesToChat): each Messages event becomes the chat chunk it implies, in the same read:
the role with message_start, content and tool-call deltas as they come, finish_reason with message_delta,
and with message_stop the usage chunk (when the client asked for include_usage) and `[DONE]`.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from llmproxy.metering.usage import Usage, anthropic_usage
from llmproxy.translate.chatstream import json_object
from llmproxy.translate.common import dumps_str, json_str, new_id, text_of, untranslatable
from llmproxy.translate.events import EventReader

_FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
                   "refusal": "content_filter", "pause_turn": "stop", "model_context_window_exceeded": "length"}
_DONE = b"data: [DONE]\n\n"


# --- the request ----------------------------------------------------------------------------------------

def request_to_messages(body: dict[str, Any], *, default_max_tokens: int) -> dict[str, Any]:
    """The Messages request for a Chat Completions request; raises ProxyError (400) for what cannot be mapped."""
    if isinstance(body.get("n"), int) and body["n"] > 1:
        raise untranslatable("n", "Anthropic's API makes one choice per request")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise untranslatable("response_format", f"{fmt.get('type')!r} cannot be translated to Messages")
    turns = body.get("messages")
    if not isinstance(turns, list) or not turns:
        raise untranslatable("messages", "must be a non-empty list")
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(turns):
        _add_message(message, f"messages[{i}]", system, messages)
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages,
                           "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens")
                           or default_max_tokens}
    if system:
        out["system"] = "\n\n".join(system)
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    temperature = body.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise untranslatable("temperature", "must be a number")
        out["temperature"] = min(float(temperature), 1.0)  # OpenAI's range is 0-2, Anthropic's 0-1
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    tools = body.get("tools")
    if tools and not isinstance(tools, list):
        raise untranslatable("tools", "must be a list of tools")
    if tools:
        out["tools"] = [_messages_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
        choice = _tool_choice(body.get("tool_choice"))
        if body.get("parallel_tool_calls") is False and (choice or {}).get("type") != "none":
            # Anthropic's "none" takes no such field (and refuses extra inputs): no tool use, nothing to serialise
            choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
        if choice is not None:
            out["tool_choice"] = choice
    if body.get("stream"):
        out["stream"] = True
    return out


def _add_message(message: Any, field: str, system: list[str], messages: list[dict[str, Any]]) -> None:
    if not isinstance(message, dict):
        raise untranslatable(field, "must be a message object")
    role = message.get("role")
    if role in ("system", "developer"):
        system.append(text_of(message.get("content"), f"{field}.content"))
        return
    if role == "user":
        blocks = _user_blocks(message.get("content"), f"{field}.content")
    elif role == "assistant":
        blocks = _assistant_blocks(message, field)
    elif role == "tool":
        blocks = [{"type": "tool_result", "tool_use_id": message.get("tool_call_id"),
                   "content": text_of(message.get("content"), f"{field}.content")}]
        role = "user"
    else:
        raise untranslatable(f"{field}.role", f"role {role!r} cannot be translated to Messages")
    if not blocks:
        return
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"] += blocks  # Messages alternates user and assistant: merge a run of one role
    else:
        messages.append({"role": role, "content": blocks})


def _user_blocks(content: Any, field: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise untranslatable(field, "must be a string or a list of content parts")
    blocks = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":
            url = part.get("image_url", {}).get("url") if isinstance(part.get("image_url"), dict) else None
            blocks.append(_image_block(url, f"{field}[{i}].image_url.url"))
        else:
            raise untranslatable(f"{field}[{i}]", f"content type {kind!r} cannot be translated to Messages")
    return blocks


def _image_block(url: Any, field: str) -> dict[str, Any]:
    if not isinstance(url, str):
        raise untranslatable(field, "must be a URL")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        media_type, _, encoding = header[5:].partition(";")
        if encoding != "base64":
            raise untranslatable(field, "a data URL must be base64")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _assistant_blocks(message: dict[str, Any], field: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    text = text_of(message.get("content"), f"{field}.content")
    if text:
        blocks.append({"type": "text", "text": text})
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise untranslatable(f"{field}.tool_calls", "must be a list of tool calls")
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise untranslatable(f"{field}.tool_calls[{i}]", "must be a function call")
        arguments = function.get("arguments") or "{}"
        try:
            value = orjson.loads(arguments) if isinstance(arguments, str) else arguments
        except orjson.JSONDecodeError:
            raise untranslatable(f"{field}.tool_calls[{i}].function.arguments", "is not valid JSON") from None
        blocks.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": value})
    return blocks


def _messages_tool(tool: Any, field: str) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(function, dict):
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise untranslatable(f"{field}.type", f"tool type {kind!r} cannot be translated (only function tools can)")
    out = {"name": function.get("name"), "input_schema": function.get("parameters") or {"type": "object"}}
    if function.get("description"):
        out["description"] = function["description"]
    return out


def _tool_choice(choice: Any) -> dict[str, Any] | None:
    if choice is None or choice == "auto":
        return None if choice is None else {"type": "auto"}
    if choice == "required":
        return {"type": "any"}
    if choice == "none":
        return {"type": "none"}
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return {"type": "tool", "name": choice["function"].get("name")}
    raise untranslatable("tool_choice", f"{choice!r} cannot be translated")


# --- the response ---------------------------------------------------------------------------------------

def chat_usage(usage: Usage | None) -> dict[str, Any] | None:
    """OpenAI's usage for Anthropic's: the prompt counts every input token, cache reads and writes included."""
    if usage is None:
        return None
    prompt, completion = usage.prompt or 0, usage.completion_tokens or 0
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion}
    if usage.cache_read_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cache_read_tokens}
    return out


def messages_body_to_chat(body: bytes, request: dict[str, Any]) -> tuple[bytes, Usage | None]:
    """A complete Messages response as a chat.completion, and the backend's usage."""
    message = json_object(body)
    if message is None:
        return body, None
    usage = anthropic_usage(message)
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message.get("content") or []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            texts.append(block.get("text", ""))
        elif block.get("type") == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": dumps_str(block.get("input", {}))}})
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        reply["tool_calls"] = calls
    out = {"id": f"chatcmpl-{message.get('id', new_id(''))}", "object": "chat.completion",
           "created": int(time.time()), "model": message.get("model") or request.get("model"),
           "choices": [{"index": 0, "message": reply, "logprobs": None,
                        "finish_reason": _FINISH_REASONS.get(message.get("stop_reason"), "stop")}],
           "usage": chat_usage(usage)}
    return orjson.dumps(out), usage


class MessagesToChat:
    """A Messages event stream read as it comes, written as chat.completion.chunk events (and metered).
    Implements the metering Meter contract."""

    __slots__ = ("_calls", "_done", "_finish", "_head", "_include_usage", "_reader", "_tail", "content_events",
                 "overflowed", "response_id", "usage")

    def __init__(self, request: dict[str, Any]) -> None:
        options = request.get("stream_options")
        self._include_usage = isinstance(options, dict) and options.get("include_usage") is True
        self._reader = EventReader()
        self._head = b""  # the start of every chunk: id, object, created, model
        self._tail = b""  # the end of every chunk but the usage one
        self._calls: dict[int, int] = {}  # Messages content block index -> chat tool-call index
        self._finish: str | None = None
        self._done = False
        self.usage: Usage | None = None
        self.content_events = 0
        self.overflowed = False
        self.response_id = None

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        for name, payload in self._reader.feed(data):
            self._event(name, payload, out)
        return b"".join(out)

    def finish(self) -> bytes:
        out: list[bytes] = []
        for name, payload in self._reader.finish():
            self._event(name, payload, out)
        return b"".join(out)

    def _chunk(self, out: list[bytes], delta: bytes, finish: bytes = b"null") -> None:
        out.append(b'data: %b"choices":[{"index":0,"delta":%b,"logprobs":null,"finish_reason":%b}]%b}\n\n'
                   % (self._head, delta, finish, self._tail))

    def _event(self, name: bytes, payload: bytes, out: list[bytes]) -> None:
        if self._done:
            return
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict):
            return
        kind = event.get("type") or name.decode("latin-1")
        if kind == "content_block_delta":
            self._delta(event, out)
        elif kind == "content_block_start":
            self._block_start(event, out)
        elif kind == "message_start":
            self._start(event.get("message") if isinstance(event.get("message"), dict) else {}, out)
        elif kind == "message_delta":
            self._message_delta(event, out)
        elif kind == "message_stop":
            self._stop(out)
        elif kind == "error":
            error = event.get("error") if isinstance(event.get("error"), dict) else {}
            out.append(b"data: %b\n\n" % orjson.dumps({"error": {"message": error.get("message"),
                                                                  "type": error.get("type"), "param": None,
                                                                  "code": None}}))
            self._done = True  # no [DONE]: the client sees the stream end in an error

    def _start(self, message: dict[str, Any], out: list[bytes]) -> None:
        self._merge_usage({"message": message})
        chunk_id = f"chatcmpl-{message.get('id') or new_id('')}"
        self._head = b'{"id":%b,"object":"chat.completion.chunk","created":%d,"model":%b,' % (
            json_str(chunk_id), int(time.time()), json_str(message.get("model") or ""))
        self._tail = b',"usage":null' if self._include_usage else b""
        self._chunk(out, b'{"role":"assistant","content":""}')

    def _block_start(self, event: dict[str, Any], out: list[bytes]) -> None:
        block = event.get("content_block")
        if not isinstance(block, dict) or block.get("type") != "tool_use":
            return
        index = len(self._calls)
        self._calls[event.get("index", 0)] = index
        call = {"index": index, "id": block.get("id"), "type": "function",
                "function": {"name": block.get("name"), "arguments": ""}}
        self._chunk(out, b'{"tool_calls":[%b]}' % orjson.dumps(call))

    def _delta(self, event: dict[str, Any], out: list[bytes]) -> None:
        delta = event.get("delta")
        if not isinstance(delta, dict):
            return
        kind = delta.get("type")
        if kind == "text_delta":
            self._chunk(out, b'{"content":%b}' % json_str(delta.get("text", "")))
        elif kind == "input_json_delta":
            index = self._calls.get(event.get("index", 0), 0)
            self._chunk(out, b'{"tool_calls":[{"index":%d,"function":{"arguments":%b}}]}'
                        % (index, json_str(delta.get("partial_json", ""))))
        elif kind == "thinking_delta":
            self._chunk(out, b'{"reasoning_content":%b}' % json_str(delta.get("thinking", "")))
        else:
            return  # signatures, citations: nothing a chat client reads
        self.content_events += 1

    def _message_delta(self, event: dict[str, Any], out: list[bytes]) -> None:
        self._merge_usage(event)
        delta = event.get("delta") if isinstance(event.get("delta"), dict) else {}
        self._finish = _FINISH_REASONS.get(delta.get("stop_reason"), "stop")
        self._chunk(out, b"{}", json_str(self._finish))

    def _stop(self, out: list[bytes]) -> None:
        self._done = True
        if self._include_usage:
            usage = orjson.dumps(chat_usage(self.usage))
            out.append(b'data: %b"choices":[],"usage":%b}\n\n' % (self._head, usage))
        out.append(_DONE)

    def _merge_usage(self, event: Any) -> None:
        usage = anthropic_usage(event)
        if usage is not None:
            self.usage = usage if self.usage is None else self.usage.merged(usage)
