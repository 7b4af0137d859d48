"""`batch` at scale: results in input order, resuming a killed run, the progress bar."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from mesh_node.simulator import prompt_key
from mesh_node.sink.lines import Answered, answered

from .support import REPO, Process, SimulatorProcess, command, run_command, wait_for


def _write_tasks(path: Path, tasks: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(task) + "\n" for task in tasks))


def _results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def _calls(simulator: SimulatorProcess, prompts: dict[str, str]) -> dict[str, int]:
    """How often the simulator has answered each task's prompt, by task id."""
    by_prompt = simulator.stats()["by_prompt"]
    return {tid: by_prompt.get(prompt_key(p), 0) for tid, p in prompts.items()}


def test_ordered_results_follow_the_input(
    node_env: dict[str, str], tmp_path: Path
) -> None:
    """With --ordered the lines come in input order although the first tasks
    finish last; without it they come as they finish."""
    tasks = [
        # The first tasks are the slowest, and one line is not a task at all.
        {"id": f"o{n}", "prompt": f"[[sim:latency_ms={max(0, 400 - 20 * n)}]] {n}"}
        for n in range(40)
    ]
    source = tmp_path / "tasks.jsonl"
    _write_tasks(source, tasks)
    with source.open("a") as extra:
        extra.write("not json\n")
    expected = [f"o{n}" for n in range(40)] + [None]

    ordered = tmp_path / "ordered.jsonl"
    done = run_command(
        "batch", str(source), "--ordered", "--output", str(ordered),
        "--concurrency", "8", env=node_env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = _results(ordered)
    assert [r["taskId"] for r in results] == expected
    assert [r["metadata"]["source"] for r in results] == [
        f"line {n}" for n in range(1, 42)
    ]
    assert results[-1]["error"]["type"] == "invalid_task"
    # Read from the answer itself, not the SDK's model of it.
    assert all(r["metadata"]["requestId"].startswith("req_") for r in results[:-1])
    assert all(r["metadata"]["usage"]["output_tokens"] > 0 for r in results[:-1])

    unordered = tmp_path / "unordered.jsonl"
    done = run_command(
        "batch", str(source), "--output", str(unordered), "--concurrency", "8",
        env=node_env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    ids = [r["taskId"] for r in _results(unordered)]
    assert sorted(ids, key=str) == sorted(expected, key=str)
    assert ids != expected


def test_resume_after_a_kill_calls_only_the_missing_ids(
    node_env: dict[str, str], simulator: SimulatorProcess, tmp_path: Path
) -> None:
    """A run killed half-way and resumed with --resume: every id gets exactly
    one line, and the second run calls the API for no id the first answered."""
    marker = tmp_path.name
    prompts = {
        f"k{n}": f"[[sim:latency_ms=60]] resume {marker} {n}" for n in range(120)
    }
    source = tmp_path / "tasks.jsonl"
    source.write_text("not a task\n")
    with source.open("a") as tasks:
        for tid, prompt in prompts.items():
            tasks.write(json.dumps({"id": tid, "prompt": prompt}) + "\n")
    output = tmp_path / "results.jsonl"

    popen = subprocess.Popen(
        command("batch", str(source), "--output", str(output), "--concurrency", "8"),
        env=node_env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first = Process(popen)
    wait_for(
        lambda: output.exists() and output.read_bytes().count(b"\n") >= 60,
        timeout_s=60,
        what="half of the results",
    )
    first.kill()
    # As if the kill had come in the middle of a write.
    with output.open("ab") as torn:
        torn.write(b'{"type":"task_result","taskId":"k119","succ')
    answered = {r["taskId"] for r in _results_whole(output)} - {None}
    assert 59 <= len(answered) < 120
    before = _calls(simulator, prompts)

    done = run_command(
        "batch", str(source), "--output", str(output), "--resume", "--ordered",
        "--concurrency", "8", env=node_env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    called = {
        tid for tid, count in _calls(simulator, prompts).items() if count > before[tid]
    }
    assert called == set(prompts) - answered
    assert all(_calls(simulator, prompts)[tid] == before[tid] for tid in answered)
    results = _results(output)
    # The line that was no task was answered by the first run, and only then.
    assert [r["metadata"]["source"] for r in results if r["taskId"] is None] == [
        "line 1"
    ]
    results = [r for r in results if r["taskId"] is not None]
    assert sorted(r["taskId"] for r in results) == sorted(prompts)
    assert all(r["success"] for r in results)
    events = _events(done.stderr)
    skipped = [e for e in events if e["event"] == "task.skipped"]
    # The answered ids, and the line that was no task.
    assert len(skipped) == len(answered) + 1
    assert {e["reason"] for e in skipped} == {"done"}
    stopped = next(e for e in events if e["event"] == "node.stopped")
    assert (stopped["skipped"], stopped["failed"]) == (len(answered) + 1, 0)


def _results_whole(path: Path) -> list[dict[str, Any]]:
    """The output's complete lines; a torn last line is not a result."""
    lines = path.read_bytes().split(b"\n")
    return [json.loads(line) for line in lines[:-1]]


def _events(stderr: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines()]


def test_resume_needs_an_output_file(node_env: dict[str, str], tmp_path: Path) -> None:
    """--resume without --output has nothing to read back: exit 2, one line."""
    source = tmp_path / "tasks.jsonl"
    _write_tasks(source, [{"id": "x", "prompt": "x"}])
    done = run_command("batch", str(source), "--resume", env=node_env)
    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == [
        "mesh-node: --resume needs --output FILE: the results it reads back"
    ]


def _line(task_id: str | None, error: str | None = None, source: str = "") -> str:
    result = {
        "type": "task_result",
        "taskId": task_id,
        "success": error is None,
        "error": {"type": error} if error else None,
        "metadata": {"source": source},
    }
    return json.dumps(result, separators=(",", ":"))


def test_answered_skips_cancelled_results_and_cuts_only_a_torn_result(
    tmp_path: Path,
) -> None:
    """Cancelled results run again; a torn last result is cut off, a whole one
    that only lacks its newline is kept; lines that were no task count by
    their source."""
    output = tmp_path / "results.jsonl"
    whole = "".join(
        _line(*fields) + "\n"
        for fields in [
            ("ok", None, "line 1"),
            ("failed", "timeout", "line 2"),
            ("stopped", "cancelled", "line 3"),
            (None, "invalid_task", "line 4"),
        ]
    )
    output.write_text(whole + _line("torn")[:30])
    assert answered(str(output)) == Answered(
        frozenset({"ok", "failed"}), frozenset({"line 4"})
    )
    assert output.read_text() == whole

    output.write_text(whole + _line("last"))
    assert answered(str(output)).ids == {"ok", "failed", "last"}
    assert output.read_text() == whole + _line("last") + "\n"
    assert answered(str(tmp_path / "missing.jsonl")) == Answered()


def test_resume_refuses_a_file_that_is_not_results(
    node_env: dict[str, str], tmp_path: Path
) -> None:
    """--resume appends only to an earlier run's output: anything else is
    refused, exit 2, and left exactly as it was."""
    source = tmp_path / "tasks.jsonl"
    _write_tasks(source, [{"id": "n1", "prompt": "x"}])
    for name, text, number in [
        ("notes.txt", "my notes, no newline at the end", 1),
        ("other.jsonl", _line("ok") + "\nnot json\n", 2),
        ("bare.jsonl", '{"type":"task_result","taskId":"x"}\n', 1),
    ]:
        output = tmp_path / name
        output.write_text(text)
        done = run_command(
            "batch", str(source), "--output", str(output), "--resume", env=node_env
        )
        assert done.returncode == 2
        assert done.stderr.decode().splitlines() == [
            f"mesh-node: {output}: line {number} is not a result line; --resume "
            "appends only to the output of an earlier batch run"
        ]
        assert output.read_text() == text


def test_output_that_is_the_tasks_file_is_refused(
    node_env: dict[str, str], tmp_path: Path
) -> None:
    """Results never go into the tasks file: it would be emptied before it is
    read, or, appended to, feed its results back in as tasks."""
    source = tmp_path / "tasks.jsonl"
    _write_tasks(source, [{"id": "s1", "prompt": "x"}])
    text = source.read_text()
    link = tmp_path / "same.jsonl"
    link.hardlink_to(source)
    for extra in ([], ["--resume"]):
        done = run_command(
            "batch", str(source), "--output", str(link), *extra, env=node_env
        )
        assert done.returncode == 2
        assert done.stderr.decode().splitlines() == [
            f"mesh-node: {link}: is the tasks file itself; write the results elsewhere"
        ]
        assert source.read_text() == text


def test_progress_bar_only_when_asked_or_on_a_terminal(
    node_env: dict[str, str], tmp_path: Path
) -> None:
    """Off a terminal stderr carries JSON lines only; --progress always draws
    the bar with the total, the rate and the error count."""
    source = tmp_path / "tasks.jsonl"
    tasks: list[dict[str, Any]] = [{"id": f"b{n}", "prompt": "x"} for n in range(9)]
    _write_tasks(source, [*tasks, {"id": "bad"}])

    done = run_command("batch", str(source), env=node_env)
    assert done.returncode == 0
    assert len(_events(done.stderr)) > 10

    done = run_command("batch", str(source), "--progress", "always", env=node_env)
    assert done.returncode == 0
    assert len(done.stdout.splitlines()) == 10
    frames = done.stderr.decode().replace("\r", "\n").splitlines()
    final = [f for f in frames if "10/10" in f]
    assert final, frames
    assert "task/s" in final[-1]
    assert "errors 1" in final[-1]
    # Info lines are left out while the bar is drawn; the audit trail is not.
    events = [json.loads(f) for f in frames if f.startswith("{")]
    assert {e["event"] for e in events} == {"api.call"}
