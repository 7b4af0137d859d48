"""Wire models: the task a producer sends and the result the node publishes.

Both are pydantic models because both cross a trust boundary; see design.md,
"Wire formats". Validation that needs the node's configuration (sizes, allowed
models, deadlines) lives in `admission`.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .constants import TASK_ID_PATTERN
from .errors import ErrorType

# Longer than any traceparent of a known version, short enough to bound a log.
MAX_TRACEPARENT_CHARS = 512

_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)


# Content blocks of the Messages API are a few levels deep; anything much
# deeper is an attack on the parser, not a conversation.
MAX_CONTENT_DEPTH = 32


class Turn(BaseModel):
    """One turn of a multi-turn task, as the Messages API takes it."""

    model_config = _STRICT

    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]] = Field(min_length=1)

    @field_validator("content")
    @classmethod
    def _shallow(cls, content: str | list[dict[str, Any]]) -> Any:
        if isinstance(content, list) and _depth(content) > MAX_CONTENT_DEPTH:
            raise ValueError(f"nested more than {MAX_CONTENT_DEPTH} levels deep")
        return content


def _depth(value: object) -> int:
    """How deeply lists and objects nest, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_CONTENT_DEPTH:
            break
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return deepest


class TaskMetadata(BaseModel):
    """The metadata the Messages API accepts; anything else is refused."""

    model_config = _STRICT

    user_id: str | None = Field(default=None, max_length=256)


class Task(BaseModel):
    """One unit of work: a single prompt or a conversation to continue."""

    model_config = _STRICT

    id: Annotated[str, Field(pattern=TASK_ID_PATTERN.pattern)]
    prompt: str | None = Field(default=None, min_length=1)
    messages: list[Turn] | None = Field(default=None, min_length=1)
    system: str | None = None
    model: str | None = Field(default=None, min_length=1, max_length=128)
    max_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    stop_sequences: list[str] | None = Field(default=None, max_length=16)
    metadata: TaskMetadata | None = None
    timeoutMs: int | None = Field(default=None, gt=0)  # noqa: N815 (wire name)
    traceparent: str | None = None
    expiresAt: dt.datetime | None = Field(default=None, strict=False)  # noqa: N815

    @field_validator("traceparent", mode="before")
    @classmethod
    def _trace_context_never_fails_a_task(cls, value: object) -> object:
        # W3C Trace Context: a traceparent that cannot be parsed is ignored,
        # not an error; the propagator judges it, as for the stream field.
        if isinstance(value, str) and len(value) <= MAX_TRACEPARENT_CHARS:
            return value
        return None

    @model_validator(mode="after")
    def _one_of_prompt_or_messages(self) -> Task:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of 'prompt' or 'messages' is required")
        if self.messages is not None and self.messages[0].role != "user":
            raise ValueError("messages: the first turn must have role 'user'")
        if self.expiresAt is not None and self.expiresAt.tzinfo is None:
            raise ValueError("expiresAt: needs a time zone, such as 'Z'")
        return self

    def turns(self) -> list[dict[str, Any]]:
        """The conversation in the Messages API's shape."""
        if self.messages is None:
            return [{"role": "user", "content": self.prompt}]
        return [turn.model_dump() for turn in self.messages]

    def text_bytes(self) -> int:
        """The size of the task's text in UTF-8 bytes, for the prompt size cap."""
        size = len((self.system or "").encode())
        if self.prompt is not None:
            return size + len(self.prompt.encode())
        for turn in self.messages or ():
            content = turn.content
            if isinstance(content, str):
                size += len(content.encode())
            else:
                size += len(orjson.dumps(content))
        return size


def is_task_id(value: object) -> bool:
    """Tells whether a value can serve as a task id (and so as a Redis key part)."""
    return isinstance(value, str) and TASK_ID_PATTERN.fullmatch(value) is not None


class Usage(BaseModel):
    """Tokens the API counted for one task, summed over its attempts."""

    input_tokens: int = 0
    output_tokens: int = 0


class ResultError(BaseModel):
    """Why a task failed."""

    type: ErrorType
    message: str
    retryable: bool = False


class ResultMetadata(BaseModel):
    """Everything about a finished task except its answer."""

    model: str | None = None
    usage: Usage = Field(default_factory=Usage)
    timestamp: str
    attempts: int = 0
    durationMs: int = 0  # noqa: N815 (wire name)
    stopReason: str | None = None  # noqa: N815
    requestId: str | None = None  # noqa: N815
    node: str | None = None
    traceparent: str | None = None
    source: str | None = None
    """Where the task came from: a stream entry id or `line N`."""


class TaskResult(BaseModel):
    """The one result object every task produces."""

    type: Literal["task_result"] = "task_result"
    taskId: str | None  # noqa: N815 (wire name)
    success: bool
    response: str | None = None
    error: ResultError | None = None
    metadata: ResultMetadata

    def to_json(self) -> str:
        """The result as one line of JSON, without a newline."""
        return self.model_dump_json()


def utc_timestamp(moment: dt.datetime | None = None) -> str:
    """Formats a moment in UTC the way the seed did: ISO 8601, milliseconds, `Z`."""
    moment = moment or dt.datetime.now(dt.UTC)
    if moment.utcoffset() != dt.timedelta(0):
        moment = moment.astimezone(dt.UTC)
    # isoformat takes half the time of strftime, and this runs for every log
    # line and result; its "+00:00" becomes the seed's "Z".
    return moment.isoformat(timespec="milliseconds")[:-6] + "Z"
