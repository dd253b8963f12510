"""An Anthropic Messages client (Claude Code) served by a Chat Completions backend.

The request is mapped once, before anything is sent: system blocks become a system message, text and
images (base64 as data URLs) become content parts, `tool_use` / `tool_result` become `tool_calls` / `tool`
messages, and tool_choice, stop_sequences, max_tokens, temperature, top_p and metadata.user_id their Chat
names. What has no Chat equivalent (documents, server tools) is refused with a 400 naming it.

The stream is mapped event by event (ChatToMessages): each chat chunk becomes the Messages events it
implies, in the same read. message_start goes with the first chunk and carries `usage.input_tokens` (the
prompt count when the backend reports usage on every chunk, else 0: the real count is in message_delta);
the terminal message_delta / message_stop go only once the backend ended cleanly, so a cut stream stays
visibly cut.
"""

from __future__ import annotations

from typing import Any

import orjson

from llmproxy.metering.usage import Usage, openai_usage
from llmproxy.translate.chatstream import ChatStreamTranslator, first_choice, json_object
from llmproxy.translate.common import arguments_object, json_str, new_id, text_of, untranslatable

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                 "content_filter": "refusal"}
_PING = b'event: ping\ndata: {"type":"ping"}\n\n'
_TEXT_START = (b'event: content_block_start\ndata: {"type":"content_block_start","index":%d,'
               b'"content_block":{"type":"text","text":""}}\n\n')
_TEXT_DELTA = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
               b'"delta":{"type":"text_delta","text":%b}}\n\n')
_JSON_DELTA = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
               b'"delta":{"type":"input_json_delta","partial_json":%b}}\n\n')
_BLOCK_STOP = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n'
_MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
_ANTHROPIC_OPTIONS = ("temperature", "top_p")


# --- the request ----------------------------------------------------------------------------------------

def request_to_chat(body: dict[str, Any], *, stream: bool, continuous_usage: bool) -> dict[str, Any]:
    """The Chat Completions request for a Messages request; raises ProxyError (400) for what cannot be mapped."""
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": text_of(system, "system")})
    turns = body.get("messages")
    if not isinstance(turns, list) or not turns:
        raise untranslatable("messages", "must be a non-empty list")
    for i, turn in enumerate(turns):
        messages += _chat_messages(turn, f"messages[{i}]")
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    if "max_tokens" in body:
        chat["max_tokens"] = body["max_tokens"]
    for name in _ANTHROPIC_OPTIONS:
        if body.get(name) is not None:
            chat[name] = body[name]
    stops = body.get("stop_sequences")
    if stops:
        chat["stop"] = stops
    user = body.get("metadata", {}).get("user_id") if isinstance(body.get("metadata"), dict) else None
    if isinstance(user, str):
        chat["user"] = user
    tools = body.get("tools")
    if tools:
        chat["tools"] = [_chat_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    _map_tool_choice(body.get("tool_choice"), chat)
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True, "continuous_usage_stats": True} if continuous_usage \
            else {"include_usage": True}
    return chat


def _chat_messages(turn: Any, field: str) -> list[dict[str, Any]]:
    if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant"):
        raise untranslatable(f"{field}.role", "must be user or assistant")
    role, content = turn["role"], turn.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise untranslatable(f"{field}.content", "must be a string or a list of content blocks")
    if role == "assistant":
        return [_assistant_message(content, f"{field}.content")]
    return _user_messages(content, f"{field}.content")


def _assistant_message(blocks: list, field: str) -> dict[str, Any]:
    texts, calls = [], []
    for i, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": orjson.dumps(block.get("input", {}))
                                       .decode()}})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # the model's own reasoning: Chat Completions has no way to hand it back
        else:
            raise untranslatable(f"{field}[{i}]", f"content block type {kind!r} cannot be translated to Chat "
                                                  "Completions")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _user_messages(blocks: list, field: str) -> list[dict[str, Any]]:
    """A user turn: its tool results first (each a `tool` message answering a call), then the rest."""
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for i, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, f"{field}[{i}]")}})
        elif kind == "tool_result":
            text, images = _tool_result(block.get("content"), f"{field}[{i}].content")
            if block.get("is_error") and text:
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
            parts += images  # a tool message takes text only: its images follow in the user turn
        else:
            raise untranslatable(f"{field}[{i}]", f"content block type {kind!r} cannot be translated to Chat "
                                                  "Completions")
    if parts:
        only_text = all(part["type"] == "text" for part in parts)
        content: Any = "\n".join(part["text"] for part in parts) if only_text else parts
        results.append({"role": "user", "content": content})
    return results


def _tool_result(content: Any, field: str) -> tuple[str, list[dict[str, Any]]]:
    """A tool result's text, and its images as content parts (Claude Code's Read tool returns images)."""
    if not isinstance(content, list):
        return text_of(content, field), []
    texts, images = [], []
    for i, block in enumerate(content):
        if isinstance(block, dict) and block.get("type") == "image":
            images.append({"type": "image_url", "image_url": {"url": _image_url(block, f"{field}[{i}]")}})
        else:
            texts.append(block)
    return text_of(texts, field), images


def _image_url(block: dict, field: str) -> str:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64":
        return f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    if isinstance(source, dict) and source.get("type") == "url" and isinstance(source.get("url"), str):
        return source["url"]
    raise untranslatable(f"{field}.source", "an image must be base64 or a URL")


def _chat_tool(tool: Any, field: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        raise untranslatable(field, "must be a tool with a name")
    kind = tool.get("type")
    if kind not in (None, "custom"):
        raise untranslatable(f"{field}.type", f"tool type {kind!r} cannot be translated to Chat Completions "
                                              "(only client tools with an input_schema can)")
    function: dict[str, Any] = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
    if tool.get("description"):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _map_tool_choice(choice: Any, chat: dict[str, Any]) -> None:
    if not isinstance(choice, dict):
        return
    kind = choice.get("type")
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    else:
        raise untranslatable("tool_choice.type", f"{kind!r} cannot be translated")
    if choice.get("disable_parallel_tool_use") and "tools" in chat:
        chat["parallel_tool_calls"] = False


# --- the response ---------------------------------------------------------------------------------------

def stop_reason(finish_reason: Any, matched: Any, stops: list[str], used_tools: bool) -> tuple[str, str | None]:
    """Messages' stop_reason (and stop_sequence) for a chat choice's finish_reason; `matched` is the stop string
    the backend says it matched (vLLM's `stop_reason`), if any."""
    if finish_reason == "stop" and isinstance(matched, str) and matched in stops:
        return "stop_sequence", matched
    if used_tools and finish_reason == "stop":
        return "tool_use", None  # some engines say "stop" after a tool call
    return _STOP_REASONS.get(finish_reason, "end_turn"), None


def messages_usage(usage: Usage | None, fallback_output: int) -> dict[str, int]:
    """Messages' usage for the backend's: input_tokens exclude the cache reads, reported beside them."""
    if usage is None:
        return {"input_tokens": 0, "output_tokens": fallback_output}
    prompt = usage.prompt or 0
    cached = usage.cache_read_tokens
    out = {"input_tokens": prompt - (cached or 0), "output_tokens": usage.completion_tokens or 0}
    if cached is not None:
        out["cache_read_input_tokens"] = cached
    return out


def chat_body_to_messages(body: bytes, request: dict[str, Any]) -> tuple[bytes, Usage | None]:
    """A complete chat.completion as a Messages response, and the backend's usage."""
    chat = json_object(body)
    if chat is None:
        return body, None
    usage = openai_usage(chat)
    choice, message = first_choice(chat)
    content: list[dict[str, Any]] = []
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    calls = message.get("tool_calls") or []
    for call in calls:
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or new_id("toolu_"), "name": function.get("name"),
                        "input": arguments_object(function.get("arguments"))})
    reason, sequence = stop_reason(choice.get("finish_reason"), choice.get("stop_reason"),
                                   request.get("stop_sequences") or [], bool(calls))
    out = {"id": _message_id(chat.get("id")), "type": "message", "role": "assistant",
           "model": chat.get("model") or request.get("model"), "content": content, "stop_reason": reason,
           "stop_sequence": sequence, "usage": messages_usage(usage, 0)}
    return orjson.dumps(out), usage


def _message_id(chat_id: Any) -> str:
    return f"msg_{chat_id}" if isinstance(chat_id, str) and chat_id else new_id("msg_")


class ChatToMessages(ChatStreamTranslator):
    """A chat.completion.chunk stream read as it comes, written as Messages events (and metered: the backend's
    usage is read off the chunks that carry it)."""

    __slots__ = ("_block", "_block_kind", "_calls", "_matched", "_model", "_stops")

    def __init__(self, request: dict[str, Any]) -> None:
        super().__init__()
        self._model = request.get("model")
        self._stops = request.get("stop_sequences") or []
        self._block = -1  # index of the open content block (-1: none yet)
        self._block_kind = ""  # "text" or "tool"
        self._calls: dict[Any, tuple[int, Any]] = {}  # the chat tool-call index -> (its content block, its id)
        self._matched: Any = None

    def ping(self) -> bytes:
        """Keep-alive for a client that heard nothing for a while: message_start first if it has not gone."""
        if self._done:
            return b""  # after message_stop or an error: the stream is over, whatever the connection does
        out: list[bytes] = []
        if not self._started:
            self._started = True
            self._start({}, out)
        out.append(_PING)
        return b"".join(out)

    def _start(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        usage = messages_usage(self.usage, 0)
        usage["output_tokens"] = 0
        message = {"id": _message_id(chunk.get("id")), "type": "message", "role": "assistant",
                   "model": chunk.get("model") or self._model, "content": [], "stop_reason": None,
                   "stop_sequence": None, "usage": usage}
        out.append(b'event: message_start\ndata: {"type":"message_start","message":%b}\n\n' % orjson.dumps(message))

    def _choice(self, choice: dict[str, Any], out: list[bytes]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            text = delta.get("content")
            if text:
                if self._block_kind != "text":
                    self._open(b"text", out)
                out.append(_TEXT_DELTA % (self._block, json_str(text)))
                self.content_events += 1
            calls = delta.get("tool_calls")
            if calls and isinstance(calls, list):
                for call in calls:
                    if isinstance(call, dict):
                        self._tool_call(call, out)
        finish = choice.get("finish_reason")
        if finish:
            self._finish = finish
            self._matched = choice.get("stop_reason")

    def _tool_call(self, call: dict[str, Any], out: list[bytes]) -> None:
        index = call.get("index", 0)
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        call_id = call.get("id")
        known = self._calls.get(index)
        # A new call: an index not seen yet, or a new id at a known one (Ollama numbers every parallel call 0,
        # ollama/ollama#15457). Its block opens with its id and name.
        if known is None or (call_id and call_id != known[1]):
            self._close(out)
            self._block += 1
            self._calls[index] = (self._block, call_id)
            self._block_kind = "tool"
            block = {"type": "tool_use", "id": call_id or new_id("toolu_"), "name": function.get("name"),
                     "input": {}}
            out.append(b'event: content_block_start\ndata: {"type":"content_block_start","index":%d,'
                       b'"content_block":%b}\n\n' % (self._block, orjson.dumps(block)))
        arguments = function.get("arguments")
        if arguments and self._calls[index][0] == self._block:  # blocks never reopen: calls come in order
            out.append(_JSON_DELTA % (self._block, json_str(arguments)))
            self.content_events += 1

    def _open(self, kind: bytes, out: list[bytes]) -> None:
        self._close(out)
        self._block += 1
        self._block_kind = kind.decode()
        out.append(_TEXT_START % self._block)

    def _close(self, out: list[bytes]) -> None:
        if self._block_kind:
            out.append(_BLOCK_STOP % self._block)
            self._block_kind = ""

    def _end(self, out: list[bytes]) -> None:
        self._done = True
        if not self._started:
            self._started = True
            self._start({}, out)
        self._close(out)
        reason, sequence = stop_reason(self._finish, self._matched, self._stops, bool(self._calls))
        delta = {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                 "usage": messages_usage(self.usage, self.content_events)}
        out.append(b"event: message_delta\ndata: %b\n\n" % orjson.dumps(delta))
        out.append(_MESSAGE_STOP)

    def _error(self, message: Any, chunk: dict[str, Any], out: list[bytes]) -> None:
        """An error the backend sent in the stream: Anthropic's error event; no terminal events follow."""
        event = {"type": "error", "error": {"type": "api_error", "message": str(message)}}
        out.append(b"event: error\ndata: %b\n\n" % orjson.dumps(event))
        self._done = True
