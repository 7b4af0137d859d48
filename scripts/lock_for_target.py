"""Print the requirements of a lock file that apply to one target interpreter.

The lock is resolved for every Python from 3.11 on, with environment markers;
pip download evaluates markers for the interpreter running it, not for the one
it downloads for, so the wheelhouse script asks this instead. Each requirement
that applies is printed with its pin and hashes and without its marker.

    python lock_for_target.py LOCK PYTHON_FULL_VERSION ARCH
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from packaging.requirements import Requirement


def logical_lines(text: str) -> Iterator[str]:
    """The lock's requirements, each joined from its continuation lines."""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        yield pending + line
        pending = ""
    if pending:
        yield pending


def target_environment(full_version: str, arch: str) -> dict[str, str]:
    """The marker variables of CPython FULL_VERSION on glibc Linux."""
    major, minor, *_ = full_version.split(".")
    return {
        "python_version": f"{major}.{minor}",
        "python_full_version": full_version,
        "implementation_version": full_version,
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "platform_machine": arch,
    }


def applicable(lock: str, full_version: str, arch: str) -> Iterator[str]:
    """Each requirement line that applies to the target, marker removed."""
    environment = target_environment(full_version, arch)
    for line in logical_lines(lock):
        spec, _, hashes = line.partition("--hash=")
        requirement = Requirement(spec)
        if not hashes:
            raise SystemExit(f"{requirement.name} has no hash in the lock")
        marker = requirement.marker
        if marker is not None and not marker.evaluate(environment):
            continue
        requirement.marker = None
        yield f"{requirement} --hash={hashes}"


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    lock = Path(argv[1]).read_text(encoding="utf-8")
    for line in applicable(lock, argv[2], argv[3]):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
