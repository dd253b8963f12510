"""Which APIs a backend serves, read from the routes its engine documents (OpenAPI): an older vLLM without the
Messages and Responses routes gets Claude Code's and Codex's requests translated to chat, with no `apis:` set."""

from __future__ import annotations

import anthropic
import openai
import pytest

from tests.support import NO_PERIODIC_PROBES, mock_posts, start_mock, start_proxy

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def older_vllm(tmp_path_factory):
    """A vLLM mock that lacks /v1/messages and /v1/responses, as releases before them did, behind a proxy that
    is told nothing of it but its type."""
    mock = start_mock("vllm", "--without-route", "/v1/messages", "--without-route", "/v1/responses")
    proxy = start_proxy(tmp_path_factory.mktemp("detect"), [{"url": mock.url, "name": "old", "type": "vllm"}],
                        health_check=NO_PERIODIC_PROBES)
    yield proxy, mock
    proxy.stop()
    mock.stop()


def test_a_messages_request_is_translated_for_a_release_that_documents_no_messages_route(older_vllm):
    proxy, mock = older_vllm
    client = anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0, timeout=TIMEOUT)
    message = client.messages.create(model="m", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert message.stop_reason == "max_tokens" and message.content[0].text
    assert [post["path"] for post in mock_posts(mock)][-1] == "/v1/chat/completions"


def test_a_responses_request_is_translated_too(older_vllm):
    proxy, mock = older_vllm
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    response = client.responses.create(model="m", input="hi", store=False, max_output_tokens=3)
    assert response.output_text and response.usage.output_tokens == 3
    assert [post["path"] for post in mock_posts(mock)][-1] == "/v1/chat/completions"


@pytest.mark.parametrize("hidden", [(), ("/openapi.json",)], ids=["documented", "docs-disabled"])
def test_a_release_that_serves_messages_gets_them_natively(tmp_path, hidden: tuple[str, ...]):
    # vllm serve --disable-fastapi-docs hides its OpenAPI document: the kind's defaults hold then.
    mock = start_mock("vllm", *(arg for path in hidden for arg in ("--without-route", path)))
    proxy = start_proxy(tmp_path, [{"url": mock.url, "type": "vllm"}], health_check=NO_PERIODIC_PROBES)
    try:
        client = anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0, timeout=TIMEOUT)
        client.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        assert [post["path"] for post in mock_posts(mock)][-1] == "/v1/messages"
    finally:
        proxy.stop()
        mock.stop()
