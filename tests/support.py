"""What the tests share besides fixtures: processes, waits, Redis helpers.

Kept apart from `conftest.py` so that the fault-injection harness (`tests.chaos`)
can use the same helpers outside pytest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis

REPO = Path(__file__).resolve().parents[1]

FAKE_KEY = "sk-ant-test-0123456789abcdef0123456789abcdef"

SECRET_NAMES = (
    "ANTHROPIC_API_KEY",
    "CLAUDE_API_KEY",
    "ANTHROPIC_API_KEY_FILE",
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_BASE_URL",
    "REDIS_URL",
    "MESH_CONFIG",
    "MESH_PREFIX",
    "MESH_GROUP",
    "MESH_NODE_ID",
    "MESH_CONCURRENCY",
    "CLAUDE_SANDBOX_MODE",
)

CONFIGURING_PREFIXES = ("OTEL_", "MESH_", "ANTHROPIC_", "CLAUDE_")

# Limits small enough that the oversize cases stay small.
TEST_CONFIG: dict[str, object] = {
    # Far above what any test sends; the limiter's own tests set their limits.
    "rateLimiting": {"maxRequestsPerMinute": 100_000, "maxRequestsPerHour": 1_000_000},
    "maxTaskBytes": 4096,
    "maxPromptBytes": 1024,
    "maxOutputTokens": 4096,
    "gracePeriodS": 10,
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(
    predicate: Callable[[], Any], *, timeout_s: float, what: str, poll_s: float = 0.02
) -> Any:
    """Polls `predicate` until it returns something truthy, or fails the test."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


@dataclass
class Process:
    """A command of ours running in the background, its stderr parsed as JSON logs."""

    popen: subprocess.Popen[bytes]
    events: list[dict[str, Any]] = field(default_factory=list)
    stderr_lines: list[bytes] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _eof: bool = False

    def __post_init__(self) -> None:
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            with self._changed:
                self.stderr_lines.append(line)
                with contextlib.suppress(ValueError):
                    self.events.append(json.loads(line))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def wait_for_event(self, name: str, timeout_s: float = 20) -> dict[str, Any]:
        """Waits until the process logs an event of this name; returns it."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for event in self.events:
                    if event.get("event") == name:
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._eof:
                    raise AssertionError(
                        f"no {name!r} event; stderr: {self.stderr_text()}"
                    )
                self._changed.wait(min(remaining, 0.2))

    def event_names(self) -> list[str]:
        """The names of the events logged so far."""
        with self._changed:
            return [str(event.get("event")) for event in self.events]

    def stderr_text(self) -> str:
        """Everything written to stderr so far."""
        with self._changed:
            return b"".join(self.stderr_lines).decode(errors="replace")

    def stop(self, timeout_s: float = 20) -> int:
        """SIGTERM, then wait for the exit code."""
        if self.popen.poll() is None:
            self.popen.terminate()
        return self.wait(timeout_s)

    def wait(self, timeout_s: float = 20) -> int:
        """Waits for the exit, reads what is left of stderr and closes the pipes."""
        code = self.popen.wait(timeout_s)
        self._reader.join(timeout_s)
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()
        return code

    def kill(self) -> None:
        """SIGKILL, for clean-up after a failed test."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.wait()


def redis_server_binary() -> str:
    """The path of redis-server, or a failed test saying how to get it."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise AssertionError(
            "redis-server is not installed; scripts/test.sh installs it"
        )
    return binary


@dataclass(frozen=True)
class RedisServer:
    """A private redis-server."""

    port: int
    url: str


def pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@dataclass(frozen=True)
class SimulatorProcess:
    """The simulator, running as `mesh-node simulate-api` on a free port."""

    base_url: str
    process: Process

    def stats(self) -> dict[str, Any]:
        """The simulator's counters."""
        with urllib.request.urlopen(f"{self.base_url}/_sim/stats", timeout=5) as reply:
            stats: dict[str, Any] = json.load(reply)
            return stats


def clean_env() -> dict[str, str]:
    """The test run's environment without anything that configures a node."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in SECRET_NAMES and not k.startswith(CONFIGURING_PREFIXES)
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def node_environment(
    redis_url: str, api_url: str, prefix: str, workdir: Path
) -> dict[str, str]:
    """The environment of a node under test: its Redis, the simulator, a fake
    key, a key prefix and the tests' configuration (written to `workdir`)."""
    config = workdir / "config.json"
    config.write_text(json.dumps(TEST_CONFIG))
    env = clean_env()
    env.update(
        ANTHROPIC_API_KEY=FAKE_KEY,
        ANTHROPIC_BASE_URL=api_url,
        REDIS_URL=redis_url,
        MESH_PREFIX=prefix,
        MESH_CONFIG=str(config),
    )
    return env


def command(*args: str) -> list[str]:
    """The argument list that runs `mesh-node` with these arguments."""
    return [sys.executable, "-m", "mesh_node", *args]


def run_command(
    *args: str, env: dict[str, str], stdin: bytes = b"", timeout_s: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """Runs `mesh-node` to completion."""
    return subprocess.run(
        command(*args),
        env=env,
        input=stdin,
        capture_output=True,
        timeout=timeout_s,
        cwd=REPO,
        check=False,
    )


def start_command(*args: str, env: dict[str, str], stdin_pipe: bool = False) -> Process:
    """Starts `mesh-node` in the background; stdin is a pipe when asked for."""
    popen = subprocess.Popen(
        command(*args),
        env=env,
        cwd=REPO,
        stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    return Process(popen)


def add_entry(rdb: redis.Redis, prefix: str, fields: dict[str, bytes | str]) -> str:
    """Adds an entry to the task stream under `prefix`; returns its id."""
    entry_id: Any = rdb.xadd(f"{prefix}tasks", cast(Any, fields))
    return str(entry_id.decode())


def add_task(rdb: redis.Redis, prefix: str, task: dict[str, Any]) -> str:
    """Adds one task, as JSON, to the task stream under `prefix`."""
    return add_entry(rdb, prefix, {"task": json.dumps(task)})


def stream_results(rdb: redis.Redis, prefix: str) -> list[dict[str, Any]]:
    """Every result published under `prefix`, in stream order."""
    entries: Any = rdb.xrange(f"{prefix}results")
    return [json.loads(fields[b"result"]) for _id, fields in entries]


@dataclass
class OwnRedis:
    """A redis-server of one test's own, with AOF on, that the test may restart."""

    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Starts the server on its port and waits until it answers."""
        self.process = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        try:
            wait_for(lambda: pings(client), timeout_s=10, what="redis-server")
        finally:
            client.close()

    def stop(self) -> None:
        """Shuts the server down (SIGTERM: it writes its AOF and exits)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)


def redis_cli_binary() -> str:
    """The path of redis-cli, or a failed test saying how to get it."""
    binary = shutil.which("redis-cli")
    if binary is None:
        raise AssertionError("redis-cli is not installed; scripts/test.sh installs it")
    return binary


def cluster_state(port: int) -> dict[str, str]:
    """`CLUSTER INFO` of the node on `port`, as text fields."""
    client = redis.Redis(port=port, socket_timeout=5)
    try:
        raw: Any = client.cluster("INFO")
    finally:
        client.close()
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    fields = (line.strip().partition(":") for line in text.splitlines())
    return {name: value for name, _colon, value in fields if _colon}


def _wait_until_up(port: int) -> None:
    client = redis.Redis(port=port)
    try:
        wait_for(lambda: pings(client), timeout_s=10, what="redis-server")
    finally:
        client.close()


@dataclass
class OwnCluster:
    """A Redis Cluster of three masters and no replicas, on loopback ports.

    Each node's cluster bus has a port of its own (`--cluster-port`) rather
    than the default port + 10000, which may be above 65535 or taken.
    """

    workdir: Path
    ports: list[int] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The URL of one of its nodes; a client discovers the others."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self, masters: int = 3) -> None:
        """Starts the nodes, joins them into one cluster and waits until it
        serves every slot."""
        for _ in range(masters):
            port, bus_port = free_port(), free_port()
            (self.workdir / str(port)).mkdir()
            self.ports.append(port)
            self.processes.append(self._server(port, bus_port))
        for port in self.ports:
            _wait_until_up(port)
        created = subprocess.run(
            [
                redis_cli_binary(),
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert created.returncode == 0, (
            created.stdout.decode() + created.stderr.decode()
        )
        self.wait_serving()

    def wait_serving(self) -> None:
        """Waits until every node says the cluster is ok and knows them all."""
        wait_for(self._serving, timeout_s=30, what="cluster_state:ok on every node")

    def stop_node(self, index: int) -> None:
        """Stops one node (SIGTERM); its slots go unserved until it is back."""
        process = self.processes[index]
        process.terminate()
        process.wait(20)

    def start_node(self, index: int) -> None:
        """Starts a stopped node again, with its cluster configuration (and
        so its slots) but none of its data."""
        command = cast(list[str], self.processes[index].args)
        self.processes[index] = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        _wait_until_up(self.ports[index])

    def stop(self) -> None:
        """Stops every node it started, by PID."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            process.wait(20)

    def _server(self, port: int, bus_port: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(port),
                "--cluster-port",
                str(bus_port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir / str(port)),
            ],
            stdout=subprocess.DEVNULL,
        )

    def _serving(self) -> bool:
        for port in self.ports:
            state = cluster_state(port)
            if state.get("cluster_state") != "ok" or state.get(
                "cluster_known_nodes"
            ) != str(len(self.ports)):
                return False
        return True


def with_config(env: dict[str, str], **values: Any) -> dict[str, str]:
    """Sets keys in the configuration file a node environment points at."""
    path = Path(env["MESH_CONFIG"])
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config))
    return env
