"""Every kind of bad input gets a typed `invalid_task` result in every mode."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from .support import (
    Process,
    add_entry,
    run_command,
    start_command,
    stream_results,
    wait_for,
)


@dataclass(frozen=True)
class Case:
    """One bad input and the result it must get."""

    name: str
    raw: bytes
    task_id: str | None
    message: str
    """A regular expression the whole error message must match."""


LONG_PROMPT = "p" * 2000
CASES = [
    Case("not json", b"hello there", None, r"task is not valid JSON: .+"),
    Case(
        "not an object",
        b'"just a string"',
        None,
        r"task must be a JSON object, not a string",
    ),
    Case(
        "array line",
        b'[{"id": "x", "prompt": "y"}]',
        None,
        r"task must be a JSON object, not an array",
    ),
    Case("no id", b'{"prompt": "hi"}', None, r"id: required"),
    Case(
        "bad id",
        b'{"id": "has space", "prompt": "hi"}',
        None,
        r"id: must be 1-128 characters of A-Z a-z 0-9 \. _ : -",
    ),
    Case(
        "id not a string",
        b'{"id": 7, "prompt": "hi"}',
        None,
        r"id: Input should be a valid string",
    ),
    Case(
        "max_tokens wrong type",
        b'{"id": "b1", "prompt": "hi", "max_tokens": "9"}',
        "b1",
        r"max_tokens: Input should be a valid integer",
    ),
    Case(
        "prompt wrong type",
        b'{"id": "b2", "prompt": ["hi"]}',
        "b2",
        r"prompt: Input should be a valid string",
    ),
    Case(
        "both prompt and messages",
        b'{"id": "b3", "prompt": "hi", "messages": [{"role": "user", "content": "x"}]}',
        "b3",
        r"exactly one of 'prompt' or 'messages' is required",
    ),
    Case(
        "neither prompt nor messages",
        b'{"id": "b4", "system": "s"}',
        "b4",
        r"exactly one of 'prompt' or 'messages' is required",
    ),
    Case(
        "unknown field",
        b'{"id": "b5", "promt": "hi"}',
        "b5",
        r"exactly one of 'prompt' or 'messages' is required|promt: unknown field",
    ),
    Case(
        "bad role",
        b'{"id": "b6", "messages": [{"role": "bot", "content": "x"}]}',
        "b6",
        r"messages\.0\.role: Input should be 'user' or 'assistant'",
    ),
    Case(
        "oversize prompt",
        json.dumps({"id": "b7", "prompt": LONG_PROMPT}).encode(),
        "b7",
        r"prompt is 2000 bytes, over the limit of 1024",
    ),
    Case(
        "oversize line",
        b'{"id": "b8", "prompt": "' + b"x" * 5000 + b'"}',
        None,
        r"task is 5026 bytes, over the limit of 4096",
    ),
    Case(
        "invalid utf-8",
        b'{"id": "b9", "prompt": "caf\xe9"}',
        None,
        r"task is not valid UTF-8 \(byte 0xe9 at offset 27\)",
    ),
    Case(
        "max_tokens over the cap",
        b'{"id": "b10", "prompt": "hi", "max_tokens": 100000}',
        "b10",
        r"max_tokens: 100000 is over the limit of 4096",
    ),
]
GOOD = b'{"id": "good-1", "prompt": "still working"}'


def _check(results: list[dict[str, Any]], sources: dict[str, Case]) -> None:
    by_source = {r["metadata"]["source"]: r for r in results}
    for source, case in sources.items():
        result = by_source[source]
        assert result["success"] is False, case.name
        assert result["error"]["type"] == "invalid_task", case.name
        assert re.fullmatch(case.message, result["error"]["message"]), (
            case.name,
            result["error"]["message"],
        )
        assert result["taskId"] == case.task_id, case.name
        assert result["metadata"]["attempts"] == 0, case.name
    good = [r for r in results if r["taskId"] == "good-1"]
    assert len(good) == 1
    assert good[0]["success"] is True


def _line_input() -> tuple[bytes, dict[str, Case]]:
    lines = [GOOD]  # first, so that a batch file is read as JSON lines
    sources: dict[str, Case] = {}
    for case in CASES:
        lines.append(case.raw)
        sources[f"line {len(lines)}"] = case
    return b"\n".join(lines) + b"\n", sources


def _parse(stdout: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_interactive_answers_every_bad_line(node_env: dict[str, str]) -> None:
    """Interactive mode gives each bad line its typed error and keeps going."""
    stdin, sources = _line_input()
    done = run_command("interactive", env=node_env, stdin=stdin)
    assert done.returncode == 0, done.stderr
    results = _parse(done.stdout)
    assert len(results) == len(CASES) + 1
    _check(results, sources)


def test_batch_answers_every_bad_line(node_env: dict[str, str], tmp_path: Path) -> None:
    """Batch mode gives each bad line its typed error and keeps going."""
    stdin, sources = _line_input()
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_bytes(stdin)
    out = tmp_path / "results.jsonl"
    done = run_command("batch", str(tasks), "--output", str(out), env=node_env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b""
    results = _parse(out.read_bytes())
    assert len(results) == len(CASES) + 1
    _check(results, sources)


def test_stream_answers_and_acks_every_bad_entry(
    node_env: dict[str, str], rdb: redis.Redis, prefix: str, started: list[Process]
) -> None:
    """Serve gives each bad entry its typed error, acknowledges it and keeps going."""
    stream = f"{prefix}tasks"
    sources: dict[str, Case] = {}
    for case in CASES:
        sources[add_entry(rdb, prefix, {"task": case.raw})] = case
    no_task = Case(
        "entry without a task field", b"", None, r"the entry has no 'task' field"
    )
    sources[add_entry(rdb, prefix, {"payload": b"{}"})] = no_task
    rdb.xadd(stream, {"task": GOOD})

    node = start_command("serve", env=node_env)
    started.append(node)
    wait_for(
        lambda: rdb.xlen(f"{prefix}results") >= len(sources) + 1,
        timeout_s=30,
        what="all results",
    )
    assert node.stop() == 0

    results = stream_results(rdb, prefix)
    assert len(results) == len(sources) + 1
    _check(results, sources)
    assert rdb.xpending(stream, "mesh-nodes")["pending"] == 0


@pytest.mark.parametrize("payload", [b"[1, 2", b'[1, {"id": "a", "prompt": "b"}]'])
def test_batch_json_array_items_are_checked(
    node_env: dict[str, str], tmp_path: Path, payload: bytes
) -> None:
    """A JSON array file is read as tasks; a broken array or item gets a result."""
    tasks = tmp_path / "tasks.json"
    tasks.write_bytes(payload)
    done = run_command("batch", str(tasks), env=node_env)
    assert done.returncode == 0, done.stderr
    results = _parse(done.stdout)
    assert results
    assert results[0]["success"] is False
    assert results[0]["error"]["type"] == "invalid_task"
