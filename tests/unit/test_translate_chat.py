"""A Chat Completions client on Anthropic's Messages API: the request mapped, the Messages stream read back as
chat chunks the openai SDK accumulates, usage and finish reasons as Anthropic reported them."""

from __future__ import annotations

import json

import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from llmproxy.errors import ProxyError
from llmproxy.translate.chat import MessagesToChat, messages_body_to_chat, request_to_messages


def test_a_conversation_with_tools_maps_to_alternating_messages_turns():
    body = {"model": "claude", "max_tokens": 99, "stop": "END", "temperature": 1.5, "user": "u1",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "developer", "content": [{"type": "text", "text": "use tools"}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "weather?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA="}}]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get", "arguments": '{"city":"Oslo"}'}},
                    {"id": "c2", "type": "function", "function": {"name": "get", "arguments": '{"city":"Rome"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "cold"},
                {"role": "tool", "tool_call_id": "c2", "content": "warm"},
            ],
            "tools": [{"type": "function", "function": {"name": "get", "description": "d",
                                                        "parameters": {"type": "object"}}}],
            "tool_choice": "required", "parallel_tool_calls": False}
    out = request_to_messages(body, default_max_tokens=4096)
    assert out["system"] == "be brief\n\nuse tools"
    assert out["max_tokens"] == 99 and out["stop_sequences"] == ["END"] and out["temperature"] == 1.0
    assert out["metadata"] == {"user_id": "u1"}
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]
    assert out["messages"][0]["content"][1] == {"type": "image", "source": {"type": "base64",
                                                                            "media_type": "image/png", "data": "AAA="}}
    assert out["messages"][1]["content"] == [{"type": "tool_use", "id": "c1", "name": "get", "input": {"city": "Oslo"}},
                                             {"type": "tool_use", "id": "c2", "name": "get", "input": {"city": "Rome"}}]
    assert out["messages"][2]["content"] == [{"type": "tool_result", "tool_use_id": "c1", "content": "cold"},
                                             {"type": "tool_result", "tool_use_id": "c2", "content": "warm"}]
    assert out["tools"] == [{"name": "get", "input_schema": {"type": "object"}, "description": "d"}]
    assert out["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}


def test_max_tokens_defaults_when_the_client_gives_none():
    out = request_to_messages({"messages": [{"role": "user", "content": "hi"}]}, default_max_tokens=77)
    assert out["max_tokens"] == 77 and "stream" not in out


@pytest.mark.parametrize(("body", "field"), [
    ({"n": 2, "messages": [{"role": "user", "content": "x"}]}, "`n`"),
    ({"response_format": {"type": "json_object"}, "messages": [{"role": "user", "content": "x"}]},
     "`response_format`"),
    ({"messages": []}, "`messages`"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "`messages[0].content[0]`"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
     "`messages[0].tool_calls[0].function.arguments`"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "code_interpreter"}]}, "`tools[0].type`"),
])
def test_what_messages_cannot_express_is_refused_naming_the_field(body: dict, field: str):
    with pytest.raises(ProxyError) as raised:
        request_to_messages(body, default_max_tokens=10)
    assert raised.value.kind == "untranslatable" and raised.value.spec.status == 400
    assert raised.value.message.startswith(field)


def sse(event: str, data: dict) -> bytes:
    return b"event: %b\ndata: %b\n\n" % (event.encode(), orjson.dumps(data))


TOOL_STREAM = b"".join([
    sse("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude", "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 2,
                  "output_tokens": 1}}}),
    sse("ping", {"type": "ping"}),
    sse("content_block_start", {"type": "content_block_start", "index": 0,
                                "content_block": {"type": "text", "text": ""}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                "delta": {"type": "text_delta", "text": "Let me check "}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                "delta": {"type": "text_delta", "text": "héllo"}}),
    sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
    sse("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_1", "name": "get", "input": {}}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                "delta": {"type": "input_json_delta", "partial_json": '{"city": '}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                "delta": {"type": "input_json_delta", "partial_json": '"Oslo"}'}}),
    sse("content_block_stop", {"type": "content_block_stop", "index": 1}),
    sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                          "usage": {"output_tokens": 12}}),
    sse("message_stop", {"type": "message_stop"}),
])


def chunks_of(stream: bytes) -> tuple[list[dict], bool]:
    """The chat chunks of a translated stream, and whether it ended with [DONE]."""
    events = [block[len(b"data: "):] for block in stream.split(b"\n\n") if block]
    done = events[-1] == b"[DONE]"
    return [json.loads(e) for e in events if e != b"[DONE]"], done


@pytest.mark.parametrize("split", [1, 7, 64, len(TOOL_STREAM)])
def test_a_tool_use_stream_becomes_chat_chunks_the_sdk_validates_however_it_is_split(split: int):
    translator = MessagesToChat({"stream": True, "stream_options": {"include_usage": True}})
    out = b"".join(translator.feed(TOOL_STREAM[i:i + split]) for i in range(0, len(TOOL_STREAM), split))
    out += translator.finish()
    chunks, done = chunks_of(out)
    assert done
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Let me check héllo"
    calls = [call for c in chunks if c["choices"] for call in c["choices"][0]["delta"].get("tool_calls") or []]
    assert calls[0]["id"] == "toolu_1" and calls[0]["function"]["name"] == "get"
    assert "".join(call["function"]["arguments"] for call in calls) == '{"city": "Oslo"}'
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    # Anthropic's input_tokens leave the cache out; OpenAI's prompt_tokens count it all
    assert chunks[-1]["usage"] == {"prompt_tokens": 17, "completion_tokens": 12, "total_tokens": 29,
                                   "prompt_tokens_details": {"cached_tokens": 5}}
    usage = translator.usage
    assert (usage.prompt, usage.completion_tokens, usage.cache_read_tokens, usage.cache_write_tokens) == (17, 12, 5, 2)


def test_without_include_usage_no_usage_chunk_is_sent_and_usage_is_still_metered():
    translator = MessagesToChat({"stream": True})
    chunks, done = chunks_of(translator.feed(TOOL_STREAM) + translator.finish())
    assert done and all("usage" not in c for c in chunks)
    assert translator.usage.completion_tokens == 12


def test_a_stream_cut_before_message_stop_gets_no_done():
    cut = TOOL_STREAM[:TOOL_STREAM.index(b"event: message_delta")]
    translator = MessagesToChat({"stream": True})
    chunks, done = chunks_of(translator.feed(cut) + translator.finish())
    assert not done and chunks and translator.content_events == 4


def test_an_error_event_becomes_an_error_chunk_and_the_stream_ends_without_done():
    stream = TOOL_STREAM[:TOOL_STREAM.index(b"event: ping")] + sse("error", {
        "type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    translator = MessagesToChat({"stream": True})
    chunks, done = chunks_of(translator.feed(stream) + translator.finish())
    assert not done and chunks[-1] == {"error": {"message": "Overloaded", "type": "overloaded_error", "param": None,
                                                 "code": None}}


def test_a_whole_message_becomes_a_chat_completion():
    message = {"id": "msg_2", "type": "message", "role": "assistant", "model": "claude",
               "content": [{"type": "text", "text": "hi"},
                           {"type": "tool_use", "id": "toolu_2", "name": "f", "input": {"a": 1}}],
               "stop_reason": "max_tokens", "stop_sequence": None,
               "usage": {"input_tokens": 3, "output_tokens": 4, "cache_read_input_tokens": 2}}
    body, usage = messages_body_to_chat(orjson.dumps(message), {})
    completion = ChatCompletion.model_validate_json(body)
    choice = completion.choices[0]
    assert choice.message.content == "hi" and choice.finish_reason == "length"
    assert choice.message.tool_calls[0].function.arguments == '{"a":1}'
    assert completion.usage.prompt_tokens == 5 and completion.usage.completion_tokens == 4
    assert usage.prompt == 5
