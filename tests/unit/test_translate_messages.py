"""An Anthropic Messages client on a Chat Completions backend (llmproxy.translate.messages), without sockets.

The request side is checked mapping by mapping, with the field path of every refusal. The stream side is fed
hand-written chunk sequences (and, in the property test, any stream the vLLM mock can produce or arbitrary
unicode text, split at any byte) and its output is parsed by the real `anthropic` SDK, over an
httpx2.MockTransport: what the SDK's own accumulator makes of it is the judge, not a parser of ours.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic._streaming import SSEDecoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmproxy.errors import ProxyError
from llmproxy.mockbackend import vllm as mock_vllm
from llmproxy.mockbackend.textgen import completion_text, tool_call_completion_tokens, tool_calls
from llmproxy.translate import messages as tm
from llmproxy.translate.events import EventReader, parse_events

# --- the request ------------------------------------------------------------------------------------------

USER = {"role": "user", "content": "hi"}
WEATHER = {"name": "get_weather", "description": "Current weather",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def to_chat(body: dict[str, Any], stream: bool = False, continuous: bool = False) -> dict[str, Any]:
    return tm.request_to_chat({"model": "m", "max_tokens": 9, **body}, stream=stream, continuous_usage=continuous)


def refusal(body: dict[str, Any]) -> str:
    """The message of the 400 a body is refused with."""
    with pytest.raises(ProxyError) as raised:
        to_chat(body)
    assert raised.value.kind == "untranslatable" and raised.value.spec.status == 400
    return raised.value.message


def test_a_plain_turn_keeps_model_max_tokens_and_sampling_and_asks_nothing_else():
    chat = to_chat({"messages": [USER], "temperature": 0.2, "top_p": 0.9, "top_k": 5})
    assert chat == {"model": "m", "max_tokens": 9, "temperature": 0.2, "top_p": 0.9,
                    "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("system", "content"), [
    ("Be terse.", "Be terse."),
    ([{"type": "text", "text": "Be terse."}], "Be terse."),
    ([{"type": "text", "text": "One."}, {"type": "text", "text": "Two.", "cache_control": {"type": "ephemeral"}}],
     "One.\nTwo."),
], ids=["string", "one-block", "two-blocks"])
def test_the_system_prompt_becomes_the_first_message(system, content):
    chat = to_chat({"system": system, "messages": [USER]})
    assert chat["messages"] == [{"role": "system", "content": content}, {"role": "user", "content": "hi"}]


@pytest.mark.parametrize("system", [None, "", []])
def test_no_system_prompt_adds_no_system_message(system):
    assert to_chat({"system": system, "messages": [USER]})["messages"] == [{"role": "user", "content": "hi"}]


def test_text_blocks_of_a_user_turn_are_one_string_and_an_assistants_are_joined():
    chat = to_chat({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "c"}, {"type": "text", "text": "d"}]},
        {"role": "user", "content": "e"}]})
    assert chat["messages"] == [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "cd"},
                                {"role": "user", "content": "e"}]


def test_images_become_image_url_parts_beside_the_text():
    chat = to_chat({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in these?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "AAEC"}},
        {"type": "image", "source": {"type": "url", "url": "https://example.invalid/cat.png"}}]}]})
    assert chat["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "What is in these?"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAEC"}},
        {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}]}]


def test_a_tool_use_round_trip_becomes_tool_calls_and_tool_messages_before_the_users_text():
    chat = to_chat({"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should call the tool", "signature": "c2ln"},
            {"type": "redacted_thinking", "data": "cmVkYWN0ZWQ="},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}}]},
        {"role": "user", "content": [
            {"type": "text", "text": "Here you go."},
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "21 degrees"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
             "content": [{"type": "text", "text": "no station"}, {"type": "text", "text": "in Rome"}]}]}]})
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "parameters": WEATHER["input_schema"], "description": "Current weather"}}]
    assistant, paris, rome, user = chat["messages"][1:]
    # The thinking blocks are the model's own: Chat Completions cannot take them back, so they are dropped.
    assert assistant == {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"id": "toolu_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]}
    # Each result answers its call right after the assistant's turn; the user's own text comes after them.
    assert paris == {"role": "tool", "tool_call_id": "toolu_1", "content": "21 degrees"}
    assert rome == {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no station\nin Rome"}
    assert user == {"role": "user", "content": "Here you go."}


def test_an_assistant_turn_of_tool_calls_only_has_null_content():
    chat = to_chat({"messages": [USER, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]})
    assert chat["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}


def test_a_tool_without_description_or_schema_gets_an_empty_object_schema():
    assert to_chat({"messages": [USER], "tools": [{"name": "ping", "type": "custom"}]})["tools"] == [
        {"type": "function", "function": {"name": "ping", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, {"tool_choice": "auto"}),
    ({"type": "any"}, {"tool_choice": "required"}),
    ({"type": "none"}, {"tool_choice": "none"}),
    ({"type": "tool", "name": "get_weather"},
     {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ({"type": "auto", "disable_parallel_tool_use": True}, {"tool_choice": "auto", "parallel_tool_calls": False}),
    ({"type": "any", "disable_parallel_tool_use": True}, {"tool_choice": "required", "parallel_tool_calls": False}),
    ({"type": "auto", "disable_parallel_tool_use": False}, {"tool_choice": "auto"}),
    (None, {}),
], ids=["auto", "any", "none", "tool", "auto-serial", "any-serial", "auto-parallel", "absent"])
def test_tool_choice(choice, expected):
    body = {"messages": [USER], "tools": [WEATHER]}
    if choice is not None:
        body["tool_choice"] = choice
    chat = to_chat(body)
    assert {k: chat[k] for k in ("tool_choice", "parallel_tool_calls") if k in chat} == expected


def test_stop_sequences_become_stop_and_metadata_user_id_the_user():
    chat = to_chat({"messages": [USER], "stop_sequences": ["\n\nHuman:", "END"], "metadata": {"user_id": "u-42"}})
    assert chat["stop"] == ["\n\nHuman:", "END"] and chat["user"] == "u-42"
    plain = to_chat({"messages": [USER], "stop_sequences": [], "metadata": {"user_id": 42}})
    assert "stop" not in plain and "user" not in plain


@pytest.mark.parametrize(("continuous", "options"), [
    (True, {"include_usage": True, "continuous_usage_stats": True}),
    (False, {"include_usage": True}),
], ids=["continuous", "final-only"])
def test_a_stream_asks_for_usage_and_for_it_on_every_chunk_where_the_engine_can(continuous, options):
    chat = to_chat({"messages": [USER]}, stream=True, continuous=continuous)
    assert chat["stream"] is True and chat["stream_options"] == options
    assert "stream" not in to_chat({"messages": [USER]}) and "stream_options" not in to_chat({"messages": [USER]})


@pytest.mark.parametrize(("body", "field"), [
    ({"messages": []}, "`messages`"),
    ({"messages": "hi"}, "`messages`"),
    ({"messages": [{"role": "system", "content": "x"}]}, "`messages[0].role`"),
    ({"messages": [{"role": "user", "content": 5}]}, "`messages[0].content`"),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "read this"},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]}]},
     "`messages[0].content[1]`"),
    ({"messages": [USER, {"role": "assistant", "content": [{"type": "server_tool_use", "id": "s", "name": "web_search",
                                                            "input": {}}]}]}, "`messages[1].content[0]`"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "file", "file_id": "file_1"}}]}]}, "`messages[0].content[0].source`"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "text", "text": "see"},
        {"type": "image", "source": {"type": "file", "file_id": "file_1"}}]}]}]},
     "`messages[0].content[0].content[1].source`"),
    ({"messages": [USER], "system": [{"type": "text", "text": "ok"}, {"type": "image"}]}, "`system[1]`"),
    ({"messages": [USER], "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]},
     "`tools[0].type`"),
    ({"messages": [USER], "tools": [WEATHER, {"type": "bash_20250124", "name": "bash"}]}, "`tools[1].type`"),
    ({"messages": [USER], "tools": [{"input_schema": {}}]}, "`tools[0]`"),
    ({"messages": [USER], "tools": [WEATHER], "tool_choice": {"type": "sometimes"}}, "`tool_choice.type`"),
], ids=["no-turns", "turns-not-a-list", "system-role", "content-number", "document", "server-tool-use",
        "image-file", "image-in-tool-result", "image-in-system", "web-search", "bash", "nameless-tool",
        "unknown-tool-choice"])
def test_what_chat_cannot_express_is_refused_naming_the_field(body, field):
    assert refusal(body).startswith(field)


def test_the_images_of_a_tool_result_follow_its_tool_message_in_a_user_turn():
    # Claude Code's Read tool answers with the image file itself: a chat tool message takes text only.
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}}
    body = {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "text", "text": "see"}, image]}]}]}
    assert to_chat(body)["messages"] == [
        {"role": "tool", "tool_call_id": "t", "content": "see"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]


def test_an_aborted_generation_ends_in_an_error_event_not_a_clean_stop():
    translator = tm.ChatToMessages({"model": "m"})
    out = translator.feed(chunk({"role": "assistant", "content": "Hel"}) + chunk({}, finish="abort") + DONE)
    assert b"event: error" in out and b"message_stop" not in out and b"message_delta" not in out


# --- the stream: hand-written chunk sequences ------------------------------------------------------------

CHUNK_ID = "chatcmpl-abc"


def chunk(delta: dict | None = None, finish: str | None = None, usage: tuple[int, int] | None = None,
          choices: bool = True, **extra: Any) -> bytes:
    """One chat.completion.chunk as an SSE event."""
    obj: dict[str, Any] = {"id": CHUNK_ID, "object": "chat.completion.chunk", "created": 1, "model": "qwen"}
    if choices:
        obj["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish, **extra}]
    else:
        obj["choices"] = []
    if usage is not None:
        obj["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def role() -> bytes:
    return chunk({"role": "assistant", "content": ""})


def text(t: str, finish: str | None = None, **kw: Any) -> bytes:
    return chunk({"content": t}, finish, **kw)


def call(index: int, *, id: str | None = None, name: str | None = None, arguments: str | None = None) -> dict:
    function = {k: v for k, v in (("name", name), ("arguments", arguments)) if v is not None}
    out: dict[str, Any] = {"index": index, "function": function}
    if id is not None:
        out.update(id=id, type="function")
    return out


def calls(*deltas: dict, finish: str | None = None, **kw: Any) -> bytes:
    return chunk({"content": None, "tool_calls": list(deltas)}, finish, **kw)


def translate(stream: bytes, request: dict[str, Any] | None = None, pieces: list[int] | None = None,
              clean_end: bool = True) -> tuple[bytes, tm.ChatToMessages]:
    """The Messages bytes for a chat stream fed whole (or cut at the offsets `pieces`), then finish() at a clean
    end (a cut stream gets no finish: the relay never calls it)."""
    translator = tm.ChatToMessages(request or {"model": "m"})
    cuts = [0, *(pieces or []), len(stream)]
    out = b"".join(translator.feed(stream[a:b]) for a, b in itertools.pairwise(cuts) if b > a)
    if clean_end:
        out += translator.finish()
    return out, translator


def events(out: bytes) -> list[tuple[str, dict]]:
    return [(name.decode(), json.loads(data)) for name, data in parse_events(out.replace(b"\r\n", b"\n"))]


def names(out: bytes) -> list[str]:
    return [name for name, _ in events(out)]


_SDK_BODY: list[bytes] = []
_SDK = anthropic.Anthropic(base_url="http://sdk.invalid", api_key="k", max_retries=0, http_client=httpx2.Client(
    transport=httpx2.MockTransport(lambda request: httpx2.Response(
        200, headers={"content-type": "text/event-stream"}, content=_SDK_BODY[-1]))))


def sdk_message(out: bytes) -> anthropic.types.Message:
    """What the anthropic SDK's messages.stream() makes of `out` as a response body: its final message."""
    _SDK_BODY[:] = [out]
    with _SDK.messages.stream(model="m", max_tokens=9, messages=[USER]) as stream:
        return stream.get_final_message()


def sdk_events(out: bytes) -> list[Any]:
    _SDK_BODY[:] = [out]
    with _SDK.messages.stream(model="m", max_tokens=9, messages=[USER]) as stream:
        return list(stream)


def tool_uses(message: anthropic.types.Message) -> list[tuple[str, str, dict]]:
    return [(b.id, b.name, b.input) for b in message.content if b.type == "tool_use"]


def texts(message: anthropic.types.Message) -> list[str]:
    return [b.text for b in message.content if b.type == "text"]


TEXT_STREAM = (role() + text(" Hello", usage=(11, 1)) + text(" world", usage=(11, 2))
               + text("!", "stop", usage=(11, 3)) + chunk(choices=False, usage=(11, 3)) + DONE)


def test_a_text_stream_is_the_messages_event_sequence_with_the_backends_counts():
    out, translator = translate(role().replace(b'"choices"', b'"usage": {"prompt_tokens": 11, '
                                               b'"completion_tokens": 0, "total_tokens": 11}, "choices"', 1)
                                + TEXT_STREAM[len(role()):])
    assert names(out) == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                          "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    start = events(out)[0][1]["message"]
    assert start["id"] == "msg_" + CHUNK_ID and start["model"] == "qwen" and start["role"] == "assistant"
    assert start["usage"] == {"input_tokens": 11, "output_tokens": 0}  # the role chunk's continuous usage
    message = sdk_message(out)
    assert texts(message) == [" Hello world!"] and message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (11, 3)
    assert translator.usage.prompt == 11 and translator.usage.completion_tokens == 3
    assert translator.content_events == 3


def test_without_continuous_usage_message_start_says_0_and_message_delta_the_count():
    out, _ = translate(TEXT_STREAM)
    first, delta = events(out)[0][1], events(out)[-2][1]
    assert first["message"]["usage"] == {"input_tokens": 0, "output_tokens": 0}
    assert delta["usage"] == {"input_tokens": 11, "output_tokens": 3}
    assert sdk_message(out).usage.input_tokens == 11


def test_done_without_usage_reports_the_deltas_relayed_as_output():
    out, translator = translate(role() + text("a") + text("b", "length") + DONE)
    assert events(out)[-2][1] == {"type": "message_delta", "delta": {"stop_reason": "max_tokens",
                                                                     "stop_sequence": None},
                                  "usage": {"input_tokens": 0, "output_tokens": 2}}
    assert translator.usage is None
    assert texts(sdk_message(out)) == ["ab"]


def test_cached_prompt_tokens_are_reported_apart_from_input_tokens():
    usage = b'"usage": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21, ' \
            b'"prompt_tokens_details": {"cached_tokens": 16}}'
    last = text("x", "stop").replace(b'"choices"', usage + b', "choices"', 1)
    out, _ = translate(role() + last + DONE)
    assert events(out)[-2][1]["usage"] == {"input_tokens": 4, "output_tokens": 1, "cache_read_input_tokens": 16}
    message = sdk_message(out)
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (4, 16)


def test_text_then_tool_calls_are_a_text_block_then_tool_use_blocks_with_the_arguments_streamed():
    stream = (role() + text("Let me check.") + calls(call(0, id="call_1", name="get_weather"))
              + calls(call(0, arguments='{"city": ')) + calls(call(0, arguments='"Paris"}'))
              + chunk({}, "tool_calls") + DONE)
    out, _ = translate(stream)
    assert names(out) == ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                          "content_block_start", "content_block_delta", "content_block_delta",
                          "content_block_stop", "message_delta", "message_stop"]
    starts = [e for n, e in events(out) if n == "content_block_start"]
    assert [s["index"] for s in starts] == [0, 1]
    assert starts[1]["content_block"] == {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}
    deltas = [e["delta"] for n, e in events(out) if n == "content_block_delta" and e["index"] == 1]
    assert deltas == [{"type": "input_json_delta", "partial_json": '{"city": '},
                      {"type": "input_json_delta", "partial_json": '"Paris"}'}]
    message = sdk_message(out)
    assert texts(message) == ["Let me check."]
    assert tool_uses(message) == [("call_1", "get_weather", {"city": "Paris"})]
    assert message.stop_reason == "tool_use"


def test_parallel_calls_are_one_block_each_in_order():
    # OpenAI's shape: each call's first delta has id, name and empty arguments, then its arguments.
    stream = (role() + calls(call(0, id="call_a", name="get_weather", arguments=""))
              + calls(call(0, arguments='{"city":"Paris"}'))
              + calls(call(1, id="call_b", name="get_time", arguments=""))
              + calls(call(1, arguments='{"tz":'), finish=None) + calls(call(1, arguments='"CET"}'))
              + chunk({}, "tool_calls", usage=(30, 12)) + DONE)
    out, _ = translate(stream)
    message = sdk_message(out)
    assert tool_uses(message) == [("call_a", "get_weather", {"city": "Paris"}), ("call_b", "get_time", {"tz": "CET"})]
    assert [e["index"] for n, e in events(out) if n == "content_block_stop"] == [0, 1]
    assert message.stop_reason == "tool_use" and message.usage.output_tokens == 12


def test_two_calls_in_one_chunk_each_get_their_block():
    stream = (role() + calls(call(0, id="a", name="f", arguments="{}"), call(1, id="b", name="g", arguments="{}"))
              + chunk({}, "tool_calls") + DONE)
    assert tool_uses(sdk_message(translate(stream)[0])) == [("a", "f", {}), ("b", "g", {})]


def test_calls_that_all_say_index_0_are_told_apart_by_their_ids():
    # Ollama's OpenAI-compatible stream numbers every parallel call 0, each sent whole with an id of its own
    # (ollama/ollama#15457): a new id at a known index is a new call, not more arguments for the last one.
    stream = (role() + calls(call(0, id="call_a", name="get_weather", arguments='{"city":"Paris"}'))
              + calls(call(0, id="call_b", name="get_time", arguments='{"tz":"CET"}'))
              + chunk({}, "tool_calls") + DONE)
    out, _ = translate(stream)
    assert tool_uses(sdk_message(out)) == [("call_a", "get_weather", {"city": "Paris"}),
                                           ("call_b", "get_time", {"tz": "CET"})]
    # An empty id repeated on every delta of one call is no new call.
    tgi = (role() + calls(call(0, id="", name="f", arguments='{"a":')) + calls(call(0, id="", arguments="1}"))
           + chunk({}, "tool_calls") + DONE)
    assert tool_uses(sdk_message(translate(tgi)[0]))[0][1:] == ("f", {"a": 1})
    # A call whose id comes again on later deltas is still one call.
    same = (role() + calls(call(0, id="c", name="f", arguments='{"a":')) + calls(call(0, id="c", arguments="1}"))
            + chunk({}, "tool_calls") + DONE)
    assert tool_uses(sdk_message(translate(same)[0])) == [("c", "f", {"a": 1})]


def test_a_call_without_an_id_gets_one():
    out, _ = translate(role() + calls(call(0, name="f", arguments="{}")) + chunk({}, "tool_calls") + DONE)
    ((block_id, name, arguments),) = tool_uses(sdk_message(out))
    assert block_id.startswith("toolu_") and (name, arguments) == ("f", {})


@pytest.mark.parametrize(("finish", "matched", "stops", "stop_reason", "stop_sequence"), [
    ("stop", None, [], "end_turn", None),
    ("length", None, [], "max_tokens", None),
    ("tool_calls", None, [], "tool_use", None),
    ("function_call", None, [], "tool_use", None),
    ("content_filter", None, [], "refusal", None),
    ("something_new", None, [], "end_turn", None),
    ("stop", "END", ["END"], "stop_sequence", "END"),  # vLLM names the stop string it matched
    ("stop", 151645, ["END"], "end_turn", None),  # vLLM's stop_reason is a token id when EOS ended it
    ("stop", "END", [], "end_turn", None),  # a string the request did not ask for
], ids=lambda v: repr(v))
def test_finish_reasons_become_stop_reasons(finish, matched, stops, stop_reason, stop_sequence):
    out, _ = translate(role() + text("x", finish, stop_reason=matched) + DONE,
                       {"model": "m", "stop_sequences": stops})
    message = sdk_message(out)
    assert (message.stop_reason, message.stop_sequence) == (stop_reason, stop_sequence)


def test_stop_after_tool_calls_is_tool_use():
    # Some engines say "stop" once a call is made.
    stream = role() + calls(call(0, id="c", name="f", arguments="{}")) + chunk({}, "stop") + DONE
    assert sdk_message(translate(stream)[0]).stop_reason == "tool_use"


def test_a_clean_end_without_done_still_ends_the_message():
    out, _ = translate(role() + text("a", "stop", usage=(5, 1)))  # no [DONE] (as some engines do)
    assert names(out)[-2:] == ["message_delta", "message_stop"]


@pytest.mark.parametrize("stream", [
    role() + text("a") + text("b"),  # cut before any finish_reason
    role() + text("a", "stop"),  # cut after the finish, before [DONE]: the relay calls no finish()
], ids=["before-finish", "after-finish"])
def test_a_cut_stream_has_no_terminal_events(stream):
    out, _ = translate(stream, clean_end=False)
    assert "message_stop" not in names(out) and "message_delta" not in names(out)
    assert names(out)[:3] == ["message_start", "content_block_start", "content_block_delta"]


def test_a_clean_end_without_any_finish_reason_has_no_terminal_events():
    out, _ = translate(role() + text("a") + DONE)
    assert "message_stop" not in names(out)


def test_an_error_chunk_is_an_error_event_and_nothing_follows_it():
    error = b'data: {"error": {"message": "Internal server error", "type": "InternalServerError", "code": 500}}\n\n'
    out, _ = translate(role() + text("a") + error + text("b", "stop") + DONE)
    assert names(out) == ["message_start", "content_block_start", "content_block_delta", "error"]
    assert events(out)[-1][1] == {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}}
    with pytest.raises(anthropic.APIStatusError, match="Internal server error"):
        sdk_message(out)


def test_an_error_as_a_string_or_before_anything_is_still_an_error_event():
    out, _ = translate(b'data: {"error": "model crashed"}\n\n' + DONE)
    assert events(out) == [("error", {"type": "error", "error": {"type": "api_error", "message": "model crashed"}})]


def test_comments_unknown_fields_and_named_events_are_read_as_sse():
    stream = (b": keep-alive\n\n" + b"retry: 100\n" + role() + b"event: chunk\nid: 7\n" + text("a")
              + b"data:" + text("b", "stop")[len(b"data: "):] + DONE)  # "data:" without its space
    assert texts(sdk_message(translate(stream)[0])) == ["ab"]


def test_ping_before_the_first_chunk_sends_message_start_first_and_only_once():
    translator = tm.ChatToMessages({"model": "claude-x"})
    first = translator.ping()
    assert names(first) == ["message_start", "ping"]
    assert events(first)[0][1]["message"]["model"] == "claude-x"
    assert names(translator.ping()) == ["ping"]
    rest = translator.feed(TEXT_STREAM) + translator.finish()
    assert "message_start" not in names(rest)
    message = sdk_message(first + rest)
    assert texts(message) == [" Hello world!"] and message.usage.input_tokens == 11


LINE_ENDS = {"LF": b"\n", "CRLF": b"\r\n", "CR": b"\r"}


@pytest.mark.parametrize("line_end", LINE_ENDS, ids=list(LINE_ENDS))
def test_events_split_at_every_byte_give_the_same_messages_stream(line_end):
    stream = (role() + text("héllo ✓", usage=(7, 1)) + calls(call(0, id="c0", name="f"))
              + calls(call(0, arguments='{"q": "ü"}')) + calls(call(1, id="c1", name="g", arguments="{}"))
              + chunk({}, "tool_calls", usage=(7, 9)) + DONE).replace(b"\n", LINE_ENDS[line_end])
    whole, _ = translate(stream)
    assert names(whole)[-1] == "message_stop"
    for cut in range(1, len(stream)):
        assert translate(stream, pieces=[cut])[0] == whole, f"split at byte {cut}"
    assert translate(stream, pieces=list(range(1, len(stream))))[0] == whole, "one byte per read"
    message = sdk_message(whole)
    assert texts(message) == ["héllo ✓"] and tool_uses(message) == [("c0", "f", {"q": "ü"}), ("c1", "g", {})]


def test_event_reader_joins_data_lines_and_keeps_the_unfinished_event():
    reader = EventReader()
    assert reader.feed(b"event: a\ndata: 1\ndata: 2\n\ndata: 3") == [(b"a", b"1\n2")]
    assert reader.feed(b"\n") == []
    assert reader.feed(b"\n") == [(b"", b"3")]
    assert reader.feed(b"data: 4") == [] and reader.finish() == [(b"", b"4")]


@st.composite
def sse_texts(draw) -> bytes:
    """SSE text of any shape: data (with colons, spaces, empty), event names, ids, retries, comments, unknown
    fields, blank-line runs, any of the three line ends (a CR and a LF that follow make one); it ends with a
    blank line, so that every event in it is complete."""
    value = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=12)
    line = st.one_of(
        st.builds(lambda v: "data: " + v, value), st.builds(lambda v: "data:" + v, value), st.just("data"),
        st.builds(lambda v: "event: " + v, st.from_regex(r"[a-z_]{1,8}", fullmatch=True)),
        st.builds(lambda v: "id: " + v, value), st.just("retry: 10"), st.builds(lambda v: ": " + v, value),
        st.builds(lambda v: "x-field: " + v, value), st.just(""))
    lines = draw(st.lists(line, max_size=30))
    ends = draw(st.lists(st.sampled_from(["\n", "\r\n", "\r"]), min_size=len(lines), max_size=len(lines)))
    return "".join(text + end for text, end in zip(lines, ends, strict=True)).encode() + b"\n\n"


@settings(max_examples=200, deadline=None)
@given(text=sse_texts(), data=st.data())
def test_event_reader_reads_any_sse_cut_anywhere_as_the_sdks_own_decoder_does(text, data):
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(text) - 1), max_size=20))))
    pieces = [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]
    reader = EventReader()
    ours = [event for piece in pieces for event in reader.feed(piece)] + reader.finish()
    sdk = [((e.event or "").encode(), e.data.encode()) for e in SSEDecoder().iter_bytes(iter(pieces))]
    # Events with data, the only ones either side reads (the SDK's Stream skips one whose data is empty).
    assert [e for e in ours if e[1]] == [e for e in sdk if e[1]]


# --- a whole (not streamed) chat.completion --------------------------------------------------------------


def completion(message: dict, finish: str, usage: dict | None = None, **choice: Any) -> bytes:
    body = {"id": "chatcmpl-1", "object": "chat.completion", "model": "qwen",
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish, **choice}]}
    if usage is not None:
        body["usage"] = usage
    return json.dumps(body).encode()


def test_a_whole_text_completion_is_a_message_with_the_backends_usage():
    raw = completion({"content": "Paris."}, "stop", {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14,
                                                      "prompt_tokens_details": {"cached_tokens": 8}})
    out, usage = tm.chat_body_to_messages(raw, {"model": "alias"})
    assert json.loads(out) == {"id": "msg_chatcmpl-1", "type": "message", "role": "assistant", "model": "qwen",
                               "content": [{"type": "text", "text": "Paris."}], "stop_reason": "end_turn",
                               "stop_sequence": None,
                               "usage": {"input_tokens": 4, "output_tokens": 2, "cache_read_input_tokens": 8}}
    assert (usage.prompt, usage.completion_tokens, usage.cache_read_tokens) == (12, 2, 8)


def test_a_whole_tool_call_completion_is_tool_use_blocks_after_the_text():
    raw = completion({"content": "Checking.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"type": "function", "function": {"name": "get_time", "arguments": ""}}]}, "tool_calls")
    message = json.loads(tm.chat_body_to_messages(raw, {})[0])
    assert message["content"][:2] == [{"type": "text", "text": "Checking."}, {
        "type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}]
    third = message["content"][2]
    assert third["id"].startswith("toolu_") and (third["name"], third["input"]) == ("get_time", {})
    assert message["stop_reason"] == "tool_use"
    assert message["usage"] == {"input_tokens": 0, "output_tokens": 0}  # the backend said nothing


@pytest.mark.parametrize(("finish", "matched", "reason", "sequence"), [
    ("stop", "END", "stop_sequence", "END"), ("length", None, "max_tokens", None), ("stop", None, "end_turn", None)])
def test_a_whole_completion_says_why_it_stopped(finish, matched, reason, sequence):
    raw = completion({"content": "x"}, finish, stop_reason=matched)
    message = json.loads(tm.chat_body_to_messages(raw, {"stop_sequences": ["END"]})[0])
    assert (message["stop_reason"], message["stop_sequence"]) == (reason, sequence)


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b""])
def test_a_body_that_is_no_completion_goes_on_as_it_is(raw):
    assert tm.chat_body_to_messages(raw, {}) == (raw, None)


# --- the recorded chat streams of the engines (tests/fixtures/streams) --------------------------------------

STREAMS = Path(__file__).resolve().parents[1] / "fixtures" / "streams"
CHAT_RECORDINGS = sorted(p.stem for p in STREAMS.glob("*.json")
                         if json.loads(p.read_text()).get("dialect") == "openai-chat-sse")
STOP_REASONS = {"length": "max_tokens", "stop": "end_turn", "tool_calls": "tool_use"}


@pytest.mark.parametrize("name", CHAT_RECORDINGS)
def test_each_recorded_chat_stream_reaches_the_sdk_whole_with_its_text_calls_and_counts(name):
    meta = json.loads((STREAMS / f"{name}.json").read_text())
    stream = (STREAMS / f"{name}.sse").read_bytes()
    whole, _ = translate(stream)
    bytewise, _ = translate(stream, pieces=list(range(1, len(stream))))
    assert without_ids(events(bytewise)) == without_ids(events(whole)), "one byte per read"
    if meta.get("expected_text") is None:  # an error inside the stream
        assert names(whole)[-1] == "error" and "message_stop" not in names(whole)
        with pytest.raises(anthropic.APIStatusError):
            sdk_message(whole)
        return
    message = sdk_message(whole)
    assert text_of_all(message) == meta["expected_text"]
    assert message.stop_reason == STOP_REASONS[meta["finish_reason"]]
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
             for c in meta.get("expected_tool_calls", [])]
    assert [(block_name, arguments) for _, block_name, arguments in tool_uses(message)] == calls
    if meta.get("usage"):
        assert (message.usage.input_tokens, message.usage.output_tokens) == (
            meta["usage"]["prompt_tokens"], meta["usage"]["completion_tokens"])
    else:  # no usage in the stream: the deltas relayed
        assert (message.usage.input_tokens, message.usage.output_tokens) == (0, meta["content_events"])


def without_ids(events_: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """The events with message_start's id left out: made up when the engine's chunks have none (TGI's are "")."""
    return [(name, {**data, "message": {**data["message"], "id": None}} if name == "message_start" else data)
            for name, data in events_]


def text_of_all(message: anthropic.types.Message) -> str:
    return "".join(texts(message))


# --- the property: any stream the vLLM mock can make, cut anywhere, parses in the SDK ----------------------

BASE = {"id": "chatcmpl-prop", "object": "chat.completion.chunk", "created": 1, "model": "qwen"}
PROPERTY_TYPES = st.sampled_from(["string", "integer", "number", "boolean", "object"])


@st.composite
def vllm_streams(draw) -> tuple[bytes, str, list[tuple[str, str]], int, int, str]:
    """(stream bytes, its text, its calls as (name, arguments), prompt tokens, completion tokens, stop reason)
    as the vLLM mock streams them (its own generators)."""
    include, continuous = draw(st.booleans()), draw(st.booleans())
    continuous = include and continuous
    p = draw(st.integers(1, 5000))
    tools = draw(st.lists(st.tuples(st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
                                    st.lists(st.tuples(st.text(min_size=1, max_size=8), PROPERTY_TYPES),
                                             max_size=4, unique_by=lambda t: t[0])),
                          max_size=3, unique_by=lambda t: t[0]))
    if tools:
        chat = {"tools": [{"type": "function", "function": {"name": name, "parameters": {
            "type": "object", "properties": {prop: {"type": kind} for prop, kind in props}}}} for name, props in tools]}
        made = tool_calls(chat)
        ids = [f"chatcmpl-tool-{i}" for i in range(len(made))]
        events_ = mock_vllm._tool_call_events(BASE, ids, made, p, include, continuous)
        return b"".join(events_), "", made, p, tool_call_completion_tokens(made), "tool_use"
    n = draw(st.integers(0, 60))
    finish = draw(st.sampled_from(["length", "stop"]))
    events_ = mock_vllm._chat_events(BASE, n, p, include, continuous, finish)
    return b"".join(events_), completion_text(n), [], p, n, {"length": "max_tokens", "stop": "end_turn"}[finish]


@st.composite
def unicode_streams(draw) -> tuple[bytes, str, list[tuple[str, str]], int, int, str]:
    """Hand-built chunks of arbitrary unicode text (raw or \\u-escaped JSON, any line ends)."""
    pieces = draw(st.lists(st.text(min_size=1, max_size=20), max_size=25))
    ascii_only = draw(st.booleans())
    line_end = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    chunks = [{**BASE, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    chunks += [{**BASE, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
               for piece in pieces]
    chunks.append({**BASE, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks.append({**BASE, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": len(pieces),
                                                    "total_tokens": 3 + len(pieces)}})
    body = b"".join(b"data: " + json.dumps(c, ensure_ascii=ascii_only).encode() + b"\n\n" for c in chunks) + DONE
    return body.replace(b"\n", line_end), "".join(pieces), [], 3, len(pieces), "end_turn"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(made=st.one_of(vllm_streams(), unicode_streams()), data=st.data())
def test_any_chat_stream_cut_anywhere_is_a_messages_stream_the_sdk_accumulates(made, data):
    stream, expected_text, expected_calls, prompt, completion, stop_reason = made
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=30))))
    out, _ = translate(stream, pieces=[c for c in cuts if c < len(stream)])
    message = sdk_message(out)
    assert "".join(texts(message)) == expected_text
    assert [(name, arguments) for _, name, arguments in tool_uses(message)] == [
        (name, json.loads(arguments)) for name, arguments in expected_calls]
    assert message.stop_reason == stop_reason
    # Without usage (include_usage false) the output is the deltas relayed, the input unknown (0).
    if b'"usage"' in stream:
        assert (message.usage.input_tokens, message.usage.output_tokens) == (prompt, completion)
    assert names(out)[0] == "message_start" and names(out)[-1] == "message_stop"
