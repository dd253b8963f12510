"""The metering session: the plan, what the relay feeds it, and the one usage a record reads."""

from __future__ import annotations

import orjson
import pytest

from llmproxy.catalogue import lookup
from llmproxy.metering.dialects import OPENAI_CHAT_SSE, SPECS, Spec, _KeyThen
from llmproxy.metering.session import ESTIMATED, NONE, REPORTED, MeteringSession
from llmproxy.metering.sse import SSEMeter
from llmproxy.metering.usage import Usage

CHAT = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x" * 40}]}


def plan(path: str = "/v1/chat/completions", kind: str = "vllm", body: dict | None = None,
         **options: bool) -> MeteringSession:
    body = CHAT if body is None else body
    options = {"inject_allowed": True, "is_stream": bool(body.get("stream")), **options}
    return MeteringSession.plan(lookup(path).dialect_on(kind), body=body, **options)


def chunk(content: str) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"%b"}}]}\n\n' % content.encode()


USAGE_EVENT = b'data: {"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":2,"total_tokens":13}}\n\n'


@pytest.mark.parametrize(("body", "inject_allowed", "injects"), [
    ({"stream": True}, True, True),
    ({"stream": True}, False, False),  # backends[].inject_usage: false
    ({"stream": True, "stream_options": {"include_usage": True}}, True, False),  # the client asked itself
    ({"stream": False}, True, False),  # not streamed: the body reports usage anyway
])
def test_the_usage_option_is_asked_for_only_when_the_client_did_not(body: dict, inject_allowed: bool, injects: bool):
    assert plan(body=body, inject_allowed=inject_allowed).injects_usage is injects


def test_a_streamed_response_is_fed_and_its_injected_usage_event_removed():
    session = plan()
    feed = session.response_started(200, streaming=True)
    assert session.streamed and session.rewrites
    assert feed(chunk("a")) == chunk("a")
    assert feed(USAGE_EVENT + b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert session.response_ended() == b""
    assert session.final_usage(200) == (11, 2, None, None, REPORTED)


def test_a_json_body_is_read_at_its_end():
    session = plan(body={"model": "m", "messages": []})
    feed = session.response_started(200, streaming=False)
    body = orjson.dumps({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}})
    assert feed(body[:10]) == body[:10] and feed(body[10:]) == body[10:]
    assert not session.streamed and not session.rewrites
    session.response_ended()
    assert session.final_usage(200) == (5, 1, None, None, REPORTED)


def test_embeddings_usage_without_completion_tokens_is_reported():
    session = plan("/v1/embeddings", body={"model": "m", "input": "some text"})
    feed = session.response_started(200, streaming=False)
    feed(b'{"object":"list","data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}')
    session.response_ended()
    assert session.final_usage(200) == (8, 0, None, None, REPORTED)


@pytest.mark.parametrize("status", [400, 404, 429, 500, 503])
def test_a_request_the_backend_refused_carries_no_tokens(status: int):
    session = plan()
    assert session.response_started(status, streaming=False) is None  # an error body is not read for usage
    assert session.final_usage(status) == (0, 0, None, None, NONE)


@pytest.mark.parametrize(("events", "completion"), [(0, 0), (3, 3)])
def test_a_stream_cut_off_before_its_usage_is_estimated(events: int, completion: int):
    session = plan()
    feed = session.response_started(200, streaming=True)
    for i in range(events):
        feed(chunk(f"t{i}"))
    prompt, relayed, cache_read, _, source = session.final_usage(200)
    assert (relayed, cache_read, source) == (completion, None, ESTIMATED)
    assert prompt > 0  # from the request text


def test_a_request_cut_before_the_backend_answered_is_estimated():
    # The backend got the request and did the prefill: no status, no usage, but work to account for.
    assert plan().final_usage(0).source == ESTIMATED


@pytest.mark.parametrize("path", ["/tokenize", "/api/tags", "/v2/unknown"])
def test_an_endpoint_that_is_no_generation_carries_no_tokens(path: str):
    session = plan(path, body={"prompt": "x" * 400})
    assert session.dialect is None and session.response_started(200, streaming=False) is None
    assert session.final_usage(200) == (0, 0, None, None, NONE)


def test_a_non_streamed_body_over_the_cap_is_not_parsed():
    session = plan(body={"model": "m", "messages": []})
    feed = session.response_started(200, streaming=False)
    big = b'{"usage":{"prompt_tokens":1,"completion_tokens":1},"pad":"' + b"x" * (9 << 20) + b'"}'
    for i in range(0, len(big), 1 << 20):
        feed(big[i:i + (1 << 20)])
    session.response_ended()
    assert session.final_usage(200).source == ESTIMATED


# --- usage that arrives in pieces --------------------------------------------------------------------------

def _split_usage(obj: object) -> Usage | None:
    """A toy dialect: `{"tokens":{"in":N}}` in its first event, `{"tokens":{"out":M}}` in its last."""
    tokens = obj.get("tokens") if isinstance(obj, dict) else None
    if not isinstance(tokens, dict):
        return None
    return Usage(tokens.get("in"), tokens.get("out"), None)


TOY = Spec(_KeyThen(b'"tokens":', b"{"), lambda data: data.count(b'"text":'), _split_usage)


def test_a_dialect_that_reports_input_and_output_in_different_events_gets_both():
    meter = SSEMeter(TOY, strip=False, max_line=1 << 20)
    stream = (b'data: {"tokens":{"in":21}}\n\n' + b'data: {"text":"a"}\n\n' * 3
              + b'data: {"tokens":{"out":3}}\n\n')
    for i in range(0, len(stream), 7):  # cut anywhere: the merge does not depend on reads
        meter.feed(stream[i:i + 7])
    meter.finish()
    assert meter.usage == Usage(21, 3, None)
    assert meter.content_events == 3


def test_a_later_event_s_count_replaces_an_earlier_one_and_a_missing_one_keeps_it():
    first = Usage(prompt_tokens=5, completion_tokens=None, total_tokens=None, cache_read_tokens=2)
    assert first.merged(Usage(7, 4, None)) == Usage(7, 4, None, 2)
    assert first.merged(Usage(None, 9, 14)) == Usage(5, 9, 14, 2)


def test_the_openai_spec_still_takes_the_last_usage_whole():
    meter = SSEMeter(SPECS[OPENAI_CHAT_SSE], strip=False, max_line=1 << 20)
    meter.feed(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\n')
    meter.feed(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":6,"total_tokens":9}}\n\n')
    assert meter.usage == Usage(3, 6, 9)


def test_tgi_says_its_counts_in_response_headers_and_they_are_reported():
    session = plan("/generate", "tgi", body={"inputs": "hello", "parameters": {"max_new_tokens": 3}})
    feed = session.response_started(200, streaming=False,
                                    headers=[(b"x-prompt-tokens", b"7"), (b"x-generated-tokens", b"3")])
    feed(b'{"generated_text":" a b c"}')  # no details: the body says nothing
    session.response_ended()
    assert session.final_usage(200) == (7, 3, None, None, REPORTED)


def test_a_completion_count_without_a_prompt_count_estimates_only_the_prompt():
    session = plan("/generate", "tgi", body={"inputs": "x" * 40, "parameters": {"details": True}})
    feed = session.response_started(200, streaming=False)
    feed(b'{"generated_text":"a","details":{"finish_reason":"length","generated_tokens":5,"prefill":[]}}')
    session.response_ended()
    prompt, completion, _, _, source = session.final_usage(200)
    assert (completion, source) == (5, ESTIMATED) and prompt > 0


def test_a_messages_stream_cut_after_message_start_keeps_the_reported_prompt_and_estimates_the_rest():
    body = {"model": "m", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    session = plan("/v1/messages", "vllm", body=body)
    feed = session.response_started(200, streaming=True)
    feed(b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","usage":'
         b'{"input_tokens":30,"cache_read_input_tokens":12,"output_tokens":0}}}\n\n')
    feed(b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
         b'"delta":{"type":"text_delta","text":"Hi"}}\n\n' * 3)
    # The client left: no message_delta. The prompt is the backend's; only the output is estimated.
    assert session.prompt_reported
    assert session.final_usage(200) == (42, 3, 12, None, ESTIMATED)


def test_sglang_generate_is_read_in_its_own_format_not_tgis():
    session = plan("/generate", "sglang", body={"text": "hello", "stream": True})
    feed = session.response_started(200, streaming=True)
    feed(b'data: {"text":" a","meta_info":{"finish_reason":null,"prompt_tokens":4,"completion_tokens":1}}\n\n')
    feed(b'data: {"text":" a b","meta_info":{"finish_reason":{"type":"length","length":2},"prompt_tokens":4,'
         b'"completion_tokens":2,"cached_tokens":3}}\n\ndata: [DONE]\n\n')
    session.response_ended()
    assert session.final_usage(200) == (4, 2, 3, None, REPORTED)


def test_the_id_of_a_stored_response_is_read_with_its_usage_streamed_or_not():
    body = {"model": "m", "input": "hi", "stream": True}
    session = plan("/v1/responses", "vllm", body=body)
    feed = session.response_started(200, streaming=True)
    feed(b'event: response.created\ndata: {"type":"response.created","response":{"id":"resp_1","object":"response",'
         b'"usage":null}}\n\n')
    assert session.response_id is None  # not parsed: it carries no usage
    feed(b'event: response.completed\ndata: {"type":"response.completed","response":{"id":"resp_1",'
         b'"object":"response","usage":{"input_tokens":5,"output_tokens":2,"total_tokens":7}}}\n\n')
    session.response_ended()
    assert session.response_id == "resp_1" and session.final_usage(200) == (5, 2, None, None, REPORTED)

    session = plan("/v1/responses", "vllm", body={**body, "stream": False})
    session.response_started(200, streaming=False)(
        b'{"id":"resp_2","object":"response","usage":{"input_tokens":5,"output_tokens":2,"total_tokens":7}}')
    session.response_ended()
    assert session.response_id == "resp_2"


def test_chat_responses_have_no_stored_response_id():
    session = plan(body={**CHAT, "stream": False})
    session.response_started(200, streaming=False)(
        b'{"id":"chatcmpl-1","object":"chat.completion","usage":{"prompt_tokens":1,"completion_tokens":1}}')
    session.response_ended()
    assert session.response_id is None


def test_a_translated_body_too_large_to_hold_fails_rather_than_reaching_the_client_in_the_backends_api(monkeypatch):
    from llmproxy.metering import session as session_module
    from llmproxy.translate import PLANS

    monkeypatch.setattr(session_module, "MAX_TRANSLATED_JSON", 10)
    session = MeteringSession.translated(PLANS[("messages", "chat")], {"model": "m"})
    feed = session.response_started(200, False)
    assert feed(b'{"id":') == b""  # held: mapped whole at its end
    with pytest.raises(session_module.TranslatedBodyTooLarge):
        feed(b'"chatcmpl-1","choices":[]}')
