"""The model a response says generated it, read by metering with the usage (for the trace span's
gen_ai.response.model): from recorded streams of each shape, and from a whole JSON body."""

from __future__ import annotations

import json

import pytest

from llmproxy.metering import meter_for, read_json_body
from llmproxy.metering.dialects import (
    ANTHROPIC_MESSAGES_SSE,
    OLLAMA_NDJSON,
    OPENAI_CHAT_SSE,
    OPENAI_RESPONSES_SSE,
    TGI_GENERATE_SSE,
)
from tests.support import FIXTURES


@pytest.mark.parametrize(("fixture", "dialect", "model"), [
    ("vllm_chat_stream_with_usage.sse", OPENAI_CHAT_SSE, "Qwen/Qwen2.5-7B-Instruct"),
    ("vllm_messages_stream.sse", ANTHROPIC_MESSAGES_SSE, "Qwen/Qwen2.5-7B-Instruct"),  # in message_start
    ("ollama_chat.ndjson", OLLAMA_NDJSON, "llama3.2"),
    ("vllm_chat_stream_no_usage.sse", OPENAI_CHAT_SSE, None),  # no usage event: nothing is parsed
    ("tgi_generate_stream.sse", TGI_GENERATE_SSE, None),  # TGI's native stream names no model
])
def test_a_streams_model_is_read_with_its_usage(fixture, dialect, model):
    meter = meter_for(dialect)
    meter.feed((FIXTURES / fixture).read_bytes())
    meter.finish()
    assert meter.response_model == model


def test_responses_stream_names_the_model_in_its_completed_response():
    meter = meter_for(OPENAI_RESPONSES_SSE)
    meter.feed((FIXTURES / "vllm_responses_stream.sse").read_bytes())
    meter.finish()
    assert meter.response_model and meter.usage is not None


def test_a_json_bodys_model():
    body = json.dumps({"id": "c1", "model": "served-name", "choices": [],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 2}}).encode()
    usage, _, model = read_json_body(body, OPENAI_CHAT_SSE)
    assert usage is not None and model == "served-name"
    assert read_json_body(b"not json", OPENAI_CHAT_SSE) == (None, None, None)
