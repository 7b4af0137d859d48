"""`mesh-node serve` end to end: a real redis-server, the simulator, the real SDK."""

from __future__ import annotations

import json
import signal
import time

import redis

from .support import (
    Process,
    SimulatorProcess,
    start_command,
    stream_results,
    wait_for,
    with_config,
)


def test_two_hundred_tasks_get_one_result_each(
    node_env: dict[str, str], rdb: redis.Redis, prefix: str, started: list[Process]
) -> None:
    """200 submitted tasks give exactly 200 results, one per id, none pending."""
    ids = [f"bulk-{n}" for n in range(200)]
    pipe = rdb.pipeline()
    for task_id in ids:
        pipe.xadd(
            f"{prefix}tasks", {"task": json.dumps({"id": task_id, "prompt": task_id})}
        )
    pipe.execute()

    node = start_command("serve", "--concurrency", "32", env=node_env)
    started.append(node)
    wait_for(
        lambda: rdb.xlen(f"{prefix}results") >= 200, timeout_s=60, what="200 results"
    )
    assert node.stop() == 0

    results = stream_results(rdb, prefix)
    assert sorted(r["taskId"] for r in results) == sorted(ids)
    for result in results:
        assert result["success"] is True
        usage = result["metadata"]["usage"]
        assert usage["input_tokens"] > 0
        assert usage["output_tokens"] > 0
    assert rdb.xpending(f"{prefix}tasks", "mesh-nodes")["pending"] == 0
    # Acknowledged entries are deleted as they are settled.
    assert rdb.xlen(f"{prefix}tasks") == 0
    stored = rdb.get(f"{prefix}result:bulk-7")
    assert stored is not None
    assert json.loads(stored)["taskId"] == "bulk-7"


def test_stored_result_stops_a_second_api_call(
    node_env: dict[str, str],
    rdb: redis.Redis,
    prefix: str,
    started: list[Process],
    simulator: SimulatorProcess,
) -> None:
    """A task id that already has a result is acknowledged without calling the API."""
    prompt = f"only once {prefix}"
    task = json.dumps({"id": "once", "prompt": prompt})
    rdb.xadd(f"{prefix}tasks", {"task": task})
    node = start_command("serve", env=node_env)
    started.append(node)
    wait_for(
        lambda: rdb.xlen(f"{prefix}results") == 1, timeout_s=30, what="the first result"
    )

    rdb.xadd(f"{prefix}tasks", {"task": task})
    assert node.wait_for_event("task.skipped")["reason"] == "done"
    assert node.stop() == 0

    assert rdb.xlen(f"{prefix}results") == 1
    assert rdb.xpending(f"{prefix}tasks", "mesh-nodes")["pending"] == 0
    by_prompt = simulator.stats()["by_prompt"]
    from mesh_node.simulator import prompt_key

    assert by_prompt[prompt_key(prompt)] == 1


def test_idle_serve_exits_zero_soon_after_sigterm(
    node_env: dict[str, str], started: list[Process]
) -> None:
    """An idle node stops within 5 s of SIGTERM, with exit code 0."""
    node = start_command("serve", env=node_env)
    started.append(node)
    node.wait_for_event("node.started")
    node.wait_for_event("group.created")
    node.popen.send_signal(signal.SIGTERM)
    assert node.wait(timeout_s=5) == 0
    assert "node.stopped" in node.event_names()


def test_sigterm_lets_tasks_in_flight_finish(
    node_env: dict[str, str], rdb: redis.Redis, prefix: str, started: list[Process]
) -> None:
    """SIGTERM with slow tasks in flight: they finish and are published, exit 0."""
    for n in range(4):
        task = {"id": f"slow-{n}", "prompt": "[[sim:latency_ms=1500]] slow"}
        rdb.xadd(f"{prefix}tasks", {"task": json.dumps(task)})
    node = start_command("serve", env=node_env)
    started.append(node)
    wait_for(
        lambda: node.event_names().count("task.started") == 4,
        timeout_s=20,
        what="four tasks in flight",
    )
    node.popen.send_signal(signal.SIGTERM)
    assert node.wait(timeout_s=15) == 0
    assert rdb.xlen(f"{prefix}results") == 4
    assert rdb.xpending(f"{prefix}tasks", "mesh-nodes")["pending"] == 0


def test_backpressure_reads_no_more_than_free_slots(
    node_env: dict[str, str], rdb: redis.Redis, prefix: str, started: list[Process]
) -> None:
    """With concurrency 3, the node holds at most 3 entries at any moment."""
    for n in range(12):
        task = {"id": f"bp-{n}", "prompt": "[[sim:latency_ms=300]] wait"}
        rdb.xadd(f"{prefix}tasks", {"task": json.dumps(task)})
    node = start_command("serve", "--concurrency", "3", env=node_env)
    started.append(node)
    node.wait_for_event("group.created")
    highest = 0
    deadline = time.monotonic() + 30
    while rdb.xlen(f"{prefix}results") < 12 and time.monotonic() < deadline:
        summary = rdb.xpending(f"{prefix}tasks", "mesh-nodes")
        highest = max(highest, summary["pending"])
        time.sleep(0.01)
    assert node.stop() == 0
    assert rdb.xlen(f"{prefix}results") == 12
    assert 1 <= highest <= 3


def test_the_results_stream_is_trimmed(
    node_env: dict[str, str], rdb: redis.Redis, prefix: str, started: list[Process]
) -> None:
    """resultsMaxLen bounds the results stream; every result is still stored."""
    env = with_config(node_env, resultsMaxLen=10)
    pipe = rdb.pipeline()
    for n in range(300):
        pipe.xadd(
            f"{prefix}tasks", {"task": json.dumps({"id": f"t{n}", "prompt": "x"})}
        )
    pipe.execute()
    node = start_command("serve", "--concurrency", "32", env=env)
    started.append(node)
    wait_for(
        lambda: (
            all(rdb.exists(f"{prefix}result:t{n}") for n in (0, 150, 299))
            and rdb.xlen(f"{prefix}tasks") == 0
        ),
        timeout_s=60,
        what="300 tasks settled",
    )
    assert node.stop() == 0
    assert sum(1 for _ in rdb.scan_iter(match=f"{prefix}result:*", count=1000)) == 300
    # Trimming is approximate (whole stream nodes of 100 entries at a time),
    # so a little over the limit stays.
    assert rdb.xlen(f"{prefix}results") <= 10 + 100
