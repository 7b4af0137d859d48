"""The API key from a file, rotated without a restart."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from .support import (
    Process,
    add_task,
    clean_env,
    free_port,
    start_command,
    stream_results,
    wait_for,
)

OLD_KEY = "sk-ant-test-old-0000000000000000000000"
NEW_KEY = "sk-ant-test-new-1111111111111111111111"


@pytest.fixture
def strict_simulator() -> Iterator[str]:
    """A simulator that accepts only the new key."""
    port = free_port()
    process = start_command(
        "simulate-api",
        "--port",
        str(port),
        env={**clean_env(), "MESH_SIM_API_KEYS": NEW_KEY},
    )
    process.wait_for_event("simulator.listening")
    yield f"http://127.0.0.1:{port}"
    process.stop()


def replace(path: Path, text: str) -> None:
    """Writes the file the way a secret manager does: a new file renamed in."""
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    os.replace(fresh, path)


def test_a_key_rotated_in_its_file_is_used_without_a_restart(
    node_env: dict[str, str],
    rdb: redis.Redis,
    prefix: str,
    started: list[Process],
    strict_simulator: str,
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "api_key"
    key_file.write_text(OLD_KEY + "\n")
    env = {k: v for k, v in node_env.items() if k != "ANTHROPIC_API_KEY"}
    env.update(
        ANTHROPIC_API_KEY_FILE=str(key_file), ANTHROPIC_BASE_URL=strict_simulator
    )
    node = start_command("serve", env=env)
    started.append(node)

    add_task(rdb, prefix, {"id": "before", "prompt": "hi"})
    wait_for(lambda: rdb.xlen(f"{prefix}results") >= 1, timeout_s=20, what="result")

    replace(key_file, "   \n")
    add_task(rdb, prefix, {"id": "blank", "prompt": "hi"})
    failed = node.wait_for_event("api_key.rotation_failed")
    assert failed["reason"].endswith("is empty")
    key_file.unlink()
    add_task(rdb, prefix, {"id": "gone", "prompt": "hi"})
    wait_for(
        lambda: node.event_names().count("api_key.rotation_failed") == 2,
        timeout_s=20,
        what="a second rotation_failed",
    )
    gone = [e for e in node.events if e.get("event") == "api_key.rotation_failed"]
    assert gone[1]["reason"].endswith("is gone")

    # Looked at again before the next call: no restart, no signal.
    replace(key_file, NEW_KEY + "\n")
    add_task(rdb, prefix, {"id": "after", "prompt": "hi"})
    rotated = node.wait_for_event("api_key.rotated")
    assert rotated["level"] == "warning"
    wait_for(lambda: rdb.xlen(f"{prefix}results") >= 4, timeout_s=20, what="results")
    assert node.stop() == 0

    by_id = {r["taskId"]: r for r in stream_results(rdb, prefix)}
    assert by_id["before"]["error"]["type"] == "authentication"
    assert by_id["after"]["success"] is True
    # Each key has windows of its own in the shared limiter.
    windows = {
        key.decode().split(":")[-2]
        for key in rdb.scan_iter(match=f"{prefix}limit:*:requests_per_minute")
    }
    assert len(windows) == 2
    stderr = node.stderr_text()
    assert OLD_KEY not in stderr
    assert NEW_KEY not in stderr


def test_a_key_is_kept_out_of_log_lines_even_when_escaped() -> None:
    """A key with a quote or a backslash is redacted in its JSON-escaped form."""
    import logging

    from mesh_node import logs

    key = 'sk-ant-test-"odd\\key-0123456789'
    logs.redact(key)
    record = logging.LogRecord("t", logging.ERROR, "", 0, "bad key %s", (key,), None)
    line = logs.JsonFormatter().format(record)
    assert "odd" not in line
    assert "[redacted]" in line


def test_a_key_too_short_to_redact_is_refused(node_env: dict[str, str]) -> None:
    from .support import run_command

    done = run_command("interactive", env={**node_env, "ANTHROPIC_API_KEY": "short"})
    assert done.returncode == 2
    assert done.stderr.decode() == (
        "mesh-node: configuration error: ANTHROPIC_API_KEY: too short to be an API "
        "key\n"
    )
