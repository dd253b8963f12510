"""Usage records delivered to a webhook by the real proxy process: signed, retried, never lost.

The consumer (tests/webhook_consumer.py) verifies signatures with its own implementation of Standard Webhooks.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import (
    REPO,
    STREAM_CHAT,
    Proc,
    ResponseReader,
    metric_value,
    post_request,
    raw_connect,
    usage_config,
    wait_for,
    write_config,
)
from tests.webhook_consumer import Answer, WebhookConsumer

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class ThreadedConsumer:
    """The asyncio consumer on its own loop in a thread, driven from synchronous tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.consumer = self.call(self._make())

    async def _make(self) -> WebhookConsumer:
        return await WebhookConsumer(secret=SECRET).up()

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def up(self) -> None:
        self.call(self.consumer.up())

    def down(self) -> None:
        self.call(self.consumer.down())

    def close(self) -> None:
        self.call(self.consumer.down())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def consumer():
    threaded = ThreadedConsumer()
    yield threaded
    threaded.close()


def _config(tmp_path, mock_vllm, consumer: ThreadedConsumer, **webhook):
    hook = {"url": consumer.consumer.url, "timeout": "2s", "secret": SECRET, "backoff_base": "50ms",
            "backoff_cap": "500ms", **webhook}
    usage = usage_config(tmp_path, {"name": "billing", "type": "webhook", "webhook": hook}, flush_interval="50ms")
    return write_config(tmp_path, [{"url": mock_vllm.url}], usage=usage)


def _serve(config_path) -> Proc:
    return Proc(["serve", "--config", str(config_path)]).wait_listening()


def _one_stream(port: int) -> str:
    with raw_connect(port) as sock:
        sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT, {"x-mock-tokens": "2"}))
        reader = ResponseReader(sock).read_head()
        _, complete = reader.read_body()
        assert complete
        return reader.headers["x-request-id"]


def test_record_is_delivered_signed_with_the_request_id(tmp_path, mock_vllm, consumer, procs):
    proxy = _serve(_config(tmp_path, mock_vllm, consumer))
    procs.append(proxy)
    request_id = _one_stream(proxy.port)
    wait_for(lambda: request_id in consumer.consumer.delivered_ids(), timeout=10)
    received = [r for r in consumer.consumer.received if r.webhook_id == request_id]
    assert len(received) == 1 and received[0].signature_ok is True
    record = received[0].record
    assert record["request_id"] == request_id and record["usage_source"] == "reported"
    assert record["completion_tokens"] == 2
    assert received[0].headers["content-type"] == "application/json"
    # delivered: the outbox gauge says nothing is pending (it once kept the count of the last commit)
    wait_for(lambda: metric_value(proxy, "llmproxy_usage_outbox_pending") == 0, timeout=5)


def test_consumer_down_30s_while_300_requests_complete_loses_nothing(tmp_path, mock_vllm, consumer, procs):
    consumer.down()
    proxy = _serve(_config(tmp_path, mock_vllm, consumer, backoff_cap="2s"))
    procs.append(proxy)
    down_since = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        request_ids = set(pool.map(lambda _: _one_stream(proxy.port), range(300)))
    assert len(request_ids) == 300
    time.sleep(max(0.0, 30.0 - (time.monotonic() - down_since)))  # the consumer stays down 30 s in all
    assert not consumer.consumer.delivered_ids()
    consumer.up()
    wait_for(lambda: consumer.consumer.delivered_ids() >= request_ids, timeout=60, interval=0.2)
    received_ids = {r.webhook_id for r in consumer.consumer.received}
    assert received_ids == request_ids, "duplicates, if any, carry the same webhook-id"
    assert all(r.signature_ok for r in consumer.consumer.received)


def test_sigterm_with_undelivered_records_then_restart_delivers_them_all(tmp_path, mock_vllm, consumer, procs):
    consumer.down()
    config = _config(tmp_path, mock_vllm, consumer)
    proxy = _serve(config)
    request_ids = {_one_stream(proxy.port) for _ in range(25)}
    assert proxy.stop(signal.SIGTERM) == 0
    consumer.up()
    restarted = _serve(config)
    procs.append(restarted)
    wait_for(lambda: consumer.consumer.delivered_ids() >= request_ids, timeout=30, interval=0.2)
    assert {r.webhook_id for r in consumer.consumer.received} == request_ids


def test_500_then_200_is_retried_with_the_same_webhook_id(tmp_path, mock_vllm, consumer, procs):
    consumer.consumer.script = [Answer(500), Answer(500), Answer(503)]
    proxy = _serve(_config(tmp_path, mock_vllm, consumer, backoff_base="100ms", backoff_cap="5s"))
    procs.append(proxy)
    request_id = _one_stream(proxy.port)
    wait_for(lambda: request_id in consumer.consumer.delivered_ids(), timeout=20)
    attempts = [r for r in consumer.consumer.received if r.webhook_id == request_id]
    assert [r.status for r in attempts] == [500, 500, 503, 200]
    intervals = [b.at - a.at for a, b in itertools.pairwise(attempts)]
    for n, interval in enumerate(intervals):
        assert interval <= 0.1 * 2 ** (n + 1) + 0.5, intervals  # full jitter under the exponential bound


def test_400_goes_to_dead_letters_and_replay_delivers_it(tmp_path, mock_vllm, consumer, procs):
    consumer.consumer.default_status = 400
    config = _config(tmp_path, mock_vllm, consumer, max_attempts=2)
    proxy = _serve(config)
    procs.append(proxy)
    request_id = _one_stream(proxy.port)

    def dead_letters() -> list[dict]:
        result = subprocess.run([sys.executable, "-m", "llmproxy", "usage", "dead-letters", "list", "--config",
                                 str(config)], capture_output=True, text=True, cwd=REPO, timeout=30)
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    letters = wait_for(lambda: [d for d in dead_letters() if d["request_id"] == request_id], timeout=20)
    assert letters[0]["attempts"] == 2 and letters[0]["last_status"] == 400
    consumer.consumer.default_status = 200
    result = subprocess.run([sys.executable, "-m", "llmproxy", "usage", "dead-letters", "replay", "--all",
                             "--config", str(config)], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: request_id in consumer.consumer.delivered_ids(), timeout=20)
    assert not [d for d in dead_letters() if d["request_id"] == request_id]
