"""The node's error tree and the mapping from SDK errors to result error types.

    MeshNodeError
    ├── ConfigError            bad configuration or usage; the command exits 2
    ├── RedisUnavailableError  a wait for Redis through an outage was abandoned
    ├── OutputClosedError      the reader of the results went away
    ├── TaskDeferredError      a task handed back to the stream for later
    └── TaskError              one task fails; its result carries `error_type`
        ├── InvalidTaskError       the input can never succeed (`invalid_task`)
        ├── ApiCallError           the Messages API refused or failed
        ├── PartialAnswerError     a streamed answer broke off after some text
        └── DeadlineExceededError  the task ran out of time (`deadline_exceeded`)

SDK exceptions are translated in one place, `api_call_error`, into the most
specific `ApiCallError`; nothing else in the node looks at SDK exception types.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import anthropic


class ErrorType(enum.StrEnum):
    """The closed set of `error.type` values a result can carry."""

    INVALID_REQUEST = "invalid_request"
    """The API rejected the request as malformed (400, 409, 422)."""
    AUTHENTICATION = "authentication"
    """The API key was refused (401)."""
    PERMISSION = "permission"
    """The key may not use this resource (403)."""
    NOT_FOUND = "not_found"
    """The model or resource does not exist (404)."""
    REQUEST_TOO_LARGE = "request_too_large"
    """The request exceeded the API's size limit (413)."""
    RATE_LIMITED = "rate_limited"
    """The API said to slow down (429)."""
    API_ERROR = "api_error"
    """The API failed on its side (500, 502, 503, 504 and other 5xx)."""
    OVERLOADED = "overloaded"
    """The API is temporarily overloaded (529)."""
    TIMEOUT = "timeout"
    """The request timed out (408, or no answer in time)."""
    CONNECTION = "connection"
    """The API could not be reached or the connection broke."""
    INVALID_TASK = "invalid_task"
    """The task itself is malformed; it can never succeed."""
    DEADLINE_EXCEEDED = "deadline_exceeded"
    """The task's deadline passed before it finished."""
    EXPIRED = "expired"
    """The task's `expiresAt` had passed before it started."""
    BUDGET_EXCEEDED = "budget_exceeded"
    """A token or cost budget of the node is used up."""
    CANCELLED = "cancelled"
    """The node cancelled the task."""
    MAX_DELIVERIES = "max_deliveries"
    """The stream entry was delivered too many times without a result."""


class MeshNodeError(Exception):
    """The root of every error the node raises on purpose."""


class ConfigError(MeshNodeError):
    """The configuration or the command line is unusable; the message names why."""


class RedisUnavailableError(MeshNodeError):
    """Redis stayed unreachable until the caller stopped waiting for it."""


class OutputClosedError(MeshNodeError):
    """The results cannot be written any more (stdout or the file was closed)."""


class TaskDeferredError(MeshNodeError):
    """A task that could not get room in time, to be handed back for later.

    Args:
        cause: the `rate_limited` error it would otherwise have failed with.
    """

    def __init__(self, cause: TaskError) -> None:
        super().__init__(cause.message)
        self.cause = cause


class TaskError(MeshNodeError):
    """One task fails with a typed, explainable error.

    Args:
        message: what went wrong, without prompt text or secrets.
        error_type: the result's `error.type`.
        retryable: whether the same task might succeed later.
    """

    def __init__(
        self, message: str, error_type: ErrorType, *, retryable: bool = False
    ) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type
        self.retryable = retryable


class InvalidTaskError(TaskError):
    """The task is malformed; the message names the field or the problem."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorType.INVALID_TASK)


class DeadlineExceededError(TaskError):
    """The task's deadline passed before it finished."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorType.DEADLINE_EXCEEDED)


class ApiCallError(TaskError):
    """The Messages API call failed.

    Args:
        message: the API's own explanation, or the transport's.
        error_type: the mapped result error type.
        status_code: the HTTP status, or None when no response came.
        retryable: whether the retry policy may try again.
        retry_after_s: how long the API asked us to wait, when it said.
        request_id: the API's request id, for support tickets.
    """

    def __init__(
        self,
        message: str,
        error_type: ErrorType,
        *,
        status_code: int | None = None,
        retryable: bool = False,
        retry_after_s: float | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, error_type, retryable=retryable)
        self.status_code = status_code
        self.retry_after_s = retry_after_s
        self.request_id = request_id


class PartialAnswerError(TaskError):
    """A streamed answer that broke off after some text; never retried.

    Args:
        cause: what broke it.
        partial: the text that arrived, returned with the failed result.
    """

    def __init__(self, cause: ApiCallError, partial: str) -> None:
        super().__init__(
            f"the answer was cut off after {len(partial)} characters: {cause.message}",
            cause.error_type,
        )
        self.partial = partial


# A 429 whose message speaks of money is a spend or credit limit, not a rate
# limit: waiting a moment will not lift it.
SPEND_LIMIT = re.compile(r"credit|spend|billing|usage limit|quota", re.IGNORECASE)

# Statuses worth another attempt: the API's documented transient failures.
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})

_STATUS_TYPES = {
    400: ErrorType.INVALID_REQUEST,
    401: ErrorType.AUTHENTICATION,
    403: ErrorType.PERMISSION,
    404: ErrorType.NOT_FOUND,
    408: ErrorType.TIMEOUT,
    409: ErrorType.INVALID_REQUEST,
    413: ErrorType.REQUEST_TOO_LARGE,
    422: ErrorType.INVALID_REQUEST,
    429: ErrorType.RATE_LIMITED,
    529: ErrorType.OVERLOADED,
}


def error_type_for_status(status_code: int) -> ErrorType:
    """Maps an HTTP status of the Messages API to a result error type."""
    if status_code in _STATUS_TYPES:
        return _STATUS_TYPES[status_code]
    if status_code >= 500:
        return ErrorType.API_ERROR
    return ErrorType.INVALID_REQUEST


def api_call_error(exc: anthropic.APIError) -> ApiCallError:
    """Translates an SDK exception into the node's own error.

    Args:
        exc: what the SDK raised.

    Returns:
        The matching `ApiCallError`; its message never carries the request.
    """
    # Imported here: the SDK takes most of a second to import, and commands
    # that never call the API (submit, --help) should not pay for it.
    import anthropic

    if isinstance(exc, anthropic.APITimeoutError):
        return ApiCallError(
            "the API did not answer in time", ErrorType.TIMEOUT, retryable=True
        )
    if isinstance(exc, anthropic.APIConnectionError):
        # The cause tells a refused connection from one that broke mid-answer.
        cause = type(exc.__cause__).__name__ if exc.__cause__ else "no cause given"
        return ApiCallError(
            f"could not reach the API, or the connection broke ({cause})",
            ErrorType.CONNECTION,
            retryable=True,
        )
    if isinstance(exc, anthropic.APIStatusError):
        return _status_error(exc)
    return ApiCallError(
        f"unexpected answer from the API: {type(exc).__name__}", ErrorType.API_ERROR
    )


# The status an error event inside a stream stands for (its HTTP status is 200).
_STREAM_ERROR_STATUSES = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


def _status_error(exc: anthropic.APIStatusError) -> ApiCallError:
    status = exc.status_code
    if status < 400:
        status = _STREAM_ERROR_STATUSES.get(exc.type or "", 500)
    detail = exc.api_message or f"HTTP {status}"
    spend_limit = status == 429 and SPEND_LIMIT.search(detail) is not None
    return ApiCallError(
        f"{status} {exc.type or 'error'}: {detail}",
        error_type_for_status(status),
        status_code=status,
        retryable=status in RETRYABLE_STATUSES and not spend_limit,
        retry_after_s=parse_retry_after(exc.response.headers),
        request_id=exc.request_id,
    )


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Reads `retry-after-ms` or `retry-after` (seconds) from response headers."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return max(0.0, float(raw_ms) / 1000)
        except ValueError:
            pass
    raw_s = headers.get("retry-after")
    if raw_s is None:
        return None
    try:
        return max(0.0, float(raw_s))
    except ValueError:
        # RFC 9110 also allows an HTTP date; the API sends seconds, so a date
        # is treated as "no advice" and the backoff decides.
        return None
