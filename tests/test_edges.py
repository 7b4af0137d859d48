"""Edges found by trying to break the node: signals, odd input, closed pipes."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis

from .support import (
    FAKE_KEY,
    REPO,
    Process,
    add_entry,
    command,
    run_command,
    start_command,
    stream_results,
    wait_for,
)

DEEP = (
    '{"id": "deep", "messages": [{"role": "user", "content": [{"type": "text", '
    '"text": "hi", "x": ' + '{"a": ' * 400 + "1" + "}" * 400 + "}]}]}"
)


def _all_json(stderr: bytes) -> bool:
    for line in stderr.splitlines():
        json.loads(line)
    return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interactive_stops_cleanly_with_stdin_open(
    node_env: dict[str, str], signum: int
) -> None:
    """A signal while stdin is still open ends interactive mode with exit 0."""
    node = start_command("interactive", env=node_env, stdin_pipe=True)
    popen = node.popen
    assert popen.stdin is not None
    popen.stdin.write(b'{"id": "open-1", "prompt": "hello"}\n')
    popen.stdin.flush()
    node.wait_for_event("task.finished")
    popen.send_signal(signum)
    code = node.wait(timeout_s=15)
    popen.stdin.close()
    assert code == 0, node.stderr_text()
    assert _all_json(b"".join(node.stderr_lines))


def test_deeply_nested_content_is_an_invalid_task(node_env: dict[str, str]) -> None:
    """Content nested hundreds of levels deep is refused, not a crash."""
    stdin = DEEP.encode() + b"\n" + b'{"id": "after", "prompt": "x"}\n'
    done = run_command("interactive", env=node_env, stdin=stdin)
    assert done.returncode == 0
    results = {r["taskId"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert results["deep"]["error"]["type"] == "invalid_task"
    assert (
        results["deep"]["error"]["message"]
        == "messages.0.content: nested more than 32 levels deep"
    )
    assert results["after"]["success"] is True


def test_deeply_nested_entry_is_answered_and_acked(
    node_env: dict[str, str], rdb: redis.Redis, prefix: str, started: list[Process]
) -> None:
    """In serve, the same entry gets its result and leaves nothing pending."""
    add_entry(rdb, prefix, {"task": DEEP})
    node = start_command("serve", env=node_env)
    started.append(node)
    wait_for(lambda: rdb.xlen(f"{prefix}results") == 1, timeout_s=20, what="a result")
    assert node.stop() == 0
    assert stream_results(rdb, prefix)[0]["error"]["type"] == "invalid_task"
    summary: Any = rdb.xpending(f"{prefix}tasks", "mesh-nodes")
    assert summary["pending"] == 0


@pytest.mark.parametrize(
    ("args", "env_extra", "message"),
    [
        (
            ["serve"],
            {"REDIS_URL": "notaurl"},
            "mesh-node: configuration error: redisUrl (REDIS_URL): must start with "
            "redis://, rediss:// or unix://",
        ),
        (
            ["interactive"],
            {"MESH_LOG_LEVEL": "bogus"},
            "mesh-node: configuration error: MESH_LOG_LEVEL: must be one of debug, "
            "info, warning, error",
        ),
        (
            ["interactive"],
            {"ANTHROPIC_API_KEY": "sk-ant-test-a\nsk-ant-test-b"},
            "mesh-node: configuration error: ANTHROPIC_API_KEY: the key holds "
            "whitespace or control characters",
        ),
    ],
)
def test_bad_configuration_is_one_line_and_exit_2(
    node_env: dict[str, str], args: list[str], env_extra: dict[str, str], message: str
) -> None:
    """Configuration mistakes give exit 2 and one line, never a traceback."""
    done = run_command(*args, env={**node_env, **env_extra})
    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == [message]
    assert FAKE_KEY.encode() not in done.stderr


@pytest.mark.parametrize(
    "args", [["--port", "99999"], ["--fail-rate", "2"], ["--latency-ms", "-1"]]
)
def test_bad_simulator_options_exit_2(args: list[str]) -> None:
    """Out-of-range simulator options are usage errors."""
    done = run_command("simulate-api", *args, env={})
    assert done.returncode == 2
    assert b"Traceback" not in done.stderr


def test_submit_of_a_broken_array_exits_2(node_env: dict[str, str]) -> None:
    """A tasks file that starts as a JSON array but is not one is a usage error."""
    done = run_command("submit", "-", env=node_env, stdin=b"[1,")
    assert done.returncode == 2
    assert done.stderr.decode().startswith("mesh-node: -: not a valid JSON array")


def test_batch_stops_when_stdout_closes(
    node_env: dict[str, str], tmp_path: Path
) -> None:
    """A reader that goes away stops the batch: exit 1, no more API calls."""
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        "".join(
            json.dumps({"id": f"p{n}", "prompt": "[[sim:latency_ms=200]] x"}) + "\n"
            for n in range(60)
        )
    )
    popen = subprocess.Popen(
        command("batch", str(tasks), "--concurrency", "2"),
        env=node_env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    node = Process(popen)
    assert popen.stdout is not None
    popen.stdout.readline()
    popen.stdout.close()
    code = node.wait(timeout_s=30)
    assert code == 1
    names = node.event_names()
    assert "output.closed" in names
    assert names.count("task.started") < 20


def test_batch_reads_an_indented_json_array(
    node_env: dict[str, str], tmp_path: Path
) -> None:
    """A JSON array file may start with whitespace."""
    tasks = tmp_path / "tasks.json"
    tasks.write_text(
        '\n   [\n {"id": "a1", "prompt": "x"},\n {"id": "a2", "prompt": "y"}]'
    )
    done = run_command("batch", str(tasks), env=node_env)
    assert done.returncode == 0
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted(r["taskId"] for r in results) == ["a1", "a2"]
    assert all(r["success"] for r in results)


def test_submit_wait_prints_results_of_tasks_without_an_id(
    node_env: dict[str, str], started: list[Process], tmp_path: Path
) -> None:
    """`submit --wait` prints one result per submitted entry, valid id or not."""
    node = start_command("serve", env=node_env)
    started.append(node)
    tasks = tmp_path / "tasks.jsonl"
    big = json.dumps({"id": "big", "prompt": "x" * 5000})
    tasks.write_text(
        f'not json\n{{"prompt": "no id"}}\n{big}\n{{"id": "ok", "prompt": "y"}}\n'
    )
    done = run_command("submit", str(tasks), "--wait", "--timeout", "20", env=node_env)
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == 4
    assert sorted(str(r["taskId"]) for r in results) == ["None", "None", "None", "ok"]
    assert node.stop() == 0
