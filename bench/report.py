"""The figures of a run: one row per system and concurrency, the table, the chart.

Ratios compare the node with the baseline on CPU per task (lower is better)
and with the peer on throughput (higher is better), each at the same
concurrency and from the same run (issue 7's targets).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .closed_loop import Window

NODE, NODE_OTLP, BASELINE, PEER = "mesh-node", "mesh-node+otlp", "baseline", "peer"
# The processes around the consumer whose CPU per task the JSON records.
AROUND = ("simulator", "redis", "otlp", "harness")
# The snapshot's counts of commands Redis has run, beside the CPU seconds.
REDIS_COMMAND_PREFIX = "redis:"


@dataclass
class Row:
    """One system at one concurrency."""

    system: str
    in_flight: int
    http_transport: str = "?"
    event_loop: str = "?"
    tasks: int = 0
    elapsed_s: float = 0.0
    tasks_per_s: float = 0.0
    cpu_ms_per_task: float = 0.0
    p50_added_ms: float = 0.0
    p99_added_ms: float = 0.0
    peak_rss_mb: float = 0.0
    failures: int = 0
    lost: int = 0
    around_cpu_ms_per_task: dict[str, float] | None = None
    machine_busy_pct: float = 0.0
    other_busy_pct: float = 0.0
    spans_per_task: float | None = None
    redis_commands_per_task: float | None = None
    # Every command Redis ran, per task: the harness's XADD and XREAD included.
    redis_command_mix: dict[str, float] | None = None
    error: str | None = None
    round_no: int = 1


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile of `values` (`share` between 0 and 1)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def fill(row: Row, window: Window, peak_rss_bytes: int, cores: int) -> Row:
    """Puts a window's figures into `row`."""
    tasks = max(window.tasks, 1)
    spent = {k: window.after[k] - window.before.get(k, 0.0) for k in window.after}
    _count_commands(row, spent, window.harness_commands, tasks)
    row.tasks, row.elapsed_s = window.tasks, round(window.elapsed_s, 2)
    row.tasks_per_s = round(window.tasks / window.elapsed_s, 1)
    row.cpu_ms_per_task = round(spent["consumer"] * 1000 / tasks, 3)
    row.p50_added_ms = round(percentile(window.added_ms, 0.50), 2)
    row.p99_added_ms = round(percentile(window.added_ms, 0.99), 2)
    row.peak_rss_mb = round(peak_rss_bytes / 2**20, 1)
    row.failures, row.lost = window.failures, window.lost
    known = sum(v for k, v in spent.items() if k != "machine")
    other = max(0.0, spent["machine"] - known)
    around = {k: spent[k] * 1000 / tasks for k in AROUND if k in spent}
    around["other"] = other * 1000 / tasks
    row.around_cpu_ms_per_task = {k: round(v, 3) for k, v in around.items()}
    capacity_s = window.elapsed_s * cores
    row.machine_busy_pct = round(100 * spent["machine"] / capacity_s, 1)
    row.other_busy_pct = round(100 * other / capacity_s, 1)
    return row


def _count_commands(
    row: Row, spent: dict[str, float], harness_commands: int, tasks: int
) -> None:
    """Moves the Redis command counts out of `spent` into `row`, per task."""
    mix = {
        k.removeprefix(REDIS_COMMAND_PREFIX): spent.pop(k)
        for k in list(spent)
        if k.startswith(REDIS_COMMAND_PREFIX)
    }
    if not mix:
        return
    # Less the harness's own XADDs and XREADs, and the INFO that counted them.
    commands = sum(mix.values()) - harness_commands - 1
    row.redis_commands_per_task = round(commands / tasks, 2)
    row.redis_command_mix = {
        name: round(calls / tasks, 2)
        for name, calls in sorted(mix.items(), key=lambda item: -item[1])
        if calls
    }


HEADER = (
    f"{'system':<15}{'transport':>10}{'loop':>9}{'in flight':>10}{'tasks/s':>9}"
    f"{'CPU ms/task':>12}{'p50 ms':>8}{'p99 ms':>8}{'peak RSS MB':>12}"
    f"{'errors':>7}{'busy %':>7}{'other %':>8}"
)


def table(rows: Iterable[Row]) -> str:
    """The rows as a fixed-width table; a failed run shows its error."""
    lines = [HEADER, "-" * len(HEADER)]
    for row in rows:
        head = (
            f"{row.system:<15}{row.http_transport:>10}{row.event_loop:>9}"
            f"{row.in_flight:>10}"
        )
        if row.error is not None:
            lines.append(f"{head}  failed: {row.error}")
            continue
        lines.append(
            f"{head}{row.tasks_per_s:>9.1f}{row.cpu_ms_per_task:>12.2f}"
            f"{row.p50_added_ms:>8.2f}{row.p99_added_ms:>8.2f}"
            f"{row.peak_rss_mb:>12.1f}{row.failures + row.lost:>7}"
            f"{row.machine_busy_pct:>7.0f}{row.other_busy_pct:>8.0f}"
        )
    return "\n".join(lines)


def ratios(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Node/baseline CPU per task and node/peer throughput, per concurrency."""
    found = {(r.system, r.in_flight): r for r in rows if r.error is None}
    figures = []
    for in_flight in sorted({r.in_flight for r in rows}):
        entry: dict[str, Any] = {"in_flight": in_flight}
        for node in (NODE, NODE_OTLP):
            mine = found.get((node, in_flight))
            base = found.get((BASELINE, in_flight))
            peer = found.get((PEER, in_flight))
            entry[f"{node}/baseline cpu_per_task"] = _ratio(
                mine, base, "cpu_ms_per_task"
            )
            entry[f"{node}/peer throughput"] = _ratio(mine, peer, "tasks_per_s")
        figures.append(entry)
    return figures


def _ratio(top: Row | None, bottom: Row | None, figure: str) -> float | None:
    if top is None or bottom is None or not getattr(bottom, figure):
        return None
    return round(float(getattr(top, figure)) / float(getattr(bottom, figure)), 2)


def ratio_lines(figures: Sequence[dict[str, Any]]) -> str:
    """The ratios, one line per concurrency."""

    def shown(value: float | None) -> str:
        return "  -  " if value is None else f"{value:.2f}x"

    lines = ["ratios       CPU/task vs baseline      throughput vs peer"]
    lines.append("in flight    node     node+otlp        node     node+otlp")
    for entry in figures:
        lines.append(
            f"{entry['in_flight']:>9}    "
            f"{shown(entry[f'{NODE}/baseline cpu_per_task']):<9}"
            f"{shown(entry[f'{NODE_OTLP}/baseline cpu_per_task']):<17}"
            f"{shown(entry[f'{NODE}/peer throughput']):<9}"
            f"{shown(entry[f'{NODE_OTLP}/peer throughput'])}"
        )
    return "\n".join(lines)


def around_lines(rows: Iterable[Row]) -> str:
    """CPU ms per task spent outside the consumer, per run."""
    lines = [
        "CPU ms per task around the consumer (same window): "
        + ", ".join((*AROUND, "other"))
        + "; Redis commands per task run for the consumer (scripts' own included)"
    ]
    for row in rows:
        if row.around_cpu_ms_per_task is None:
            continue
        parts = "  ".join(f"{k} {v:.2f}" for k, v in row.around_cpu_ms_per_task.items())
        if row.redis_commands_per_task is not None:
            parts += f"  redis cmds/task {row.redis_commands_per_task:.1f}"
        if row.spans_per_task is not None:
            parts += f"  spans/task {row.spans_per_task:.2f}"
        lines.append(f"{row.system:<15}{row.in_flight:>5}  {parts}")
    return "\n".join(lines)


def calmest(rows: Sequence[Row]) -> list[Row]:
    """For each system and concurrency, the round least disturbed by others.

    A run that failed counts only when every round of it failed.
    """
    chosen: dict[tuple[str, int], Row] = {}
    for row in rows:
        key = (row.system, row.in_flight)
        if key not in chosen or _calmness(row) < _calmness(chosen[key]):
            chosen[key] = row
    return list(chosen.values())


def _calmness(row: Row) -> tuple[bool, float]:
    return (row.error is not None, row.other_busy_pct)


def write_json(
    path: Path, meta: dict[str, Any], rows: Sequence[Row], measured: Sequence[Row]
) -> None:
    """The reported rows and every round measured, with settings and machine."""
    document = {
        **meta,
        "rows": [asdict(r) for r in rows],
        "ratios": ratios(rows),
        "all_rounds": [asdict(r) for r in measured]
        if len(measured) > len(rows)
        else [],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def write_chart(path: Path, rows: Sequence[Row], title: str) -> None:
    """Throughput and CPU per task against concurrency, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for system in dict.fromkeys(r.system for r in rows):
        mine = [r for r in rows if r.system == system and r.error is None]
        x = [r.in_flight for r in mine]
        left.plot(x, [r.tasks_per_s for r in mine], marker="o", label=system)
        right.plot(x, [r.cpu_ms_per_task for r in mine], marker="o", label=system)
    for axes, label in ((left, "tasks/s"), (right, "consumer CPU ms per task")):
        axes.set_xscale("log")
        axes.set_xticks(sorted({r.in_flight for r in rows}))
        axes.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axes.set_xlabel("tasks in flight")
        axes.set_ylabel(label)
        axes.set_ylim(bottom=0)
        axes.grid(True, alpha=0.3)
    left.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
