"""Measures the node against the hand-written minimum and a peer (issue 7).

One run starts a private redis-server, the Messages API simulator with a fixed
latency and, for the OTLP row, a loopback OTLP receiver. Then, for each
concurrency and each system, it starts the consumer fresh, keeps exactly that
many tasks in flight with a closed-loop producer, and measures a window after
a warm-up: tasks/s, the consumer's CPU ms per task (user + system, children
included), added latency per task (end to end minus the simulator's latency)
at p50 and p99, and the consumer's peak RSS. It prints one table and the
ratios, and writes `bench.json` and `bench.png` to `--out`.

    python -m bench.run [--quick] [--concurrency 16,256] [--systems baseline,peer]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import redis

from tests.support import REPO

from . import report, usage
from .closed_loop import ClosedLoop, Plan, StalledError
from .services import (
    Service,
    ServiceError,
    http_json,
    start_otlp_sink,
    start_redis,
    start_simulator,
)
from .systems import NODE_RATE_LIMITS, SYSTEM_NAMES, Bench, System, system_named

DEFAULT_CONCURRENCY = (16, 256, 1000)
# Sized so that the default run (4 systems x 3 concurrencies, each with its own
# start, warm-up and drain) ends well inside 10 minutes on 2 cores.
WARMUP_S, MEASURE_S = 5.0, 15.0
QUICK_WARMUP_S, QUICK_MEASURE_S = 2.0, 5.0
# Above this share of the machine, load from outside the benchmark is noted.
OTHER_LOAD_WARNING_PCT = 10.0


@dataclass
class Infra:
    """The processes every run of the benchmark shares."""

    bench: Bench
    redis: Service
    simulator: Service
    otlp: Service | None

    def services(self) -> list[Service]:
        """Every shared process, the receiver last."""
        return [s for s in (self.simulator, self.redis, self.otlp) if s is not None]


def measure(
    infra: Infra, system: System, in_flight: int, plan: Plan, rdb: redis.Redis
) -> report.Row:
    """Runs one system at one concurrency on a freshly emptied Redis."""
    row = report.Row(system.name, in_flight)
    rdb.flushall()
    http_json(infra.bench.api_url, "POST", "/_sim/reset")
    spans_before = _spans(infra)
    consumer = system.start(infra.bench, in_flight)
    row.http_transport, row.event_loop = consumer.http_transport, consumer.event_loop
    pids = {"consumer": consumer.service.pid, "redis": infra.redis.pid}
    pids["simulator"] = infra.simulator.pid
    if infra.otlp is not None:
        pids["otlp"] = infra.otlp.pid
    loop = ClosedLoop(rdb, system.encode, plan, lambda: _watch(pids, rdb))
    try:
        window = loop.run()
        peak = usage.peak_rss_bytes(consumer.service.pid)
    except StalledError as exc:
        row.error = f"{exc}; see {consumer.service.log_path}"
        return row
    finally:
        consumer.service.stop()
    report.fill(row, window, peak, os.cpu_count() or 1)
    if system.name.endswith("+otlp"):
        answered = max(window.answered_total, 1)
        row.spans_per_task = round((_spans(infra) - spans_before) / answered, 2)
    return row


def _watch(pids: dict[str, int], rdb: redis.Redis) -> dict[str, float]:
    figures = usage.snapshot(pids)
    stats: Any = rdb.info("commandstats")
    for name, figures_of_command in stats.items():
        command = name.removeprefix("cmdstat_")
        figures[report.REDIS_COMMAND_PREFIX + command] = figures_of_command["calls"]
    return figures


def _spans(infra: Infra) -> int:
    if infra.bench.otlp_endpoint is None:
        return 0
    return int(http_json(infra.bench.otlp_endpoint, "GET", "/counts")["spans"])


def start_infra(latency_ms: int, otlp: bool, log_dir: Path, workdir: Path) -> Infra:
    """Starts redis-server, the simulator and, when asked, the OTLP receiver."""
    started: list[Service] = []
    try:
        redis_service, redis_url = start_redis(workdir, log_dir)
        started.append(redis_service)
        simulator, api_url = start_simulator(latency_ms, log_dir)
        started.append(simulator)
        sink, endpoint = start_otlp_sink(log_dir) if otlp else (None, None)
    except BaseException:
        for service in started:
            service.stop()
        raise
    bench = Bench(redis_url, api_url, log_dir, endpoint)
    return Infra(bench, redis_service, simulator, sink)


def run_all(args: argparse.Namespace, out_dir: Path) -> list[report.Row]:
    """Every system at every concurrency; one row each."""
    log_dir = out_dir / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True)
    systems = [system_named(name) for name in args.systems]
    rows: list[report.Row] = []
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as workdir:
        wants_otlp = any(s.name.endswith("+otlp") for s in systems)
        infra = start_infra(args.latency_ms, wants_otlp, log_dir, Path(workdir))
        rdb = redis.Redis.from_url(infra.bench.redis_url)
        try:
            for round_no in range(1, args.rounds + 1):
                this_round = _for_round(infra, round_no, args.rounds)
                for in_flight in args.concurrency:
                    plan = Plan(
                        in_flight, args.warmup_s, args.measure_s, args.latency_ms
                    )
                    for system in systems:
                        row = _measured(this_round, system, in_flight, plan, rdb)
                        row.round_no = round_no
                        rows.append(row)
        finally:
            rdb.close()
            for service in infra.services():
                service.stop()
    return rows


def _for_round(infra: Infra, round_no: int, rounds: int) -> Infra:
    """The shared processes, with the round's own log folder when there are more."""
    if rounds == 1:
        return infra
    log_dir = infra.bench.log_dir / f"round-{round_no}"
    log_dir.mkdir()
    return dataclasses.replace(
        infra, bench=dataclasses.replace(infra.bench, log_dir=log_dir)
    )


def _measured(
    infra: Infra, system: System, in_flight: int, plan: Plan, rdb: redis.Redis
) -> report.Row:
    started_s = time.monotonic()
    try:
        row = measure(infra, system, in_flight, plan, rdb)
    except ServiceError as exc:
        row = report.Row(system.name, in_flight, error=str(exc))
    took_s = time.monotonic() - started_s
    say(f"{system.name} at {in_flight} in flight ({took_s:.0f} s): " + _brief(row))
    return row


def _brief(row: report.Row) -> str:
    if row.error is not None:
        return f"failed: {row.error}"
    return (
        f"{row.tasks_per_s:.0f} tasks/s, {row.cpu_ms_per_task:.2f} CPU ms/task, "
        f"p99 +{row.p99_added_ms:.1f} ms"
    )


def meta(args: argparse.Namespace, took_s: float) -> dict[str, Any]:
    """The run's settings, the machine and the versions, for the JSON."""
    versions: dict[str, str | None] = {}
    for package in ("mesh-node", "anthropic", "redis", "taskiq", "taskiq-redis"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cores": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
            "platform": platform.platform(terse=True),
        },
        "settings": {
            "api_latency_ms": args.latency_ms,
            "warmup_s": args.warmup_s,
            "measure_s": args.measure_s,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "systems": args.systems,
            "node_rate_limits": NODE_RATE_LIMITS,
        },
        "versions": versions,
        "took_s": round(took_s, 1),
    }


def _csv_ints(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive numbers")
    return values


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _csv_systems(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in SYSTEM_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(SYSTEM_NAMES)}")
    return names


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The options; `--quick` shortens warm-up and window unless they are given."""
    parser = argparse.ArgumentParser(
        prog="scripts/bench.sh", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument(
        "--systems",
        type=_csv_systems,
        default=list(SYSTEM_NAMES),
        help=f"comma-separated, of {','.join(SYSTEM_NAMES)} (default all)",
    )
    parser.add_argument(
        "--concurrency",
        type=_csv_ints,
        default=list(DEFAULT_CONCURRENCY),
        help="tasks in flight, comma-separated (default 16,256,1000)",
    )
    parser.add_argument(
        "--latency-ms", type=int, default=50, help="the simulator's (default 50)"
    )
    parser.add_argument("--warmup-s", type=float, help=f"default {WARMUP_S:g}")
    parser.add_argument("--measure-s", type=float, help=f"default {MEASURE_S:g}")
    parser.add_argument(
        "--rounds",
        type=_positive,
        default=1,
        help="measure everything this many times, interleaved, and report for "
        "each system and concurrency the round that other processes disturbed "
        "least (default 1)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"warm-up {QUICK_WARMUP_S:g} s, window {QUICK_MEASURE_S:g} s",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "build" / "bench",
        help="where bench.json, bench.png and logs/ go (default build/bench)",
    )
    args = parser.parse_args(argv)
    if args.warmup_s is None:
        args.warmup_s = QUICK_WARMUP_S if args.quick else WARMUP_S
    if args.measure_s is None:
        args.measure_s = QUICK_MEASURE_S if args.quick else MEASURE_S
    return args


def say(line: str) -> None:
    """Progress, on stderr: stdout carries the report."""
    print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark, prints the report; exits 1 when a run failed."""
    args = parse(argv)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    say(
        f"benchmark: {', '.join(args.systems)} at {args.concurrency} in flight; "
        f"API latency {args.latency_ms} ms, warm-up {args.warmup_s:g} s, "
        f"window {args.measure_s:g} s"
    )
    started_s = time.monotonic()
    measured = run_all(args, out_dir)
    took_s = time.monotonic() - started_s
    rows = report.calmest(measured)
    document = meta(args, took_s)
    report.write_json(out_dir / "bench.json", document, rows, measured)
    title = f"API latency {args.latency_ms} ms, {document['machine']['cores']} cores"
    report.write_chart(out_dir / "bench.png", rows, title)
    print(summary(args, rows, document, out_dir))
    return 1 if any(r.error is not None for r in measured) else 0


def summary(
    args: argparse.Namespace,
    rows: Sequence[report.Row],
    document: dict[str, Any],
    out_dir: Path,
) -> str:
    """The printed report: table, ratios, CPU around the consumer, notes."""
    machine = document["machine"]
    limits = NODE_RATE_LIMITS
    notes = [
        f"{document['date']}, {machine['cores']} cores, {machine['memory_gb']} GB; "
        f"simulator latency {args.latency_ms} ms fixed; warm-up {args.warmup_s:g} s, "
        f"window {args.measure_s:g} s; took {document['took_s']:.0f} s",
        f"mesh-node rate limits raised to {limits['maxRequestsPerMinute']:,}/min and "
        f"{limits['maxRequestsPerHour']:,}/h, far above the load: none throttled "
        "(the limiter still runs)",
        "CPU ms/task = the consumer's user + system time (children included) "
        "over the window / tasks answered in it; p50/p99 = added latency, result "
        f"seen minus submitted minus the simulator's {args.latency_ms} ms",
        "errors = failed results + tasks never answered; busy % = the whole "
        "machine, all cores, during the window; other % = the part of it no "
        "process of the benchmark used",
        f"figures: {_shown(out_dir / 'bench.json')}, chart: "
        f"{_shown(out_dir / 'bench.png')}, logs: {_shown(out_dir / 'logs')}",
    ]
    if args.rounds > 1:
        notes.append(
            f"{args.rounds} rounds; each row is the round of that system and "
            "concurrency with the least other load (every round is in bench.json)"
        )
    busiest = max((r.other_busy_pct for r in rows), default=0.0)
    if busiest > OTHER_LOAD_WARNING_PCT:
        notes.append(
            f"warning: other processes took up to {busiest:.0f} % of the machine "
            "during a window; the figures are less comparable than usual"
        )
    return "\n\n".join(
        [
            report.table(rows),
            report.ratio_lines(report.ratios(rows)),
            report.around_lines(rows),
            "\n".join(notes),
        ]
    )


def _shown(path: Path) -> str:
    """`path` relative to the repository when it lies inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
