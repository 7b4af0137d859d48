"""CPU time and peak memory of the processes a run watches.

A process counts with its children (taskiq's worker command supervises a
child that runs the tasks). Peak RSS is the kernel's high-water mark,
`VmHWM` in `/proc/PID/status`, summed over the process tree; where that file
is missing (not Linux) it falls back to the RSS at the moment of reading.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import psutil


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds of the process and its living children."""
    total = 0.0
    for process in _tree(pid):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return float(total)


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent on anything but idling, all cores."""
    times = psutil.cpu_times()
    # Guest time is already inside `user` on Linux; idle and iowait are not work.
    busy = ("user", "nice", "system", "irq", "softirq", "steal")
    return float(sum(getattr(times, name, 0.0) for name in busy))


def peak_rss_bytes(pid: int) -> int:
    """The high-water mark of resident memory of the process tree, in bytes."""
    total = 0
    for process in _tree(pid):
        status = Path(f"/proc/{process.pid}/status")
        try:
            total += _vm_hwm(status) if status.exists() else process.memory_info().rss
        except (psutil.NoSuchProcess, FileNotFoundError):
            continue
    return total


def _vm_hwm(status: Path) -> int:
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def snapshot(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds of every watched process so far, plus `machine` and `harness`."""
    figures = {name: cpu_s(pid) for name, pid in pids.items()}
    # The harness's own time only: every other watched process is its child.
    own = psutil.Process(os.getpid()).cpu_times()
    figures["harness"] = float(own.user + own.system)
    figures["machine"] = machine_busy_s()
    return figures
