"""The whole key layout on a Redis Cluster: three masters, two serving nodes."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    ClusterDownError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)

from mesh_node import status as mesh_status
from mesh_node.constants import Keys, hash_tag
from mesh_node.ratelimit.limiter import windows_for
from mesh_node.ratelimit.redis_backend import key_id
from mesh_node.redis_link import is_outage, open_redis_once
from mesh_node.settings import Settings

from .support import (
    FAKE_KEY,
    OwnCluster,
    Process,
    SimulatorProcess,
    node_environment,
    run_command,
    start_command,
    wait_for,
    with_config,
)

PREFIX = "{mesh}:"


def _node_env(url: str, simulator: SimulatorProcess, workdir: Path) -> dict[str, str]:
    return node_environment(url, simulator.base_url, PREFIX, workdir)


@pytest.fixture
def cluster_env(
    redis_cluster: OwnCluster, simulator: SimulatorProcess, tmp_path: Path
) -> dict[str, str]:
    """A node's environment on the cluster, under the prefix `{mesh}:`."""
    return _node_env(redis_cluster.url, simulator, tmp_path)


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[OwnCluster]:
    """A cluster of one test's own, which it may break."""
    cluster = OwnCluster(tmp_path / "own")
    cluster.workdir.mkdir()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(redis_cluster: OwnCluster) -> Iterator[RedisCluster]:
    """A cluster client of the test's own, returning bytes."""
    client = RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0])
    yield client
    client.close()


@pytest.mark.parametrize("prefix", ["{mesh}:", "{t1}:", "a{b}c:", "{{x}}:", "x}{y}:"])
def test_a_tagged_prefix_puts_every_key_of_a_stream_in_one_slot(prefix: str) -> None:
    """Every key the node makes under a tagged prefix hashes to the tag's slot,
    whatever braces a node or task id holds."""
    keys = Keys(prefix)
    limit = f"{prefix}limit:{key_id(FAKE_KEY)}"
    names = [
        keys.tasks,
        keys.results,
        keys.dead,
        keys.result("id-1"),
        keys.lease("id-1"),
        keys.node("host-1"),
        keys.node("odd}{node}"),
        f"{limit}:requests_per_minute",
        f"{limit}:requests_per_minute:sum",
        f"{limit}:pause",
    ]
    tag = hash_tag(prefix)
    assert tag is not None
    assert {key_slot(name.encode()) for name in names} == {key_slot(tag.encode())}


@pytest.mark.parametrize("prefix", ["mesh:", "{}mesh:", "mesh{:", "mesh}:", "}{:"])
def test_a_prefix_without_a_closed_tag_has_none(prefix: str) -> None:
    """A prefix without a non-empty `{…}` of its own gives its keys no common tag."""
    assert hash_tag(prefix) is None
    keys = Keys(prefix)
    assert len({key_slot(k.encode()) for k in (keys.tasks, keys.node("a}b"))}) == 2


def test_a_cluster_out_of_reach_is_an_outage_and_its_other_errors_are_not() -> None:
    """Failover, resharding and no reachable node are ridden out; a cluster
    client's refusal of a command is not."""
    unreachable = RedisClusterException("no node of the cluster could be reached")
    unreachable.__cause__ = redis.ConnectionError("Connection refused")
    assert is_outage(unreachable)
    assert is_outage(ClusterDownError("CLUSTERDOWN The cluster is down"))
    assert is_outage(TryAgainError("TRYAGAIN"))
    assert is_outage(SlotNotCoveredError("slot 3 is not covered"))
    assert not is_outage(RedisClusterException("keys in different slots"))
    assert not is_outage(redis.ResponseError("CROSSSLOT Keys in request"))


@pytest.mark.parametrize("name", ["serve", "submit", "status", "health"])
def test_an_untagged_prefix_on_a_cluster_is_refused(
    cluster_env: dict[str, str], name: str
) -> None:
    """Every command that uses Redis refuses a prefix without a hash tag on a
    cluster, with exit 2 and one line that names the fix."""
    args = [name, "-"] if name == "submit" else [name]
    done = run_command(*args, env={**cluster_env, "MESH_PREFIX": "mesh:"})
    assert done.returncode == 2
    assert done.stdout == b""
    assert done.stderr.decode() == (
        "mesh-node: configuration error: prefix: 'mesh:' has no hash tag, which a "
        "Redis Cluster needs to keep a stream's keys in one slot; use e.g. "
        "--prefix '{mesh}:' (or MESH_PREFIX)\n"
    )


@pytest.mark.parametrize("name", ["serve", "submit", "status", "health"])
def test_a_database_other_than_0_on_a_cluster_is_refused(
    cluster_env: dict[str, str], redis_cluster: OwnCluster, name: str
) -> None:
    """A URL naming database 1 of a cluster node is refused by every command
    that uses Redis, with exit 2 and one line naming the fix, not a raw
    SELECT error."""
    port = redis_cluster.ports[0]
    url = f"redis://127.0.0.1:{port}/1"
    args = [name, "-"] if name == "submit" else [name]
    done = run_command(*args, env={**cluster_env, "REDIS_URL": url})
    assert done.returncode == 2, done.stderr.decode()
    assert done.stdout == b""
    assert done.stderr.decode() == (
        "mesh-node: configuration error: redisUrl: names database 1, but a Redis "
        "Cluster has only database 0; end the URL with /0\n"
    )


def test_two_nodes_serve_a_cluster_end_to_end(
    cluster_env: dict[str, str],
    cluster: RedisCluster,
    started: list[Process],
    tmp_path: Path,
) -> None:
    """200 tasks submitted to a cluster get one result each from two nodes;
    the task stream ends empty and `status` sees both nodes."""
    # Only this test's keys, for the look at every key at the end.
    cluster.flushall()
    nodes = {}
    for node_id in ("cluster-a", "cluster-b"):
        env = {**cluster_env, "MESH_NODE_ID": node_id}
        nodes[node_id] = start_command("serve", "--concurrency", "8", env=env)
        started.append(nodes[node_id])
    for node in nodes.values():
        node.wait_for_event("node.started")
    ids = [f"c-{n}" for n in range(200)]
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        "".join(json.dumps({"id": i, "prompt": f"cluster {i}"}) + "\n" for i in ids)
    )

    submitted = run_command(
        "submit", str(tasks), "--wait", "--timeout", "90", env=cluster_env
    )
    assert submitted.returncode == 0, submitted.stderr.decode()
    printed = [json.loads(line) for line in submitted.stdout.splitlines()]
    assert sorted(r["taskId"] for r in printed) == sorted(ids)

    def both_seen() -> dict[str, Any] | None:
        done = run_command("status", "--json", env=cluster_env)
        assert done.returncode == 0, done.stderr.decode()
        report: dict[str, Any] = json.loads(done.stdout)
        live = {n["node"] for n in report["nodes"] if n["live"]}
        return report if live == set(nodes) else None

    report = wait_for(both_seen, timeout_s=20, what="status showing both nodes")
    assert report["tasks"]["key"] == "{mesh}:tasks"
    assert report["tasks"]["length"] == 0
    assert report["results"]["length"] == 200
    (api_key,) = report["limiter"]["keys"]
    assert api_key["id"] == key_id(FAKE_KEY)
    by_window = {w["name"]: w["used"] for w in api_key["windows"]}
    assert by_window["requests_per_minute"] == 200
    for node_id in nodes:
        healthy = run_command("health", "--node-id", node_id, env=cluster_env)
        assert healthy.returncode == 0, healthy.stdout.decode()

    # Every key the nodes made is under the prefix, in the tag's one slot.
    made = [key.decode() for key in cluster.scan_iter(match="*", count=1000)]
    assert {key_slot(key.encode()) for key in made} == {key_slot(b"mesh")}
    kinds = Counter(key.removeprefix(PREFIX).split(":", 1)[0] for key in made)
    assert kinds["result"] == 200
    assert kinds["node"] == 2
    assert kinds["limit"] > 0

    for node in nodes.values():
        assert node.stop() == 0
        # A pool too small for the node's concurrency would show as outages.
        assert "redis.unavailable" not in node.event_names()
    entries: Any = cluster.xrange(f"{PREFIX}results")
    results = [json.loads(fields[b"result"]) for _id, fields in entries]
    assert sorted(r["taskId"] for r in results) == sorted(ids)
    assert all(r["success"] for r in results)
    by_node = Counter(r["metadata"]["node"] for r in results)
    assert set(by_node) == set(nodes)
    assert cluster.xlen(f"{PREFIX}tasks") == 0
    assert cluster.xpending(f"{PREFIX}tasks", "mesh-nodes")["pending"] == 0


def test_a_dead_letter_is_written_and_settled_on_a_cluster(
    cluster_env: dict[str, str], cluster: RedisCluster, started: list[Process]
) -> None:
    """An entry delivered too often is copied to the dead letters, answered and
    acknowledged in one script on the cluster."""
    prefix = "{dead-letters}:"
    env = with_config(
        {**cluster_env, "MESH_PREFIX": prefix}, claimTimeoutMs=200, maxDeliveries=3
    )
    stream = f"{prefix}tasks"
    cluster.xgroup_create(stream, "mesh-nodes", id="0", mkstream=True)
    task = json.dumps({"id": "poison", "prompt": "never runs"})
    entry: Any = cluster.xadd(stream, {"task": task})
    cluster.xreadgroup("mesh-nodes", "ghost", {stream: ">"})
    for _ in range(3):
        cluster.xclaim(stream, "mesh-nodes", "ghost", 0, [entry])
    node = start_command("serve", env=env)
    started.append(node)
    wait_for(
        lambda: cluster.xlen(f"{prefix}results") == 1,
        timeout_s=20,
        what="the max_deliveries result",
    )
    assert node.stop() == 0

    dead: Any = cluster.xrange(f"{prefix}dead")
    assert [fields for _id, fields in dead] == [
        {
            b"entryId": entry,
            b"reason": b"delivered 5 times, more than maxDeliveries (3)",
            b"deliveries": b"5",
            b"node": node.wait_for_event("node.started")["node"].encode(),
            b"task": task.encode(),
        }
    ]
    published: Any = cluster.xrange(f"{prefix}results")
    [(_id, fields)] = published
    assert json.loads(fields[b"result"])["error"]["type"] == "max_deliveries"
    assert cluster.exists(f"{prefix}result:poison") == 1
    assert cluster.xlen(stream) == 0
    assert cluster.xpending(stream, "mesh-nodes")["pending"] == 0


def test_status_and_health_find_heartbeats_on_every_master(
    redis_cluster: OwnCluster,
) -> None:
    """`status` and `health` find a stream's heartbeats and limiter keys
    whichever master holds the stream's slot."""

    async def look() -> None:
        client = await open_redis_once(redis_cluster.url, prefix=PREFIX, timeout_s=5)
        assert isinstance(client, AsyncRedisCluster)
        try:
            prefixes = await _one_prefix_per_master(client)
            for prefix in prefixes:
                keys = Keys(prefix)
                windows = windows_for(Settings())
                report = await mesh_status.gather(client, keys, "mesh-nodes", windows)
                assert [n["node"] for n in report["nodes"]] == ["beater"]
                (api_key,) = report["limiter"]["keys"]
                used = {w["name"]: w["used"] for w in api_key["windows"]}
                assert used["requests_per_minute"] == 3
                healthy, line = await mesh_status.health(
                    client, keys, node_id=None, host="far-host"
                )
                assert healthy, line
        finally:
            await client.aclose()

    asyncio.run(look())


async def _one_prefix_per_master(client: AsyncRedisCluster) -> list[str]:
    """Tagged prefixes whose slots lie on each master in turn, each with a
    fresh heartbeat and a limiter window that holds 3."""
    masters = {node.name for node in client.get_primaries()}
    by_master: dict[str, str] = {}
    for n in range(1000):
        owner = client.get_node_from_key(f"{{p{n}}}")
        assert owner is not None
        by_master.setdefault(owner.name, f"{{p{n}}}:")
    assert set(by_master) == masters
    for prefix in by_master.values():
        seconds, _micros = await client.time(
            target_nodes=client.get_node_from_key(prefix)
        )
        await client.hset(
            f"{prefix}node:beater",
            mapping={"node": "beater", "host": "far-host", "seen_ms": seconds * 1000},
        )
        await client.set(f"{prefix}limit:{key_id(FAKE_KEY)}:requests_per_minute:sum", 3)
    return list(by_master.values())


def test_a_node_rides_out_the_restart_of_the_master_holding_its_slot(
    own_cluster: OwnCluster,
    simulator: SimulatorProcess,
    started: list[Process],
    tmp_path: Path,
) -> None:
    """The master of the stream's slot goes down and comes back empty: the node
    reports the outage once, recreates its group and serves on."""
    env = {**_node_env(own_cluster.url, simulator, tmp_path), "MESH_NODE_ID": "rider"}
    node = start_command("serve", env=env)
    started.append(node)
    node.wait_for_event("group.created")
    cluster = RedisCluster(host="127.0.0.1", port=own_cluster.ports[0])
    try:
        owner: Any = cast(Any, cluster).get_node_from_key(PREFIX)
        _add_and_wait(cluster, "before")
    finally:
        cluster.close()
    master = own_cluster.ports.index(int(owner.port))

    own_cluster.stop_node(master)
    node.wait_for_event("redis.unavailable")
    own_cluster.start_node(master)
    own_cluster.wait_serving()

    cluster = RedisCluster(host="127.0.0.1", port=own_cluster.ports[0])
    try:
        _add_and_wait(cluster, "after")
    finally:
        cluster.close()
    assert node.wait_for_event("redis.reconnected")["outage_s"] > 0
    assert node.stop() == 0
    names = node.event_names()
    assert names.count("redis.unavailable") == 1
    assert names.count("group.created") == 2
    assert "node.crashed" not in names


def _add_and_wait(cluster: RedisCluster, task_id: str) -> None:
    task = json.dumps({"id": task_id, "prompt": task_id})
    cluster.xadd(f"{PREFIX}tasks", {"task": task})
    wait_for(
        lambda: cluster.exists(f"{PREFIX}result:{task_id}"),
        timeout_s=30,
        what=f"the result of {task_id}",
    )
