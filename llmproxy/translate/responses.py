"""A Responses API client (Codex CLI) served by a Chat Completions backend.

The request: `instructions` and system/developer items become system messages, message items their
roles' messages, `function_call` / `function_call_output` items an assistant's tool_calls and `tool`
messages; function tools map one to one, any other tool type is refused with a 400 naming it;
max_output_tokens becomes max_tokens. The proxy stores nothing, so `store: true` and
`previous_response_id` are refused: only a backend that serves Responses itself can keep a conversation.

The stream (ChatToResponses): response.created / in_progress with the first chunk, then per output
item `output_item.added`, its deltas (`output_text.delta`, `function_call_arguments.delta`) and its
`…done` events as the chunks come, and `response.completed` (or `response.incomplete` when max tokens cut
it) with the backend's usage once the backend ended cleanly. The final response repeats every output
item whole, as the API defines it: the text is kept for that, never held back.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from llmproxy.metering.usage import Usage, openai_usage
from llmproxy.translate.chatstream import ChatStreamTranslator, first_choice, json_object
from llmproxy.translate.common import json_str, new_id, text_of, untranslatable

_PASSED = ("temperature", "top_p", "parallel_tool_calls", "user")
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_DELTA = (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":%d,'
               b'"item_id":"%b","output_index":%d,"content_index":0,"delta":%b,"logprobs":[]}\n\n')
_ARGS_DELTA = (b'event: response.function_call_arguments.delta\ndata: {"type":"response.function_call_arguments.delta",'
               b'"sequence_number":%d,"item_id":"%b","output_index":%d,"delta":%b}\n\n')


# --- the request ----------------------------------------------------------------------------------------

def request_to_chat(body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
    """The Chat Completions request for a Responses request; raises ProxyError (400) for what cannot be mapped."""
    if body.get("store") is True:
        raise untranslatable("store", "the proxy stores no responses, and this backend serves no Responses API: "
                                      "send store: false")
    if body.get("previous_response_id"):
        raise untranslatable("previous_response_id", "this backend serves no Responses API, so nothing was "
                                                     "stored: send the whole conversation as input")
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": text_of(body["instructions"], "instructions")})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list):
        for i, item in enumerate(items):
            _add_item(item, f"input[{i}]", messages)
    else:
        raise untranslatable("input", "must be a string or a list of items")
    chat: dict[str, Any] = {"model": body.get("model"), "messages": _one_system_message(messages)}
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for name in _PASSED:
        if body.get(name) is not None:
            chat[name] = body[name]
    tools = body.get("tools")
    if tools:
        chat["tools"] = [_chat_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    choice = body.get("tool_choice")
    if choice in ("auto", "none", "required"):
        chat["tool_choice"] = choice
    elif isinstance(choice, dict) and choice.get("type") == "function":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif choice is not None:
        raise untranslatable("tool_choice", "only auto, none, required or a function can be translated")
    _map_text_format(body.get("text"), chat)
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def _one_system_message(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The leading system messages (instructions, then Codex's developer items) joined into one: many chat
    templates (Gemma's, older Mistral's) take a single system message, first, and refuse more."""
    lead = 0
    while lead < len(messages) and messages[lead]["role"] == "system" and isinstance(messages[lead]["content"], str):
        lead += 1
    if lead < 2:
        return messages
    joined = "\n\n".join(message["content"] for message in messages[:lead])
    return [{"role": "system", "content": joined}, *messages[lead:]]


def _add_item(item: Any, field: str, messages: list[dict[str, Any]]) -> None:
    if not isinstance(item, dict):
        raise untranslatable(field, "must be an item object")
    kind = item.get("type", "message")
    if kind == "message":
        role = _ROLES.get(item.get("role"))
        if role is None:
            raise untranslatable(f"{field}.role", f"role {item.get('role')!r} cannot be translated")
        messages.append({"role": role, "content": _content(item.get("content"), f"{field}.content", role)})
    elif kind == "function_call":
        call = {"id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
            last["tool_calls"].append(call)  # parallel calls: one assistant message
        elif last is not None and last["role"] == "assistant" and "tool_calls" not in last:
            last["tool_calls"] = [call]
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else text_of(output, f"{field}.output")
        messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
    elif kind == "reasoning":
        return  # the model's own reasoning summary: Chat Completions has no way to hand it back
    else:
        raise untranslatable(f"{field}.type", f"input item type {kind!r} cannot be translated to Chat Completions")


def _content(content: Any, field: str, role: str) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise untranslatable(field, "must be a string or a list of content parts")
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": part.get("text", "")})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            raise untranslatable(f"{field}[{i}]", f"content type {kind!r} cannot be translated to Chat Completions")
    if role != "user" or all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts if part["type"] == "text")
    return parts


def _chat_tool(tool: Any, field: str) -> dict[str, Any]:
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind != "function":
        raise untranslatable(f"{field}.type", f"tool type {kind!r} cannot be translated to Chat Completions "
                                              "(only function tools can)")
    function: dict[str, Any] = {"name": tool.get("name"), "parameters": tool.get("parameters") or {"type": "object"}}
    for name in ("description", "strict"):
        if tool.get(name) is not None:
            function[name] = tool[name]
    return {"type": "function", "function": function}


def _map_text_format(text: Any, chat: dict[str, Any]) -> None:
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return
    if fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif fmt.get("type") == "json_schema":
        schema = {key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt}
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    else:
        raise untranslatable("text.format.type", f"{fmt.get('type')!r} cannot be translated")


# --- the response ---------------------------------------------------------------------------------------

def responses_usage(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    prompt, completion = usage.prompt or 0, usage.completion_tokens or 0
    # Both details are required fields of the API's usage object (the openai SDK's ResponseUsage).
    details = {"cached_tokens": usage.cache_read_tokens or 0, "cache_write_tokens": usage.cache_write_tokens or 0}
    return {"input_tokens": prompt, "input_tokens_details": details,
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def _response(request: dict[str, Any], response_id: str, model: Any, created: int) -> dict[str, Any]:
    """The response object's fields as the API lists them; status, output and usage are set by the caller."""
    return {"id": response_id, "object": "response", "created_at": created, "status": "in_progress",
            "background": False, "error": None, "incomplete_details": None,
            "instructions": request.get("instructions"), "max_output_tokens": request.get("max_output_tokens"),
            "model": model or request.get("model"), "output": [],
            "parallel_tool_calls": request.get("parallel_tool_calls", True), "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": False,
            "temperature": request.get("temperature"), "text": request.get("text") or {"format": {"type": "text"}},
            "tool_choice": request.get("tool_choice", "auto"), "tools": request.get("tools") or [],
            "top_p": request.get("top_p"), "truncation": "disabled", "usage": None,
            "user": request.get("user"), "metadata": request.get("metadata") or {}}


# The chat finish reasons that leave a response incomplete, and the reason the Responses API gives.
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def _finished(response: dict[str, Any], finish_reason: Any, usage: Usage | None) -> dict[str, Any]:
    reason = _INCOMPLETE.get(finish_reason) if isinstance(finish_reason, str) else None
    if reason is not None:
        response["status"] = "incomplete"
        response["incomplete_details"] = {"reason": reason}
    else:
        response["status"] = "completed"
    response["usage"] = responses_usage(usage)
    return response


def chat_body_to_responses(body: bytes, request: dict[str, Any]) -> tuple[bytes, Usage | None]:
    """A complete chat.completion as a Responses API response, and the backend's usage."""
    chat = json_object(body)
    if chat is None:
        return body, None
    usage = openai_usage(chat)
    choice, message = first_choice(chat)
    response = _response(request, new_id("resp_"), chat.get("model"), int(chat.get("created") or time.time()))
    if message.get("content"):
        response["output"].append(_message_item(new_id("msg_"), message["content"], "completed"))
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        response["output"].append(_call_item(new_id("fc_"), call.get("id"), function.get("name"),
                                             function.get("arguments") or "", "completed"))
    return orjson.dumps(_finished(response, choice.get("finish_reason"), usage)), usage


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [] if status == "in_progress" else [_text_part(text)]}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(item_id: str, call_id: Any, name: Any, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id or new_id("call_"),
            "name": name, "arguments": arguments}


class ChatToResponses(ChatStreamTranslator):
    """A chat.completion.chunk stream read as it comes, written as Responses API events (and metered)."""

    __slots__ = ("_calls", "_item", "_item_id", "_parts", "_request", "_response", "_seq")

    def __init__(self, request: dict[str, Any]) -> None:
        super().__init__()
        self._request = request
        self._response: dict[str, Any] = {}  # the response object, from the first chunk on
        self._seq = 0
        self._item: dict[str, Any] | None = None  # the output item being streamed
        self._item_id = b""
        self._parts: list[str] = []  # its text or arguments so far: the `…done` events repeat them whole
        self._calls: dict[int, dict[str, Any]] = {}  # chat tool-call index -> its function_call item

    def _emit(self, out: list[bytes], kind: str, fields: dict[str, Any]) -> None:
        self._seq += 1
        event = {"type": kind, "sequence_number": self._seq, **fields}
        out.append(b"event: %b\ndata: %b\n\n" % (kind.encode(), orjson.dumps(event)))

    def _error(self, message: Any, chunk: dict[str, Any], out: list[bytes]) -> None:
        """An error the backend sent in the stream, or an aborted generation: the `error` event, then
        `response.failed` (Codex retries a stream that ends without a terminal event, and loses the message)."""
        if not self._started:  # a client's stream starts with response.created, even one that fails
            self._started = True
            self._start(chunk, out)
        self._emit(out, "error", {"code": "server_error", "message": str(message), "param": None})
        response = self._response
        response["status"] = "failed"
        response["error"] = {"code": "server_error", "message": str(message)}
        response["usage"] = responses_usage(self.usage)
        self._emit(out, "response.failed", {"response": response})

    def _start(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        created = chunk.get("created") if type(chunk.get("created")) is int else int(time.time())
        self._response = _response(self._request, new_id("resp_"), chunk.get("model"), created)
        self._emit(out, "response.created", {"response": self._response})
        self._emit(out, "response.in_progress", {"response": self._response})

    def _choice(self, choice: dict[str, Any], out: list[bytes]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            text = delta.get("content")
            if text:
                if self._item is None or self._item["type"] != "message":
                    self._open_message(out)
                self._parts.append(text)
                self._seq += 1
                out.append(_TEXT_DELTA % (self._seq, self._item_id, self._index, json_str(text)))
                self.content_events += 1
            calls = delta.get("tool_calls")
            if calls and isinstance(calls, list):
                for call in calls:
                    if isinstance(call, dict):
                        self._tool_call(call, out)
        if choice.get("finish_reason"):
            self._finish = choice["finish_reason"]

    @property
    def _index(self) -> int:
        return len(self._response.get("output", ())) - 1

    def _open_message(self, out: list[bytes]) -> None:
        self._close(out)
        item = _message_item(new_id("msg_"), "", "in_progress")
        self._add_item(item, out)
        self._emit(out, "response.content_part.added", {"item_id": item["id"], "output_index": self._index,
                                                        "content_index": 0, "part": _text_part("")})

    def _add_item(self, item: dict[str, Any], out: list[bytes]) -> None:
        self._response["output"].append(item)
        self._item = item
        self._item_id = item["id"].encode()
        self._parts = []
        self._emit(out, "response.output_item.added", {"output_index": self._index, "item": item})

    def _tool_call(self, call: dict[str, Any], out: list[bytes]) -> None:
        index = call.get("index", 0)
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        call_id = call.get("id")
        known = self._calls.get(index)
        # A new call: an index not seen yet, or a new id at a known one (Ollama numbers every parallel call 0).
        if known is None or (call_id and call_id != known["call_id"]):
            self._close(out)
            item = _call_item(new_id("fc_"), call.get("id"), function.get("name"), "", "in_progress")
            self._calls[index] = item
            self._add_item(item, out)
        arguments = function.get("arguments")
        if arguments and self._calls[index] is self._item:
            self._parts.append(arguments)
            self._seq += 1
            out.append(_ARGS_DELTA % (self._seq, self._item_id, self._index, json_str(arguments)))
            self.content_events += 1

    def _close(self, out: list[bytes]) -> None:
        """The open output item is complete: its `…done` events, with its whole text or arguments."""
        item = self._item
        if item is None:
            return
        self._item = None
        whole = "".join(self._parts)
        index = self._index
        if item["type"] == "message":
            self._emit(out, "response.output_text.done", {"item_id": item["id"], "output_index": index,
                                                          "content_index": 0, "text": whole, "logprobs": []})
            self._emit(out, "response.content_part.done", {"item_id": item["id"], "output_index": index,
                                                           "content_index": 0, "part": _text_part(whole)})
            item["content"] = [_text_part(whole)]
        else:
            self._emit(out, "response.function_call_arguments.done", {"item_id": item["id"], "output_index": index,
                                                                      "arguments": whole})
            item["arguments"] = whole
        item["status"] = "completed"
        self._emit(out, "response.output_item.done", {"output_index": index, "item": item})

    def _end(self, out: list[bytes]) -> None:
        self._done = True
        if not self._started:
            self._started = True
            self._start({}, out)
        self._close(out)
        response = _finished(self._response, self._finish, self.usage)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        self._emit(out, kind, {"response": response})
