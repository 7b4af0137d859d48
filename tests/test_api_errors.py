"""API failures map to the design's error types, and the retry policy decides."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest

from .support import free_port, run_command, with_config

# status the simulator answers -> error type, retryable
STATUS_CASES = [
    (400, "invalid_request", False),
    (401, "authentication", False),
    (403, "permission", False),
    (404, "not_found", False),
    (413, "request_too_large", False),
    (429, "rate_limited", True),
    (500, "api_error", True),
    (503, "api_error", True),
    (529, "overloaded", True),
    (408, "timeout", True),
]


def _run(
    env: dict[str, str], *tasks: Mapping[str, object]
) -> dict[str, dict[str, Any]]:
    stdin = b"".join(json.dumps(task).encode() + b"\n" for task in tasks)
    done = run_command("interactive", env=env, stdin=stdin)
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    return {str(result["taskId"]): result for result in results}


@pytest.fixture
def no_retry_env(node_env: dict[str, str]) -> dict[str, str]:
    """A node that tries each call once, so every status shows as it is."""
    return with_config(node_env, retry={"maxAttempts": 1})


def test_each_status_maps_to_its_error_type(no_retry_env: dict[str, str]) -> None:
    """Every API status gets its documented error type and retryable flag."""
    tasks = [
        {"id": f"s{status}", "prompt": f"[[sim:status={status}]] fail {status}"}
        for status, _type, _retryable in STATUS_CASES
    ]
    results = _run(no_retry_env, *tasks)
    for status, error_type, retryable in STATUS_CASES:
        result = results[f"s{status}"]
        assert result["success"] is False
        error = result["error"]
        assert isinstance(error, dict)
        assert error["type"] == error_type, status
        assert error["retryable"] is retryable, status
        assert str(status) in error["message"]
        assert result["metadata"]["attempts"] == 1


def test_unreachable_api_is_a_connection_error(no_retry_env: dict[str, str]) -> None:
    """A closed port gives `connection`, not a crash."""
    env = {**no_retry_env, "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{free_port()}"}
    result = _run(env, {"id": "c1", "prompt": "anyone there?"})["c1"]
    assert result["error"] == {
        "type": "connection",
        "message": "could not reach the API, or the connection broke (ConnectError)",
        "retryable": True,
    }


def test_cut_response_is_a_connection_error(no_retry_env: dict[str, str]) -> None:
    """A response cut off mid-body gives `connection`."""
    result = _run(no_retry_env, {"id": "cut", "prompt": "[[sim:cut]] x"})["cut"]
    assert result["error"]["type"] == "connection"


def test_transient_failures_are_retried(node_env: dict[str, str]) -> None:
    """Two 529s then a success: one successful result after 3 attempts."""
    prompt = (
        f"[[sim:fail_times=2,status=529,retry_after_s=0.1]] {node_env['MESH_PREFIX']}"
    )
    result = _run(node_env, {"id": "r1", "prompt": prompt})["r1"]
    assert result["success"] is True
    assert result["metadata"]["attempts"] == 3


def test_permanent_failure_is_not_retried(node_env: dict[str, str]) -> None:
    """A 401 fails at once with one attempt, even with retries allowed."""
    result = _run(node_env, {"id": "p1", "prompt": "[[sim:status=401]] no"})["p1"]
    assert result["error"]["type"] == "authentication"
    assert result["metadata"]["attempts"] == 1


def test_task_deadline_cuts_a_slow_call(node_env: dict[str, str]) -> None:
    """A task's `timeoutMs` below the API's latency ends as `deadline_exceeded`."""
    task = {"id": "d1", "prompt": "[[sim:latency_ms=5000]] slow", "timeoutMs": 500}
    result = _run(node_env, task)["d1"]
    assert result["error"] == {
        "type": "deadline_exceeded",
        "message": "no answer within 500 ms",
        "retryable": False,
    }


def test_expired_task_makes_no_call(node_env: dict[str, str]) -> None:
    """A task whose `expiresAt` has passed is answered `expired` with no attempt."""
    task = {"id": "e1", "prompt": "late", "expiresAt": "2001-01-01T00:00:00Z"}
    result = _run(node_env, task)["e1"]
    assert result["error"]["type"] == "expired"
    assert result["metadata"]["attempts"] == 0
