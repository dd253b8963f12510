"""model: auto through the real proxy: routing.auto's rules pick the model, the backend gets the chosen name, and
the record says both; a request no rule fits is a 400 in the client's API shape saying why."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from tests.support import NO_PERIODIC_PROBES, mock_posts, start_mock, start_proxy, usage_config, usage_record

TIMEOUT = 10.0
RULES = [{"model": "tiny", "when": {"max_prompt_tokens": 200, "max_output_tokens": 64, "needs_tools": False}},
         {"model": "big", "when": {"max_prompt_tokens": 2000}}]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    records = tmp_path_factory.mktemp("auto")
    mocks = {name: start_mock("vllm", "--model", name) for name in ("tiny", "big")}
    proxy = start_proxy(records, [{"url": mock.url, "name": name, "type": "vllm"} for name, mock in mocks.items()],
                        routing={"auto": RULES}, usage=usage_config(records), health_check=NO_PERIODIC_PROBES)
    yield proxy, mocks, records
    proxy.stop()
    for mock in mocks.values():
        mock.stop()


def client(proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


@pytest.mark.parametrize(("prompt", "max_tokens", "model"), [("Say hi.", 16, "tiny"), ("Say hi.", 500, "big"),
                                                              ("word " * 400, 16, "big")])
def test_the_first_rule_the_request_meets_picks_the_model_the_backend_gets(fleet, prompt, max_tokens, model):
    proxy, mocks, records = fleet
    raw = client(proxy).chat.completions.with_raw_response.create(
        model="auto", max_tokens=max_tokens, messages=[{"role": "user", "content": prompt}])
    assert raw.parse().model == model
    assert json.loads(mock_posts(mocks[model])[-1]["body"])["model"] == model  # the body was rewritten
    record = usage_record(records, raw.headers["x-request-id"])
    assert (record["model_requested"], record["model"]) == ("auto", model)


def test_a_request_no_rule_fits_is_refused_in_the_clients_shape_saying_why(fleet):
    proxy, mocks, _ = fleet
    before = {name: len(mock_posts(mock)) for name, mock in mocks.items()}
    with pytest.raises(openai.BadRequestError) as raised:
        client(proxy).chat.completions.create(model="auto", messages=[{"role": "user", "content": "word " * 3000}])
    assert "rule 2 (big): prompt ~" in raised.value.message and "> max_prompt_tokens 2000" in raised.value.message
    claude = anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0, timeout=TIMEOUT)
    with pytest.raises(anthropic.BadRequestError) as messages_raised:  # Anthropic's shape on /v1/messages
        claude.messages.create(model="auto", max_tokens=16, messages=[{"role": "user", "content": "word " * 3000}])
    assert "no routing.auto rule fits" in messages_raised.value.message
    assert {name: len(mock_posts(mock)) for name, mock in mocks.items()} == before
