"""Fixtures of the end-to-end tests: processes a test starts and owns, the proxy a module shares.

(The mocks shared by a module, mock_vllm, mock_tgi and mock_ollama, and `procs` are in tests/conftest.py.)
"""

from __future__ import annotations

import pytest

from tests.support import Proc, assert_idle, start_mock, start_proxy, usage_config


@pytest.fixture
def new_mock(procs):
    """new_mock(dialect="vllm", *extra): a mock backend of this test's own, stopped at its end."""
    def start(dialect: str = "vllm", *extra: str) -> Proc:
        mock = start_mock(dialect, *extra)
        procs.append(mock)
        return mock
    return start


@pytest.fixture
def new_proxy(tmp_path, procs):
    """new_proxy(backends, **sections): a proxy whose config, access log and files are in this test's tmp_path,
    stopped at the end of the test."""
    def start(backends: list[dict], **sections: dict) -> Proc:
        proxy = start_proxy(tmp_path, backends, **sections)
        procs.append(proxy)
        return proxy
    return start


@pytest.fixture
def metered_proxy(new_proxy, tmp_path):
    """new_proxy with usage metering on (unless `usage` is given): the file reporter of usage_config(tmp_path)
    writes every record to tmp_path/usage.jsonl (usage_records(tmp_path), usage_record(tmp_path, id))."""
    def start(backends: list[dict], **sections: dict) -> Proc:
        sections.setdefault("usage", usage_config(tmp_path))
        return new_proxy(backends, **sections)
    return start


@pytest.fixture(scope="module")
def proxy(mock_vllm, tmp_path_factory):
    """One proxy for the module, in front of its vLLM mock (backend "vllm")."""
    proc = start_proxy(tmp_path_factory.mktemp("proxy"), [{"url": mock_vllm.url, "name": "vllm"}])
    yield proc
    proc.stop()


@pytest.fixture
def proxy_idle_after(request):
    """After a test that used the module's `proxy`: it is idle again (assert_idle). For `pytestmark`."""
    yield
    if "proxy" in request.fixturenames:
        assert_idle(request.getfixturevalue("proxy"))
