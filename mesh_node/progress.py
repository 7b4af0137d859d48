"""The progress bar `batch` draws on stderr when stderr is a terminal.

The bar (tqdm) shows tasks done of the file's total, the rate, the ETA and the
errors so far; log records are printed above it, not through it. Off a
terminal there is no bar and stderr carries the JSON log lines alone.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from tqdm import tqdm

_CHUNK_BYTES = 1 << 20


def wanted(choice: str) -> bool:
    """Whether to draw the bar: `auto` draws it on a terminal only."""
    if choice == "auto":
        return sys.stderr.isatty()
    return choice == "always"


def count_tasks(source: BinaryIO) -> int | None:
    """The non-blank lines of a regular file, counted ahead of the run; None
    for a pipe or a JSON array, whose length is not known until its end.

    The file is read in chunks and rewound; memory does not grow with it.
    """
    fd = source.fileno()
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        start = os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:
        return None
    count, has_text, first = 0, False, b""
    try:
        while chunk := os.read(fd, _CHUNK_BYTES):
            first = first or chunk.lstrip()[:1]
            *ended, rest = chunk.split(b"\n")
            for line in ended:
                count += has_text or bool(line.strip())
                has_text = False
            has_text = has_text or bool(rest.strip())
    finally:
        os.lseek(fd, start, os.SEEK_SET)
    return None if first == b"[" else count + has_text


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 0


class Progress:
    """Counts finished tasks, and errors among them, onto a bar.

    Args:
        total: the number of tasks, or None when it is not known.
    """

    def __init__(self, total: int | None) -> None:
        from tqdm import tqdm

        self._errors = 0
        # A terminal that reports no width (some `script` sessions) would get
        # a bar of width 0, which tqdm draws as nothing.
        sized = _columns() > 0
        self._bar: tqdm[Any] = tqdm(
            total=total,
            unit="task",
            file=sys.stderr,
            dynamic_ncols=sized,
            ncols=None if sized else 100,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
            "[{elapsed}<{remaining}, {rate_fmt}{postfix}]",
            postfix="errors 0",
            mininterval=0.2,
        )

    def done(self, *, failed: bool, skipped: bool = False) -> None:
        """One more task finished, with a result line or without.

        A task skipped as answered before (`--resume`) leaves the count of
        tasks to run instead, so that the rate and the ETA are those of the
        tasks this run calls the API for.
        """
        if skipped:
            if self._bar.total is not None:
                self._bar.total -= 1
                self._bar.update(0)
            return
        if failed:
            self._errors += 1
            self._bar.set_postfix_str(f"errors {self._errors}", refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        """Draws the final state and leaves the bar on its line."""
        self._bar.close()

    @contextlib.contextmanager
    def logs_above(self) -> Iterator[None]:
        """Prints log records above the bar while it is drawn."""
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():
            yield
