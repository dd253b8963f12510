"""Durable usage delivery: outbox, webhook and file reporters, retries, dead letters, restarts.

Everything runs on 127.0.0.1 against tests/webhook_consumer.py, which verifies Standard Webhooks
signatures with its own implementation. Back-off bases and caps are shrunk to tens of milliseconds,
except in the tests of the pinned schedule itself (0.5 s base, 30 s cap); every wait is bounded. The
60 s outage is a soak test (`python -m pytest -m soak tests/unit/test_delivery.py -s` prints its numbers).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import io
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
import uvloop
from hypothesis import given, settings

from llmproxy.config.model import FileReporterConfig, ReporterConfig, UsageConfig, WebhookConfig, signing_key
from llmproxy.delivery import DeliveryService, SpoolError, SpoolLocked, dead_letters_main
from llmproxy.delivery.dispatch import PROBE_INTERVAL
from llmproxy.delivery.retry import AttemptResult, RetryPolicy, backoff, decide, parse_retry_after
from llmproxy.delivery.spool import Row, SpoolDB
from llmproxy.delivery.webhook import sign
from tests.webhook_consumer import Answer, WebhookConsumer, verify_standard_webhook

REPO = Path(__file__).resolve().parents[2]
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
TEST_TIMEOUT = 20.0


class MaxJitter(random.Random):
    """Full jitter always drawing its upper bound: back-offs become deterministic and strictly growing."""

    def uniform(self, a: float, b: float) -> float:
        return b


class RecordingMetrics:
    def __init__(self) -> None:
        self.calls: Counter[tuple[str, ...]] = Counter()
        self.depths: list[int] = []

    def webhook_success(self, reporter: str) -> None:
        self.calls["success", reporter] += 1

    def webhook_failure(self, reporter: str, reason: str) -> None:
        self.calls["failure", reporter, reason] += 1

    def outbox_depth(self, n: int) -> None:
        self.depths.append(n)

    def dead_letter(self, reporter: str, reason: str) -> None:
        self.calls["dead", reporter, reason] += 1


def run(coro: Any, timeout: float = TEST_TIMEOUT) -> Any:
    return uvloop.run(asyncio.wait_for(coro, timeout))


async def wait_until(predicate: Any, timeout: float, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def records(n: int, prefix: str = "req") -> list[dict[str, Any]]:
    return [{"request_id": f"{prefix}-{i}", "model": "m", "backend": "b1",
             "usage": {"prompt_tokens": i, "completion_tokens": 2 * i, "total_tokens": 3 * i}} for i in range(n)]


def hook(name: str, url: str, **options: Any) -> ReporterConfig:
    settings_ = {"backoff_base": 0.02, "backoff_cap": 0.2, "timeout": 2.0, **options}
    return ReporterConfig(name=name, type="webhook", webhook=WebhookConfig(url=url, **settings_))


def service(spool: Path, reporters: list[ReporterConfig], metrics: Any = None, rng: random.Random | None = None,
            **options: Any) -> DeliveryService:
    config = UsageConfig(enabled=True, spool_dir=str(spool), reporters=reporters,
                         **{"flush_interval": 0.02, **options})
    return DeliveryService(config, metrics, rng=rng, poll_interval=0.2)


async def dead_letters(spool: Path, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    # A thread, like a separate CLI process: it must not need the proxy's loop to make progress.
    code = await asyncio.to_thread(dead_letters_main, list(argv), str(spool), out, err)
    return code, out.getvalue(), err.getvalue()


async def free_port_url() -> str:
    """A URL where nothing listens (a consumer that is down)."""
    consumer = await WebhookConsumer().up()
    await consumer.down()
    return consumer.url


# Pure pieces -------------------------------------------------------------------------------------------


def test_signature_matches_the_standard_webhooks_test_vector() -> None:
    signature = sign(signing_key(SECRET), "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@settings(max_examples=50, deadline=None)
@given(secret=st.one_of(st.binary(min_size=1, max_size=40).map(lambda key: "whsec_" + base64.b64encode(key).decode()),
                        st.text(min_size=1, max_size=30).filter(lambda s: not s.startswith("whsec_"))),
       msg_id=st.text(alphabet="abcdefXYZ0123456789_-", min_size=1, max_size=40), body=st.binary(max_size=300))
def test_signing_agrees_with_an_independent_verifier(secret: str, msg_id: str, body: bytes) -> None:
    now = int(time.time())
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(now),
               "webhook-signature": sign(signing_key(secret), msg_id, now, body)}
    assert verify_standard_webhook(secret, headers, body, now)
    assert not verify_standard_webhook(secret, headers, body + b"x", now)


@given(attempt=st.integers(1, 10_000), base=st.floats(0.001, 5), cap=st.floats(0.001, 60), seed=st.integers())
def test_backoff_is_full_jitter_under_the_capped_exponential(attempt: int, base: float, cap: float, seed: int) -> None:
    delay = backoff(attempt, base, cap, random.Random(seed))
    assert 0.0 <= delay <= min(cap, base * 2 ** min(attempt - 1, 60))


def test_retry_after_seconds_and_http_date() -> None:
    now = time.time()
    assert parse_retry_after(b"7", now) == 7.0
    assert abs(parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now) - 30) <= 1
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert parse_retry_after(b"soon", now) is None
    assert parse_retry_after(None, now) is None


def test_decide_classifies_outcomes() -> None:
    policy = RetryPolicy(max_attempts=3, max_age=100.0, base=1.0, cap=8.0)
    rng, now = MaxJitter(), 1000.0
    fresh = Row(1, "r", b"{}", now - 1, now - 1, 0)
    assert decide(fresh, AttemptResult(204), now, policy, rng).kind == "delivered"
    for status in (500, 503, 408, 429, None):
        action = decide(fresh, AttemptResult(status), now, policy, rng)
        assert (action.kind, action.retryable, action.next_attempt_at) == ("retry", True, now + 1.0)
    later = decide(fresh, AttemptResult(429, retry_after=50.0), now, policy, rng)
    assert later.next_attempt_at == now + 50.0  # Retry-After wins when longer than the back-off
    assert decide(Row(1, "r", b"{}", now, now, 1), AttemptResult(404), now, policy, rng).kind == "retry"
    rejected = decide(Row(1, "r", b"{}", now, now, 2), AttemptResult(404, "nope"), now, policy, rng)
    assert (rejected.kind, rejected.reason, rejected.status, rejected.error) == ("dead", "rejected", 404, "nope")
    many = decide(Row(1, "r", b"{}", now - 99, now - 99, 500), AttemptResult(503), now, policy, rng)
    assert many.kind == "retry"  # retryable failures: no attempt limit within max_age
    expired = decide(Row(1, "r", b"{}", now - 100, now - 100, 5), AttemptResult(None), now, policy, rng)
    assert (expired.kind, expired.reason) == ("dead", "expired")


def test_config_validation() -> None:
    assert WebhookConfig(url="http://h/x", retry=5).max_attempts == 5
    for bad in ({"url": "ftp://h/"}, {"url": "http://h/", "secret": "whsec_!!!"},
                {"url": "http://h/", "headers": {"Webhook-Id": "x"}}, {"url": "http://h/", "concurrency": 0}):
        with pytest.raises(ValueError):
            WebhookConfig(**bad)
    with pytest.raises(ValueError, match="type webhook needs"):
        ReporterConfig(name="a", type="webhook")
    with pytest.raises(ValueError, match="unique"):
        UsageConfig(reporters=[hook("a", "http://h/"), hook("a", "http://h/")])
    assert UsageConfig(enabled=False, reporters=[hook("a", "http://h/")]).active_reporters() == []


# Webhook delivery ------------------------------------------------------------------------------------------


def test_signed_delivery_is_verified_and_every_reporter_delivers(tmp_path: Path) -> None:
    async def main() -> None:
        signed, raw, plain = (await WebhookConsumer(SECRET).up(), await WebhookConsumer("raw-secret").up(),
                              await WebhookConsumer().up())
        svc = service(tmp_path, [hook("signed", signed.url, secret=SECRET, headers={"X-Env": "prod"}),
                                 hook("raw", raw.url, secret="raw-secret"), hook("plain", plain.url)])
        svc.start()
        sent = records(5)
        for record in sent:
            svc.append(record)
        ids = {record["request_id"] for record in sent}
        try:
            for consumer in (signed, raw, plain):
                await consumer.wait_for(lambda c=consumer: c.delivered_ids() == ids, 5)
        finally:
            await svc.close(1)
        for consumer in (signed, raw):
            assert all(r.signature_ok for r in consumer.received)
        assert all("webhook-signature" not in r.headers and r.webhook_id in ids for r in plain.received)
        by_id = {r.webhook_id: r for r in signed.received}
        for record in sent:
            got = by_id[record["request_id"]]
            assert got.record == record
            assert got.headers["content-type"] == "application/json" and got.headers["x-env"] == "prod"
        assert svc.pending_count() == 0

    run(main())


def test_500_then_200_is_retried_with_growing_intervals(tmp_path: Path) -> None:
    async def main() -> None:
        consumer = await WebhookConsumer(SECRET).up()
        consumer.script = [Answer(500), Answer(502), Answer(503), Answer(500)]
        metrics = RecordingMetrics()
        svc = service(tmp_path, [hook("billing", consumer.url, secret=SECRET, backoff_base=0.05, backoff_cap=5)],
                      metrics, MaxJitter())
        svc.start()
        svc.append(records(1)[0])
        try:
            await consumer.wait_for(lambda: consumer.delivered_ids() == {"req-0"}, 5)
        finally:
            await svc.close(1)
        times = [r.at for r in consumer.received]
        assert [r.status for r in consumer.received] == [500, 502, 503, 500, 200]
        assert {r.webhook_id for r in consumer.received} == {"req-0"}  # the id is stable across retries
        assert all(r.signature_ok for r in consumer.received)  # re-signed with each attempt's timestamp
        intervals = [b - a for a, b in itertools.pairwise(times)]
        for interval, expected in zip(intervals, (0.05, 0.1, 0.2, 0.4), strict=True):
            assert expected * 0.9 <= interval < expected + 0.5, intervals
        assert intervals == sorted(intervals)
        assert metrics.calls["failure", "billing", "http_5xx"] == 4 and metrics.calls["success", "billing"] == 1

    run(main())


def test_retry_after_is_honoured(tmp_path: Path) -> None:
    async def main() -> None:
        consumer = await WebhookConsumer().up()
        consumer.script = [Answer(503, [("retry-after", "1")])]
        svc = service(tmp_path, [hook("billing", consumer.url, backoff_base=0.01, backoff_cap=0.05)])
        svc.start()
        svc.append(records(1)[0])
        try:
            await consumer.wait_for(lambda: consumer.delivered_ids() == {"req-0"}, 5)
        finally:
            await svc.close(1)
        first, second = consumer.received
        assert 0.95 <= second.at - first.at < 2.5

    run(main())


def test_400_dead_letters_after_max_attempts_and_replay_delivers(tmp_path: Path) -> None:
    async def main() -> None:
        consumer = await WebhookConsumer(SECRET).up()
        consumer.default_status = 400
        consumer.script = [Answer(400, body=b'{"error": "unknown model"}')] * 3
        metrics = RecordingMetrics()
        svc = service(tmp_path, [hook("billing", consumer.url, secret=SECRET, max_attempts=3)], metrics)
        svc.start()
        svc.append(records(1)[0])
        try:
            await wait_until(lambda: svc.dead_letter_count() == 1, 5, "the dead letter")
            assert len(consumer.received) == 3 and svc.pending_count() == 0
            code, out, _ = await dead_letters(tmp_path, "list")
            assert code == 0
            (letter,) = [json.loads(line) for line in out.splitlines()]
            assert letter["reporter"] == "billing" and letter["request_id"] == "req-0"
            assert (letter["reason"], letter["attempts"], letter["last_status"]) == ("rejected", 3, 400)
            assert "unknown model" in letter["error"] and letter["created"].endswith("Z")
            assert metrics.calls["dead", "billing", "rejected"] == 1

            consumer.default_status = 200
            code, out, _ = await dead_letters(tmp_path, "replay", "--id", str(letter["id"]))
            assert (code, json.loads(out)) == (0, {"replayed": 1})
            await consumer.wait_for(lambda: consumer.delivered_ids() == {"req-0"}, 5)
            await wait_until(lambda: svc.pending_count() == 0 and svc.dead_letter_count() == 0, 3, "empty spool")
            code, _, err = await dead_letters(tmp_path, "replay", "--id", "999")
            assert code == 1 and "not dead letters" in err
        finally:
            await svc.close(1)

    run(main())


def test_expired_after_max_age(tmp_path: Path) -> None:
    async def main() -> None:
        url = await free_port_url()
        svc = service(tmp_path, [hook("billing", url, max_age=0.3, backoff_base=0.05, backoff_cap=0.1)])
        svc.start()
        svc.append(records(1)[0])
        try:
            await wait_until(lambda: svc.dead_letter_count() == 1, 5, "expiry")
        finally:
            await svc.close(1)
        code, out, _ = await dead_letters(tmp_path, "list")
        assert code == 0 and json.loads(out)["reason"] == "expired" and json.loads(out)["last_status"] is None

    run(main())


def test_consumer_down_then_up_delivers_every_record(tmp_path: Path) -> None:
    async def main() -> None:
        consumer = await WebhookConsumer(SECRET).up()
        await consumer.down()
        metrics = RecordingMetrics()
        svc = service(tmp_path, [hook("billing", consumer.url, secret=SECRET, max_age=60, concurrency=4)], metrics)
        started = time.monotonic()
        svc.start()
        sent = records(300)
        try:
            for start in range(0, len(sent), 30):  # bursts while the consumer is down
                for record in sent[start:start + 30]:
                    svc.append(record)
                await asyncio.sleep(0.1)
            failures_while_down = sum(n for key, n in metrics.calls.items() if key[0] == "failure")
            # A dead consumer is probed one attempt at a time, not hammered with the whole backlog: the first
            # round at full concurrency, then one attempt per PROBE_INTERVAL at most.
            most = 4 + (time.monotonic() - started) / PROBE_INTERVAL + 1
            assert 1 <= failures_while_down <= most, (failures_while_down, most)
            await consumer.up()
            ids = {record["request_id"] for record in sent}
            await consumer.wait_for(lambda: consumer.delivered_ids() == ids, 10)
            await wait_until(lambda: svc.pending_count() == 0, 3, "an empty outbox")
        finally:
            await svc.close(1)
        assert consumer.delivered_ids() == ids
        for received in consumer.received:  # a duplicate can only be the same record under the same id
            assert received.signature_ok and received.record["request_id"] == received.webhook_id
        assert svc.dead_letter_count() == 0

    run(main())


# How long an attempt may start after its row fell due, on a loaded 2-core machine: the event loop, the
# outbox thread's claim, a connect, plus the probe pace when several records fall due together.
SCHEDULING_SLACK = 0.5
RECOVERY_NOTICED = 2.0  # a consumer back up gets its first delivery within this (a few probe intervals)
DRAINED_AFTER_RECOVERY = 10.0  # the measurement: every record of the backlog delivered within this of recovery


def pinned_hook(name: str, url: str, **options: Any) -> ReporterConfig:
    """A webhook reporter with the shipped back-off (0.5 s base, 30 s cap) and concurrency (4)."""
    config = WebhookConfig(url=url, **options)
    assert (config.backoff_base, config.backoff_cap, config.concurrency) == (0.5, 30.0, 4)
    return ReporterConfig(name=name, type="webhook", webhook=config)


def test_each_record_keeps_its_own_backoff_when_the_consumer_fails_every_record_four_times(tmp_path: Path) -> None:
    """The reported case: 500 four times per record, then 200, six records. Each record's n-th gap is its own
    full-jitter back-off, at most base * 2^(n-1) (0.5, 1, 2, 4 s): other records' failures never add to it."""
    async def main() -> None:
        consumer = await WebhookConsumer(SECRET).up()
        consumer.fail_each = 4
        reporter = pinned_hook("billing", consumer.url, secret=SECRET)
        policy = reporter.webhook
        ceilings = [min(policy.backoff_cap, policy.backoff_base * 2 ** (n - 1)) for n in range(1, 5)]
        svc = service(tmp_path, [reporter], rng=random.Random(20240611))
        sent = records(6)
        ids = {record["request_id"] for record in sent}
        svc.start()
        for record in sent:
            svc.append(record)
        try:
            # The slowest record allowed: every gap at its ceiling plus slack (7.5 s + 2 s). On a timeout
            # the gaps so far are checked first: they say what went wrong.
            with contextlib.suppress(asyncio.TimeoutError):
                await consumer.wait_for(lambda: consumer.delivered_ids() == ids, sum(ceilings) + 4 * SCHEDULING_SLACK)
            ended = time.monotonic()
        finally:
            await svc.close(1)
        gaps: dict[str | None, list[float]] = {}
        for request_id in sorted(ids):
            mine = [r for r in consumer.received if r.webhook_id == request_id]
            assert all(r.signature_ok for r in mine)
            statuses = [r.status for r in mine]
            assert statuses == [500, 500, 500, 500, 200][:len(statuses)], (request_id, statuses)  # none twice
            times = [r.at for r in mine] + ([ended] if mine and statuses[-1] != 200 else [])  # still waiting
            gaps[request_id] = [round(b - a, 3) for a, b in itertools.pairwise(times)]
        print("\ngaps per record (s):", gaps)
        for request_id, record_gaps in gaps.items():
            for gap, ceiling in zip(record_gaps, ceilings, strict=False):
                assert gap <= ceiling + SCHEDULING_SLACK, (request_id, record_gaps, ceilings)
        assert consumer.delivered_ids() == ids, (
            f"{len(consumer.delivered_ids())} of {len(ids)} delivered after {len(consumer.received)} requests: {gaps}")
        assert svc.pending_count() == 0

    run(main())


async def outage_then_recovery(tmp_path: Path, down_for: float, n: int) -> dict[str, float]:
    """`n` records pending while the consumer is down for `down_for` s; returns what happened after it came back.

    MaxJitter: every back-off draws its upper bound, the slowest the pinned schedule allows.
    """
    consumer = await WebhookConsumer(SECRET).up()
    await consumer.down()
    metrics = RecordingMetrics()
    svc = service(tmp_path, [pinned_hook("billing", consumer.url, secret=SECRET)], metrics, MaxJitter())
    went_down = time.monotonic()
    svc.start()
    sent = records(n, prefix="outage")
    ids = {record["request_id"] for record in sent}
    try:
        for record in sent:
            svc.append(record)
        await asyncio.sleep(went_down + down_for - time.monotonic())
        attempts_while_down = sum(count for key, count in metrics.calls.items() if key[0] == "failure")
        await consumer.up()
        recovered = time.monotonic()
        with contextlib.suppress(asyncio.TimeoutError):  # reported below, with what was delivered
            await consumer.wait_for(lambda: consumer.delivered_ids() == ids, DRAINED_AFTER_RECOVERY + 10)
    finally:
        await svc.close(1)
    delivered = [r for r in consumer.received if r.status == 200]
    assert consumer.delivered_ids() == ids and svc.pending_count() == 0, (
        f"{len(consumer.delivered_ids())} of {n} delivered in the {time.monotonic() - recovered:.1f} s after "
        f"recovery, the first {min(r.at for r in delivered) - recovered:.1f} s after it" if delivered else
        f"nothing delivered in the {time.monotonic() - recovered:.1f} s after recovery")
    twice = [key for key, count in Counter(r.webhook_id for r in delivered).items() if count > 1]
    assert not twice, f"delivered more than once: {twice[:10]}"
    assert all(r.signature_ok and r.record["request_id"] == r.webhook_id for r in consumer.received)
    assert svc.dead_letter_count() == 0
    result = {"attempts_while_down": attempts_while_down,
              "first_delivery_after_recovery": min(r.at for r in delivered) - recovered,
              "last_delivery_after_recovery": max(r.at for r in delivered) - recovered}
    print(f"\nconsumer down {down_for:g} s with {n} records pending: {result}")
    return result


def check_outage(result: dict[str, float]) -> None:
    assert result["first_delivery_after_recovery"] <= RECOVERY_NOTICED, result
    assert result["last_delivery_after_recovery"] <= DRAINED_AFTER_RECOVERY, result


def test_a_backlog_is_delivered_within_seconds_of_the_consumer_coming_back(tmp_path: Path) -> None:
    check_outage(run(outage_then_recovery(tmp_path, down_for=8.0, n=1000), timeout=40))


@pytest.mark.soak
@pytest.mark.timeout(180)
def test_soak_1000_records_after_a_60s_outage_are_delivered_within_10s_of_recovery(tmp_path: Path) -> None:
    check_outage(run(outage_then_recovery(tmp_path, down_for=60.0, n=1000), timeout=120))


def test_a_failing_consumer_is_probed_one_record_at_a_time_then_drained_at_full_concurrency(tmp_path: Path) -> None:
    async def main() -> None:
        consumer = await WebhookConsumer().up()
        consumer.default_status = 503
        consumer.delay = 0.02  # long enough for concurrent requests to overlap at the consumer
        # A shrunk back-off: rows are due again at once, so only the probe pace holds them back.
        svc = service(tmp_path, [hook("billing", consumer.url, concurrency=4)])
        sent = records(200)
        ids = {record["request_id"] for record in sent}
        svc.start()
        for record in sent:
            svc.append(record)
        try:
            # The first round (4 at once) fails, the consumer is down from then on.
            await wait_until(lambda: len(consumer.received) >= 4 + 1, 5, "the first probe")
            consumer.peak_concurrency, before, started = consumer.concurrency, len(consumer.received), time.monotonic()
            await asyncio.sleep(2.0)
            probes, elapsed = len(consumer.received) - before, time.monotonic() - started
            assert consumer.peak_concurrency == 1  # one record at a time
            assert probes <= elapsed / PROBE_INTERVAL + 1, (probes, elapsed)  # at the probe pace at most
            assert probes >= elapsed / 1.0, (probes, elapsed)  # and steadily: a recovery would be seen at once
            consumer.default_status = 200
            await consumer.wait_for(lambda: consumer.delivered_ids() == ids, 10)
        finally:
            await svc.close(1)
        assert consumer.peak_concurrency == 4  # the backlog drains at the reporter's concurrency
        assert Counter(r.webhook_id for r in consumer.received if r.status == 200) == Counter(ids)

    run(main())


def test_retry_after_from_a_consumer_that_is_down_pauses_the_probes(tmp_path: Path) -> None:
    async def main() -> None:
        consumer = await WebhookConsumer().up()
        consumer.script = [Answer(503, [("retry-after", "1")])] * 4  # the first round: it is down, come back in 1 s
        svc = service(tmp_path, [hook("billing", consumer.url, concurrency=4, backoff_base=0.01, backoff_cap=0.02)])
        sent = records(20)
        svc.start()
        for record in sent:
            svc.append(record)
        try:
            await consumer.wait_for(lambda: len(consumer.delivered_ids()) == len(sent), 5)
        finally:
            await svc.close(1)
        first_round, after = consumer.received[:4], consumer.received[4:]
        assert [r.status for r in first_round] == [503] * 4 and after[0].status == 200
        # No record was attempted before the consumer's Retry-After, not only the four it was given to.
        assert 0.95 <= after[0].at - first_round[-1].at < 2.5

    run(main())


def test_close_keeps_undelivered_rows_for_the_next_start(tmp_path: Path) -> None:
    async def main() -> None:
        consumer = await WebhookConsumer().up()
        await consumer.down()
        sent = records(20)
        # A long flush interval: the records are still only in memory when close() is called.
        first = service(tmp_path, [hook("billing", consumer.url)], flush_interval=5.0)
        first.start()
        for record in sent:
            first.append(record)
        started = time.monotonic()
        await first.close(0.5)
        assert time.monotonic() - started < 2
        db = SpoolDB(str(tmp_path), create=False)
        assert db.pending == 20
        db.close()

        await consumer.up()
        second = service(tmp_path, [hook("billing", consumer.url)])
        second.start()
        try:
            await consumer.wait_for(lambda: len(consumer.delivered_ids()) == 20, 5)
        finally:
            await second.close(1)
        assert consumer.delivered_ids() == {record["request_id"] for record in sent}

    run(main())


def test_a_slow_consumer_costs_the_proxy_nothing_and_close_is_bounded(tmp_path: Path) -> None:
    async def main() -> None:
        consumer = await WebhookConsumer().up()
        consumer.delay = 5.0
        svc = service(tmp_path, [hook("billing", consumer.url, timeout=10.0, concurrency=2)])
        svc.start()
        started = time.perf_counter()
        for record in records(1000):
            svc.append(record)
        # The request path only appends: it never waits for the consumer (which takes 5 s per delivery).
        # A behaviour bound, not a speed claim: generous enough for a loaded CI machine.
        assert time.perf_counter() - started < 2.0
        assert svc.pending_count() == 1000
        await asyncio.sleep(0.3)  # committed, and two attempts are now stuck in the consumer
        started = time.monotonic()
        await svc.close(0.3)
        assert time.monotonic() - started < 1.5
        await consumer.down()
        db = SpoolDB(str(tmp_path), create=False)
        assert db.pending == 1000  # the cancelled attempts stay pending, to be retried after restart
        db.close()

    run(main())


def test_the_spool_belongs_to_one_process(tmp_path: Path) -> None:
    async def main() -> None:
        url = await free_port_url()
        first = service(tmp_path, [hook("billing", url)])
        first.start()
        lock = tmp_path / "usage.lock"
        try:
            assert lock.read_text() == f"{os.getpid()}\n"  # the holder's pid, for the next one's message
            with pytest.raises(SpoolLocked) as refused:
                service(tmp_path, [hook("billing", url)]).start()
            assert isinstance(refused.value, SpoolError) and refused.value.holder == os.getpid()
            assert str(refused.value) == (f"usage spool {tmp_path} is in use by another llmproxy (pid {os.getpid()}); "
                                          "give each instance its own usage.spool_dir")
            lock.write_text("")  # a holder that wrote no pid (yet): the message says so, without one
            with pytest.raises(SpoolLocked, match="in use by another llmproxy process;"):
                service(tmp_path, [hook("billing", url)]).start()
        finally:
            await first.close(1)
        assert lock.read_text() == ""  # released: no stale pid left to name the wrong process
        second = service(tmp_path, [hook("billing", url)])
        second.start()  # the lock is free again
        await second.close(1)

    run(main())


SIGKILL_CHILD = textwrap.dedent("""
    import asyncio, pathlib, sys
    from llmproxy.config.model import ReporterConfig, UsageConfig, WebhookConfig
    from llmproxy.delivery import DeliveryService

    async def main():
        hook = ReporterConfig(name="billing", type="webhook", webhook=WebhookConfig(url=sys.argv[2]))
        svc = DeliveryService(UsageConfig(enabled=True, spool_dir=sys.argv[1], reporters=[hook], flush_interval=0.05))
        svc.start()
        for i in range(100):
            svc.append({"request_id": f"k-{i}"})
        await asyncio.sleep(0.25)  # several group-commit intervals
        pathlib.Path(sys.argv[3]).write_text("appended")
        await asyncio.sleep(30)

    asyncio.run(main())
""")


def test_sigkill_loses_nothing_older_than_a_group_commit(tmp_path: Path) -> None:
    url = run(free_port_url())
    marker = tmp_path / "appended"
    child = subprocess.Popen([sys.executable, "-c", SIGKILL_CHILD, str(tmp_path / "spool"), url, str(marker)],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "the child did not append in time"
            time.sleep(0.02)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(5)
        child.stderr.close()
    db = SpoolDB(str(tmp_path / "spool"), create=False)
    assert db.pending == 100
    db.close()


# Size cap, file reporter, metrics -----------------------------------------------------------------------------


def test_outbox_full_moves_the_oldest_pending_rows_to_dead_letters(tmp_path: Path) -> None:
    async def main() -> None:
        url = await free_port_url()
        metrics = RecordingMetrics()
        svc = service(tmp_path, [hook("billing", url, backoff_base=5, backoff_cap=5)], metrics,
                      max_outbox_records=5, flush_interval=0.05)
        svc.start()
        try:
            for record in records(8):
                svc.append(record)
            await wait_until(lambda: svc.dead_letter_count() == 3, 3, "outbox_full dead letters")
            assert svc.pending_count() == 5
            svc.append(records(9)[8])  # new records are still accepted...
            await wait_until(lambda: svc.dead_letter_count() == 4, 3, "one more dead letter")
            assert svc.pending_count() == 5
        finally:
            await svc.close(1)
        _, out, _ = await dead_letters(tmp_path, "list", "--body")
        letters = [json.loads(line) for line in out.splitlines()]
        # ...and the oldest pending rows make room for them.
        assert [letter["request_id"] for letter in letters] == ["req-0", "req-1", "req-2", "req-3"]
        assert {letter["reason"] for letter in letters} == {"outbox_full"}
        assert letters[0]["record"] == records(1)[0]
        assert metrics.calls["dead", "billing", "outbox_full"] == 4
        assert metrics.depths[-1] == 5  # pending rows on disk plus buffered records

    run(main())


def test_file_reporter_writes_json_lines_and_retries_io_errors(tmp_path: Path) -> None:
    async def main() -> None:
        blocker = tmp_path / "logs"
        blocker.write_text("a file where the directory should be")
        path = blocker / "usage.jsonl"
        reporter = ReporterConfig(name="local", type="file", file=FileReporterConfig(path=str(path)))
        metrics = RecordingMetrics()
        svc = service(tmp_path / "spool", [reporter], metrics, MaxJitter())
        svc.start()
        sent = records(50)
        try:
            for record in sent:
                svc.append(record)
            await wait_until(lambda: metrics.calls["failure", "local", "io_error"] >= 1, 3, "an I/O error")
            blocker.unlink()
            await wait_until(lambda: svc.pending_count() == 0, 5, "the file write")
        finally:
            await svc.close(1)
        lines = path.read_bytes().splitlines()
        assert [json.loads(line) for line in lines] == sent
        assert metrics.calls["success", "local"] == 50

    run(main())


def test_disabled_usage_does_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        svc = DeliveryService(UsageConfig(enabled=False, spool_dir=str(tmp_path / "spool")))
        svc.start()
        svc.append(records(1)[0])
        await svc.close(1)
        assert not (tmp_path / "spool").exists() and svc.pending_count() == 0

    run(main())
