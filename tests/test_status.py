"""`mesh-node status` and the heartbeats it reads, against a real serving node."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from typing import Any

import redis

from .support import (
    REPO,
    Process,
    add_task,
    command,
    run_command,
    start_command,
    wait_for,
)


def status(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = run_command("status", "--json", *args, env=env)
    assert done.returncode == 0, done.stderr.decode()
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_status_shows_the_stream_the_nodes_the_last_minute_and_the_limits(
    node_env: dict[str, str], rdb: redis.Redis, prefix: str, started: list[Process]
) -> None:
    for n in range(4):
        add_task(rdb, prefix, {"id": f"s{n}", "prompt": f"status {n}"})
    add_task(rdb, prefix, {"id": "refused", "prompt": "[[sim:status=400]] no"})
    add_task(rdb, prefix, {"id": "nope", "prompt": 7})
    env = {**node_env, "MESH_NODE_ID": "status-node"}
    node = start_command("serve", "--concurrency", "3", env=env)
    started.append(node)
    wait_for(lambda: rdb.xlen(f"{prefix}results") >= 6, timeout_s=30, what="results")

    def node_reports_six() -> dict[str, Any] | None:
        report = status(env)
        nodes = report["nodes"]
        done = nodes and (nodes[0]["succeeded"] or 0) + (nodes[0]["failed"] or 0)
        return report if done == 6 else None

    report = wait_for(node_reports_six, timeout_s=20, what="a heartbeat with 6 tasks")
    assert report["tasks"]["key"] == f"{prefix}tasks"
    # Acknowledged entries are deleted: the stream holds only what is left.
    assert report["tasks"]["length"] == 0
    group = report["tasks"]["group"]
    assert (group["name"], group["pending"], group["lag"]) == ("mesh-nodes", 0, 0)
    assert [c["name"] for c in group["consumers"]] == ["status-node"]
    (me,) = report["nodes"]
    assert me["node"] == "status-node"
    assert me["live"] is True
    assert me["state"] == "running"
    assert (me["succeeded"], me["failed"], me["concurrency"]) == (4, 2, 3)
    assert me["pid"] == node.popen.pid
    recent = report["last_minute"]
    assert (recent["results"], recent["succeeded"], recent["failed"]) == (6, 4, 2)
    assert recent["errors"] == {"invalid_request": 1, "invalid_task": 1}
    assert report["results"]["length"] == 6
    assert report["dead"]["length"] == 0
    (api_key,) = report["limiter"]["keys"]
    by_window = {w["name"]: w for w in api_key["windows"]}
    # Five calls reached the API (the 400 included); the bad task made none.
    assert by_window["requests_per_minute"]["used"] == 5
    assert by_window["requests_per_minute"]["headroom"] == 100_000 - 5
    assert api_key["paused_s"] == 0

    # Headroom is against the limits the node runs with, whatever this
    # command's own configuration says.
    elsewhere = {**env, "MESH_CONFIG": str(REPO / "config" / "security-config.json")}
    (seen,) = status(elsewhere)["limiter"]["keys"]
    by_window = {w["name"]: w for w in seen["windows"]}
    assert by_window["requests_per_minute"]["limit"] == 100_000

    assert node.stop() == 0
    # A node that stopped takes its heartbeat with it, and, holding nothing,
    # leaves the group.
    assert status(env)["nodes"] == []
    assert rdb.xinfo_consumers(f"{prefix}tasks", "mesh-nodes") == []


def test_status_shows_why_a_key_is_paused(
    node_env: dict[str, str], rdb: redis.Redis, prefix: str, started: list[Process]
) -> None:
    add_task(
        rdb,
        prefix,
        {
            "id": "limited",
            "prompt": "[[sim:status=429,retry_after_s=60]] slow down",
            "timeoutMs": 2000,
        },
    )
    node = start_command("serve", env=node_env)
    started.append(node)
    wait_for(lambda: rdb.xlen(f"{prefix}results") >= 1, timeout_s=30, what="result")
    (api_key,) = status(node_env)["limiter"]["keys"]
    assert 50 < api_key["paused_s"] <= 60
    assert api_key["pause_reason"] == "the API said 429"

    def text_with_the_error() -> str | None:
        # The last minute comes from heartbeats, written every 5 s.
        done = run_command("status", env=node_env)
        assert done.returncode == 0
        out = done.stdout.decode()
        return out if "rate_limited 1" in out else None

    out = wait_for(text_with_the_error, timeout_s=20, what="the error in status")
    assert f"tasks        {prefix}tasks" in out
    assert "nodes        1 live, 0 stale" in out
    assert "paused for " in out
    assert "s more: the API said 429" in out
    assert node.stop() == 0


def test_status_before_anything_exists_and_without_redis(
    node_env: dict[str, str], prefix: str
) -> None:
    report = status(node_env)
    assert report["tasks"] == {
        "key": f"{prefix}tasks",
        "length": 0,
        "group": {"name": "mesh-nodes", "exists": False},
    }
    assert report["nodes"] == []
    assert report["limiter"]["keys"] == []
    assert [w["name"] for w in report["limiter"]["limits"]] == [
        "requests_per_minute",
        "requests_per_hour",
    ]

    gone = run_command("status", env={**node_env, "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert gone.returncode == 1
    (line,) = gone.stderr.decode().splitlines()
    assert json.loads(line)["event"] == "redis.failed"


def _group_line(env: dict[str, str]) -> str:
    done = run_command("status", env=env)
    assert done.returncode == 0, done.stderr.decode()
    (line,) = [
        text for text in done.stdout.decode().splitlines() if text.startswith("group")
    ]
    return line


def _reported_lag(rdb: redis.Redis, stream: str) -> Any:
    (group,) = rdb.xinfo_groups(stream)
    return group["lag"]


def test_status_lag_is_never_more_than_the_stream_holds(
    node_env: dict[str, str], rdb: redis.Redis, prefix: str
) -> None:
    """A group whose read counter went wrong (as after a restart from an AOF)
    makes Redis report more lag than the stream has entries; status does not."""
    stream = f"{prefix}tasks"
    ids = [add_task(rdb, prefix, {"id": f"l{n}", "prompt": "x"}) for n in range(5)]
    rdb.xgroup_create(stream, "mesh-nodes", id="0")
    rdb.xreadgroup("mesh-nodes", "gone", {stream: ">"})
    rdb.xack(stream, "mesh-nodes", *ids)
    rdb.xdel(stream, *ids)
    rdb.xgroup_delconsumer(stream, "mesh-nodes", "gone")
    rdb.xgroup_setid(stream, "mesh-nodes", "$", entries_read=0)
    assert (rdb.xlen(stream), _reported_lag(rdb, stream)) == (0, 5)

    group = status(node_env)["tasks"]["group"]
    assert (group["pending"], group["lag"]) == (0, 0)
    assert _group_line(node_env) == (
        "group        mesh-nodes               pending 0  lag 0  consumers 0"
    )

    # Two entries not delivered yet: the lag is theirs, not Redis's 7.
    for n in range(2):
        add_task(rdb, prefix, {"id": f"m{n}", "prompt": "x"})
    assert (rdb.xlen(stream), _reported_lag(rdb, stream)) == (2, 7)
    assert status(node_env)["tasks"]["group"]["lag"] == 2


def test_status_lag_that_redis_cannot_tell(
    node_env: dict[str, str], rdb: redis.Redis, prefix: str
) -> None:
    """Redis 7 reports no lag for a group whose read counter is unknown with
    entries deleted past it: none waits in an empty stream; otherwise status
    says it does not know."""
    stream = f"{prefix}tasks"
    first, _second, third = (
        add_task(rdb, prefix, {"id": f"u{n}", "prompt": "x"}) for n in range(3)
    )
    rdb.xgroup_create(stream, "mesh-nodes", id="0")
    # No ENTRIESREAD: the group's read counter is unknown.
    rdb.xgroup_setid(stream, "mesh-nodes", first)
    rdb.xdel(stream, third)
    assert (rdb.xlen(stream), _reported_lag(rdb, stream)) == (2, None)
    assert status(node_env)["tasks"]["group"]["lag"] is None
    assert _group_line(node_env) == (
        "group        mesh-nodes               pending 0  lag unknown  consumers 0"
    )

    rdb.xtrim(stream, maxlen=0)
    rdb.xgroup_setid(stream, "mesh-nodes", "99999999999999-0")
    assert (rdb.xlen(stream), _reported_lag(rdb, stream)) == (0, None)
    assert status(node_env)["tasks"]["group"]["lag"] == 0


def test_status_watch_repeats_until_interrupted(node_env: dict[str, str]) -> None:
    watch = subprocess.Popen(
        command("status", "--json", "--watch", "0.2"),
        env=node_env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert watch.stdout is not None
        first, second = watch.stdout.readline(), watch.stdout.readline()
        assert json.loads(first)["at"]
        assert json.loads(second)["at"]
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 0
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
        for pipe in (watch.stdout, watch.stderr):
            if pipe is not None:
                pipe.close()


def test_health_follows_the_heartbeat(
    node_env: dict[str, str], rdb: redis.Redis, prefix: str, started: list[Process]
) -> None:
    env = {**node_env, "MESH_NODE_ID": "healthy-node"}
    node = start_command("serve", env=env)
    started.append(node)
    wait_for(
        lambda: rdb.exists(f"{prefix}node:healthy-node"), timeout_s=20, what="beat"
    )

    by_id = run_command("health", env=env)
    assert by_id.returncode == 0, by_id.stdout
    assert by_id.stdout.decode().startswith("healthy: node healthy-node beat ")
    # Without an id, the node whose heartbeat names this host.
    by_host = run_command("health", env=node_env)
    assert by_host.returncode == 0, by_host.stdout
    assert "node healthy-node" in by_host.stdout.decode()

    assert node.stop() == 0
    gone = run_command("health", env=env)
    assert gone.returncode == 1
    assert gone.stdout.decode() == (
        "unhealthy: no heartbeat from node healthy-node in Redis\n"
    )

    # A node that stopped beating without removing its heartbeat (killed).
    seconds, _micros = rdb.time()
    rdb.hset(
        f"{prefix}node:frozen",
        mapping={"node": "frozen", "seen_ms": (seconds - 60) * 1000},
    )
    stale = run_command("health", "--node-id", "frozen", env=node_env)
    assert stale.returncode == 1
    assert re.fullmatch(
        r"unhealthy: node frozen last beat 6\d\.\ds ago, more than 15s\n",
        stale.stdout.decode(),
    )

    down = run_command("health", env={**node_env, "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert down.returncode == 1
    assert down.stdout.decode().startswith(
        "unhealthy: cannot reach Redis at redis://127.0.0.1:1/0 (ConnectionError"
    )


def test_status_watch_survives_redis_and_a_closed_pipe(
    node_env: dict[str, str],
) -> None:
    down = {**node_env, "REDIS_URL": "redis://127.0.0.1:1/0"}
    watch = subprocess.Popen(
        command("status", "--watch", "0.2"),
        env=down,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert watch.stdout is not None
        frames = [watch.stdout.readline().decode() for _ in range(4)]
        # Two frames, each followed by a blank line that sets it apart.
        unreachable = "Redis unreachable (ConnectionError) at redis://127.0.0.1:1/0\n"
        assert frames == [unreachable, "\n", unreachable, "\n"]
        # The reader goes away, as `status --watch | head -2` does.
        watch.stdout.close()
        assert watch.wait(10) == 0
        assert watch.stderr is not None
        assert watch.stderr.read() == b""
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
        if watch.stderr is not None:
            watch.stderr.close()
