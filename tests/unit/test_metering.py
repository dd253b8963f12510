"""llmproxy.metering: usage read off streams however they are split, bytes forwarded untouched or stripped exactly.

Every recorded fixture is fed whole, one byte at a time and at random split points, with LF, CRLF and CR line
ends. Expected values come from the fixture's .json (usage) and from a reference parser here that parses every
event as JSON (content events), independent of the meters' byte heuristics.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmproxy.metering import (
    ANTHROPIC_MESSAGES_SSE,
    DIALECTS,
    LLAMACPP_COMPLETION_SSE,
    OLLAMA_NDJSON,
    OPENAI_CHAT_SSE,
    OPENAI_COMPLETIONS_SSE,
    OPENAI_RESPONSES_SSE,
    SGLANG_GENERATE_SSE,
    TGI_GENERATE_SSE,
    Usage,
    meter_for,
    meter_for_json_body,
)
from tests.fixtures.record import SPECS as RECORDED
from tests.support import FIXTURES

SPECS = sorted(FIXTURES.glob("*.json"))
EOLS = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}
STRIPPABLE = (OPENAI_CHAT_SSE, OPENAI_COMPLETIONS_SSE)


@dataclass
class Fixture:
    name: str
    dialect: str
    data: bytes
    usage: tuple[int, int, int] | None
    content_events: int  # counted by the recorder's own parse when it made the fixture


def load(spec: Path) -> Fixture:
    meta = json.loads(spec.read_text())
    usage = meta["usage"]
    expected = (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) if usage else None
    # The recordings name Ollama's two native endpoints apart; both are one dialect here.
    dialect = OLLAMA_NDJSON if meta["dialect"] in ("ollama-chat-ndjson", "ollama-generate-ndjson") else meta["dialect"]
    return Fixture(spec.stem, dialect, (FIXTURES / meta["fixture"]).read_bytes(), expected, meta["content_events"])


ALL = [load(spec) for spec in SPECS]
IDS = [f.name for f in ALL]


def test_recorded_fixtures_are_present():
    # every stream the recorder makes: a missing one must fail here, not drop out of the parametrized tests
    missing = {spec.name for spec in RECORDED} - set(IDS)
    assert not missing, f"recorded streams missing from {FIXTURES}: {sorted(missing)}"


# --- reference parser: whole stream, every event parsed -------------------------------------------------


def ref_events(data: bytes, dialect: str) -> list[bytes]:
    """Data payloads of a whole stream, WHATWG rules (NDJSON: lines); an unterminated last event counts."""
    lines = re.split(rb"\r\n|\r|\n", data)
    if dialect == OLLAMA_NDJSON:
        return [line for line in lines if line]
    events, buf = [], []
    for line in [*lines, b""]:
        if not line:
            if buf:
                events.append(b"\n".join(buf))
            buf = []
            continue
        field, _, value = line.partition(b":")
        if field == b"data":
            buf.append(value[1:] if value.startswith(b" ") else value)
    return events


def is_content(dialect: str, obj: object) -> bool:
    if not isinstance(obj, dict):
        return False
    choices = obj.get("choices") or [{}]
    if dialect == OPENAI_CHAT_SSE:
        delta = choices[0].get("delta") or {}
        return any(delta.get(k) for k in ("content", "reasoning", "reasoning_content", "tool_calls"))
    if dialect == OPENAI_COMPLETIONS_SSE:
        return bool(choices[0].get("text"))
    if dialect == OPENAI_RESPONSES_SSE:
        return str(obj.get("type", "")).endswith(".delta")
    if dialect == TGI_GENERATE_SSE:
        return (obj.get("token") or {}).get("special") is False
    if dialect == ANTHROPIC_MESSAGES_SSE:
        return obj.get("type") == "content_block_delta"
    if dialect == LLAMACPP_COMPLETION_SSE:
        return bool(obj.get("content"))
    if dialect == SGLANG_GENERATE_SSE:
        return isinstance(obj.get("meta_info"), dict)
    message = obj.get("message") or {}
    return any((message.get("content"), message.get("thinking"), message.get("tool_calls"), obj.get("response")))


def ref_content_events(data: bytes, dialect: str) -> int:
    count = 0
    for payload in ref_events(data, dialect):
        with contextlib.suppress(orjson.JSONDecodeError):
            count += is_content(dialect, orjson.loads(payload))
    return count


def is_usage_only(block: bytes) -> bool:
    for payload in ref_events(block, OPENAI_CHAT_SSE):
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict):
            return True
    return False


# --- feeding helpers ------------------------------------------------------------------------------------


def chunks_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(set(c for c in cuts if 0 < c < len(data))), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def run(dialect: str, chunks: list[bytes], **kwargs) -> tuple[bytes, object]:
    meter = meter_for(dialect, **kwargs)
    out = []
    for chunk in chunks:
        forwarded = meter.feed(chunk)
        if not kwargs.get("strip_usage_event"):
            assert forwarded is chunk  # passed through, not copied
        out.append(forwarded)
    out.append(meter.finish())
    return b"".join(out), meter


def triple(usage: Usage | None) -> tuple[int, int, int] | None:
    """Prompt (cache reads and writes included), completion, total: Messages streams report no total."""
    if usage is None:
        return None
    total = usage.total_tokens
    return usage.prompt, usage.completion_tokens, usage.prompt + usage.completion_tokens if total is None else total


def variant(fx: Fixture, eol: str) -> bytes:
    if eol == "cr" and fx.dialect == OLLAMA_NDJSON:
        pytest.skip("NDJSON lines end in LF (or CRLF); a lone CR is not a line end there")
    return fx.data.replace(b"\n", EOLS[eol])


def check_passthrough(fx: Fixture, eol: str, chunks: list[bytes]) -> None:
    data = variant(fx, eol)
    out, meter = run(fx.dialect, chunks)
    assert out == data
    assert triple(meter.usage) == fx.usage
    assert meter.content_events == ref_content_events(data, fx.dialect)
    assert not meter.overflowed


@pytest.mark.parametrize("eol", EOLS)
@pytest.mark.parametrize("fx", ALL, ids=IDS)
def test_fixture_whole_and_byte_at_a_time(fx: Fixture, eol: str):
    data = variant(fx, eol)
    check_passthrough(fx, eol, [data])
    check_passthrough(fx, eol, [data[i : i + 1] for i in range(len(data))])


@pytest.mark.parametrize("eol", EOLS)
@pytest.mark.parametrize("fx", ALL, ids=IDS)
@settings(max_examples=100, deadline=None)
@given(cuts=st.data())
def test_fixture_random_splits(fx: Fixture, eol: str, cuts: st.DataObject):
    data = variant(fx, eol)
    points = cuts.draw(st.lists(st.integers(1, len(data) - 1), max_size=60))
    check_passthrough(fx, eol, chunks_at(data, points))


BY_NAME = {fx.name: fx for fx in ALL}


@pytest.mark.parametrize("fx", ALL, ids=IDS)
def test_fixture_content_events_match_the_recordings(fx: Fixture):
    # The reference parser agrees with what the recorder counted when it made the fixture...
    assert ref_content_events(fx.data, fx.dialect) == fx.content_events


def test_fixture_content_events_are_what_the_recorder_asked_the_mock_for():
    # ...and both agree with the requests behind the recordings (x-mock-tokens, x-mock-error-after).
    assert ref_content_events(BY_NAME["vllm_chat_stream_with_usage"].data, OPENAI_CHAT_SSE) == 12
    assert ref_content_events(BY_NAME["vllm_error_midstream"].data, OPENAI_CHAT_SSE) == 8
    assert ref_content_events(BY_NAME["ollama_chat"].data, OLLAMA_NDJSON) == 22
    assert ref_content_events(BY_NAME["ollama_chat_error_midstream"].data, OLLAMA_NDJSON) == 5
    assert ref_content_events(BY_NAME["tgi_generate_stream"].data, TGI_GENERATE_SSE) == 17


# --- strip mode -----------------------------------------------------------------------------------------


@dataclass
class Block:
    raw: bytes  # one event with its terminating blank line
    keep: bool


def fixture_blocks(fx: Fixture, eol: str) -> list[Block]:
    pieces, start = [], 0
    while (end := fx.data.find(b"\n\n", start)) != -1:
        pieces.append(fx.data[start : end + 2])
        start = end + 2
    assert start == len(fx.data)
    return [Block(p.replace(b"\n", EOLS[eol]), not is_usage_only(p)) for p in pieces]


def check_strip(dialect: str, blocks: list[Block], chunks: list[bytes], usage: tuple[int, int, int] | None):
    """Fed `chunks`, the meter forwards exactly the kept blocks, each one from the feed that completed it."""
    data = b"".join(b.raw for b in blocks)
    assert b"".join(chunks) == data
    expected = b"".join(b.raw for b in blocks if b.keep)
    due, ipos, opos = [], 0, 0  # (input consumed, output owed by then)
    for block in blocks:
        ipos += len(block.raw)
        opos += len(block.raw) if block.keep else 0
        lag = 1 if block.raw.endswith(b"\r\n") else 0  # complete at the CR; its LF comes with the next byte
        due.append((ipos - lag, opos - (lag if block.keep else 0)))
    meter = meter_for(dialect, strip_usage_event=True)
    out, consumed = b"", 0
    for chunk in chunks:
        out += meter.feed(chunk)
        consumed += len(chunk)
        assert expected.startswith(out)
        owed = max((o for i, o in due if i <= consumed), default=0)
        assert len(out) >= owed, f"an event completed at {consumed} was held back"
    out += meter.finish()
    assert out == expected
    assert triple(meter.usage) == usage


STRIP_FIXTURES = [fx for fx in ALL if fx.dialect in STRIPPABLE]


@pytest.mark.parametrize("eol", EOLS)
@pytest.mark.parametrize("fx", STRIP_FIXTURES, ids=[f.name for f in STRIP_FIXTURES])
def test_strip_whole_and_byte_at_a_time(fx: Fixture, eol: str):
    blocks = fixture_blocks(fx, eol)
    data = variant(fx, eol)
    # exactly the usage-only event goes, when there is one
    assert sum(not b.keep for b in blocks) == (1 if fx.usage else 0)
    check_strip(fx.dialect, blocks, [data], fx.usage)
    check_strip(fx.dialect, blocks, [data[i : i + 1] for i in range(len(data))], fx.usage)
    check_strip(fx.dialect, blocks, [b.raw for b in blocks], fx.usage)


@pytest.mark.parametrize("eol", EOLS)
@pytest.mark.parametrize("fx", STRIP_FIXTURES, ids=[f.name for f in STRIP_FIXTURES])
@settings(max_examples=100, deadline=None)
@given(cuts=st.data())
def test_strip_random_splits(fx: Fixture, eol: str, cuts: st.DataObject):
    data = variant(fx, eol)
    points = cuts.draw(st.lists(st.integers(1, len(data) - 1), max_size=60))
    check_strip(fx.dialect, fixture_blocks(fx, eol), chunks_at(data, points), fx.usage)


def test_strip_keeps_tgi_completions_usage_on_a_chunk_with_choices():
    final = (b'data: {"object":"text_completion","id":"","created":1,"choices":[{"index":0,"text":".",'
             b'"logprobs":null,"finish_reason":"eos_token"}],"model":"m","system_fingerprint":"3.3.7",'
             b'"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}\n\n')
    first = (b'data: {"object":"text_completion","id":"","created":1,"choices":[{"index":0,"text":"Hi",'
             b'"logprobs":null,"finish_reason":""}],"model":"m","system_fingerprint":"3.3.7"}\n\n')
    data = first + final + b"data: [DONE]\n\n"
    out, meter = run(OPENAI_COMPLETIONS_SSE, [data], strip_usage_event=True)
    assert out == data
    assert triple(meter.usage) == (5, 2, 7)
    assert meter.content_events == 2


def test_strip_ollama_completions_zero_usage_then_usage_only():
    def chunk(text: str, usage: dict, choices: bool = True) -> bytes:
        body = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                "choices": [{"text": text, "index": 0, "finish_reason": None}] if choices else [], "usage": usage}
        return b"data: " + orjson.dumps(body) + b"\n\n"

    zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    last = chunk("", {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}, choices=False)
    kept = chunk("a", zero) + chunk("b", zero) + chunk("c", zero)
    out, meter = run(OPENAI_COMPLETIONS_SSE, [kept + last + b"data: [DONE]\n\n"], strip_usage_event=True)
    assert out == kept + b"data: [DONE]\n\n"
    assert triple(meter.usage) == (9, 3, 12)


def test_strip_removes_an_unterminated_usage_event_at_the_end():
    head = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
    tail = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}'
    for end in (b"", b"\n"):
        out, meter = run(OPENAI_CHAT_SSE, [head, tail + end], strip_usage_event=True)
        assert out == head
        assert triple(meter.usage) == (1, 1, 2)


def test_strip_removes_a_usage_event_without_choices_and_keeps_everything_else():
    # A naive client indexes choices[0]: an event with usage and no choices at all crashes it the same way.
    kept = [b": ping\n\n", b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n', b"event: x\n\n"]
    usage = b'data: {"id":"c","usage":{"prompt_tokens":4,"completion_tokens":1,"total_tokens":5}}\n\n'
    out, meter = run(OPENAI_CHAT_SSE, [kept[0], kept[1] + usage + kept[2], b"data: [DONE]\n\n"],
                     strip_usage_event=True)
    assert out == b"".join(kept) + b"data: [DONE]\n\n"
    assert triple(meter.usage) == (4, 1, 5)


def test_empty_reads_pass_through():
    for dialect in DIALECTS:
        meter = meter_for(dialect)
        assert meter.feed(b"") == b"" and meter.finish() == b"" and meter.usage is None


def test_strip_is_refused_where_there_is_no_usage_only_event():
    for dialect in (OPENAI_RESPONSES_SSE, TGI_GENERATE_SSE, OLLAMA_NDJSON):
        with pytest.raises(ValueError):
            meter_for(dialect, strip_usage_event=True)


# --- generated streams: mixed line ends, comments, named events, multi-line data, garbage ---------------


def _chunk(text: str, usage: object = "absent", choices: bool = True) -> dict:
    body: dict = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                  "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}] if choices else []}
    if usage != "absent":
        body["usage"] = usage
    return body


_usage_st = st.tuples(st.integers(0, 10**6), st.integers(0, 10**6))
# (kind, payload lines, content?, usage?, keep?)
_event_st = st.one_of(
    st.text(max_size=12).map(lambda t: ("content", [orjson.dumps(_chunk(t))], bool(t), None, True)),
    st.tuples(_usage_st, st.booleans()).map(lambda a: (
        "usage", [orjson.dumps(_chunk("", {"prompt_tokens": a[0][0], "completion_tokens": a[0][1]}, a[1]))],
        False, a[0], a[1])),
    st.just(("null", [orjson.dumps(_chunk("", None))], False, None, True)),
    st.tuples(_usage_st, st.integers(1, 60)).map(lambda a: (  # one JSON split over data lines at a key
        "multiline", [b'{"choices":[],', b'"usage":{"prompt_tokens":%d,' % a[0][0],
                      b'"completion_tokens":%d}}' % a[0][1]], False, a[0], False)),
    st.sampled_from([
        ("comment", [], False, None, True),
        ("malformed", [b"{not json"], False, None, True),
        ("truncated", [b'{"choices":[],"usage":{"prompt_tokens":1'], False, None, True),
        ("badcount", [b'{"choices":[],"usage":{"prompt_tokens":"7","completion_tokens":true}}'], False, None, True),
        ("done", [b"[DONE]"], False, None, True),
    ]),
)


@st.composite
def sse_streams(draw):
    """A list of (block bytes, keep) plus the expected usage and content count."""
    blocks, usage, content = [], None, 0
    prev_eol = b"\n"
    for kind, payloads, has_content, event_usage, keep in draw(st.lists(_event_st, max_size=12)):
        lines = []
        if kind == "comment" or draw(st.booleans()):
            lines.append(draw(st.sampled_from([b":", b": ping", b":keep-alive"])))
        if draw(st.booleans()):
            lines.append(b"event: message")
        for payload in payloads:
            lines.append((b"data: " if draw(st.booleans()) else b"data:") + payload)
        raw = b""
        for line in [*lines, b""]:
            eols = [b"\r", b"\r\n"] if not line and prev_eol == b"\r" else [b"\n", b"\r\n", b"\r"]
            prev_eol = draw(st.sampled_from(eols))  # a CR then an LF-only blank line would read as one CRLF
            raw += line + prev_eol
        blocks.append(Block(raw, keep))
        content += has_content
        if event_usage is not None:
            usage = (event_usage[0], event_usage[1], event_usage[0] + event_usage[1])
    return blocks, usage, content


@settings(max_examples=300, deadline=None)
@given(stream=sse_streams(), cuts=st.lists(st.integers(1, 4000), max_size=40))
def test_generated_streams_pass_through_and_meter(stream, cuts):
    blocks, usage, content = stream
    data = b"".join(b.raw for b in blocks)
    out, meter = run(OPENAI_CHAT_SSE, chunks_at(data, cuts))
    assert out == data
    assert triple(meter.usage) == usage
    assert meter.content_events == content


@settings(max_examples=300, deadline=None)
@given(stream=sse_streams(), cuts=st.lists(st.integers(1, 4000), max_size=40))
def test_generated_streams_strip_exactly_the_usage_only_events(stream, cuts):
    blocks, usage, _ = stream
    data = b"".join(b.raw for b in blocks)
    check_strip(OPENAI_CHAT_SSE, blocks, chunks_at(data, cuts), usage)


MIXED = [  # every kind of line end, CRs right before other lines, a usage-only event in the middle
    Block(b': c\rdata: {"choices":[{"delta":{"content":"x"}}]}\n\r', True),
    Block(b'data:{"choices":[],\r\ndata:"usage":{"prompt_tokens":1,"completion_tokens":2}}\r\r', False),
    Block(b"event: e\r\ndata: [DONE]\r\n\r\n", True),
]


def test_mixed_line_ends_at_every_pair_of_split_points():
    data = b"".join(b.raw for b in MIXED)
    for i in range(1, len(data)):
        for j in range(i, len(data), 7):
            chunks = chunks_at(data, [i, j])
            check_strip(OPENAI_CHAT_SSE, MIXED, chunks, (1, 2, 3))
            out, meter = run(OPENAI_CHAT_SSE, chunks)
            assert out == data and triple(meter.usage) == (1, 2, 3) and meter.content_events == 1


def test_strip_holds_back_at_most_the_cap():
    # An event that never ends (lines without a blank one) is not held back past max_line: forwarded as is.
    data = b"".join(b": comment line %d\n" % i for i in range(100))
    meter = meter_for(OPENAI_CHAT_SSE, strip_usage_event=True, max_line=200)
    out = b"".join(meter.feed(data[i : i + 50]) for i in range(0, len(data), 50))
    assert meter.overflowed and out == data and meter.finish() == b""


# --- other dialect details ------------------------------------------------------------------------------


def _responses_stream() -> bytes:
    def event(kind: str, body: dict) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **body}) + b"\n\n"

    response = {"id": "resp_1", "object": "response", "status": "in_progress", "usage": None}
    parts = [event("response.created", {"response": response, "sequence_number": 0})]
    for i, text in enumerate(["The", " sky", "", " is"]):
        parts.append(event("response.output_text.delta",
                           {"content_index": 0, "delta": text, "item_id": "msg_1", "output_index": 0,
                            "sequence_number": i + 1}))
    usage = {"input_tokens": 11, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 5,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 16}
    done = {**response, "status": "completed", "output": [{"type": "message", "content": [
        {"type": "output_text", "text": 'The sky is "usage":{ blue'}]}], "usage": usage}
    parts.append(event("response.completed", {"response": done, "sequence_number": 9}))
    return b"".join(parts)


def test_responses_stream_usage_from_response_completed():
    data = _responses_stream()
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        out, meter = run(OPENAI_RESPONSES_SSE, chunks)
        assert out == data
        assert meter.usage == Usage(11, 5, 16, cache_read_tokens=4)
        assert meter.content_events == 4 == ref_content_events(data, OPENAI_RESPONSES_SSE)


def test_old_tgi_without_space_after_data():
    fx = BY_NAME["tgi_generate_stream"]
    data = fx.data.replace(b"data: ", b"data:")
    out, meter = run(TGI_GENERATE_SSE, [data])
    assert out == data and triple(meter.usage) == fx.usage and meter.content_events == 17


def test_tgi_stream_without_details_has_no_usage_but_counts_tokens():
    fx = BY_NAME["tgi_generate_stream"]
    data = re.sub(rb'"details":\{[^}]*\}', b'"details":null', fx.data)
    assert data != fx.data
    _, meter = run(TGI_GENERATE_SSE, [data])
    assert meter.usage is None and meter.content_events == 17


def test_tgi_top_tokens_are_not_counted_as_events():
    event = (b'data: {"index":1,"token":{"id":1,"text":"a","logprob":-0.1,"special":false},"top_tokens":'
             b'[{"id":1,"text":"a","logprob":-0.1,"special":false},{"id":2,"text":"b","logprob":-2.0,'
             b'"special":false}],"generated_text":null,"details":null}\n\n')
    _, meter = run(TGI_GENERATE_SSE, [event * 3])
    assert meter.content_events == 3


def test_cached_tokens_and_last_usage_wins_over_a_later_null():
    usage = {"prompt_tokens": 40, "total_tokens": 45, "completion_tokens": 5,
             "prompt_tokens_details": {"cached_tokens": 32}}
    data = (b"data: " + orjson.dumps(_chunk("", {"prompt_tokens": 1, "completion_tokens": 1}))
            + b"\n\ndata: " + orjson.dumps(_chunk("", usage, choices=False))
            + b"\n\ndata: " + orjson.dumps(_chunk("x", None)) + b"\n\ndata: [DONE]\n\n")
    _, meter = run(OPENAI_CHAT_SSE, [data])
    assert meter.usage == Usage(40, 5, 45, cache_read_tokens=32)


def test_ollama_load_and_unload_lines_are_not_billed():
    load = b'{"model":"llama3.2","created_at":"2026-05-17T10:10:00Z","message":{"role":"assistant","content":""},' \
           b'"done_reason":"load","done":true}\n'
    _, meter = run(OLLAMA_NDJSON, [load, load.replace(b'"load"', b'"unload"')])
    assert meter.usage is None and meter.content_events == 0


def test_ollama_missing_metrics_default_to_zero_and_unterminated_last_line_counts():
    line = b'{"model":"m","created_at":"t","response":"","done":true,"done_reason":"stop","eval_count":4}'
    _, meter = run(OLLAMA_NDJSON, [line[:30], line[30:]])
    assert meter.usage == Usage(0, 4, 4)


# --- bounds and garbage ---------------------------------------------------------------------------------


@pytest.mark.parametrize("strip", [False, True])
@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_line_over_the_cap_stops_metering_but_not_forwarding(dialect: str, strip: bool):
    if strip and dialect not in STRIPPABLE:
        return
    head = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
    line = b'data: {"usage":{"prompt_tokens":1,"completion_tokens":1},"x":"' + b"a" * (2 << 20)
    data = head + line + b'"}\n\n'
    for size in (len(data), 65536, 1000):
        out, meter = run(dialect, chunks_at(data, list(range(size, len(data), size))), strip_usage_event=strip)
        assert out == data
        assert meter.overflowed and meter.usage is None


def test_usage_read_before_an_overflow_is_kept():
    event = b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3}}\n\n'
    data = event + b"data: " + b"x" * 5000
    for strip in (False, True):
        out, meter = run(OPENAI_CHAT_SSE, [data[:100], data[100:]], max_line=1000, strip_usage_event=strip)
        assert meter.overflowed and triple(meter.usage) == (2, 3, 5)
        assert out == (data[len(event):] if strip else data)


def test_the_cap_is_on_lines_not_on_chunks():
    event = b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3}}\n\n'
    out, meter = run(OPENAI_CHAT_SSE, [event * 100], max_line=len(event))
    assert not meter.overflowed and triple(meter.usage) == (2, 3, 5) and out == event * 100
    _, meter = run(OPENAI_CHAT_SSE, [event[:30], event[30:]], max_line=len(event) - 10)
    assert meter.overflowed and meter.usage is None


GARBAGE = [
    b"data: {not json\n\n",
    b'data: {"usage":{\n\n',
    b'data: {"usage":{"prompt_tokens":1}\n\n',
    b'data: [1, "usage":{]\n\n',
    b'data: "usage": {"a"}\n\n',
    b'data: {"usage":{"prompt_tokens":-1,"completion_tokens":[]}}\n\n',
    b'data: {"details":{"generated_tokens":"x"}}\n\n',
    b'data: {"response":{"usage":{"input_tokens":null}}}\n\n',
    b'data: {"usage":{}}\n\n',
    b'{"done":true,"done_reason":"stop","eval_count":"9"\n',
    b'{"done":true}x\n',
    b"data: \xff\xfe\x00\x80\n\n\r\r\n\n",
    b'"done": true "usage": { "details": {\n\n',
]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_malformed_lines_never_raise(dialect: str):
    for garbage in GARBAGE:
        for strip in (False, True) if dialect in STRIPPABLE else (False,):
            out, meter = run(dialect, [garbage[:7], garbage[7:]], strip_usage_event=strip)
            assert out == garbage
            assert meter.usage is None


@settings(max_examples=200, deadline=None)
@given(data=st.lists(st.sampled_from([b"data:", b" ", b"\n", b"\r", b'"usage":{', b'"done":true', b"}", b"{",
                                      b'"details":{', b'"content":"', b"\xff", b":", b"[DONE]"]), max_size=40),
       cuts=st.lists(st.integers(1, 200), max_size=10))
def test_random_garbage_never_raises_and_passes_through(data, cuts):
    stream = b"".join(data)
    for dialect in DIALECTS:
        out, _ = run(dialect, chunks_at(stream, cuts))
        assert out == stream


# --- non-streamed JSON bodies ---------------------------------------------------------------------------

BODIES = [
    (OPENAI_CHAT_SSE, {"id": "c", "object": "chat.completion", "choices": [], "usage": {
        "prompt_tokens": 38, "total_tokens": 51, "completion_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 16}}}, Usage(38, 13, 51, 16)),
    (OPENAI_CHAT_SSE, {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}, Usage(3, 4, 7)),
    (OPENAI_CHAT_SSE, {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4,
                                                "prompt_tokens_details": None}}, Usage(3, 4, 7)),
    (OPENAI_COMPLETIONS_SSE, {"object": "text_completion", "usage": {
        "prompt_tokens": 5, "total_tokens": 13, "completion_tokens": 8}}, Usage(5, 8, 13)),
    (OPENAI_RESPONSES_SSE, {"object": "response", "usage": {
        "input_tokens": 11, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 5,
        "total_tokens": 16}}, Usage(11, 5, 16, 0)),
    (TGI_GENERATE_SSE, {"generated_text": "x", "details": {
        "finish_reason": "length", "generated_tokens": 20, "seed": None,
        "prefill": [{"id": 1, "text": "a", "logprob": None}, {"id": 2, "text": "b", "logprob": -1.0}]}},
     Usage(2, 20, 22)),
    # The prompt is not in the body (no input_length, no prefill): unknown, for the record to estimate.
    (TGI_GENERATE_SSE, {"generated_text": "x", "details": {"finish_reason": "length", "generated_tokens": 20}},
     Usage(None, 20, None)),
    (TGI_GENERATE_SSE, [{"generated_text": "x", "details": {"generated_tokens": 3, "prefill": []}}],
     Usage(None, 3, None)),
    (TGI_GENERATE_SSE, {"generated_text": "x"}, None),
    (OLLAMA_NDJSON, {"model": "m", "message": {"role": "assistant", "content": "hi"}, "done": True,
                     "done_reason": "stop", "total_duration": 1, "prompt_eval_count": 33, "eval_count": 22},
     Usage(33, 22, 55)),
    (OLLAMA_NDJSON, {"model": "m", "response": "hi", "done": True, "done_reason": "stop", "eval_count": 2},
     Usage(0, 2, 2)),
    (OLLAMA_NDJSON, {"model": "m", "response": "", "done": True, "done_reason": "load"}, None),
    (OPENAI_CHAT_SSE, {"error": {"message": "bad", "type": "BadRequestError", "param": None, "code": 400}}, None),
    (OPENAI_CHAT_SSE, {"error": "Unauthorized"}, None),
    (OLLAMA_NDJSON, {"error": "model \"x\" not found, try pulling it first"}, None),
    # llama.cpp: its OpenAI routes put the slot cache's reuse in timings when prompt_tokens_details lacks it.
    (OPENAI_CHAT_SSE, {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
                       "timings": {"cache_n": 4, "prompt_n": 5}}, Usage(9, 2, 11, 4)),
    (LLAMACPP_COMPLETION_SSE, {"content": "hi", "stop": True, "tokens_predicted": 7, "tokens_evaluated": 30,
                               "generation_settings": {"stop": []}, "timings": {"cache_n": 24, "prompt_n": 6}},
     Usage(30, 7, 37, 24)),
    (LLAMACPP_COMPLETION_SSE, {"content": " tok", "stop": False, "tokens_predicted": 1, "tokens_evaluated": 30},
     None),  # a partial chunk: only the last one is read
    (SGLANG_GENERATE_SSE, {"text": "x", "meta_info": {"id": "a", "finish_reason": {"type": "length", "length": 4},
                                                      "prompt_tokens": 12, "completion_tokens": 4,
                                                      "cached_tokens": 8}}, Usage(12, 4, 16, 8)),
    # A batch: one answer per prompt, summed.
    (SGLANG_GENERATE_SSE, [{"meta_info": {"prompt_tokens": 3, "completion_tokens": 2, "cached_tokens": 0}},
                           {"meta_info": {"prompt_tokens": 5, "completion_tokens": 1, "cached_tokens": 2}}],
     Usage(8, 3, 11, 2)),
    (ANTHROPIC_MESSAGES_SSE, {"type": "message", "usage": {"input_tokens": 10, "output_tokens": 3,
                                                           "cache_read_input_tokens": 20,
                                                           "cache_creation_input_tokens": 5}},
     Usage(None, 3, None, 20, 5, 10)),
]


@pytest.mark.parametrize(("dialect", "body", "expected"), BODIES)
def test_json_bodies(dialect: str, body: object, expected: Usage | None):
    assert meter_for_json_body(orjson.dumps(body), dialect) == expected


@pytest.mark.parametrize("dialect", DIALECTS)
def test_json_bodies_malformed(dialect: str):
    for body in (b"", b"{", b"null", b"[]", b'"usage"', b"\xff", b'{"usage":null,"details":null}'):
        assert meter_for_json_body(body, dialect) is None


def test_unknown_dialects_are_refused_and_fixture_aliases_accepted():
    with pytest.raises(ValueError):
        meter_for("openai-chat")
    with pytest.raises(ValueError):
        meter_for_json_body(b"{}", "sse")
    for alias in ("ollama-chat-ndjson", "ollama-generate-ndjson"):
        meter = meter_for(alias)
        meter.feed(b'{"done":true,"done_reason":"stop","prompt_eval_count":1,"eval_count":2}\n')
        assert meter.usage == Usage(1, 2, 3)


# --- paths ----------------------------------------------------------------------------------------------


def _burst(events: int) -> tuple[bytes, bytes]:
    """A whole chat stream in one read, as a fast backend sends it, and its usage-only event."""
    chunk = b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"t%d"}}]}\n\n'
    usage = (b'data: {"id":"x","object":"chat.completion.chunk","choices":[],'
             b'"usage":{"prompt_tokens":5,"completion_tokens":%d,"total_tokens":%d}}\n\n' % (events, events + 5))
    body = b"".join(chunk % i for i in range(events))
    return body + usage + b"data: [DONE]\n\n", usage


@pytest.mark.parametrize("strip", [True, False])
def test_a_whole_burst_in_one_read_is_parsed_only_where_usage_is(strip):
    data, usage_event = _burst(64)
    meter = meter_for("openai-chat-sse", strip_usage_event=strip)
    out = meter.feed(data)
    assert meter.finish() == b""
    assert meter.usage.completion_tokens == 64 and meter.content_events == 64
    if strip:
        assert out == data.replace(usage_event, b"")
    else:
        assert out is data  # nothing changed: the same object goes on, no copy


def test_a_usage_marker_inside_a_content_string_is_not_usage():
    # The marker escaped inside a string cannot match; a real "usage": null is not an object either.
    data = (b'data: {"choices":[{"delta":{"content":"say \\"usage\\": {1}"}}],"usage":null}\n\n'
            b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}\n\n')
    meter = meter_for("openai-chat-sse", strip_usage_event=True)
    assert meter.feed(data) == data.split(b"\n\n")[0] + b"\n\n"
    assert meter.usage.total_tokens == 3
