"""Fixtures that start real parts: a redis-server and the simulator, on loopback.

Nothing here touches the machine's shared Redis: each test run starts its own
`redis-server` on a free port, and each test works under its own key prefix.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from .support import (
    OwnCluster,
    OwnRedis,
    Process,
    RedisServer,
    SimulatorProcess,
    clean_env,
    free_port,
    node_environment,
    pings,
    redis_server_binary,
    start_command,
    wait_for,
)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of this test session, on a free port, keeping nothing on disk."""
    binary = redis_server_binary()
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    try:
        wait_for(lambda: pings(client), timeout_s=10, what="redis-server")
        yield RedisServer(port, f"redis://127.0.0.1:{port}/0")
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own."""
    return f"t{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def rdb(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of the session's redis-server that returns bytes."""
    client = redis.Redis(port=redis_server.port)
    yield client
    client.close()


@pytest.fixture(scope="session")
def simulator() -> Iterator[SimulatorProcess]:
    """The simulator for this test session, with a little latency."""
    port = free_port()
    process = start_command(
        "simulate-api", "--port", str(port), "--latency-ms", "20", env=clean_env()
    )
    process.wait_for_event("simulator.listening")
    yield SimulatorProcess(f"http://127.0.0.1:{port}", process)
    process.stop()


@pytest.fixture
def node_env(
    redis_server: RedisServer, simulator: SimulatorProcess, prefix: str, tmp_path: Path
) -> dict[str, str]:
    """The environment of a node under test: private Redis, simulator, fake key."""
    return node_environment(redis_server.url, simulator.base_url, prefix, tmp_path)


@pytest.fixture
def started() -> Iterator[list[Process]]:
    """Processes a test starts; each still running at the end is killed by PID."""
    processes: list[Process] = []
    yield processes
    for process in processes:
        process.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A running redis-server of this test's own; stopped at the end."""
    server = OwnRedis(free_port(), tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnCluster]:
    """A Redis Cluster of three masters, of this test module's own."""
    cluster = OwnCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
