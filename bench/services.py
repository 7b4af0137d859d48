"""The processes a benchmark run starts: redis-server, the simulator, the consumers.

Each process writes its output to a log file of its own rather than to a pipe:
the node logs a few lines per task, and a pipe would make the harness read
and parse them on the cores the consumer is being measured on.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from tests.support import REPO, clean_env, free_port, redis_server_binary

from . import wire


class ServiceError(RuntimeError):
    """A process exited, or did not say it was ready in time."""


@dataclass
class Service:
    """A process of ours running in the background, its output in `log_path`."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _offset: int = 0
    _unread: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def wait_for_line(self, needle: str, timeout_s: float = 30) -> str:
        """Waits until a line containing `needle` is logged; returns it."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._unread += self._new_lines()
            while self._unread:
                line = self._unread.pop(0)
                if needle in line:
                    return line
            if self.popen.poll() is not None:
                raise ServiceError(f"{self.name} exited; see {self.log_path}")
            if time.monotonic() >= deadline:
                raise ServiceError(f"{self.name}: no {needle!r}; see {self.log_path}")
            time.sleep(0.05)

    def wait_for_event(self, event: str, timeout_s: float = 30) -> dict[str, Any]:
        """Waits for a JSON log line whose `event` is `event`; returns it."""
        line = self.wait_for_line(f'"{event}"', timeout_s)
        found: dict[str, Any] = json.loads(line)
        return found

    @contextlib.contextmanager
    def stopped_on_failure(self) -> Iterator[Service]:
        """Stops the process when the block raises: one that never got ready."""
        try:
            yield self
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout_s: float = 20) -> int:
        """SIGTERM, then SIGKILL when it has not exited within `timeout_s`."""
        if self.popen.poll() is None:
            self.popen.terminate()
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(timeout_s)

    def _new_lines(self) -> list[str]:
        with self.log_path.open("rb") as log:
            log.seek(self._offset)
            chunk = log.read()
        complete = chunk.rfind(b"\n") + 1
        self._offset += complete
        return chunk[:complete].decode(errors="replace").splitlines()


def start(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> Service:
    """Starts `argv` from the repository's root, its output in `log_dir/name.log`."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            argv,
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Service(name, popen, log_path)


def python_env() -> dict[str, str]:
    """This environment without anything that configures a node."""
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), env.get("PYTHONPATH")])
    )
    return env


def start_redis(workdir: Path, log_dir: Path) -> tuple[Service, str]:
    """A private redis-server without persistence; returns it and its URL."""
    port = free_port()
    argv = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(workdir)]
    service = start("redis-server", argv, python_env(), log_dir)
    with service.stopped_on_failure():
        service.wait_for_line("Ready to accept connections")
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    client.ping()
    client.close()
    return service, url


def start_simulator(latency_ms: int, log_dir: Path) -> tuple[Service, str]:
    """The Messages API simulator with a fixed latency; returns it and its URL."""
    port = free_port()
    env = python_env()
    env["MESH_SIM_API_KEYS"] = wire.API_KEY
    argv = [sys.executable, "-m", "mesh_node", "simulate-api", "--port", str(port)]
    argv += ["--latency-ms", str(latency_ms), "--latency-jitter-ms", "0"]
    service = start("simulator", argv, env, log_dir)
    with service.stopped_on_failure():
        service.wait_for_event("simulator.listening")
    return service, f"http://127.0.0.1:{port}"


def start_otlp_sink(log_dir: Path) -> tuple[Service, str]:
    """The OTLP receiver; returns it and the endpoint for OTEL_EXPORTER_OTLP_*."""
    argv = [sys.executable, "-m", "bench.otlp_sink"]
    service = start("otlp-sink", argv, python_env(), log_dir)
    with service.stopped_on_failure():
        port = service.wait_for_event("otlp.listening")["port"]
    return service, f"http://127.0.0.1:{port}"


def http_json(base_url: str, method: str, path: str) -> dict[str, Any]:
    """One request to a loopback server of ours; returns its JSON answer."""
    host_port = base_url.removeprefix("http://")
    connection = http.client.HTTPConnection(host_port, timeout=10)
    try:
        connection.request(method, path)
        answer: dict[str, Any] = json.loads(connection.getresponse().read())
    finally:
        connection.close()
    return answer
