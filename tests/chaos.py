"""Fault injection at scale: nodes killed, Redis restarted, a node stopped, mid-run.

Runs `mesh-node serve` processes against a redis-server with AOF persistence and
the simulator with random latency and injected 429/500/529, and while the tasks
flow: kills nodes with SIGKILL (starting a replacement each time), restarts
Redis, and stops a node with SIGTERM. Events fire at fixed shares of progress
so that each lands mid-run. At the end it checks the delivery guarantees and
prints the figures:

- every id has exactly one result in the results stream;
- no entry is left pending;
- no id was billed more than twice, and the ids billed twice are no more than
  the tasks the killed nodes held at the moment they were killed.

    python -m tests.chaos [--tasks N] [--nodes N] [--kills N] [--sigterms N]
                          [--redis-restarts N] [--seed N]

`scripts/chaos.sh` runs it; `tests/test_chaos.py` runs the default size.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from mesh_node.simulator import prompt_key

from .support import (
    FAKE_KEY,
    OwnRedis,
    Process,
    clean_env,
    free_port,
    start_command,
    wait_for,
)

GROUP = "mesh-nodes"


@dataclass(frozen=True)
class Plan:
    """How big the run is and which faults it injects."""

    tasks: int = 1000
    nodes: int = 2
    kills: int = 2
    sigterms: int = 1
    redis_restarts: int = 1
    concurrency: int = 16
    seed: int = 1
    timeout_s: float = 240


@dataclass
class Report:
    """The figures of one run."""

    tasks: int = 0
    results: int = 0
    ids_with_one_result: int = 0
    duplicate_results: int = 0
    missing_ids: int = 0
    pending: int = 0
    billed_calls: int = 0
    ids_billed_twice: int = 0
    ids_billed_more: int = 0
    held_at_kills: int = 0
    failed_results: int = 0
    bad_exit_codes: list[int] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether every guarantee held."""
        return (
            self.ids_with_one_result == self.tasks
            and self.results == self.tasks
            and self.pending == 0
            and self.ids_billed_more == 0
            and self.ids_billed_twice <= self.held_at_kills
            and not self.bad_exit_codes
        )

    def lines(self) -> list[str]:
        """The report as printable lines."""
        return [
            f"tasks submitted           {self.tasks}",
            f"results in stream         {self.results}",
            f"ids with exactly 1 result {self.ids_with_one_result}",
            f"duplicate results         {self.duplicate_results}",
            f"ids without a result      {self.missing_ids}",
            f"entries pending           {self.pending}",
            f"failed results            {self.failed_results}",
            f"billed API calls          {self.billed_calls}",
            f"ids billed twice          {self.ids_billed_twice}"
            f" (tasks held by killed nodes: {self.held_at_kills})",
            f"ids billed 3+ times       {self.ids_billed_more}",
            f"bad exit codes            {self.bad_exit_codes or 'none'}",
            f"events                    {', '.join(self.events)}",
            f"elapsed                   {self.elapsed_s:.1f} s",
            f"verdict                   {'PASS' if self.ok else 'FAIL'}",
        ]


class Run:
    """One chaos run and the processes it owns."""

    def __init__(self, plan: Plan, workdir: Path) -> None:
        self.plan = plan
        self.rng = random.Random(plan.seed)
        self.redis = OwnRedis(free_port(), workdir)
        self.prefix = f"chaos{uuid.uuid4().hex[:6]}:"
        self.workdir = workdir
        self.processes: list[Process] = []
        self.nodes: list[Process] = []
        self.report = Report(tasks=plan.tasks)
        self.prompts = {f"c{n}": f"chaos {n} {self.prefix}" for n in range(plan.tasks)}
        self.serial = 0

    def execute(self) -> Report:
        """Runs the plan and checks the outcome."""
        started_s = time.monotonic()
        try:
            self._start_parts()
            self._submit()
            for _ in range(self.plan.nodes):
                self._start_node()
            self._inject_faults()
            wait_for(
                self._all_settled,
                timeout_s=self.plan.timeout_s,
                what="every task settled",
                poll_s=0.2,
            )
            for node in self.nodes:
                self._expect_exit_zero(node)
            self.report.elapsed_s = time.monotonic() - started_s
            self._check()
        finally:
            self._stop_everything()
        return self.report

    def _start_parts(self) -> None:
        self.redis.start()
        port = free_port()
        self.simulator = start_command(
            "simulate-api",
            "--port",
            str(port),
            "--latency-ms",
            "60",
            "--latency-jitter-ms",
            "240",
            "--fail-rate",
            "0.05",
            env=clean_env(),
        )
        self.processes.append(self.simulator)
        self.simulator.wait_for_event("simulator.listening")
        self.api_url = f"http://127.0.0.1:{port}"
        config = self.workdir / "config.json"
        config.write_text(
            json.dumps(
                {
                    "claimTimeoutMs": 3000,
                    "gracePeriodS": 10,
                    "retry": {"maxAttempts": 8},
                    "rateLimiting": {
                        "maxRequestsPerMinute": 1_000_000,
                        "maxRequestsPerHour": 10_000_000,
                    },
                }
            )
        )
        self.env = clean_env()
        self.env.update(
            ANTHROPIC_API_KEY=FAKE_KEY,
            ANTHROPIC_BASE_URL=self.api_url,
            REDIS_URL=self.redis.url,
            MESH_PREFIX=self.prefix,
            MESH_CONFIG=str(config),
            MESH_CONCURRENCY=str(self.plan.concurrency),
        )

    def _client(self) -> redis.Redis:
        return redis.Redis(port=self.redis.port, socket_timeout=5)

    def _submit(self) -> None:
        with self._client() as client:
            pipe = client.pipeline(transaction=False)
            for task_id, prompt in self.prompts.items():
                task = json.dumps({"id": task_id, "prompt": prompt})
                pipe.xadd(f"{self.prefix}tasks", {"task": task})
            pipe.execute()

    def _start_node(self) -> None:
        self.serial += 1
        node = start_command(
            "serve", "--node-id", f"chaos-node-{self.serial}", env=self.env
        )
        self.processes.append(node)
        self.nodes.append(node)
        node.wait_for_event("node.started")

    def _inject_faults(self) -> None:
        """Fires each fault when the results reach its share of the tasks."""
        faults = (
            ["kill"] * self.plan.kills
            + ["sigterm"] * self.plan.sigterms
            + ["redis"] * self.plan.redis_restarts
        )
        self.rng.shuffle(faults)
        shares = sorted(self.rng.uniform(0.1, 0.8) for _ in faults)
        for fault, share in zip(faults, shares, strict=True):
            wait_for(
                lambda s=share: self._progress() >= s,  # type: ignore[misc]
                timeout_s=self.plan.timeout_s,
                what=f"{share:.0%} progress",
                poll_s=0.05,
            )
            getattr(self, f"_{fault}")()
            self.report.events.append(f"{fault}@{self._progress():.0%}")

    def _progress(self) -> float:
        try:
            with self._client() as client:
                return int(client.xlen(f"{self.prefix}results")) / self.plan.tasks
        except redis.ConnectionError:
            return 0.0

    def _kill(self) -> None:
        node = self.rng.choice(self.nodes)
        held = self._held_by(node)
        node.popen.send_signal(signal.SIGKILL)
        node.wait()
        self.nodes.remove(node)
        self.report.held_at_kills += held
        self._start_node()

    def _held_by(self, node: Process) -> int:
        """Tasks a node holds: started and neither finished nor given back."""
        names = node.event_names()
        return max(
            0,
            names.count("task.started")
            - names.count("task.finished")
            - names.count("task.released"),
        )

    def _sigterm(self) -> None:
        node = self.rng.choice(self.nodes)
        self.nodes.remove(node)
        self._start_node()
        self._expect_exit_zero(node)

    def _redis(self) -> None:
        self.redis.stop()
        time.sleep(self.rng.uniform(0.5, 1.5))  # the outage itself
        self.redis.start()

    def _expect_exit_zero(self, node: Process) -> None:
        code = node.stop(timeout_s=30)
        if code != 0:
            self.report.bad_exit_codes.append(code)

    def _all_settled(self) -> bool:
        try:
            with self._client() as client:
                done = int(client.xlen(f"{self.prefix}results")) >= self.plan.tasks
                summary: Any = client.xpending(f"{self.prefix}tasks", GROUP)
                return done and int(summary["pending"]) == 0
        except redis.RedisError:
            return False

    def _check(self) -> None:
        report = self.report
        with self._client() as client:
            entries: Any = client.xrange(f"{self.prefix}results")
            summary: Any = client.xpending(f"{self.prefix}tasks", GROUP)
        results = [json.loads(fields[b"result"]) for _id, fields in entries]
        per_id = Counter(r["taskId"] for r in results)
        report.results = len(results)
        report.ids_with_one_result = sum(1 for t in self.prompts if per_id[t] == 1)
        report.duplicate_results = sum(n - 1 for n in per_id.values() if n > 1)
        report.missing_ids = sum(1 for t in self.prompts if per_id[t] == 0)
        report.failed_results = sum(1 for r in results if not r["success"])
        report.pending = int(summary["pending"])
        billed = self.simulator_stats()["billed_by_prompt"]
        calls = [int(billed.get(prompt_key(p), 0)) for p in self.prompts.values()]
        report.billed_calls = sum(calls)
        report.ids_billed_twice = sum(1 for n in calls if n == 2)
        report.ids_billed_more = sum(1 for n in calls if n > 2)

    def simulator_stats(self) -> dict[str, Any]:
        """The simulator's counters."""
        import urllib.request

        with urllib.request.urlopen(f"{self.api_url}/_sim/stats", timeout=10) as r:
            stats: dict[str, Any] = json.load(r)
            return stats

    def _stop_everything(self) -> None:
        for process in self.processes:
            if process.popen.poll() is None:
                process.popen.kill()
            process.wait()
        self.redis.stop()


def run(plan: Plan) -> Report:
    """Runs one chaos plan in a temporary directory and returns its figures."""
    with tempfile.TemporaryDirectory(prefix="mesh-chaos-") as workdir:
        return Run(plan, Path(workdir)).execute()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: runs a plan, prints the figures, exits 1 on a breach."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Plan()
    for name in (
        "tasks",
        "nodes",
        "kills",
        "sigterms",
        "redis_restarts",
        "concurrency",
        "seed",
    ):
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=getattr(defaults, name),
            help=f"default {getattr(defaults, name)}",
        )
    args = parser.parse_args(argv)
    plan = Plan(**{k: v for k, v in vars(args).items()})
    report = run(plan)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
