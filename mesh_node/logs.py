"""Log records as one JSON object per line, for stderr.

Only the command-line entry calls `configure`; modules log through
`logging.getLogger(__name__)` with a stable event name as the message and their
fields in `extra`. A record made inside a task's span carries its `trace_id`
and `span_id`. The audit trail (one `api.call` record per API call) has a
logger of its own, `AUDIT_LOGGER`, that `configure` can send to a file.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from typing import Any, TextIO

import orjson
from opentelemetry import trace

from .tasks import utc_timestamp

AUDIT_LOGGER = "mesh_node.audit"
# Shorter values would blot out ordinary words; `resolve_api_key` refuses
# keys this short.
MIN_SECRET_CHARS = 8

# Values that must never reach a log line, whatever path they took to it (an
# exception message, a library's warning): replaced before the line is written.
_secrets: set[str] = set()


def redact(secret: str) -> None:
    """Keeps `secret` out of every log line from now on.

    The line is matched as written, JSON escapes and all, so the escaped form
    of a key with a quote or a backslash is kept out too.
    """
    if len(secret) >= MIN_SECRET_CHARS:
        _secrets.add(secret)
        _secrets.add(orjson.dumps(secret).decode()[1:-1])


# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName"}
)


class JsonFormatter(logging.Formatter):
    """Formats a record as `{"ts", "level", "logger", "event", ...fields}`."""

    def format(self, record: logging.LogRecord) -> str:
        """Renders one record; exceptions become a `error_trace` string field."""
        entry: dict[str, Any] = {
            "ts": utc_timestamp(_record_time(record)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update(
            (key, value) for key, value in vars(record).items() if key not in _STANDARD
        )
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = f"{span.trace_id:032x}"
            entry["span_id"] = f"{span.span_id:016x}"
        if record.exc_info:
            entry["error_trace"] = self.formatException(record.exc_info)
        line = orjson.dumps(entry, default=str).decode()
        for secret in _secrets:
            if secret in line:
                line = line.replace(secret, "[redacted]")
        return line


def _record_time(record: logging.LogRecord) -> dt.datetime:
    return dt.datetime.fromtimestamp(record.created, dt.UTC)


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """Sends every log record to stderr as JSON lines at the given level.

    The audit records go there too, at any level, until `route_audit`.
    """
    # A line carries none of the caller's file, thread or process, so no
    # record looks them up (a stack walk and two system calls per record,
    # three records per task; the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # An audit trail records every call whatever the verbosity of the rest.
    logging.getLogger(AUDIT_LOGGER).setLevel(logging.INFO)
    # Library warnings (a deprecated model, say) become JSON log lines too.
    logging.captureWarnings(True)
    # The HTTP libraries log every request at INFO; the node logs its own.
    for noisy in ("httpx", "httpx2", "httpcore", "anthropic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def route_audit(path: str) -> None:
    """Sends the audit records to `path` (appended to) instead of stderr.

    Raises:
        OSError: the file cannot be opened for appending.
    """
    handler = _AuditFileHandler(path, encoding="utf-8")
    handler.setFormatter(JsonFormatter())
    audit = logging.getLogger(AUDIT_LOGGER)
    audit.handlers[:] = [handler]
    audit.propagate = False


class _AuditFileHandler(logging.FileHandler):
    """A file handler that says once, as a log line, that it cannot write.

    The default prints a bare traceback to stderr for every record, which
    breaks the one-JSON-object-a-line rule and says the same thing each time.
    """

    _failed = False

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802
        if self._failed:
            return
        self._failed = True
        error = sys.exc_info()[1]
        logging.getLogger("mesh_node").error(
            "audit.write_failed",
            extra={
                "path": self.baseFilename,
                "error": type(error).__name__ if error else None,
                "detail": str(error) if isinstance(error, OSError) else None,
            },
        )
