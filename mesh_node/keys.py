"""The API key, re-read when its file changes, so a rotation needs no restart.

A key that came from a variable is fixed for the process's life. A key file
(`ANTHROPIC_API_KEY_FILE`, a container secret) is looked at again before
every API call, by its modification time, size and inode (one `stat`, a
microsecond against the milliseconds a call costs), which also sees a secret
manager that renames a new file into place; a new key that fails the checks
`resolve_api_key` makes keeps the old one in use and is reported once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from .errors import ConfigError
from .settings import API_KEY_FILE_VARIABLE, resolve_api_key

log = logging.getLogger(__name__)


class RotatingKey:
    """The node owner's API key.

    Args:
        environ: where the key, or its file, is named.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = dict(environ)
        self._path = environ.get(API_KEY_FILE_VARIABLE) or None
        self.value = resolve_api_key(environ).get_secret_value()
        self._stamp: tuple[int, ...] | None = self._stat()
        self._refused: tuple[int, ...] | None = (0,)

    def changed(self) -> str | None:
        """The new key when the file now holds a different valid one, else None."""
        if self._path is None:
            return None
        stamp = self._stat()
        if stamp == self._stamp or stamp == self._refused:
            return None
        try:
            if stamp is None:
                raise ConfigError(
                    f"configuration error: {API_KEY_FILE_VARIABLE}: {self._path} "
                    "is gone"
                )
            key = resolve_api_key(self._environ).get_secret_value()
        except ConfigError as exc:
            self._refused = stamp
            log.error(
                "api_key.rotation_failed",
                extra={"reason": str(exc), "keeping": "the key in use"},
            )
            return None
        self._stamp = stamp
        if key == self.value:
            return None
        self.value = key
        return key

    def _stat(self) -> tuple[int, ...] | None:
        if self._path is None:
            return None
        try:
            stat = os.stat(self._path)
        except OSError:
            return None
        # The change time too: a file made unreadable changes only that.
        return (stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size, stat.st_ino)
