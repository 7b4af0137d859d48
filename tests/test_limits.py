"""Rate limits, retries, deadlines and budgets, end to end against the simulator."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import redis

from mesh_node.simulator import prompt_key

from .support import (
    Process,
    SimulatorProcess,
    add_task,
    run_command,
    start_command,
    stream_results,
    wait_for,
    with_config,
)


def _interactive(env: dict[str, str], *tasks: dict[str, Any]) -> list[dict[str, Any]]:
    stdin = b"".join(json.dumps(task).encode() + b"\n" for task in tasks)
    done = run_command("interactive", env=env, stdin=stdin, timeout_s=90)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_seed_limits_send_twenty_then_wait(
    node_env: dict[str, str], rdb: redis.Redis, prefix: str, started: list[Process]
) -> None:
    """20/min, 100/h: of 30 tasks 20 go at once, 10 wait their minute; none fails."""
    config = json.loads(Path(node_env["MESH_CONFIG"]).read_text())
    del config["rateLimiting"]  # the seed's 20 per minute and 100 per hour
    Path(node_env["MESH_CONFIG"]).write_text(json.dumps(config))
    for n in range(30):
        add_task(rdb, prefix, {"id": f"seed-{n}", "prompt": "x"})
    node = start_command("serve", "--concurrency", "32", env=node_env)
    started.append(node)
    wait_for(
        lambda: rdb.xlen(f"{prefix}results") >= 20,
        timeout_s=20,
        what="the first 20 results",
    )
    assert rdb.xlen(f"{prefix}results") == 20
    wait_for(
        lambda: rdb.xlen(f"{prefix}results") == 30,
        timeout_s=75,
        what="the last 10 results, a minute later",
    )
    assert node.stop() == 0
    results = stream_results(rdb, prefix)
    assert all(r["success"] for r in results)
    first, later = results[:20], results[20:]
    assert all(r["metadata"]["durationMs"] < 15_000 for r in first)
    # The later ten waited for the first minute's window to free.
    assert all(r["metadata"]["durationMs"] >= 55_000 for r in later)


def test_retries_wait_at_least_retry_after(node_env: dict[str, str]) -> None:
    """529 twice with retry-after 1 s, then 200: 3 attempts, 2 s or more."""
    prompt = (
        f"[[sim:fail_times=2,status=529,retry_after_s=1]] {node_env['MESH_PREFIX']}"
    )
    [result] = _interactive(node_env, {"id": "ra", "prompt": prompt})
    assert result["success"] is True
    assert result["metadata"]["attempts"] == 3
    assert result["metadata"]["durationMs"] >= 2000


def test_refused_request_costs_one_call(
    node_env: dict[str, str], simulator: SimulatorProcess
) -> None:
    """A 400 and a 401 each make exactly one API call."""
    tag = node_env["MESH_PREFIX"]
    prompts = {s: f"[[sim:status={s}]] {tag}" for s in (400, 401)}
    results = _interactive(
        node_env, *({"id": f"r{s}", "prompt": p} for s, p in prompts.items())
    )
    assert {r["error"]["type"] for r in results} == {
        "invalid_request",
        "authentication",
    }
    by_prompt = simulator.stats()["by_prompt"]
    assert [by_prompt[prompt_key(p)] for p in prompts.values()] == [1, 1]


def test_deadline_cancels_the_call_in_flight(
    node_env: dict[str, str], simulator: SimulatorProcess
) -> None:
    """timeoutMs 2000 against a 5 s answer: deadline_exceeded, request abandoned."""
    dropped_before = simulator.stats()["by_status"].get("dropped", 0)
    task = {"id": "slow", "prompt": "[[sim:latency_ms=5000]] slow", "timeoutMs": 2000}
    [result] = _interactive(node_env, task)
    assert result["error"]["type"] == "deadline_exceeded"
    assert 2000 <= result["metadata"]["durationMs"] < 5000
    wait_for(
        lambda: simulator.stats()["by_status"].get("dropped", 0) > dropped_before,
        timeout_s=10,
        what="the simulator to see the request abandoned",
    )


def _budget_tasks(tag: str) -> list[dict[str, Any]]:
    # About 300 tokens each: 1,150 bytes of prompt, a short answer.
    return [
        {"id": f"b{n}", "prompt": f"{n} {tag} " + "w" * 1180, "max_tokens": 10}
        for n in range(10)
    ]


def test_budget_holds_the_fourth_task(node_env: dict[str, str]) -> None:
    """1,000 tokens an hour and ~300-token tasks: three run, the fourth is held."""
    env = with_config(node_env, budget={"tokensPerHour": 1000}, maxPromptBytes=4096)
    node = start_command("interactive", "--concurrency", "1", env=env, stdin_pipe=True)
    popen = node.popen
    assert popen.stdin is not None
    assert popen.stdout is not None
    for task in _budget_tasks(env["MESH_PREFIX"]):
        popen.stdin.write(json.dumps(task).encode() + b"\n")
    popen.stdin.flush()
    finished = [json.loads(popen.stdout.readline()) for _ in range(3)]
    assert [r["taskId"] for r in finished] == ["b0", "b1", "b2"]
    assert all(r["success"] for r in finished)
    spent = sum(sum(r["metadata"]["usage"].values()) for r in finished)
    assert 800 <= spent <= 1000
    wait_for(
        lambda: node.event_names().count("task.started") == 4,
        timeout_s=10,
        what="the fourth task to be taken",
    )
    assert node.event_names().count("task.finished") == 3
    popen.send_signal(signal.SIGINT)
    assert node.wait(timeout_s=20) == 0
    popen.stdin.close()


def test_budget_can_fail_instead_of_holding(node_env: dict[str, str]) -> None:
    """With onExceeded=fail, the fourth task fails with budget_exceeded."""
    env = with_config(
        node_env,
        budget={"tokensPerHour": 1000, "onExceeded": "fail"},
        maxPromptBytes=4096,
    )
    done = run_command(
        "interactive",
        "--concurrency",
        "1",
        env=env,
        stdin=b"".join(
            json.dumps(t).encode() + b"\n" for t in _budget_tasks(env["MESH_PREFIX"])
        ),
    )
    assert done.returncode == 0
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["success"] for r in results[:3]] == [True] * 3
    assert results[3]["error"] == {
        "type": "budget_exceeded",
        "message": "the tokens per hour budget is spent",
        "retryable": False,
    }


def test_long_answers_are_streamed_and_cut_offs_say_so(
    node_env: dict[str, str],
) -> None:
    """Long answers stream; a cut stream keeps its text; an empty one fails."""
    env = with_config(node_env, maxOutputTokens=64_000)
    tag = env["MESH_PREFIX"]
    whole, cut, empty = _interactive(
        env,
        {"id": "long", "prompt": f"long answer {tag}", "max_tokens": 30_000},
        {
            "id": "cut",
            "prompt": f"[[sim:cut]] cut this answer off in the middle {tag}",
            "max_tokens": 30_000,
        },
        {"id": "empty", "prompt": f"[[sim:empty]] {tag}"},
    )
    by_id = {r["taskId"]: r for r in (whole, cut, empty)}
    assert by_id["long"]["success"] is True
    assert by_id["long"]["response"] == f"Simulated reply to: long answer {tag}"
    assert by_id["long"]["metadata"]["usage"]["output_tokens"] > 0
    broken = by_id["cut"]
    assert broken["success"] is False
    assert broken["error"]["type"] == "connection"
    assert broken["error"]["message"].startswith("the answer was cut off after ")
    assert broken["error"]["retryable"] is False
    assert broken["response"]
    assert broken["metadata"]["attempts"] == 1
    assert by_id["empty"]["error"]["message"] == (
        "the API returned an empty answer (stop reason end_turn)"
    )


def test_long_retry_after_hands_the_task_back_when_so_configured(
    node_env: dict[str, str], rdb: redis.Redis, prefix: str, started: list[Process]
) -> None:
    """onLongWait=release: a retry-after past the deadline leaves the entry pending."""
    env = with_config(
        node_env,
        rateLimiting={
            "maxRequestsPerMinute": 1000,
            "maxRequestsPerHour": 10_000,
            "onLongWait": "release",
        },
    )
    task = {
        "id": "later",
        "prompt": "[[sim:status=429,retry_after_s=30]] busy",
        "timeoutMs": 3000,
    }
    add_task(rdb, prefix, task)
    node = start_command("serve", env=env)
    started.append(node)
    event = node.wait_for_event("task.deferred")
    assert event["task_id"] == "later"
    assert node.stop() == 0
    assert rdb.xlen(f"{prefix}results") == 0
    summary: Any = rdb.xpending(f"{prefix}tasks", "mesh-nodes")
    assert summary["pending"] == 1


def test_answers_are_checked_before_they_are_published(
    node_env: dict[str, str],
) -> None:
    """An answer that is not UTF-8, or too big, fails `api_error`, never retried."""
    env = with_config(node_env, maxResponseBytes=40)
    results = _interactive(
        env,
        {"id": "broken", "prompt": "[[sim:surrogate]] hi"},
        {"id": "big", "prompt": "a" * 100},
        {"id": "fits", "prompt": "ok"},
    )
    big, broken, fits = sorted(results, key=lambda r: str(r["taskId"]))
    assert broken["success"] is False
    assert broken["error"] == {
        "type": "api_error",
        # "Simulated reply to: hi" is 22 characters; the surrogate follows.
        "message": "the answer is not valid UTF-8 (at character 22)",
        "retryable": False,
    }
    assert broken["response"] is None
    assert broken["metadata"]["attempts"] == 1
    too_big = re.fullmatch(
        r"the answer is (\d+) bytes, more than maxResponseBytes \(40\)",
        big["error"]["message"],
    )
    assert too_big is not None
    assert int(too_big[1]) > 40
    assert big["response"] is None
    assert fits["success"] is True
