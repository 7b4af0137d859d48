"""The systems under test: how each consumer starts and how a task reaches it.

Every consumer is its own process, started fresh for each concurrency, with
the same key, simulator and Redis. Each names the HTTP transport and event
loop it runs: the baseline and the peer say so in a ready line, the node in
its `node.started` log line (`?` where the line does not carry them).
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tests.support import REPO

from . import wire
from .services import Service, python_env, start

UNKNOWN = "?"
NODE_ID = "bench-node"

# Far above anything the benchmark sends, so that the limiter never holds a
# task back; it still runs, and its Redis round trips count.
NODE_RATE_LIMITS = {
    "maxRequestsPerMinute": 6_000_000,
    "maxRequestsPerHour": 360_000_000,
}


@dataclass(frozen=True)
class Bench:
    """What every consumer of a benchmark run shares."""

    redis_url: str
    api_url: str
    log_dir: Path
    otlp_endpoint: str | None = None


@dataclass(frozen=True)
class Consumer:
    """A running consumer and what it runs on."""

    service: Service
    http_transport: str
    event_loop: str


class System(Protocol):
    """A consumer the benchmark can start and feed."""

    name: str

    def start(self, bench: Bench, in_flight: int) -> Consumer:
        """Starts the consumer with `in_flight` as its concurrency, once ready."""
        ...

    def encode(self, task_id: str, index: int) -> tuple[str, dict[str, Any]]:
        """The stream and entry fields that carry this task to the consumer."""
        ...


def api_env(bench: Bench) -> dict[str, str]:
    """A clean environment pointing the SDK at the simulator and Redis."""
    env = python_env()
    env.update(
        REDIS_URL=bench.redis_url,
        ANTHROPIC_API_KEY=wire.API_KEY,
        ANTHROPIC_BASE_URL=bench.api_url,
    )
    return env


def stream_entry(task_id: str, index: int) -> tuple[str, dict[str, Any]]:
    """The node's task entry: the task as JSON in the `task` field."""
    return wire.TASKS, {"task": json.dumps(wire.task(task_id, index))}


def _from_ready_line(service: Service) -> Consumer:
    with service.stopped_on_failure():
        ready = service.wait_for_event(wire.READY_EVENT, timeout_s=60)
    return Consumer(service, ready["http_transport"], ready["event_loop"])


class Baseline:
    """The hand-written minimum, `bench.baseline`."""

    name = "baseline"

    def start(self, bench: Bench, in_flight: int) -> Consumer:
        """Starts `python -m bench.baseline`."""
        argv = [sys.executable, "-m", "bench.baseline"]
        argv += ["--concurrency", str(in_flight)]
        service = start(f"baseline-{in_flight}", argv, api_env(bench), bench.log_dir)
        return _from_ready_line(service)

    def encode(self, task_id: str, index: int) -> tuple[str, dict[str, Any]]:
        """Same entries as the node's."""
        return stream_entry(task_id, index)


class MeshNode:
    """`mesh-node serve`, with telemetry off or exporting OTLP."""

    def __init__(self, *, otlp: bool) -> None:
        self.otlp = otlp
        self.name = "mesh-node+otlp" if otlp else "mesh-node"

    def start(self, bench: Bench, in_flight: int) -> Consumer:
        """Starts `mesh-node serve --concurrency in_flight`; waits for node.started."""
        env = api_env(bench)
        env["MESH_CONFIG"] = str(self._write_config(bench.log_dir))
        if self.otlp:
            if bench.otlp_endpoint is None:
                raise ValueError("mesh-node+otlp needs the OTLP receiver")
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = bench.otlp_endpoint
        argv = [sys.executable, "-m", "mesh_node", "serve", "--node-id", NODE_ID]
        argv += ["--concurrency", str(in_flight)]
        label = f"{self.name.replace('+', '-')}-{in_flight}"
        service = start(label, argv, env, bench.log_dir)
        with service.stopped_on_failure():
            started = service.wait_for_event("node.started", timeout_s=60)
        return Consumer(
            service,
            str(started.get("http_transport", UNKNOWN)),
            str(started.get("event_loop", UNKNOWN)),
        )

    def encode(self, task_id: str, index: int) -> tuple[str, dict[str, Any]]:
        """The node's own entries."""
        return stream_entry(task_id, index)

    @staticmethod
    def _write_config(directory: Path) -> Path:
        path = directory / "node-config.json"
        config = {"rateLimiting": NODE_RATE_LIMITS, "gracePeriodS": 10}
        path.write_text(json.dumps(config, indent=2))
        return path


class Peer:
    """taskiq's worker on taskiq-redis's RedisStreamBroker, `bench.peer`."""

    name = "peer"

    def __init__(self) -> None:
        # taskiq is a benchmark-only dependency: imported when the peer runs.
        from taskiq.message import TaskiqMessage
        from taskiq.serializers.json_serializer import JSONSerializer

        self._message = TaskiqMessage
        self._serializer = JSONSerializer()

    def start(self, bench: Bench, in_flight: int) -> Consumer:
        """Starts `taskiq worker` with one worker process."""
        argv = [sys.executable, "-m", "taskiq", "worker", "bench.peer:broker"]
        argv += ["--app-dir", str(REPO), "--workers", "1"]
        argv += ["--max-async-tasks", str(in_flight)]
        env = api_env(bench)
        env[wire.POOL_SIZE_VARIABLE] = str(in_flight)
        service = start(f"peer-{in_flight}", argv, env, bench.log_dir)
        consumer = _from_ready_line(service)
        with service.stopped_on_failure():
            service.wait_for_line("Listening started", timeout_s=60)
        return consumer

    def encode(self, task_id: str, index: int) -> tuple[str, dict[str, Any]]:
        """The message `run_task.kiq(task=...)` would send, as taskiq encodes it."""
        message = self._message(
            task_id=uuid.uuid4().hex,
            task_name=wire.PEER_TASK_NAME,
            labels={},
            labels_types={},
            args=[],
            kwargs={"task": wire.task(task_id, index)},
        )
        data = self._serializer.dumpb(message.model_dump(mode="json"))
        return wire.PEER_QUEUE, {"data": data}


SYSTEM_NAMES = ("baseline", "mesh-node", "mesh-node+otlp", "peer")


def system_named(name: str) -> System:
    """The system of this name (one of `SYSTEM_NAMES`)."""
    if name == "baseline":
        return Baseline()
    if name in ("mesh-node", "mesh-node+otlp"):
        return MeshNode(otlp=name.endswith("+otlp"))
    if name == "peer":
        return Peer()
    raise ValueError(f"unknown system {name!r}; one of {', '.join(SYSTEM_NAMES)}")
