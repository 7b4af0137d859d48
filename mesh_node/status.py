"""`mesh-node status`: an operator's first look at a mesh, read from Redis alone.

Everything comes from what the nodes keep in Redis anyway: the streams and
their consumer group, the nodes' heartbeats, the limiter's windows, and the
results of the last minute. Times are the Redis server's, so nodes whose
clocks disagree are judged alike.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Any

import orjson
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from . import constants as c
from .heartbeat import HEARTBEAT_STALE_MS
from .ratelimit import SAFETY_MS, Window
from .redis_link import Client

RECENT_MS = 60_000


async def gather(
    client: Client, keys: c.Keys, group: str, windows: list[Window]
) -> dict[str, Any]:
    """Reads the mesh's state; a missing stream or group reads as empty.

    Args:
        client: the Redis client.
        keys: the key layout.
        group: the consumer group to report on.
        windows: the configured limits, to show each one's headroom.
    """
    now_ms = await _now_ms(client, keys)
    nodes = await _nodes(client, keys, now_ms)
    # The limits the nodes run with, when one says; else this command's own.
    published = next((n["limits"] for n in nodes if n["live"] and n["limits"]), None)
    if published:
        windows = [
            Window(w.name, published.get(w.name, w.limit), w.window_ms, w.unit, w.kind)
            for w in windows
        ]
    return {
        "at": dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z"),
        "tasks": await _stream(client, keys.tasks, group),
        "results": {"key": keys.results, "length": await client.xlen(keys.results)},
        "dead": {"key": keys.dead, "length": await client.xlen(keys.dead)},
        "nodes": nodes,
        "last_minute": _recent(nodes),
        "limiter": await _limiter(client, keys, windows, now_ms),
    }


async def _now_ms(client: Client, keys: c.Keys) -> int:
    """The Redis server's time; on a cluster, that of the master holding the
    prefix's slot, whose clock stamped the heartbeats and the limiter."""
    if isinstance(client, RedisCluster):
        node = client.get_node_from_key(keys.tasks)
        seconds, micros = await client.time(target_nodes=node)
    else:
        seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def _stream(client: Client, key: str, group: str) -> dict[str, Any]:
    length = int(await client.xlen(key))
    report: dict[str, Any] = {"key": key, "length": length}
    try:
        groups = await client.xinfo_groups(key)
    except ResponseError:
        groups = []
    mine = next((g for g in groups if _text(g.get("name")) == group), None)
    if mine is None:
        report["group"] = {"name": group, "exists": False}
        return report
    consumers = await client.xinfo_consumers(key, group)
    report["group"] = {
        "name": group,
        "exists": True,
        "pending": int(mine.get("pending") or 0),
        "lag": _lag(mine.get("lag"), length),
        "last_delivered": _text(mine.get("last-delivered-id")),
        "consumers": [
            {
                "name": _text(consumer.get("name")),
                "pending": int(consumer.get("pending") or 0),
                "idle_ms": int(consumer.get("idle") or 0),
            }
            for consumer in consumers
        ],
    }
    return report


def _lag(reported: Any, length: int) -> int | None:
    """The group's lag as XINFO GROUPS reports it, but never more than the
    stream's length: an entry not yet delivered to the group is still in the
    stream.

    Redis computes the lag from two counters, the stream's entries added and
    the group's entries read, which go wrong after a restart from an AOF (or an
    XSETID, or an XGROUP SETID with ENTRIESREAD): it may then report 1164 for
    an empty stream.

    Redis 7 answers null when it cannot tell (the group's read counter is
    unknown and entries were deleted past its last-delivered id, or that id is
    past the stream's last one), and Redis 6.2 has no lag at all. An empty
    stream then has no lag for sure; any other is shown as unknown rather than
    as its length, which would count the pending entries, still in the
    stream, as lag too.
    """
    if reported is None:
        return 0 if length == 0 else None
    return max(0, min(int(reported), length))


async def _nodes(
    client: Client,
    keys: c.Keys,
    now_ms: int,
    match: str = "*",
    node_id: str | None = None,
) -> list[dict[str, Any]]:
    """The heartbeats whose node ids match the glob `match` (or the one of
    `node_id`, read directly), in one round trip."""
    found: list[Any] = (
        [keys.node(node_id)]
        if node_id is not None
        else [
            key
            async for key in client.scan_iter(
                match=_glob(keys.node("")) + match, count=500
            )
        ]
    )
    pipe = client.pipeline(transaction=False)
    for key in found:
        pipe.hgetall(key)
    nodes = []
    for key, raw in zip(found, await pipe.execute() if found else [], strict=True):
        fields = {_text(k): _text(v) for k, v in raw.items()}
        if not fields:
            continue
        seen_ms = _int(fields.get("seen_ms"))
        age_ms = now_ms - seen_ms if seen_ms is not None else None
        started_ms = _int(fields.get("started_ms"))
        nodes.append(
            {
                "node": fields.get("node", _text(key).removeprefix(keys.node(""))),
                "host": fields.get("host"),
                "live": age_ms is not None and age_ms <= HEARTBEAT_STALE_MS,
                "state": fields.get("state"),
                "in_flight": _int(fields.get("in_flight")),
                "concurrency": _int(fields.get("concurrency")),
                "succeeded": _int(fields.get("succeeded")),
                "failed": _int(fields.get("failed")),
                "crashed": _int(fields.get("crashed")),
                "seen_s_ago": None if age_ms is None else round(age_ms / 1000, 1),
                "up_s": None
                if started_ms is None or seen_ms is None
                else (seen_ms - started_ms) // 1000,
                "spans_dropped": _int(fields.get("spans_dropped")),
                "minute_succeeded": _int(fields.get("minute_succeeded")),
                "minute_failed": _int(fields.get("minute_failed")),
                "minute_errors": _json_object(fields.get("minute_errors")),
                "minute_dead_lettered": _int(fields.get("minute_dead_lettered")),
                "limits": _json_object(fields.get("limits")),
                "version": fields.get("version"),
                "pid": _int(fields.get("pid")),
            }
        )
    return sorted(nodes, key=lambda node: str(node["node"]))


def _recent(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """The last minute, added up from the live nodes' heartbeats."""
    live = [node for node in nodes if node["live"]]
    succeeded = sum(node["minute_succeeded"] or 0 for node in live)
    failed = sum(node["minute_failed"] or 0 for node in live)
    errors: Counter[str] = Counter()
    for node in live:
        errors.update(node["minute_errors"])
    return {
        "results": succeeded + failed,
        "per_s": round((succeeded + failed) / (RECENT_MS / 1000), 2),
        "succeeded": succeeded,
        "failed": failed,
        "errors": dict(errors.most_common()),
        "dead_letters": sum(node["minute_dead_lettered"] or 0 for node in live),
    }


async def _limiter(
    client: Client, keys: c.Keys, windows: list[Window], now_ms: int
) -> dict[str, Any]:
    base = f"{keys.prefix}limit:"
    ids = set()
    async for key in client.scan_iter(match=_glob(base) + "*", count=500):
        rest = _text(key).removeprefix(base)
        if ":" in rest:
            ids.add(rest.split(":", 1)[0])
    configured = [
        {"name": w.name, "limit": w.limit, "window_s": w.window_ms / 1000}
        for w in windows
    ]
    api_keys = []
    for key_id in sorted(ids):
        used = []
        for window in windows:
            total = await _window_used(
                client, f"{base}{key_id}:{window.name}", window, now_ms
            )
            used.append(
                {
                    "name": window.name,
                    "limit": window.limit,
                    "used": total,
                    "headroom": max(0, window.limit - total),
                }
            )
        pause = f"{base}{key_id}:pause"
        paused_ms = max(0, int(await client.pttl(pause)))
        reason = await client.get(pause) if paused_ms else None
        api_keys.append(
            {
                "id": key_id,
                "windows": used,
                "paused_s": round(paused_ms / 1000, 1),
                "pause_reason": _text(reason) if reason else None,
            }
        )
    return {"limits": configured, "keys": api_keys}


async def health(
    client: Client, keys: c.Keys, *, node_id: str | None, host: str
) -> tuple[bool, str]:
    """Whether a serving node is healthy, and one line saying why or why not.

    The node is `node_id`, or else the freshest one whose heartbeat names
    `host`. Healthy means its heartbeat is fresh: it reached Redis within
    the last three beats.
    """
    now_ms = await _now_ms(client, keys)
    # A container's check runs every 30 s beside every node: it reads its
    # own node's heartbeat, not the whole mesh's, where it can.
    if node_id is not None:
        nodes = await _nodes(client, keys, now_ms, node_id=node_id)
        mine = [node for node in nodes if node["node"] == node_id]
        whose = f"node {node_id}"
    else:
        # Default node ids are host-pid; a node named otherwise is found by
        # the host its heartbeat records, at the cost of reading them all.
        nodes = await _nodes(client, keys, now_ms, match=_glob(host) + "-*")
        mine = [node for node in nodes if node.get("host") == host]
        if not mine:
            nodes = await _nodes(client, keys, now_ms)
            mine = [node for node in nodes if node.get("host") == host]
        whose = f"a node on host {host}"
    if not mine:
        return False, f"unhealthy: no heartbeat from {whose} in Redis"
    node = min(
        mine, key=lambda n: n["seen_s_ago"] if n["seen_s_ago"] is not None else 1e9
    )
    age = node["seen_s_ago"]
    if not node["live"]:
        return False, (
            f"unhealthy: node {node['node']} last beat {age}s ago, more than "
            f"{HEARTBEAT_STALE_MS / 1000:g}s"
        )
    return True, (
        f"healthy: node {node['node']} beat {age}s ago, {node['state']}, "
        f"{node['in_flight']}/{node['concurrency']} in flight"
    )


async def _window_used(client: Client, key: str, window: Window, now_ms: int) -> int:
    """What a window holds: its running total, which may still count a few
    entries the next call will age out (so headroom errs low), or, without
    one, its entries counted."""
    total = await client.get(f"{key}:sum")
    if total is not None:
        return max(0, int(total))
    members = await client.zrangebyscore(
        key, now_ms - window.window_ms - SAFETY_MS, "+inf"
    )
    return sum(int(_text(m).rsplit("|", 1)[1]) for m in members)


def render(report: dict[str, Any]) -> str:
    """The report as an operator reads it on a terminal."""
    tasks, group = report["tasks"], report["tasks"]["group"]
    lines = [f"mesh status at {report['at']}", ""]
    lines.append(f"tasks        {tasks['key']:<24} length {tasks['length']}")
    if group["exists"]:
        lag = "unknown" if group["lag"] is None else group["lag"]
        lines.append(
            f"group        {group['name']:<24} pending {group['pending']}  "
            f"lag {lag}  consumers {len(group['consumers'])}"
        )
        for consumer in group["consumers"]:
            lines.append(
                f"  {consumer['name']:<34} pending {consumer['pending']:<6} "
                f"idle {consumer['idle_ms'] / 1000:.1f}s"
            )
    else:
        lines.append(f"group        {group['name']:<24} not created yet")
    recent = report["last_minute"]
    lines.append(
        f"results      {report['results']['key']:<24} length "
        f"{report['results']['length']}"
    )
    lines.append(
        f"dead letters {report['dead']['key']:<24} length {report['dead']['length']}"
        f" ({recent['dead_letters']} in the last minute)"
    )
    lines += ["", *_render_nodes(report["nodes"]), ""]
    errors = ", ".join(f"{name} {count}" for name, count in recent["errors"].items())
    lines.append(
        f"last minute  {recent['results']} results ({recent['per_s']}/s): "
        f"{recent['succeeded']} succeeded, {recent['failed']} failed"
        + (f" ({errors})" if errors else "")
    )
    lines += ["", *_render_limiter(report["limiter"])]
    return "\n".join(lines)


def _render_nodes(nodes: list[dict[str, Any]]) -> list[str]:
    live = sum(1 for node in nodes if node["live"])
    lines = [f"nodes        {live} live, {len(nodes) - live} stale"]
    if nodes:
        lines.append(
            f"  {'node':<28} {'state':<9} {'in flight':<10} {'succeeded':>9} "
            f"{'failed':>7}  seen    up"
        )
    for node in nodes:
        state = node["state"] if node["live"] else "stale"
        flight = f"{node['in_flight']}/{node['concurrency']}"
        dropped = node["spans_dropped"]
        lines.append(
            f"  {node['node']:<28} {state:<9} {flight:<10} "
            f"{node['succeeded'] or 0:>9} {node['failed'] or 0:>7}  "
            f"{_ago(node['seen_s_ago']):<7} {_ago(node['up_s'])}"
            + (f"  ({dropped} spans dropped)" if dropped else "")
        )
    return lines


def _render_limiter(limiter: dict[str, Any]) -> list[str]:
    if not limiter["keys"]:
        limits = ", ".join(
            f"{w['name'].replace('_', ' ')} {w['limit']}" for w in limiter["limits"]
        )
        return [f"limiter      no calls recorded yet; limits: {limits}"]
    lines = []
    for key in limiter["keys"]:
        lines.append(f"limiter      API key #{key['id'][:8]}")
        for window in key["windows"]:
            lines.append(
                f"  {window['name'].replace('_', ' '):<28} used {window['used']:>8}"
                f" of {window['limit']:<8} headroom {window['headroom']}"
            )
        if key["paused_s"]:
            lines.append(f"  paused for {key['paused_s']}s more: {key['pause_reason']}")
    return lines


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def _glob(text: str) -> str:
    """`text` with the characters SCAN's MATCH treats specially escaped."""
    return "".join(f"\\{ch}" if ch in "*?[]\\" else ch for ch in text)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _json_object(value: str | None) -> dict[str, Any]:
    try:
        parsed = orjson.loads(value or "{}")
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None
