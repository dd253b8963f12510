"""The supervisor's port reservation, and metrics in multiprocess mode (as each worker runs them)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmproxy.metrics import Metrics
from llmproxy.overhead import ProxyOverhead
from llmproxy.workers import reserve_port

REPO = Path(__file__).resolve().parents[2]

STATE = {
    "inflight": 2, "streams": 1, "connections": 3, "ratelimit_held": 1, "outbox_pending": 4,
    "backends": {"a": {"checked_out": 1, "idle": 2, "inflight": 1, "healthy": True, "ttft_ewma": 0.5,
                       "queue_depth": 7, "kv_cache": 0.25}},
}


def test_a_reserved_port_takes_no_connections_but_lets_workers_listen_beside_it() -> None:
    reserved = reserve_port("127.0.0.1", 0)
    port = reserved.getsockname()[1]
    try:
        assert port != 0
        with socket.socket() as plain, pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))  # held: nothing else takes the port
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        with socket.socket() as worker:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
            for _ in range(20):  # every connection goes to the listener, none to the reservation
                client = socket.create_connection(("127.0.0.1", port), timeout=2)
                worker.accept()[0].close()
                client.close()
    finally:
        reserved.close()


def _render(live_state: dict, multiprocess_dir: Path | None) -> str:
    """Render a Metrics in a fresh interpreter: multiprocess mode is chosen when prometheus_client is imported."""
    script = textwrap.dedent(f"""
        import asyncio, json, sys
        from llmproxy.metrics import Metrics
        from llmproxy.overhead import ProxyOverhead
        state = json.loads({json.dumps(json.dumps(live_state))})
        overhead = ProxyOverhead()
        metrics = Metrics(lambda: state, overhead)
        metrics.observe_request("a", 200, "--", 0.01, 0.001)
        overhead.chunk.observe(0.00003)
        overhead.first_byte.observe(0.0002)
        metrics.render()  # copies the overhead counts so far: the next render must not count them again
        overhead.chunk.observe(0.2)
        sys.stdout.write(metrics.render().decode())
    """)
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    if multiprocess_dir is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(multiprocess_dir)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_multiprocess_mode_keeps_every_name_and_label_and_sums_workers(tmp_path: Path) -> None:
    single = _samples(_render(STATE, None))
    _render(STATE, tmp_path)
    merged = _samples(_render(STATE, tmp_path))  # two "workers" have now written to the shared files
    expected = {name for name in single if not name.startswith(("process_", "python_")) and "_created" not in name}
    assert expected <= set(merged)
    assert merged['llmproxy_requests_total{backend="a",status="200"}'] == 2
    # the overhead histograms are counted in place and copied at scrape time: each worker's twice-rendered
    # counts arrive once, summed over both workers
    for samples, workers in ((single, 1), (merged, 2)):
        assert samples["llmproxy_proxy_chunk_overhead_seconds_count"] == 2 * workers
        assert samples['llmproxy_proxy_chunk_overhead_seconds_bucket{le="5e-05"}'] == workers
        assert samples['llmproxy_proxy_chunk_overhead_seconds_bucket{le="0.1"}'] == workers
        assert samples['llmproxy_proxy_chunk_overhead_seconds_bucket{le="+Inf"}'] == 2 * workers
        assert samples["llmproxy_proxy_chunk_overhead_seconds_sum"] == pytest.approx(0.20003 * workers)
        assert samples['llmproxy_proxy_first_byte_overhead_seconds_bucket{le="0.00025"}'] == workers
        assert samples["llmproxy_proxy_request_overhead_seconds_count"] == 0
    assert merged["llmproxy_inflight_requests"] == 4  # "live" gauges: summed over processes still alive
    assert merged['llmproxy_backend_healthy{backend="a"}'] == 1  # min over the workers
    assert merged['llmproxy_backend_queue_depth{backend="a"}'] == 7  # max over the workers
    assert merged["llmproxy_usage_outbox_pending"] == 8


def test_single_process_live_gauges_are_read_at_scrape_time() -> None:
    state = {**STATE, "backends": {"a": {**STATE["backends"]["a"], "queue_depth": None, "healthy": False}}}
    state.pop("outbox_pending")
    samples = _samples(Metrics(lambda: state, ProxyOverhead()).render().decode())
    assert samples["llmproxy_inflight_requests"] == 2
    assert samples['llmproxy_backend_healthy{backend="a"}'] == 0
    assert not any(name.startswith(("llmproxy_backend_queue_depth", "llmproxy_usage_outbox")) for name in samples)
    assert any(name.startswith("process_") for name in samples)
