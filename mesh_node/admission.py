"""Admission: turns raw input into a `Task` the node is willing to run.

Every way input can be wrong ends here as an `InvalidTaskError` whose message
names the problem, so that every intake (stream, stdin, file) reports bad input
the same way and none of them crashes on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from .errors import InvalidTaskError
from .settings import Settings
from .tasks import Task, is_task_id


@dataclass(frozen=True, slots=True)
class Limits:
    """The node's limits on what a task may be and ask for."""

    max_task_bytes: int
    max_prompt_bytes: int
    max_output_tokens: int
    max_execution_time_ms: int
    allowed_models: frozenset[str]

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """Takes the limits out of the node's settings."""
        return cls(
            max_task_bytes=settings.max_task_bytes,
            max_prompt_bytes=settings.max_prompt_bytes,
            max_output_tokens=settings.max_output_tokens,
            max_execution_time_ms=settings.max_execution_time_ms,
            allowed_models=frozenset(settings.allowed_models),
        )


@dataclass(frozen=True, slots=True)
class Rejected:
    """A task that failed admission, with whatever id could be read from it."""

    task_id: str | None
    error: InvalidTaskError


def admit(raw: bytes | str | None, limits: Limits) -> Task | Rejected:
    """Parses and checks one task.

    Args:
        raw: the task's JSON text as it arrived; None when the input held no
            task at all (a stream entry without a `task` field).
        limits: the node's limits.

    Returns:
        The task, or a `Rejected` naming why it can never run.
    """
    obj: Any = None
    try:
        obj = _decode(raw, limits)
        task = _validate(obj)
        _check_limits(task, limits)
    except InvalidTaskError as exc:
        return Rejected(_salvage_id(obj), exc)
    except (RecursionError, ValueError, TypeError) as exc:
        # Input shaped to break a parser gets the same answer as any other
        # bad input, never a crash.
        error = InvalidTaskError(f"task could not be read ({type(exc).__name__})")
        return Rejected(_salvage_id(obj), error)
    return task


def _salvage_id(obj: Any) -> str | None:
    task_id = obj.get("id") if isinstance(obj, dict) else None
    return task_id if is_task_id(task_id) else None


def _decode(raw: bytes | str | None, limits: Limits) -> Any:
    if raw is None:
        raise InvalidTaskError("the entry has no 'task' field")
    data = raw.encode() if isinstance(raw, str) else raw
    if len(data) > limits.max_task_bytes:
        raise InvalidTaskError(
            f"task is {len(data)} bytes, over the limit of {limits.max_task_bytes}"
        )
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidTaskError(
            f"task is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start})"
        ) from None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidTaskError(f"task is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidTaskError(f"task must be a JSON object, not {_json_type(obj)}")
    return obj


def _validate(obj: dict[str, Any]) -> Task:
    try:
        return Task.model_validate(obj)
    except ValidationError as exc:
        raise InvalidTaskError(_describe(exc)) from None


def _check_limits(task: Task, limits: Limits) -> None:
    size = task.text_bytes()
    if size > limits.max_prompt_bytes:
        raise InvalidTaskError(
            f"prompt is {size} bytes, over the limit of {limits.max_prompt_bytes}"
        )
    if task.max_tokens is not None and task.max_tokens > limits.max_output_tokens:
        raise InvalidTaskError(
            f"max_tokens: {task.max_tokens} is over the limit of "
            f"{limits.max_output_tokens}"
        )
    if task.timeoutMs is not None and task.timeoutMs > limits.max_execution_time_ms:
        raise InvalidTaskError(
            f"timeoutMs: {task.timeoutMs} is over maxExecutionTimeMs "
            f"({limits.max_execution_time_ms})"
        )
    if task.model and limits.allowed_models and task.model not in limits.allowed_models:
        raise InvalidTaskError(f"model: '{task.model}' is not in the allowed list")


def _describe(exc: ValidationError) -> str:
    """Names each problem by field; never echoes the values themselves."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in error["loc"])
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        elif error["type"] == "missing":
            message = "required"
        elif error["type"] == "string_pattern_mismatch" and field == "id":
            message = "must be 1-128 characters of A-Z a-z 0-9 . _ : -"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        problems.append(f"{field}: {message}" if field else message)
    return "; ".join(problems)


def _json_type(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return "a number"
