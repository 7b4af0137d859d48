"""What the benchmark's processes agree on: key names, the tasks, the result entry.

Every system under test reads the same tasks and writes one entry per task to
the same results stream (`taskId`, `result`), so the harness measures them all
on one path. The node's names are its defaults (README, "Redis layout").
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import anthropic

TASKS = "mesh:tasks"
GROUP = "mesh-nodes"
RESULTS = "mesh:results"

# The peer's own stream and group: taskiq writes its own message format.
PEER_QUEUE = "mesh:taskiq"
PEER_GROUP = "taskiq"
PEER_TASK_NAME = "bench.peer.run_task"

# Obviously fake; the simulator is told to accept exactly this key.
API_KEY = "sk-ant-test-bench-0123456789abcdef0123456789abcdef"

MODEL = "claude-sonnet-5-5"
MAX_TOKENS = 256

# A few distinct prompts, cycled, so that the simulator's per-prompt counters
# stay small however many tasks a run sends.
PROMPTS = (
    "Summarise the benefits of stream processing in one sentence.",
    "Name three uses of a consumer group.",
    "Explain backpressure to a new engineer.",
    "What is an idempotency key for?",
    "Give one reason to batch Redis commands.",
    "Describe a closed-loop load generator.",
    "Why measure the 99th percentile?",
    "What does XACK do in Redis streams?",
)

READY_EVENT = "bench.ready"
# Tells the peer's worker its concurrency, which taskiq keeps to itself.
POOL_SIZE_VARIABLE = "BENCH_CONCURRENCY"


def task(task_id: str, index: int) -> dict[str, Any]:
    """The task with this id, the same for every system."""
    return {
        "id": task_id,
        "prompt": PROMPTS[index % len(PROMPTS)],
        "model": MODEL,
        "max_tokens": MAX_TOKENS,
    }


def event_loop_name() -> str:
    """`uvloop` or `asyncio`: the running loop's implementation."""
    module = type(asyncio.get_running_loop()).__module__
    return module.split(".", 1)[0]


def announce_ready(http_transport: str) -> None:
    """Writes the ready line the harness waits for, naming transport and loop."""
    line = {
        "event": READY_EVENT,
        "http_transport": http_transport,
        "event_loop": event_loop_name(),
    }
    print(json.dumps(line), file=sys.stderr, flush=True)


async def answer(api: anthropic.AsyncAnthropic, task: dict[str, Any]) -> str:
    """The API call every system makes for a task, and the result entry's
    JSON; an API error is a failed result, as the node would write it."""
    try:
        message = await api.messages.create(
            model=task["model"],
            max_tokens=task["max_tokens"],
            messages=[{"role": "user", "content": task["prompt"]}],
        )
        result = {
            "type": "task_result",
            "taskId": task["id"],
            "success": True,
            "response": "".join(b.text for b in message.content if b.type == "text"),
            "error": None,
            "metadata": {"model": message.model, "usage": message.usage.to_dict()},
        }
    except anthropic.APIError as exc:
        result = {
            "type": "task_result",
            "taskId": task["id"],
            "success": False,
            "response": None,
            "error": {"type": type(exc).__name__, "message": str(exc)},
        }
    return json.dumps(result)
