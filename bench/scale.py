"""The node at scale: start-up, 1,000 tasks in flight, stream hygiene, a large batch.

Each check starts what it needs (a private redis-server, the simulator) and
prints its figures with the bound it is held to; the exit code is 1 when any
bound is missed. `scripts/bench-scale.sh` runs it.

- start-up: seconds from exec to `node.started` (the node reads its group),
  and to the first result of a task that was already waiting, which includes
  the SDK's import.
- in-flight: 1,000 tasks at once against a 5 s API latency: every one
  succeeds on its first attempt, and the node's peak RSS stays under 256 MB.
- hygiene: after 10,000 tasks the task stream holds no entry, so none that
  was acknowledged, and the group nothing pending.
- batch: a 100,000-task JSON-lines file; RSS sampled at every tenth of the
  output stays within 10% between 10% and 100%. The same file is then run
  again, killed half-way and resumed with `--resume`: the resumed run calls the
  API exactly once per id the killed run left without a line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import psutil
import redis

from tests.support import REPO, wait_for

from . import wire
from .services import (
    Service,
    http_json,
    python_env,
    start,
    start_redis,
    start_simulator,
)
from .systems import NODE_RATE_LIMITS

RSS_BOUND_BYTES = 256 * 1024 * 1024
FLAT_BOUND = 1.10
MB = 1024 * 1024


def say(line: str) -> None:
    print(line, flush=True)


def peak_rss_bytes(pid: int) -> int:
    """The kernel's high-water mark of the process's resident set."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc")


class Setup:
    """Redis, the simulator and the node's environment, for one check."""

    def __init__(self, stack: ExitStack, workdir: Path, latency_ms: int) -> None:
        self.workdir = workdir
        self.log_dir = workdir
        redis_service, self.redis_url = start_redis(workdir, workdir)
        stack.callback(redis_service.stop)
        simulator, self.api_url = start_simulator(latency_ms, workdir)
        stack.callback(simulator.stop)
        self.redis = redis.Redis.from_url(self.redis_url)
        stack.callback(self.redis.close)
        config = workdir / "node-config.json"
        config.write_text(
            json.dumps({"rateLimiting": NODE_RATE_LIMITS, "gracePeriodS": 10})
        )
        self.env = python_env()
        self.env.update(
            ANTHROPIC_API_KEY=wire.API_KEY,
            ANTHROPIC_BASE_URL=self.api_url,
            REDIS_URL=self.redis_url,
            MESH_CONFIG=str(config),
        )

    def serve(self, name: str, concurrency: int) -> Service:
        argv = [sys.executable, "-m", "mesh_node", "serve", "--node-id", name]
        argv += ["--concurrency", str(concurrency)]
        return start(name, argv, self.env, self.log_dir)

    def submit(self, count: int, prompt: str = "") -> None:
        pipe = self.redis.pipeline(transaction=False)
        for index in range(count):
            task = wire.task(f"t{index}", index)
            if prompt:
                task["prompt"] = prompt
            pipe.xadd(wire.TASKS, {"task": json.dumps(task)})
            if index % 1000 == 999:
                pipe.execute()
        pipe.execute()

    def results(self) -> list[dict[str, Any]]:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = self.redis.xrange(
            wire.RESULTS
        )  # type: ignore[assignment]
        return [json.loads(fields[b"result"]) for _id, fields in entries]

    def api_requests(self) -> int:
        return int(http_json(self.api_url, "GET", "/_sim/stats")["requests"])


@contextmanager
def setup(latency_ms: int) -> Iterator[Setup]:
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        yield Setup(stack, workdir, latency_ms)


def check_startup() -> bool:
    with setup(latency_ms=0) as s:
        s.submit(1)
        started_s = time.monotonic()
        node = s.serve("startup", 16)
        try:
            ready = node.wait_for_event("node.started")
            wait_for(
                lambda: s.redis.xlen(wire.RESULTS),
                timeout_s=30,
                what="the first result",
            )
            first_s = time.monotonic() - started_s
        finally:
            node.stop()
    startup_s = float(ready["startup_s"])
    say(
        f"start-up: node.started {startup_s:.2f} s after exec (bound 1 s), "
        f"first result of a waiting task {first_s:.2f} s "
        f"({ready['http_transport']}, {ready['event_loop']})"
    )
    return startup_s < 1.0


def check_in_flight(count: int) -> bool:
    with setup(latency_ms=5000) as s:
        node = s.serve("in-flight", count)
        try:
            node.wait_for_event("node.started")
            started_s = time.monotonic()
            s.submit(count)
            wait_for(
                lambda: s.redis.xlen(wire.RESULTS) >= count,
                timeout_s=120,
                what="every result",
            )
            took_s = time.monotonic() - started_s
            peak = peak_rss_bytes(node.pid)
        finally:
            node.stop()
        results = s.results()
    first = sum(1 for r in results if r["success"] and r["metadata"]["attempts"] == 1)
    say(
        f"in flight: {count} tasks at a 5 s latency, {first}/{len(results)} "
        f"succeeded on the first attempt in {took_s:.1f} s; peak RSS "
        f"{peak / MB:.0f} MB (bound {RSS_BOUND_BYTES // MB} MB)"
    )
    return first == count == len(results) and peak < RSS_BOUND_BYTES


def check_hygiene(count: int) -> bool:
    with setup(latency_ms=5) as s:
        node = s.serve("hygiene", 256)
        try:
            node.wait_for_event("node.started")
            s.submit(count)
            wait_for(
                lambda: s.redis.xlen(wire.RESULTS) >= count,
                timeout_s=600,
                what="every result",
            )
            pending = s.redis.xpending(wire.TASKS, wire.GROUP)["pending"]
            length = s.redis.xlen(wire.TASKS)
        finally:
            node.stop()
    say(
        f"hygiene: after {count} tasks the task stream holds {length} entries, "
        f"{pending} pending (bound 0 and 0)"
    )
    return length == 0 and pending == 0


def write_batch(path: Path, count: int) -> None:
    with path.open("w") as out:
        for index in range(count):
            out.write(json.dumps(wire.task(f"b{index}", index)) + "\n")


def batch_argv(source: Path, output: Path, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "mesh_node", "batch", str(source)]
    return [*argv, "--output", str(output), "--concurrency", "256", *extra]


class Lines:
    """Counts the lines of a growing file without reading it twice."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._offset = 0

    def update(self) -> int:
        if self.path.exists():
            with self.path.open("rb") as file:
                file.seek(self._offset)
                chunk = file.read()
            self._offset += len(chunk)
            self.count += chunk.count(b"\n")
        return self.count


def run_batch(
    s: Setup, argv: list[str], output: Path, count: int, kill_at: int | None
) -> dict[int, int]:
    """Runs a batch; RSS (bytes) at every tenth of `count` written lines."""
    log = (s.workdir / "batch.log").open("ab")
    popen = subprocess.Popen(
        argv, env=s.env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log
    )
    lines, samples = Lines(output), {}
    process = psutil.Process(popen.pid)
    try:
        while popen.poll() is None:
            done = lines.update()
            tenth = done * 10 // count
            if tenth and tenth not in samples:
                samples[tenth] = process.memory_info().rss
            if kill_at is not None and done >= kill_at:
                popen.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        popen.wait()
        log.close()
    return samples


def check_batch(count: int) -> bool:
    with setup(latency_ms=20) as s:
        source = s.workdir / "tasks.jsonl"
        write_batch(source, count)
        output = s.workdir / "results.jsonl"
        started_s = time.monotonic()
        samples = run_batch(s, batch_argv(source, output), output, count, None)
        took_s = time.monotonic() - started_s
        written = Lines(output).update()
        rss = [samples[t] for t in sorted(samples) if 1 <= t <= 10]
        flat = max(rss) / min(rss) if rss else float("inf")
        say(
            f"batch: {written} of {count} result lines in {took_s:.0f} s "
            f"({written / took_s:.0f} tasks/s); RSS from 10% to 100%: "
            + ", ".join(f"{r / MB:.0f}" for r in rss)
            + f" MB, max/min {flat:.3f} (bound {FLAT_BOUND})"
        )

        resumed = s.workdir / "resumed.jsonl"
        run_batch(s, batch_argv(source, resumed), resumed, count, count // 2)
        answered = {
            json.loads(line)["taskId"]
            for line in resumed.read_bytes().split(b"\n")[:-1]
        }
        before = s.api_requests()
        done = subprocess.run(
            batch_argv(source, resumed, "--resume"),
            env=s.env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        calls = s.api_requests() - before
        ids = [json.loads(line)["taskId"] for line in resumed.read_bytes().splitlines()]
    missing = count - len(answered)
    say(
        f"batch --resume: killed at {len(answered)} lines; the resumed run made "
        f"{calls} API calls for {missing} missing ids, exit {done.returncode}; "
        f"{len(set(ids))} distinct ids in {len(ids)} lines"
    )
    return (
        written == count
        and flat <= FLAT_BOUND
        and calls == missing
        and done.returncode == 0
        and len(ids) == len(set(ids)) == count
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench-scale.sh", description=__doc__)
    parser.add_argument(
        "--checks",
        default="startup,in-flight,hygiene,batch",
        help="comma-separated subset of startup,in-flight,hygiene,batch",
    )
    parser.add_argument("--in-flight", type=int, default=1000, help="default 1000")
    parser.add_argument("--tasks", type=int, default=10_000, help="hygiene, 10000")
    parser.add_argument(
        "--batch-tasks", type=int, default=100_000, help="default 100000"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    checks: dict[str, Callable[[], bool]] = {
        "startup": check_startup,
        "in-flight": lambda: check_in_flight(args.in_flight),
        "hygiene": lambda: check_hygiene(args.tasks),
        "batch": lambda: check_batch(args.batch_tasks),
    }
    memory_gib = psutil.virtual_memory().total / 2**30
    say(f"machine: {os.cpu_count()} cores, {memory_gib:.0f} GiB")
    failed = []
    for name in args.checks.split(","):
        if not checks[name.strip()]():
            failed.append(name)
    say("all bounds held" if not failed else f"bounds missed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
