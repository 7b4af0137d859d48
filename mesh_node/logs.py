"""Log records as one JSON object per line, for stderr.

Only the command-line entry calls `configure`; modules log through
`logging.getLogger(__name__)` with a stable event name as the message and their
fields in `extra`.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from typing import Any, TextIO

import orjson

from .tasks import utc_timestamp

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
        if record.exc_info:
            entry["error_trace"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def _record_time(record: logging.LogRecord) -> dt.datetime:
    return dt.datetime.fromtimestamp(record.created, dt.UTC)


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """Sends every log record to stderr as JSON lines at the given level."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library warnings (a deprecated model, say) become JSON log lines too.
    logging.captureWarnings(True)
    # The HTTP libraries log every request at INFO; the node logs its own.
    for noisy in ("httpx", "httpx2", "httpcore", "anthropic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
