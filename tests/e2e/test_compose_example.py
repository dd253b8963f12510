"""deploy/compose.yaml, the local multi-instance example, checked without Docker.

The file is read for what Docker would need (the image built from the repository's Dockerfile, the config
mounted where the image reads it, the services wired by name), then the same topology runs as processes on
loopback: a redis-server, the mock backend with the compose command's arguments, and two proxies on the
very config file the containers mount, with the compose environment pointed at loopback ports. A per-key
limit then holds across both proxies.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.e2e.test_ratelimit import Reply, call, posts
from tests.redis_server import RedisServer
from tests.support import REPO, Proc

DEPLOY = Path(REPO) / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
PROXIES = ("proxy1", "proxy2")
KEY = "sk-compose-test-key-0123456789"

pytestmark = pytest.mark.timeout(60)


def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def config_mount(service: dict) -> tuple[Path, str]:
    """(the file on the host, where the container sees it) of the proxy's config volume."""
    source, target, *_ = service["volumes"][0].split(":")
    return (COMPOSE.parent / source).resolve(), target


def mock_listen_port(mock: dict) -> int:
    command = mock["command"]
    return int(command[command.index("--listen") + 1].rpartition(":")[2])


def test_compose_file_builds_the_image_and_wires_the_services():
    found = services()
    assert set(found) == {"redis", "mock", *PROXIES}
    for name in ("mock", *PROXIES):
        build = found[name]["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == Path(REPO, "Dockerfile")
        assert "image" not in found[name]  # a tag shared by several builds makes parallel builds collide
    mock = found["mock"]
    assert mock["entrypoint"] == ["python", "-m", "llmproxy.mockbackend"]
    # The image's CMD: serve --config /home/llmproxy/config.yaml
    dockerfile = Path(REPO, "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))
    published = set()
    for name in PROXIES:
        proxy = found[name]
        source, target = config_mount(proxy)
        assert source.is_file() and cmd[cmd.index("--config") + 1] == target
        config = yaml.safe_load(source.read_text())
        host_port, container_port = proxy["ports"][0].split(":")
        assert config["server"]["listen"] == f":{container_port}"
        published.add(host_port)
        env = proxy["environment"]
        redis_url, backend_url = urlsplit(env["REDIS_URL"]), urlsplit(env["BACKEND_URL"])
        assert redis_url.hostname == "redis" and proxy["depends_on"]["redis"]["condition"] == "service_healthy"
        assert (backend_url.hostname, backend_url.port) == ("mock", mock_listen_port(mock))
        assert "${REDIS_URL" in config["rate_limit"]["redis_url"] and "${BACKEND_URL" in config["backends"][0]["url"]
    assert len(published) == len(PROXIES)


def test_the_mock_entrypoint_runs():
    done = subprocess.run([sys.executable, "-m", "llmproxy.mockbackend", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0 and "--listen" in done.stdout


def loopback(url: str, port: int) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=f"127.0.0.1:{port}").geturl()


def test_the_compose_topology_on_loopback_holds_a_per_key_limit_across_both_proxies(procs):
    found = services()
    mock_args = list(found["mock"]["command"])
    mock_args[mock_args.index("--listen") + 1] = "127.0.0.1:0"
    config_path, _ = config_mount(found["proxy1"])
    config = yaml.safe_load(config_path.read_text())
    burst = config["rate_limit"]["per_key"]["burst"]
    model = mock_args[mock_args.index("--model") + 1]
    with RedisServer() as redis_server:
        mock = Proc(["mock-backend", *mock_args]).wait_listening()  # python -m llmproxy.mockbackend's CLI
        procs.append(mock)
        ports = []
        for name in PROXIES:
            env = found[name]["environment"]
            env = {"REDIS_URL": loopback(env["REDIS_URL"], redis_server.port),
                   "BACKEND_URL": loopback(env["BACKEND_URL"], mock.port), "DEMO_KEY": KEY}
            proxy = Proc(["serve", "--config", str(config_path), "--listen", "127.0.0.1:0"], env=env).wait_listening()
            procs.append(proxy)
            ports.append(proxy.port)
        before = posts(mock)
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
        barrier = threading.Barrier(50)

        def one(i: int) -> Reply:
            barrier.wait(timeout=10)
            return call(ports[i % 2], KEY, body)

        with ThreadPoolExecutor(50) as pool:
            replies = list(pool.map(one, range(50)))
        assert Counter(r.status for r in replies) == {200: burst, 429: 50 - burst}
        assert posts(mock) == before + burst

