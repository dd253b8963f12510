"""HuggingFace's own TGI clients through the proxy: they call TGI's compat route `POST /`, streaming or not
by the body; both answers are relayed as TGI sent them and metered with TGI's own counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import InferenceClient
from text_generation import Client

from llmproxy.mockbackend import TEMPLATES, prompt_tokens
from tests.support import start_mock, start_proxy, wait_for

PROMPT = "Write one short sentence about the sea."


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp_path: Path = tmp_path_factory.mktemp("tgi-clients")
    mock = start_mock("tgi", "--tokens", "6")
    usage = tmp_path / "usage.jsonl"
    proxy = start_proxy(tmp_path, [{"url": mock.url, "name": "tgi", "type": "tgi"}],
                        usage={"enabled": True, "spool_dir": str(tmp_path / "spool"),
                               "reporters": [{"name": "f", "type": "file", "file": {"path": str(usage)}}]})
    yield proxy, usage
    proxy.stop()
    mock.stop()


def _record(usage: Path, count: int) -> dict:
    lines = wait_for(lambda: len(usage.read_text().splitlines()) >= count if usage.exists() else False, timeout=5)
    assert lines
    return json.loads(usage.read_text().splitlines()[count - 1])


EXPECTED_PROMPT = prompt_tokens({"inputs": PROMPT}, TEMPLATES["tgi"])


def test_text_generation_client_generate_and_stream(setup):
    proxy, usage = setup
    client = Client(proxy.url, timeout=10)
    response = client.generate(PROMPT, max_new_tokens=4)
    assert response.details.generated_tokens == 4 and response.generated_text
    record = _record(usage, 1)
    assert (record["endpoint"], record["usage_source"]) == ("/", "reported")
    assert (record["prompt_tokens"], record["completion_tokens"]) == (EXPECTED_PROMPT, 4)

    tokens = [r.token.text for r in client.generate_stream(PROMPT, max_new_tokens=5)]
    assert len(tokens) == 5
    record = _record(usage, 2)
    assert record["is_stream"] and record["usage_source"] == "reported"  # from the stream's last details
    assert (record["prompt_tokens"], record["completion_tokens"]) == (EXPECTED_PROMPT, 5)


@pytest.mark.parametrize("stream", [False, True])
def test_huggingface_hub_inference_client_text_generation(setup, stream: bool):
    proxy, usage = setup
    before = len(usage.read_text().splitlines()) if usage.exists() else 0
    client = InferenceClient(model=proxy.url, timeout=10)
    if stream:
        pieces = list(client.text_generation(PROMPT, max_new_tokens=3, stream=True))
        assert len(pieces) == 3
    else:
        text = client.text_generation(PROMPT, max_new_tokens=3)
        assert isinstance(text, str) and text
    record = _record(usage, before + 1)
    assert record["endpoint"] == "/" and record["completion_tokens"] == 3 and record["status"] == 200
    if stream:  # asked without details the stream reports no usage: TGI's tokenizer counts the prompt after
        assert (record["usage_source"], record["is_stream"]) == ("tokenized", True)
        assert record["prompt_tokens"] == EXPECTED_PROMPT
    else:  # TGI's x-prompt-tokens / x-generated-tokens headers
        assert (record["usage_source"], record["prompt_tokens"]) == ("reported", EXPECTED_PROMPT)
