"""`server.workers: 2`: one port, two worker processes, a supervisor that restarts and stops them.

Which worker served a request shows in its request id: each process draws its own random id prefix
(the first 12 hex digits), which the response carries in `x-request-id` and the usage record keeps.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support import (
    CHAT,
    REPO,
    STREAM_CHAT,
    Proc,
    ResponseReader,
    assert_idle,
    free_port,
    metric_value,
    post_request,
    raw_connect,
    usage_config,
    usage_records,
    wait_for,
    write_config,
)

ACCEPTING = re.compile(r"worker (\d+) \(pid (\d+)\) accepting connections")


def _usage(tmp_path: Path, reporter: dict | None = None) -> dict:
    return usage_config(tmp_path, reporter, flush_interval="50ms")


@pytest.fixture
def two_workers(metered_proxy, mock_vllm, tmp_path):
    """two_workers(**sections): a proxy of two workers in front of the vLLM mock, usage flushed every 50 ms."""
    def start(**sections: dict) -> Proc:
        sections.setdefault("usage", _usage(tmp_path))
        return metered_proxy([{"url": mock_vllm.url}], server={"listen": "127.0.0.1:0", "workers": 2}, **sections)
    return start


def _worker_pids(proxy: Proc) -> dict[int, int]:
    """The latest pid of each worker that said it accepts connections."""
    return {int(index): int(pid) for index, pid in ACCEPTING.findall(proxy.text())}


def _chat(proxy: Proc, retry: bool = False) -> str:
    """One request on a fresh connection; returns its request id. `retry`: a refused or reset connection
    (a worker being killed) is tried again, a bounded number of times."""
    for _ in range(50 if retry else 1):
        request = urllib.request.Request(proxy.url + "/v1/chat/completions", data=CHAT, method="POST",
                                         headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200
                response.read()
                return response.headers["x-request-id"]
        except (ConnectionError, urllib.error.URLError) as error:
            if not retry or isinstance(error, urllib.error.HTTPError):
                raise
    raise AssertionError("no successful request in 50 attempts")


def _wait_records(tmp_path: Path, request_ids: list[str], timeout: float = 15.0) -> None:
    """Every request's usage record arrives, and exactly once."""
    wait_for(lambda: {r["request_id"] for r in usage_records(tmp_path)} >= set(request_ids), timeout=timeout,
             interval=0.1)
    counts = collections.Counter(r["request_id"] for r in usage_records(tmp_path))
    assert set(counts) == set(request_ids)
    assert max(counts.values()) == 1, [rid for rid, n in counts.items() if n > 1]


def _backend(mock: Proc) -> str:
    return f'backend="127.0.0.1:{mock.port}"'


def test_two_workers_serve_one_port_and_metrics_sum_both(tmp_path, mock_vllm, two_workers):
    proxy = two_workers()
    assert re.search(r"listening on http://127\.0\.0\.1:\d+ \(2 workers\)", proxy.text())
    assert proxy.text().count("listening on") == 1, "only the supervisor says it"
    assert sorted(_worker_pids(proxy)) == [0, 1]
    request_ids = [_chat(proxy) for _ in range(40)]
    assert len({rid[:12] for rid in request_ids}) == 2, "fresh connections land on both workers"
    # A worker counts a request when it has finished it, which may be just after the client read the last
    # byte and scraped the other worker: the sum reaches 40 within moments, and never more.
    wait_for(lambda: metric_value(proxy, "llmproxy_requests_total", _backend(mock_vllm)) == 40, timeout=5)
    assert metric_value(proxy, "llmproxy_request_duration_seconds_count", _backend(mock_vllm)) == 40
    _wait_records(tmp_path, request_ids)
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == ["worker-0", "worker-1"]
    assert metric_value(proxy, "llmproxy_usage_records_total") == 40
    wait_for(lambda: metric_value(proxy, "llmproxy_webhook_success_total", 'reporter="f"') == 40, timeout=5)
    assert_idle(proxy)
    assert metric_value(proxy, "llmproxy_backend_healthy", _backend(mock_vllm)) == 1


def test_a_killed_worker_is_restarted_and_serving_goes_on(tmp_path, mock_vllm, two_workers):
    proxy = two_workers()
    killed = _worker_pids(proxy)[1]
    before = [_chat(proxy) for _ in range(20)]
    _wait_records(tmp_path, before)  # committed before the kill: a SIGKILL may lose the last flush_interval
    os.kill(killed, signal.SIGKILL)
    wait_for(lambda: f"worker 1 (pid {killed}) was killed by SIGKILL: restarting it in 0 s" in proxy.text())
    during = [_chat(proxy, retry=True) for _ in range(20)]
    wait_for(lambda: _worker_pids(proxy)[1] != killed, timeout=10)
    after = [_chat(proxy) for _ in range(40)]  # no retries: every request succeeds
    prefixes_after = {rid[:12] for rid in after}
    assert len(prefixes_after) == 2 and prefixes_after - {rid[:12] for rid in before}, "the new worker serves"
    # The dead worker's counts stay in the sums; its live gauges are gone.
    assert metric_value(proxy, "llmproxy_requests_total", _backend(mock_vllm)) == 80
    _wait_records(tmp_path, before + during + after)
    assert_idle(proxy)


def test_sigterm_drains_every_worker_then_the_supervisor_exits_zero(tmp_path, mock_vllm, two_workers):
    proxy = two_workers()
    pids = _worker_pids(proxy)
    environ = Path(f"/proc/{pids[0]}/environ").read_bytes().split(b"\0")
    metrics_dir = next(v.split(b"=", 1)[1] for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR="))
    assert Path(os.fsdecode(metrics_dir)).is_dir()
    request_ids = [_chat(proxy) for _ in range(20)]
    with raw_connect(proxy.port, timeout=10) as sock:
        sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT,
                                  {"x-mock-tokens": "20", "x-mock-delay-ms": "50"}))
        reader = ResponseReader(sock).read_head()
        assert reader.read_chunk()
        proxy.popen.send_signal(signal.SIGTERM)
        body, complete = reader.read_body()
    assert complete and body.endswith(b"data: [DONE]\n\n"), "an in-flight stream finishes on SIGTERM"
    assert proxy.popen.wait(20) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids.values())
    assert not Path(os.fsdecode(metrics_dir)).exists()
    with pytest.raises(OSError):
        raw_connect(proxy.port, timeout=1).close()
    # Whatever was left undelivered at the stop goes out when each worker starts again on its own spool.
    request_ids.append(reader.headers["x-request-id"])
    two_workers()
    _wait_records(tmp_path, request_ids)


def test_dead_letters_are_listed_and_replayed_across_workers(tmp_path, mock_vllm, two_workers):
    dead_url = f"http://127.0.0.1:{free_port()}/hook"  # a consumer that is down: its port refuses connections
    hook = {"url": dead_url, "timeout": "1s", "max_age": "200ms", "backoff_base": "20ms", "backoff_cap": "50ms"}
    proxy = two_workers(usage=_usage(tmp_path, {"name": "billing", "type": "webhook", "webhook": hook}))
    request_ids = [_chat(proxy) for _ in range(20)]
    config = str(tmp_path / "config.yaml")

    def usage_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "llmproxy", "usage", "dead-letters", *args, "--config", config],
                              capture_output=True, text=True, cwd=REPO, timeout=30)

    def letters() -> list[dict]:
        result = usage_cli("list")
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    wait_for(lambda: {d["request_id"] for d in letters()} == set(request_ids), timeout=20, interval=0.2)
    assert {d["spool"] for d in letters()} == {"worker-0", "worker-1"}
    result = usage_cli("replay", "--id", str(letters()[0]["id"]))
    assert result.returncode == 1 and "--spool" in result.stderr, "ids are per spool"
    result = usage_cli("replay", "--all")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"replayed": len(request_ids)}


def test_a_port_in_use_refuses_to_start(tmp_path, mock_vllm):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, [{"url": mock_vllm.url}], server={"listen": f"127.0.0.1:{port}", "workers": 2})
        result = subprocess.run([sys.executable, "-m", "llmproxy", "serve", "--config", str(config)],
                                capture_output=True, text=True, cwd=REPO, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "listening on" not in result.stdout
