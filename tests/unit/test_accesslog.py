"""The JSON access log (llmproxy/accesslog.py) on real request contexts, without sockets."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmproxy import accesslog
from llmproxy.accesslog import AccessLog, milliseconds, rfc3339
from llmproxy.context import RequestContext, new_context
from llmproxy.http11.request import RequestHead
from llmproxy.ratelimit.store import Limits
from llmproxy.tenant import Tenant

FIELDS = ["ts", "request_id", "client_request_id", "client", "key_id", "method", "path", "model", "stream",
          "backend", "retries", "status", "termination", "ttft_ms", "duration_ms", "bytes_out"]
REJECTED_FIELDS = ["ts", "request_id", "client", "method", "path", "status", "termination", "error"]


class Client:
    """The one thing of a client connection the access log reads."""

    def __init__(self, peer: str) -> None:
        self.peer = peer


def context(method: bytes = b"POST", target: bytes = b"/v1/chat/completions?x=1", peer: str = "198.51.100.4",
            client_request_id: bytes | None = None, request_id: str = "ae03a13848aa00000001") -> RequestContext:
    headers = [(b"host", b"proxy")]
    if client_request_id is not None:
        headers.append((b"x-request-id", client_request_id))
    head = RequestHead(method, target, "1.1", headers, b"proxy", None, False, True, False, client_request_id)
    return new_context(Client(peer), head, request_id, keep_alive=True)


def lines(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture
def log_file(tmp_path: Path):
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    yield log, path
    log.close()


def test_a_request_is_one_json_line_with_the_documented_fields(log_file):
    log, path = log_file
    ctx = context(client_request_id=b"client-7")
    ctx.model, ctx.is_stream, ctx.backend, ctx.retries = "qwen", True, "vllm:8000", 1
    ctx.status, ctx.termination, ctx.bytes_out = 200, "--", 4567
    ctx.tenant = Tenant("9f86d081884c", "team-a", None, Limits())
    before = time.time()
    log.write(ctx, 0.25, 0.0123456)
    after = time.time()
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    record = orjson.loads(raw)
    assert list(record) == FIELDS
    assert {k: v for k, v in record.items() if k != "ts"} == {
        "request_id": "ae03a13848aa00000001", "client_request_id": "client-7", "client": "198.51.100.4",
        "key_id": "9f86d081884c", "method": "POST", "path": "/v1/chat/completions?x=1", "model": "qwen", "stream": True,
        "backend": "vllm:8000", "retries": 1, "status": 200, "termination": "--", "ttft_ms": 12.346,
        "duration_ms": 250.0, "bytes_out": 4567}
    # ts is when the request started: now minus its duration
    started = datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()
    assert before - 0.25 - 0.001 <= started <= after - 0.25


def test_what_a_request_did_not_get_to_is_null(log_file):
    log, path = log_file
    ctx = context(method=b"GET", target=b"/v1/models")
    log.write(ctx, 0.001, None)  # no model, no backend, no first byte, no client request id
    record = lines(path)[0]
    assert {k: record[k] for k in ("client_request_id", "key_id", "model", "backend", "ttft_ms", "stream",
                                    "retries", "status", "termination", "bytes_out")} == {
        "client_request_id": None, "key_id": None, "model": None, "backend": None, "ttft_ms": None, "stream": False,
        "retries": 0, "status": 0, "termination": "--", "bytes_out": 0}
    assert record["method"] == "GET" and record["path"] == "/v1/models"


@pytest.mark.parametrize(("message", "logged"), [
    ("", None),
    ("upstream connect failed: connection refused", "upstream connect failed: connection refused"),
])
def test_the_error_field_is_there_only_when_the_request_had_an_error(log_file, message: str, logged: str | None):
    log, path = log_file
    ctx = context()
    ctx.error_message, ctx.status, ctx.termination = message, 502, "SC"
    log.write(ctx, 0.01, None)
    record = lines(path)[0]
    assert record.get("error") == logged
    assert list(record) == FIELDS + ([] if logged is None else ["error"])


def test_bytes_that_are_not_utf8_in_the_request_line_are_logged_as_latin1(log_file):
    log, path = log_file
    log.write(context(target=b"/v1/caf\xe9?q=\xff"), 0.01, None)
    assert lines(path)[0]["path"] == "/v1/caf\u00e9?q=\u00ff"


def test_each_write_is_its_own_line_in_order(log_file):
    log, path = log_file
    for i in range(5):
        ctx = context(request_id=f"req-{i}")
        ctx.status = 200 + i
        log.write(ctx, 0.01, None)
    assert [(r["request_id"], r["status"]) for r in lines(path)] == [(f"req-{i}", 200 + i) for i in range(5)]


def test_a_file_target_appends_to_what_is_there(tmp_path: Path):
    path = tmp_path / "access.log"
    path.write_bytes(b'{"earlier":"line"}\n')
    for request_id in ("first-run", "second-run"):  # the proxy restarted: a new AccessLog on the same file
        log = AccessLog(str(path))
        assert log.enabled
        log.write(context(request_id=request_id), 0.01, None)
        log.close()
    assert [r.get("request_id", r.get("earlier")) for r in lines(path)] == ["line", "first-run", "second-run"]


def test_a_file_target_is_created_readable_by_owner_and_group_only(tmp_path: Path):
    path = tmp_path / "new.log"
    AccessLog(str(path)).close()
    assert path.exists() and path.stat().st_mode & 0o007 == 0


def test_off_writes_nothing(capfd, tmp_path: Path):
    log = AccessLog("off")
    assert not log.enabled
    log.write(context(), 0.01, 0.001)
    log.write_rejected("198.51.100.4", 400, "CR", "malformed request")
    log.close()
    assert capfd.readouterr() == ("", "")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["stdout", "stderr"])
def test_stdout_and_stderr_targets_write_there_and_are_left_open(monkeypatch, target: str):
    pipes = {name: os.pipe() for name in ("stdout", "stderr")}  # (read end, write end) standing in for each
    for name, (_, write_end) in pipes.items():
        monkeypatch.setattr(sys, name, SimpleNamespace(fileno=lambda fd=write_end: fd))
    try:
        log = AccessLog(target)
        log.write(context(request_id="to-" + target), 0.01, None)
        log.close()  # not ours to close: the stream stays open
        for name, (read_end, write_end) in pipes.items():
            os.write(write_end, b"end\n")  # raises if the log closed it
            written = os.read(read_end, 65536).splitlines()
            if name == target:
                assert orjson.loads(written[0])["request_id"] == "to-" + target and written[1:] == [b"end"]
            else:
                assert written == [b"end"]
    finally:
        for fd in (fd for pair in pipes.values() for fd in pair):
            with contextlib.suppress(OSError):  # already closed if the log closed it
                os.close(fd)


def test_after_close_nothing_is_written(tmp_path: Path):
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log.close()
    assert not log.enabled
    log.write(context(), 0.01, None)
    log.write_rejected("198.51.100.4", 400, "CR", "malformed request")
    assert path.read_bytes() == b""


@pytest.mark.parametrize(("status", "termination", "message"), [
    (400, "CR", "malformed request: invalid header value char"),
    (431, "CR", "request header block is too large"),
    (408, "cR", "request head not received in time"),
])
def test_a_request_rejected_before_it_was_parsed_is_one_line(log_file, status: int, termination: str, message: str):
    log, path = log_file
    before = time.time()
    log.write_rejected("2001:db8::5", status, termination, message)
    after = time.time()
    (record,) = lines(path)
    assert list(record) == REJECTED_FIELDS
    assert {k: v for k, v in record.items() if k != "ts"} == {
        "request_id": None, "client": "2001:db8::5", "method": None, "path": None, "status": status,
        "termination": termination, "error": message}
    logged = datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()
    assert before - 0.001 <= logged <= after


@pytest.mark.parametrize(("epoch", "text"), [
    (0.0, "1970-01-01T00:00:00.000Z"),
    (1_700_000_000.0, "2023-11-14T22:13:20.000Z"),
    (1_700_000_000.5, "2023-11-14T22:13:20.500Z"),
    (1_700_000_000.25, "2023-11-14T22:13:20.250Z"),
    (951_782_400.0, "2000-02-29T00:00:00.000Z"),  # a leap day
    (4_102_444_799.0, "2099-12-31T23:59:59.000Z"),
])
def test_rfc3339_is_utc_with_milliseconds_and_a_z(epoch: float, text: str):
    assert rfc3339(epoch) == text
    assert datetime.fromisoformat(text.replace("Z", "+00:00")) == datetime.fromtimestamp(epoch, tz=timezone.utc)


@given(st.floats(min_value=-2_208_988_800, max_value=4_102_444_800, allow_nan=False))  # 1900 to 2100
def test_rfc3339_agrees_with_datetime_to_the_millisecond(epoch: float):
    expected = datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="milliseconds")
    assert rfc3339(epoch) == expected.replace("+00:00", "Z")


@pytest.mark.parametrize(("seconds", "ms"), [(0.0, 0.0), (0.0123456, 12.346), (0.25, 250.0), (1.0000004, 1000.0),
                                               (1.0000006, 1000.001), (86_400.0, 86_400_000.0)])
def test_milliseconds_are_to_the_microsecond(seconds: float, ms: float):
    assert milliseconds(seconds) == ms


@given(st.floats(min_value=0, max_value=86_400 * 365, allow_nan=False))
def test_milliseconds_agree_with_decimal_rounding_but_at_a_tie(seconds: float):
    assert abs(milliseconds(seconds) - round(seconds * 1000.0, 3)) <= 0.001 * (1 + 1e-9)


def test_rfc3339_is_the_same_instant_whatever_the_local_time_zone(monkeypatch):
    stamp = 1_700_000_000.5
    expected = rfc3339(stamp)
    for zone in ("UTC", "America/New_York", "Asia/Kolkata"):
        monkeypatch.setenv("TZ", zone)
        time.tzset()
        monkeypatch.setattr(accesslog, "_SECONDS", accesslog._Seconds())  # format the second again, in this zone
        assert rfc3339(stamp) == expected == "2023-11-14T22:13:20.500Z"
    monkeypatch.undo()
    time.tzset()
