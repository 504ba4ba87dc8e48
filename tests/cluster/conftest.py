"""Fixtures for the cluster tests: a real redis-server (Debian's `redis-server`,
started here on a free loopback port) and clusters of server.py on it.

Without redis-server or redis-py these tests skip on a developer's machine and
fail under CI (CI=1), where scripts/test installs both.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_harness import REDIS_SERVER, Cluster, RedisServer, need


def _require_redis() -> None:
    if REDIS_SERVER is None:
        need("redis-server is not installed (apt-get install redis-server)")
    if importlib.util.find_spec("redis") is None:
        need("redis-py is not installed in this interpreter (pip install '.[redis]')")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One non-persistent Redis for the session, emptied before each test."""
    _require_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.command("FLUSHALL")
    return redis_server.url


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own whose data survives a restart (append-only file)."""
    _require_redis()
    server = RedisServer(tmp_path, persistent=True)
    yield server
    server.stop()


def _cluster(url: str) -> Iterator[Cluster]:
    cluster = Cluster(url)
    yield cluster
    bad = cluster.close()
    if bad:
        pytest.fail("a process printed a traceback:\n" + "\n".join(bad), pytrace=False)


@pytest.fixture
def cluster(redis_url: str) -> Iterator[Cluster]:
    """No server started yet: tests start as many as they need."""
    yield from _cluster(redis_url)


@pytest.fixture
def trio(cluster: Cluster) -> Cluster:
    """Three servers; alice (client.py) on server 0, bob (client.py) on
    server 1, carol (raw socket) on server 2; every join line consumed."""
    cluster.start(3)
    cluster.join("alice", 0)
    cluster.join("bob", 1)
    cluster.nc_join("carol", 2)
    return cluster
