"""The commands: check-config, serve refusing bad configs, graceful SIGTERM, demo."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from tests.support import (
    REPO,
    STREAM_CHAT,
    Proc,
    ResponseReader,
    post_request,
    raw_connect,
    start_proxy,
)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmproxy", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=30, stdin=subprocess.DEVNULL)


def test_check_config_accepts_the_example_and_masks_secrets(tmp_path):
    result = _run("check-config", str(REPO / "config.yaml.example"))
    assert result.returncode == 0, result.stderr
    config = tmp_path / "c.yaml"
    config.write_text('backends:\n  - url: "http://127.0.0.1:9"\n    api_key: "sk-very-secret"\n')
    result = _run("check-config", str(config))
    assert result.returncode == 0
    assert "sk-very-secret" not in result.stdout
    assert "***" in result.stdout


@pytest.mark.parametrize(("text", "message"), [
    ('backends:\n  - url: "http://a:1"\n  - url: "http://b:2"\n    weight: "abc"\n',
     'backends[1].weight: must be a positive integer, got "abc"'),
    ('backends:\n  - url: "http://a:1"\nserver:\n  tiemouts: {}\n', "server.tiemouts"),
    ("backends: []\n", "backends"),
])
def test_bad_config_refuses_to_start_naming_the_key(tmp_path, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    for args in (("check-config", str(config)), ("serve", "--config", str(config), "--listen", "127.0.0.1:0")):
        result = _run(*args)
        assert result.returncode == 1
        assert message in result.stderr
        assert "listening on" not in result.stdout


def test_sigterm_lets_in_flight_stream_finish_then_exits_zero(mock_vllm, tmp_path):
    proxy = start_proxy(tmp_path, [{"url": mock_vllm.url}])
    try:
        sock = raw_connect(proxy.port, timeout=10)
        sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT,
                                  {"x-mock-tokens": "20", "x-mock-delay-ms": "50"}))
        reader = ResponseReader(sock).read_head()
        assert reader.read_chunk()
        proxy.popen.send_signal(signal.SIGTERM)
        body, complete = reader.read_body()
        sock.close()
        assert complete, "an in-flight stream must be allowed to finish on SIGTERM"
        assert body.endswith(b"data: [DONE]\n\n")
        assert proxy.popen.wait(10) == 0
        with pytest.raises(OSError):
            raw_connect(proxy.port, timeout=1).close()
    finally:
        proxy.stop(signal.SIGKILL)


def test_demo_serves_the_openai_sdk_out_of_the_box(procs):
    openai = pytest.importorskip("openai")
    demo = Proc(["demo", "--listen", "127.0.0.1:0"]).wait_listening()
    procs.append(demo)
    client = openai.OpenAI(base_url=demo.url + "/v1", api_key="unused", max_retries=0, timeout=20)
    stream = client.chat.completions.create(model="demo-model", stream=True,
                                            messages=[{"role": "user", "content": "hi"}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert len(text) > 10
    assert "curl" in demo.text()


def test_serve_listen_flag_and_health(mock_vllm, new_proxy):
    proxy = new_proxy([{"url": mock_vllm.url}])
    with raw_connect(proxy.port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reader = ResponseReader(sock).read_head()
        body, _ = reader.read_body()
    health = json.loads(body)
    assert reader.status == 200 and health["status"] == "ok" and health["backends"] == 1
