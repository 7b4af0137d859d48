"""Traces, metrics and the audit trail, exported by a real `serve` over OTLP/HTTP.

The receiver is the test's own loopback server (`tests.otlp`); it decodes the
protobuf the node's standard exporters send.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from mesh_node.simulator import prompt_key

from .otlp import KIND_CLIENT, KIND_CONSUMER, STATUS_ERROR, OtlpReceiver, start_receiver
from .support import (
    Process,
    SimulatorProcess,
    add_entry,
    add_task,
    free_port,
    run_command,
    start_command,
    stream_results,
    wait_for,
)

GROUP = "mesh-nodes"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    """An OTLP/HTTP receiver on loopback, of this test's own."""
    server = start_receiver()
    yield server
    server.close()


def traced_env(node_env: dict[str, str], receiver: OtlpReceiver) -> dict[str, str]:
    """A node environment exporting quickly to the receiver."""
    return {
        **node_env,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test",
        "MESH_NODE_ID": "traced-node",
    }


def producer_context() -> tuple[str, str, str]:
    """A producer's trace id, span id and `traceparent`, made up."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def add_traced(
    rdb: redis.Redis, prefix: str, task: dict[str, object], traceparent: str
) -> str:
    """Adds a task whose stream entry carries the producer's `traceparent`."""
    return add_entry(
        rdb, prefix, {"task": json.dumps(task), "traceparent": traceparent}
    )


def results_by_id(rdb: redis.Redis, prefix: str, count: int) -> dict[str, dict]:  # type: ignore[type-arg]
    wait_for(
        lambda: rdb.xlen(f"{prefix}results") >= count,
        timeout_s=30,
        what=f"{count} results",
    )
    return {r["taskId"]: r for r in stream_results(rdb, prefix)}


def test_one_trace_from_producer_to_api_call(
    node_env: dict[str, str],
    receiver: OtlpReceiver,
    rdb: redis.Redis,
    prefix: str,
    started: list[Process],
    simulator: SimulatorProcess,
) -> None:
    """The producer's trace continues through the task's span to the SDK's call span."""
    stream_trace, stream_span, stream_parent = producer_context()
    field_trace, field_span, field_parent = producer_context()
    marker = f"secret-prompt-{secrets.token_hex(4)}"
    prompt = f"tell me about {marker}"
    entry_id = add_traced(
        rdb, prefix, {"id": "by-field", "prompt": prompt}, stream_parent
    )
    add_task(
        rdb,
        prefix,
        {"id": "in-task", "prompt": f"{prompt} again", "traceparent": field_parent},
    )
    node = start_command("serve", env=traced_env(node_env, receiver))
    started.append(node)
    results = results_by_id(rdb, prefix, 2)

    process_spans = receiver.wait_for_spans(f"process {prefix}tasks", 2)
    call_spans = receiver.wait_for_spans("anthropic.messages.create", 2)
    assert node.stop() == 0

    by_task = {span.attributes["mesh.task.id"]: span for span in process_spans}
    process = by_task["by-field"]
    assert process.kind == KIND_CONSUMER
    assert process.trace_id == stream_trace
    assert process.parent_span_id == stream_span
    assert process.attributes["messaging.system"] == "redis"
    assert process.attributes["messaging.destination.name"] == f"{prefix}tasks"
    assert process.attributes["messaging.consumer.group.name"] == GROUP
    assert process.attributes["messaging.operation.type"] == "process"
    assert process.attributes["messaging.message.id"] == entry_id
    assert process.attributes["mesh.task.outcome"] == "succeeded"
    assert process.resource["service.name"] == "mesh-node"
    assert process.resource["service.instance.id"] == "traced-node"
    assert process.resource["deployment.environment.name"] == "test"
    assert by_task["in-task"].trace_id == field_trace
    assert by_task["in-task"].parent_span_id == field_span

    (call,) = [span for span in call_spans if span.trace_id == stream_trace]
    assert call.kind == KIND_CLIENT
    assert call.parent_span_id == process.span_id
    assert call.attributes["gen_ai.provider.name"] == "anthropic"
    assert call.attributes["gen_ai.operation.name"] == "chat"
    assert call.attributes["gen_ai.request.model"] == "claude-sonnet-5-5"
    assert call.attributes["http.response.status_code"] == 200
    sim_in, sim_out = simulator.stats()["tokens_by_prompt"][prompt_key(prompt)]
    assert call.attributes["gen_ai.usage.input_tokens"] == sim_in
    assert call.attributes["gen_ai.usage.output_tokens"] == sim_out
    usage = results["by-field"]["metadata"]["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (sim_in, sim_out)

    assert results["by-field"]["metadata"]["traceparent"] == (
        f"00-{stream_trace}-{process.span_id}-01"
    )
    # No prompt, no answer: content stays out unless the operator opts in.
    assert not any(marker.encode() in body for body in receiver.raw)


def test_metrics_count_tasks_and_tokens(
    node_env: dict[str, str],
    receiver: OtlpReceiver,
    rdb: redis.Redis,
    prefix: str,
    started: list[Process],
) -> None:
    """Tasks by outcome and error type, token usage and call durations arrive."""
    for n in range(3):
        add_task(rdb, prefix, {"id": f"ok-{n}", "prompt": f"count me {n}"})
    add_task(rdb, prefix, {"id": "bad", "prompt": "[[sim:status=400]] no"})
    node = start_command("serve", env=traced_env(node_env, receiver))
    started.append(node)
    results = results_by_id(rdb, prefix, 4)
    want_input = sum(
        r["metadata"]["usage"]["input_tokens"] for r in results.values() if r["success"]
    )

    def finished(outcome: str, error: str | None) -> int:
        points = receiver.data_points("mesh.tasks.finished")
        matching = [
            point.as_int
            for attrs, point in points
            if attrs.get("mesh.task.outcome") == outcome
            and attrs.get("error.type") == error
        ]
        # Cumulative sums: the latest export holds the total.
        return max(matching, default=0)

    wait_for(
        lambda: (
            finished("succeeded", None) == 3
            and finished("failed", "invalid_request") == 1
        ),
        timeout_s=20,
        what="task counts in the exported metrics",
    )
    input_sums = [
        point.sum
        for attrs, point in receiver.data_points("gen_ai.client.token.usage")
        if attrs.get("gen_ai.token.type") == "input"
    ]
    assert max(input_sums) == want_input
    durations = receiver.data_points("gen_ai.client.operation.duration")
    errors = [attrs.get("error.type") for attrs, _point in durations]
    assert "invalid_request" in errors
    assert receiver.data_points("mesh.tasks.in_flight")
    assert receiver.data_points("messaging.process.duration")
    assert node.stop() == 0


def test_retries_and_failures_are_on_the_span(
    node_env: dict[str, str],
    receiver: OtlpReceiver,
    rdb: redis.Redis,
    prefix: str,
    started: list[Process],
) -> None:
    """A retried call shows its retry event; a failed task sets `error.type`."""
    add_task(
        rdb,
        prefix,
        {"id": "flaky", "prompt": f"[[sim:status=529,fail_times=1]] {prefix}"},
    )
    add_task(rdb, prefix, {"id": "refused", "prompt": "[[sim:status=400]] never"})
    node = start_command("serve", env=traced_env(node_env, receiver))
    started.append(node)
    results_by_id(rdb, prefix, 2)
    spans = receiver.wait_for_spans(f"process {prefix}tasks", 2)
    by_task = {span.attributes["mesh.task.id"]: span for span in spans}

    flaky = by_task["flaky"]
    retries = [attrs for name, attrs in flaky.events if name == "retry"]
    assert retries == [
        {
            "attempt": 1,
            "error.type": "overloaded",
            "http.response.status_code": 529,
            "wait_ms": retries[0]["wait_ms"],
        }
    ]
    calls = [
        span
        for span in receiver.wait_for_spans("anthropic.messages.create", 3)
        if span.parent_span_id == flaky.span_id
    ]
    assert sorted(span.attributes["http.response.status_code"] for span in calls) == [
        200,
        529,
    ]

    refused = by_task["refused"]
    assert refused.status_code == STATUS_ERROR
    assert refused.attributes["error.type"] == "invalid_request"
    assert refused.attributes["mesh.task.outcome"] == "failed"
    assert node.stop() == 0


def test_link_mode_starts_a_new_trace_linked_to_the_producer(
    node_env: dict[str, str],
    receiver: OtlpReceiver,
    rdb: redis.Redis,
    prefix: str,
    started: list[Process],
) -> None:
    trace_id, span_id, traceparent = producer_context()
    add_traced(rdb, prefix, {"id": "linked", "prompt": "hi"}, traceparent)
    env = {**traced_env(node_env, receiver), "MESH_TRACE_CONTEXT": "link"}
    node = start_command("serve", env=env)
    started.append(node)
    (span,) = receiver.wait_for_spans(f"process {prefix}tasks", 1)
    assert span.trace_id != trace_id
    assert span.parent_span_id == ""
    assert span.links == [(trace_id, span_id)]
    assert node.stop() == 0


def test_logs_inside_a_task_carry_its_trace(
    node_env: dict[str, str],
    receiver: OtlpReceiver,
    rdb: redis.Redis,
    prefix: str,
    started: list[Process],
    tmp_path: Path,
) -> None:
    """`task.started`, `task.finished` and the audit record name the task's span."""
    trace_id, _span_id, traceparent = producer_context()
    add_traced(rdb, prefix, {"id": "logged", "prompt": "hi"}, traceparent)
    node = start_command("serve", env=traced_env(node_env, receiver))
    started.append(node)
    (span,) = receiver.wait_for_spans(f"process {prefix}tasks", 1)
    assert node.stop() == 0
    in_task = [
        event
        for event in node.events
        if event.get("event") in ("task.started", "task.finished", "api.call")
    ]
    assert [event["event"] for event in in_task] == [
        "task.started",
        "api.call",
        "task.finished",
    ]
    for event in in_task:
        assert event["trace_id"] == trace_id
        assert event["span_id"] == span.span_id
    audit = in_task[1]
    assert audit["logger"] == "mesh_node.audit"
    assert audit["task_id"] == "logged"
    assert audit["status"] == 200
    assert audit["attempt"] == 1
    assert audit["request_id"].startswith("req_")
    assert audit["input_tokens"] > 0
    assert "trace_id" not in node.wait_for_event("node.stopped")


def rss_kb(pid: int) -> int:
    """The resident set size of a running process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def run_many(
    env: dict[str, str], rdb: redis.Redis, prefix: str, started: list[Process], n: int
) -> tuple[int, Process]:
    """Runs `n` tasks through one `serve`; its RSS once all are done, and it."""
    pipe = rdb.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(
            f"{prefix}tasks", {"task": json.dumps({"id": f"m{i}", "prompt": "m"})}
        )
    pipe.execute()
    node = start_command(
        "serve", "--concurrency", "64", env={**env, "MESH_PREFIX": prefix}
    )
    started.append(node)
    wait_for(
        lambda: rdb.xlen(f"{prefix}results") >= n, timeout_s=300, what=f"{n} results"
    )
    return rss_kb(node.popen.pid), node


def test_a_dead_collector_neither_blocks_nor_grows_the_node(
    node_env: dict[str, str],
    rdb: redis.Redis,
    prefix: str,
    started: list[Process],
) -> None:
    """5,000 tasks finish with the collector down, in the memory they take without."""
    n = 5000
    off_rss, off = run_many(node_env, rdb, f"{prefix}off:", started, n)
    assert off.stop(30) == 0
    dead_env = {
        **node_env,
        # Nothing listens there: every export fails.
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "OTEL_METRIC_EXPORT_INTERVAL": "1000",
    }
    dead_rss, dead = run_many(dead_env, rdb, f"{prefix}dead:", started, n)
    assert dead.stop(30) == 0

    ratio = dead_rss / off_rss
    print(f"RSS after {n} tasks: off {off_rss} kB, dead {dead_rss} kB, {ratio:.3f}x")
    assert ratio <= 1.10, f"{dead_rss} kB with a dead collector vs {off_rss} kB off"
    assert len(set(r["taskId"] for r in stream_results(rdb, f"{prefix}dead:"))) == n
    names = dead.event_names()
    failed = [e for e in dead.events if e.get("event") == "telemetry.export_failed"]
    assert sorted(e["signal"] for e in failed) == ["metrics", "traces"]
    assert names.count("telemetry.spans_dropped") == 1
    (lost,) = [
        e
        for e in dead.events
        if e.get("event") in ("telemetry.flush_incomplete", "telemetry.lost")
    ]
    assert lost["spans_dropped"] > 0
    # Off means off: no exporter, nothing to report.
    assert not any(name.startswith("telemetry.") for name in off.event_names())


def test_the_key_appears_nowhere(
    node_env: dict[str, str],
    receiver: OtlpReceiver,
    rdb: redis.Redis,
    prefix: str,
    started: list[Process],
    tmp_path: Path,
) -> None:
    """Every byte a node writes or exports, through a 401 and a crash, lacks the key."""
    key = f"sk-ant-test-{secrets.token_hex(24)}"
    audit = tmp_path / "audit.jsonl"
    env = {
        **traced_env(node_env, receiver),
        "ANTHROPIC_API_KEY": key,
        "MESH_AUDIT_LOG": str(audit),
        "MESH_LOG_LEVEL": "debug",
    }
    add_task(rdb, prefix, {"id": "fine", "prompt": "hello"})
    add_task(rdb, prefix, {"id": "denied", "prompt": "[[sim:status=401]] who"})
    node = start_command("serve", env=env)
    started.append(node)
    results = results_by_id(rdb, prefix, 2)
    assert results["denied"]["error"]["type"] == "authentication"

    # A crash path: the results stream replaced by a string, so publishing fails
    # inside the node with a traceback in its log.
    rdb.rename(f"{prefix}results", f"{prefix}results-before")
    rdb.set(f"{prefix}results", "not a stream")
    add_task(rdb, prefix, {"id": "crashes", "prompt": "boom"})
    crashed = node.wait_for_event("task.crashed")
    assert "error_trace" in crashed
    receiver.wait_for_spans("anthropic.messages.create", 3)
    assert node.stop() == 0

    batch = run_command(
        "interactive",
        env=env,
        stdin=b'{"id": "line", "prompt": "[[sim:status=401]] x"}\n{"id": "ok"',
    )
    assert batch.returncode == 0
    assert b'"authentication"' in batch.stdout
    assert b'"invalid_task"' in batch.stdout

    audit_text = audit.read_bytes()
    # fine, denied, crashes (called, then failed to publish), and the line.
    assert audit_text.count(b'"api.call"') == 4
    everything = {
        "serve stderr": node.stderr_text().encode(),
        "interactive stdout": batch.stdout,
        "interactive stderr": batch.stderr,
        "audit log": audit_text,
        "exported telemetry": b"".join(receiver.raw),
    }
    for where, data in everything.items():
        assert data, f"nothing in the {where}: the check would prove nothing"
        for fragment in (key, key[-20:]):
            assert fragment.encode() not in data, f"the key is in the {where}"


def test_off_means_no_trace_context_anywhere(
    node_env: dict[str, str], rdb: redis.Redis, prefix: str, started: list[Process]
) -> None:
    """Without telemetry a producer's traceparent is not passed off as the task's."""
    _trace_id, _span_id, traceparent = producer_context()
    add_traced(rdb, prefix, {"id": "untraced", "prompt": "hi"}, traceparent)
    node = start_command("serve", env=node_env)
    started.append(node)
    (result,) = results_by_id(rdb, prefix, 1).values()
    assert node.stop() == 0
    assert result["metadata"]["traceparent"] is None
    assert not any("trace_id" in event for event in node.events)


@pytest.mark.parametrize(
    "bad",
    [
        "garbage",
        "00-" + "A" * 32 + "-" + "b" * 16 + "-01",
        "ff-" + "a" * 32 + "-" + "b" * 16 + "-01",
        "x" * 600,
    ],
    ids=["garbage", "uppercase", "version-ff", "overlong"],
)
def test_a_bad_traceparent_in_a_task_is_ignored_not_fatal(
    node_env: dict[str, str],
    receiver: OtlpReceiver,
    rdb: redis.Redis,
    prefix: str,
    started: list[Process],
    bad: str,
) -> None:
    add_task(rdb, prefix, {"id": "odd-trace", "prompt": "hi", "traceparent": bad})
    node = start_command("serve", env=traced_env(node_env, receiver))
    started.append(node)
    (result,) = results_by_id(rdb, prefix, 1).values()
    (span,) = receiver.wait_for_spans(f"process {prefix}tasks", 1)
    assert node.stop() == 0
    assert result["success"] is True
    # A trace of its own, as W3C asks of a traceparent that cannot be read.
    assert span.parent_span_id == ""
    assert result["metadata"]["traceparent"].startswith(
        f"00-{span.trace_id}-{span.span_id}-"
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OTEL_BSP_SCHEDULE_DELAY", "0"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "-5"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "many"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "127.0.0.1:4318"),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
    ],
)
def test_bad_telemetry_settings_are_configuration_errors(
    node_env: dict[str, str], name: str, value: str
) -> None:
    env = {**node_env, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", name: value}
    done = run_command("interactive", env=env)
    assert done.returncode == 2
    (line,) = done.stderr.decode().splitlines()
    assert line.startswith("mesh-node: configuration error: ")
    if not name.startswith(("OTEL_BSP_SCHEDULE", "OTEL_METRIC")):
        assert name in line


def test_console_export_keeps_stderr_one_json_object_a_line(
    node_env: dict[str, str],
) -> None:
    env = {
        **node_env,
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_METRICS_EXPORTER": "console",
    }
    done = run_command("interactive", env=env, stdin=b'{"id": "c", "prompt": "hi"}\n')
    assert done.returncode == 0
    lines = done.stderr.decode().splitlines()
    objects = [json.loads(line) for line in lines]
    assert any(o.get("name") == "process stdin" for o in objects)
    assert any(o.get("event") == "task.finished" for o in objects)


def test_a_failing_collector_is_not_waited_for_at_shutdown(
    node_env: dict[str, str],
) -> None:
    env = {**node_env, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    done = run_command("batch", "-", env=env, stdin=b'{"id": "b", "prompt": "hi"}\n')
    assert done.returncode == 0
    events = [json.loads(line) for line in done.stderr.splitlines()]
    (flush,) = [e for e in events if e["event"] == "telemetry.flush_incomplete"]
    # The flush's own export failed: no waiting out the 5 s bound for it.
    assert flush["timeout_s"] == 0.5


def test_an_audit_log_that_cannot_be_written_is_reported_once(
    node_env: dict[str, str],
) -> None:
    env = {**node_env, "MESH_AUDIT_LOG": "/dev/full"}
    tasks = b'{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "ho"}\n'
    done = run_command("interactive", env=env, stdin=tasks)
    assert done.returncode == 0
    assert done.stdout.count(b'"success":true') == 2
    events = [json.loads(line) for line in done.stderr.splitlines()]
    (failed,) = [e for e in events if e["event"] == "audit.write_failed"]
    assert failed["path"] == "/dev/full"
    assert failed["detail"] == "[Errno 28] No space left on device"
