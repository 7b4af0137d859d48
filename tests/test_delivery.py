"""Delivery guarantees: no task lost, none paid for twice, under crashes and stops."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from mesh_node.intake.redis_stream import autoclaim_parts
from mesh_node.simulator import prompt_key

from .support import (
    OwnRedis,
    Process,
    SimulatorProcess,
    add_entry,
    add_task,
    start_command,
    stream_results,
    wait_for,
    with_config,
)


def _pending(rdb: redis.Redis, prefix: str) -> int:
    """Entries pending in the group; -1 while the group does not exist yet."""
    try:
        summary: Any = rdb.xpending(f"{prefix}tasks", "mesh-nodes")
    except redis.ResponseError:
        return -1
    return int(summary["pending"])


def _billed(simulator: SimulatorProcess, prompt: str) -> int:
    return int(simulator.stats()["billed_by_prompt"].get(prompt_key(prompt), 0))


def test_same_ids_twice_cost_one_call_each(
    node_env: dict[str, str],
    rdb: redis.Redis,
    prefix: str,
    started: list[Process],
    simulator: SimulatorProcess,
) -> None:
    """100 ids submitted twice give 100 results and 100 API calls."""
    prompts = {f"twice-{n}": f"twice {n} {prefix}" for n in range(100)}
    for _round in range(2):
        for task_id, prompt in prompts.items():
            add_task(rdb, prefix, {"id": task_id, "prompt": prompt})
    node = start_command("serve", "--concurrency", "32", env=node_env)
    started.append(node)
    wait_for(
        lambda: _pending(rdb, prefix) == 0 and rdb.xlen(f"{prefix}results") >= 100,
        timeout_s=60,
        what="all 200 entries settled",
    )
    assert node.stop() == 0
    results = stream_results(rdb, prefix)
    assert sorted(r["taskId"] for r in results) == sorted(prompts)
    assert [_billed(simulator, p) for p in prompts.values()] == [1] * 100


def test_killed_node_tasks_are_finished_by_another(
    node_env: dict[str, str],
    rdb: redis.Redis,
    prefix: str,
    started: list[Process],
) -> None:
    """A node killed while holding 16 tasks: another node finishes all 16."""
    env = with_config(node_env, claimTimeoutMs=1500)
    ids = [f"held-{n}" for n in range(16)]
    for task_id in ids:
        task = {"id": task_id, "prompt": f"[[sim:latency_ms=4000]] {task_id} {prefix}"}
        add_task(rdb, prefix, task)
    doomed = start_command("serve", "--node-id", "doomed", env=env)
    started.append(doomed)
    wait_for(
        lambda: doomed.event_names().count("task.started") == 16,
        timeout_s=20,
        what="16 tasks in flight",
    )
    doomed.popen.send_signal(signal.SIGKILL)
    doomed.wait()
    assert rdb.xlen(f"{prefix}results") == 0

    rescuer = start_command("serve", "--node-id", "rescuer", env=env)
    started.append(rescuer)
    wait_for(
        lambda: rdb.xlen(f"{prefix}results") >= 16,
        timeout_s=40,
        what="16 results from the rescuer",
    )
    assert rescuer.stop() == 0
    results = stream_results(rdb, prefix)
    assert sorted(r["taskId"] for r in results) == sorted(ids)
    assert {r["metadata"]["node"] for r in results} == {"rescuer"}
    assert all(r["success"] for r in results)
    assert _pending(rdb, prefix) == 0


def test_running_task_is_not_reclaimed(
    node_env: dict[str, str],
    rdb: redis.Redis,
    prefix: str,
    started: list[Process],
    simulator: SimulatorProcess,
) -> None:
    """A call longer than the claim timeout stays with its holder: one call."""
    env = with_config(node_env, claimTimeoutMs=600)
    prompt = f"[[sim:latency_ms=3000]] long {prefix}"
    first = start_command("serve", "--node-id", "first", env=env)
    started.append(first)
    first.wait_for_event("group.created")
    add_task(rdb, prefix, {"id": "long", "prompt": prompt})
    first.wait_for_event("task.started")
    second = start_command("serve", "--node-id", "second", env=env)
    started.append(second)
    wait_for(
        lambda: rdb.xlen(f"{prefix}results") == 1,
        timeout_s=20,
        what="the long task's result",
    )
    assert first.stop() == 0
    assert second.stop() == 0
    assert "task.started" not in second.event_names()
    assert _billed(simulator, prompt) == 1
    assert stream_results(rdb, prefix)[0]["metadata"]["node"] == "first"


def test_sigterm_leaves_unfinished_tasks_pending(
    node_env: dict[str, str], rdb: redis.Redis, prefix: str, started: list[Process]
) -> None:
    """SIGTERM past the grace period: exit 0, no result, every entry still pending."""
    env = with_config(node_env, gracePeriodS=1)
    for n in range(5):
        task = {"id": f"cut-{n}", "prompt": f"[[sim:latency_ms=8000]] {n} {prefix}"}
        add_task(rdb, prefix, task)
    node = start_command("serve", env=env)
    started.append(node)
    wait_for(
        lambda: node.event_names().count("task.started") == 5,
        timeout_s=20,
        what="five tasks in flight",
    )
    node.popen.send_signal(signal.SIGTERM)
    assert node.wait(timeout_s=6) == 0
    assert rdb.xlen(f"{prefix}results") == 0
    assert _pending(rdb, prefix) == 5
    assert node.event_names().count("task.released") == 5
    assert rdb.keys(f"{prefix}lease:*") == []
    # Its consumer stays in the group while it holds entries, or they would go.
    (consumer,) = rdb.xinfo_consumers(f"{prefix}tasks", "mesh-nodes")
    assert consumer["pending"] == 5


def test_too_many_deliveries_go_to_dead_letters(
    node_env: dict[str, str], rdb: redis.Redis, prefix: str, started: list[Process]
) -> None:
    """An entry delivered more than maxDeliveries times is dead-lettered once."""
    env = with_config(node_env, claimTimeoutMs=200, maxDeliveries=3)
    stream = f"{prefix}tasks"
    rdb.xgroup_create(stream, "mesh-nodes", id="0", mkstream=True)
    task = json.dumps({"id": "poison", "prompt": "never runs"})
    entry = add_entry(rdb, prefix, {"task": task})
    rdb.xreadgroup("mesh-nodes", "ghost", {stream: ">"})
    for _ in range(3):
        rdb.xclaim(stream, "mesh-nodes", "ghost", 0, [entry])
    node = start_command("serve", env=env)
    started.append(node)
    wait_for(
        lambda: rdb.xlen(f"{prefix}results") == 1,
        timeout_s=20,
        what="the max_deliveries result",
    )
    assert node.stop() == 0
    [result] = stream_results(rdb, prefix)
    assert result["taskId"] == "poison"
    assert result["error"] == {
        "type": "max_deliveries",
        "message": "delivered 5 times, more than maxDeliveries (3)",
        "retryable": False,
    }
    dead: Any = rdb.xrange(f"{prefix}dead")
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields[b"entryId"] == entry.encode()
    assert fields[b"deliveries"] == b"5"
    assert fields[b"task"] == task.encode()
    assert _pending(rdb, prefix) == 0


def test_entry_deleted_while_pending_is_dropped(
    node_env: dict[str, str], rdb: redis.Redis, prefix: str, started: list[Process]
) -> None:
    """A pending entry deleted from the stream is let go of, once, with a log line."""
    env = with_config(node_env, claimTimeoutMs=200)
    stream = f"{prefix}tasks"
    rdb.xgroup_create(stream, "mesh-nodes", id="0", mkstream=True)
    entry = add_task(rdb, prefix, {"id": "gone", "prompt": "x"})
    rdb.xreadgroup("mesh-nodes", "ghost", {stream: ">"})
    rdb.xdel(stream, entry)
    node = start_command("serve", env=env)
    started.append(node)
    event = node.wait_for_event("entry.deleted")
    assert event["entry"] == entry
    wait_for(lambda: _pending(rdb, prefix) == 0, timeout_s=10, what="an empty PEL")
    assert node.stop() == 0
    assert rdb.xlen(f"{prefix}results") == 0


def test_lost_group_is_recreated(
    node_env: dict[str, str], rdb: redis.Redis, prefix: str, started: list[Process]
) -> None:
    """A consumer group destroyed under a running node is recreated; work goes on."""
    node = start_command("serve", env=node_env)
    started.append(node)
    node.wait_for_event("group.created")
    rdb.xgroup_destroy(f"{prefix}tasks", "mesh-nodes")
    add_task(rdb, prefix, {"id": "after", "prompt": "x"})
    wait_for(
        lambda: rdb.xlen(f"{prefix}results") == 1,
        timeout_s=20,
        what="a result after the group was lost",
    )
    assert node.stop() == 0
    assert node.event_names().count("group.created") == 2


OUTAGE_S = 10


def test_node_rides_out_a_redis_restart(
    node_env: dict[str, str], own_redis: OwnRedis, started: list[Process]
) -> None:
    """Redis down for 10 s: the node carries on after, logging the outage once."""
    env = {**node_env, "REDIS_URL": own_redis.url}
    prefix = env["MESH_PREFIX"]
    client = redis.Redis(port=own_redis.port)
    node = start_command("serve", env=env)
    started.append(node)
    node.wait_for_event("group.created")
    for n in range(5):
        add_task(client, prefix, {"id": f"pre-{n}", "prompt": "x"})
    wait_for(
        lambda: client.xlen(f"{prefix}results") == 5,
        timeout_s=20,
        what="results before the outage",
    )
    client.close()

    own_redis.stop()
    node.wait_for_event("redis.unavailable")
    lines_before = len(node.stderr_lines)
    time.sleep(OUTAGE_S)  # the outage itself, not a wait for a condition
    lines_during = len(node.stderr_lines) - lines_before
    own_redis.start()

    client = redis.Redis(port=own_redis.port)
    for n in range(5):
        add_task(client, prefix, {"id": f"post-{n}", "prompt": "x"})
    wait_for(
        lambda: client.xlen(f"{prefix}results") == 10,
        timeout_s=30,
        what="results after the outage",
    )
    client.close()
    assert node.popen.poll() is None
    assert node.stop() == 0
    names = node.event_names()
    assert names.count("redis.unavailable") == 1
    assert names.count("redis.reconnected") == 1
    assert lines_during <= OUTAGE_S


def _finish(process: Process, timeout_s: float) -> tuple[int, bytes]:
    """Waits for a command's exit; its exit code and everything on stdout."""
    code = process.popen.wait(timeout_s)
    assert process.popen.stdout is not None
    out = process.popen.stdout.read()
    process.wait()
    return code, out


def test_submit_wait_rides_out_a_redis_restart(
    node_env: dict[str, str],
    own_redis: OwnRedis,
    started: list[Process],
    tmp_path: Path,
) -> None:
    """Redis restarts while `submit --wait` waits: it logs the outage once and
    prints every result, each once, as the tasks finish on the other side."""
    env = {**node_env, "REDIS_URL": own_redis.url}
    prefix = env["MESH_PREFIX"]
    ids = [f"w{n}" for n in range(40)]
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        "".join(
            json.dumps({"id": i, "prompt": f"[[sim:latency_ms=500]] {i} {prefix}"})
            + "\n"
            for i in ids
        )
    )
    node = start_command("serve", "--concurrency", "2", env=env)
    started.append(node)
    node.wait_for_event("group.created")
    submit = start_command("submit", str(tasks), "--wait", "--timeout", "120", env=env)
    started.append(submit)
    client = redis.Redis(port=own_redis.port)
    wait_for(
        lambda: client.xlen(f"{prefix}results") >= 4,
        timeout_s=30,
        what="a few results before the outage",
    )
    client.close()

    own_redis.stop()
    submit.wait_for_event("redis.unavailable")
    time.sleep(3)  # the outage itself, as long as the one the tester made
    own_redis.start()

    code, out = _finish(submit, timeout_s=120)
    assert code == 0, submit.stderr_text()
    printed = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["taskId"] for r in printed) == sorted(ids)
    assert all(r["success"] for r in printed)
    names = submit.event_names()
    assert names.count("redis.unavailable") == 1
    assert names.count("redis.reconnected") == 1
    assert "redis.failed" not in names
    assert node.stop() == 0


def test_submit_wait_gives_up_on_a_redis_outage_at_its_timeout(
    node_env: dict[str, str], own_redis: OwnRedis, started: list[Process]
) -> None:
    """Redis goes away for good while `submit --wait` waits: it exits 1 at its
    timeout, saying which results are missing, not at the first error."""
    env = {**node_env, "REDIS_URL": own_redis.url}
    tasks = b"".join(
        json.dumps({"id": f"g{n}", "prompt": "x"}).encode() + b"\n" for n in range(3)
    )
    submit = start_command(
        "submit", "-", "--wait", "--timeout", "6", env=env, stdin_pipe=True
    )
    started.append(submit)
    assert submit.popen.stdin is not None
    submit.popen.stdin.write(tasks)
    submit.popen.stdin.close()
    submit.wait_for_event("tasks.submitted")
    own_redis.stop()
    began_s = time.monotonic()

    code, out = _finish(submit, timeout_s=30)
    assert code == 1
    assert out == b""
    assert time.monotonic() - began_s < 15
    names = submit.event_names()
    assert names.count("redis.unavailable") == 1
    assert "redis.reconnected" not in names
    assert "redis.failed" not in names
    timeout = submit.wait_for_event("submit.timeout")
    assert (timeout["missing"], timeout["first_missing"]) == (3, ["g0", "g1", "g2"])


def _lines(first: int, count: int) -> bytes:
    return b"".join(
        json.dumps({"id": f"a{n}", "prompt": "x"}).encode() + b"\n"
        for n in range(first, first + count)
    )


@pytest.mark.parametrize("comes_back", [True, False])
def test_submit_rides_out_a_redis_outage_while_adding_tasks(
    node_env: dict[str, str],
    own_redis: OwnRedis,
    started: list[Process],
    comes_back: bool,
) -> None:
    """Redis goes down between two batches of XADDs: the second is added once
    Redis is back, or, when it stays away past `--timeout`, submit exits 1
    saying how many tasks went in."""
    env = {**node_env, "REDIS_URL": own_redis.url}
    stream = f"{env['MESH_PREFIX']}tasks"
    submit = start_command("submit", "-", "--timeout", "4", env=env, stdin_pipe=True)
    started.append(submit)
    stdin = submit.popen.stdin
    assert stdin is not None
    # 500 tasks make one pipelined batch, sent before the input ends.
    stdin.write(_lines(0, 500))
    stdin.flush()
    client = redis.Redis(port=own_redis.port)
    wait_for(lambda: client.xlen(stream) == 500, timeout_s=20, what="the first batch")
    client.close()

    own_redis.stop()
    stdin.write(_lines(500, 10))
    stdin.close()
    submit.wait_for_event("redis.unavailable")
    if not comes_back:
        code, _out = _finish(submit, timeout_s=30)
        assert code == 1
        failed = submit.wait_for_event("redis.failed")
        assert failed["error"] == (
            "Redis unreachable for 4 s while adding tasks; the first 500 were added"
        )
        return
    own_redis.start()
    code, _out = _finish(submit, timeout_s=30)
    assert code == 0, submit.stderr_text()
    client = redis.Redis(port=own_redis.port)
    try:
        assert client.xlen(stream) == 510
    finally:
        client.close()
    names = submit.event_names()
    assert names.count("redis.unavailable") == 1
    assert names.count("redis.reconnected") == 1
    assert submit.wait_for_event("tasks.submitted")["tasks"] == 510


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        # Redis 7: cursor, entries, ids deleted while pending.
        (
            [b"0-0", [(b"1-0", {b"task": b"{}"})], [b"2-0"]],
            ("0-0", [(b"1-0", {b"task": b"{}"})], [b"2-0"]),
        ),
        # Redis 6.2: no third element; a deleted entry comes back without fields.
        ([b"5-0", [(b"1-0", None)]], ("5-0", [(b"1-0", None)], [])),
        # Nothing to claim at all.
        ([b"0-0", [], []], ("0-0", [], [])),
    ],
)
def test_every_autoclaim_reply_shape_is_understood(
    reply: list[Any], expected: tuple[str, list[Any], list[bytes]]
) -> None:
    """XAUTOCLAIM replies of Redis 6.2 and 7 split into cursor, entries, deleted."""
    assert autoclaim_parts(reply) == expected


def test_node_does_not_reclaim_its_own_tasks_after_an_outage(
    node_env: dict[str, str],
    own_redis: OwnRedis,
    started: list[Process],
    simulator: SimulatorProcess,
) -> None:
    """Redis down longer than the claim timeout: no task of the node runs twice."""
    env = with_config({**node_env, "REDIS_URL": own_redis.url}, claimTimeoutMs=1000)
    prefix = env["MESH_PREFIX"]
    prompts = [f"[[sim:latency_ms=2500]] outage {n} {prefix}" for n in range(12)]
    client = redis.Redis(port=own_redis.port)
    node = start_command("serve", "--concurrency", "4", env=env)
    started.append(node)
    node.wait_for_event("group.created")
    for n, prompt in enumerate(prompts):
        add_task(client, prefix, {"id": f"o{n}", "prompt": prompt})
    wait_for(
        lambda: node.event_names().count("task.started") == 4,
        timeout_s=20,
        what="four tasks in flight",
    )
    client.close()
    own_redis.stop()
    node.wait_for_event("redis.unavailable")
    time.sleep(6)  # the outage itself, longer than the claim timeout
    own_redis.start()
    client = redis.Redis(port=own_redis.port)
    wait_for(
        lambda: client.xlen(f"{prefix}results") == 12,
        timeout_s=40,
        what="all twelve results",
    )
    client.close()
    assert node.stop() == 0
    assert [_billed(simulator, p) for p in prompts] == [1] * 12
    assert node.event_names().count("task.started") == 12
