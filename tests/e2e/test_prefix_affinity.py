"""prefix_affinity through the real proxy: each conversation's turns reach one backend of three, the
conversations spread over all of them, and a backend that goes down moves only its own conversations."""

from __future__ import annotations

from collections import Counter

import openai
import pytest

from tests.support import NO_PERIODIC_PROBES, mock_posts, start_mock, start_proxy

TIMEOUT = 10.0
NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    mocks = {name: start_mock("vllm") for name in NAMES}
    proxy = start_proxy(tmp_path_factory.mktemp("affinity"), [
        {"url": mock.url, "name": name, "type": "vllm"} for name, mock in mocks.items()],
        routing={"load_balance": "prefix_affinity", "retries": 2}, health_check=NO_PERIODIC_PROBES)
    yield proxy, mocks
    proxy.stop()
    for mock in mocks.values():
        mock.stop()


def where(mocks, marker: str) -> list[str]:
    """The backends that got a request whose first user message holds `marker`."""
    return [name for name, mock in mocks.items() for post in mock_posts(mock)
            if marker in str(post.get("body", ""))]


def converse(client: openai.OpenAI, marker: str, turns: int) -> None:
    messages = [{"role": "system", "content": "You are a coding agent."},
                {"role": "user", "content": f"Task {marker}: make the parser accept ISO dates."}]
    for turn in range(turns):
        reply = client.chat.completions.create(model="m", messages=messages, max_tokens=2)
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": f"Turn {turn}: go on."}]


def test_each_conversation_stays_on_one_backend_and_conversations_spread(fleet):
    proxy, mocks = fleet
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    markers = [f"conv-{i:02d}" for i in range(24)]
    for marker in markers:
        converse(client, marker, 4)
    homes = {}
    for marker in markers:
        seen = where(mocks, marker)
        assert len(seen) == 4 and len(set(seen)) == 1, (marker, seen)  # every turn on one backend
        homes[marker] = seen[0]
    assert set(Counter(homes.values())) == set(NAMES)  # and the conversations over all three


def test_a_session_header_pins_requests_whatever_their_text(fleet):
    proxy, mocks = fleet
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT,
                           default_headers={"x-session-id": "session-7"})
    for i in range(6):
        client.chat.completions.create(model="m", max_tokens=1,
                                       messages=[{"role": "user", "content": f"pinned-{i} unrelated text"}])
    assert len({name for i in range(6) for name in where(mocks, f"pinned-{i} ")}) == 1
