"""The `mesh-node` command: parses arguments, sets up logging, runs a command.

Logging is configured here and nowhere else, except that a command routes the
audit trail once its settings are known. The commands themselves live in
`commands`. Exit codes: 0 done, 1 runtime failure, 2 usage or configuration
error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from . import commands, logs, progress
from . import constants as c
from .commands import EXIT_FAILURE, EXIT_USAGE
from .errors import ConfigError

log = logging.getLogger("mesh_node")

LOG_LEVELS = ("debug", "info", "warning", "error")

Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command and returns its exit code."""
    # A stop request that comes while the node is still starting (importing
    # the SDK takes a second or two) is noted and honoured once the loop runs:
    # raising from the handler could land anywhere, half-way through an import.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, commands.note_stop)
    args = build_parser().parse_args(argv)
    command: Command = args.command
    if command in (commands.submit, commands.health, commands.audit) or (
        command is commands.status and not args.watch
    ):
        # A producer has nothing to drain: a signal ends it as usual.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if command is commands.batch:
            args.progress_bar = progress.wanted(args.progress)
        # A progress bar would scroll away under a line per task: with one,
        # only warnings and errors (and the audit trail) print above it.
        quiet = getattr(args, "progress_bar", False)
        logs.configure(_log_level(args.log_level or ("warning" if quiet else "info")))
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(command(args))
    except ConfigError as exc:
        print(f"mesh-node: {'; '.join(str(exc).splitlines())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except Exception:
        # A fault of the node itself: logged as JSON like everything else, and
        # through the same redaction, never as a bare traceback.
        log.exception("node.crashed")
        return EXIT_FAILURE


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed, asyncio's otherwise.

    uvloop spends less CPU on every socket read and callback, a few hundred
    microseconds per task at the node's rates; `MESH_EVENT_LOOP=asyncio`
    keeps the standard loop.
    """
    choice = os.environ.get("MESH_EVENT_LOOP", "uvloop")
    if choice not in ("uvloop", "asyncio"):
        raise ConfigError(
            "configuration error: MESH_EVENT_LOOP: must be uvloop or asyncio"
        )
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _log_level(level: str) -> str:
    if level not in LOG_LEVELS:
        choices = ", ".join(LOG_LEVELS)
        raise ConfigError(
            f"configuration error: MESH_LOG_LEVEL: must be one of {choices}"
        )
    return level


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command, with help for every option."""
    parser = argparse.ArgumentParser(
        prog="mesh-node",
        description="Runs LLM tasks against the Anthropic Messages API: from a Redis "
        "stream (serve), stdin (interactive) or a file (batch).",
        epilog="The API key comes from ANTHROPIC_API_KEY_FILE, ANTHROPIC_API_KEY or "
        "CLAUDE_API_KEY; ANTHROPIC_BASE_URL points the client elsewhere. Exit "
        "codes: 0 done, 1 runtime failure, 2 usage or configuration error. Results "
        "go to stdout, logs to stderr as JSON lines.",
    )
    parser.set_defaults(log_level=os.environ.get("MESH_LOG_LEVEL"))
    subparsers = parser.add_subparsers(
        title="commands", required=True, metavar="COMMAND"
    )
    _add_serve(subparsers)
    _add_interactive(subparsers)
    _add_batch(subparsers)
    _add_submit(subparsers)
    _add_status(subparsers)
    _add_health(subparsers)
    _add_audit(subparsers)
    _add_simulate(subparsers)
    return parser


def _bounded(
    kind: Callable[[str], Any], low: float, high: float
) -> Callable[[str], Any]:
    """An argparse type that also checks a range."""

    def parse(text: str) -> Any:
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False, parents=[_logging_option()])
    common.add_argument(
        "--config",
        help="JSON configuration file (env MESH_CONFIG; default "
        f"{c.DEFAULT_CONFIG_PATH} when present)",
    )
    return common


def _logging_option() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=os.environ.get("MESH_LOG_LEVEL"),
        help="least severe log level written to stderr (env MESH_LOG_LEVEL; "
        "default info)",
    )
    return common


def _redis_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--redis-url",
        help=f"Redis to use (env REDIS_URL; default {c.DEFAULT_REDIS_URL})",
    )
    options.add_argument(
        "--prefix",
        help="prefix of every Redis key; on a Redis Cluster it must hold a hash "
        f"tag, e.g. '{{mesh}}:' (env MESH_PREFIX; default {c.DEFAULT_PREFIX})",
    )
    return options


def _node_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--concurrency",
        type=int,
        help=f"most tasks in flight at once (env MESH_CONCURRENCY; default "
        f"{c.DEFAULT_CONCURRENCY})",
    )
    options.add_argument(
        "--node-id",
        help="this node's name in results and logs, and in serve its consumer "
        "name (env MESH_NODE_ID; default host name and process id)",
    )
    return options


def _add_serve(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve",
        parents=[_common(), _redis_options(), _node_options()],
        help="consume the task stream until SIGTERM or SIGINT",
        description="Consumes the task stream through a consumer group and "
        "publishes one result per task, until SIGTERM or SIGINT.",
    )
    serve.add_argument(
        "--group", help=f"consumer group (env MESH_GROUP; default {c.DEFAULT_GROUP})"
    )
    serve.set_defaults(command=commands.serve)


def _add_interactive(subparsers: Any) -> None:
    interactive = subparsers.add_parser(
        "interactive",
        parents=[_common(), _node_options()],
        help="tasks as JSON lines on stdin, results on stdout",
        description="Reads tasks as JSON lines on stdin and writes each result to "
        "stdout as one JSON line as soon as it is ready, until end of input.",
    )
    interactive.set_defaults(command=commands.interactive)


def _add_batch(subparsers: Any) -> None:
    batch = subparsers.add_parser(
        "batch",
        parents=[_common(), _node_options()],
        help="run a file of tasks, one result line per task",
        description="Runs every task of a JSON-lines file or JSON array and "
        "writes one result line per task as each finishes (or, with --ordered, "
        "in input order). A JSON-lines file is read as it runs, so memory does not "
        "grow with it; a JSON array is read whole.",
    )
    batch.add_argument("file", metavar="FILE", help="tasks file, or - for stdin")
    batch.add_argument(
        "--output", metavar="FILE", help="write results here instead of stdout"
    )
    batch.add_argument(
        "--ordered",
        action="store_true",
        help="write results in input order instead of as each finishes",
    )
    batch.add_argument(
        "--resume",
        action="store_true",
        help="append to --output, skipping the tasks whose ids it already answers "
        "(cancelled results excepted)",
    )
    batch.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="progress bar on stderr: done, rate, errors, ETA (default auto: when "
        "stderr is a terminal; log level then defaults to warning)",
    )
    batch.set_defaults(command=commands.batch)


def _add_submit(subparsers: Any) -> None:
    submit_cmd = subparsers.add_parser(
        "submit",
        parents=[_common(), _redis_options()],
        help="add tasks to the task stream (producer side)",
        description="Adds each task of a JSON-lines file or JSON array to the task "
        "stream, unvalidated: the node judges them.",
    )
    submit_cmd.add_argument("file", metavar="FILE", help="tasks file, or - for stdin")
    submit_cmd.add_argument(
        "--wait",
        action="store_true",
        help="print each submitted task's result (by id) as it appears; exit 1 if "
        "any is missing at the timeout",
    )
    submit_cmd.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="with --wait, how long to wait in seconds; also the longest a Redis "
        "outage may hold up adding tasks (default 60)",
    )
    submit_cmd.set_defaults(command=commands.submit)


def _add_status(subparsers: Any) -> None:
    status = subparsers.add_parser(
        "status",
        parents=[_common(), _redis_options()],
        help="the mesh at a glance: streams, group, nodes, last minute, limits",
        description="Shows the task stream's length, the group's pending entries "
        "and lag per consumer, the live nodes from their heartbeats, dead "
        "letters, results and errors over the last minute, and the headroom "
        "left in each rate limit and budget. Reads Redis only.",
    )
    status.add_argument(
        "--group", help=f"consumer group (env MESH_GROUP; default {c.DEFAULT_GROUP})"
    )
    status.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (one per line with --watch)",
    )
    status.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=_bounded(float, 0.2, 3600),
        metavar="S",
        help="refresh every S seconds (default 2) until interrupted",
    )
    status.set_defaults(command=commands.status)


def _add_health(subparsers: Any) -> None:
    health = subparsers.add_parser(
        "health",
        parents=[_common(), _redis_options()],
        help="exit 0 when this node's heartbeat is fresh (container HEALTHCHECK)",
        description="Checks the heartbeat a serving node keeps in Redis: exit 0 "
        "when it is fresh, 1 with one line saying why when it is stale, missing "
        "or Redis cannot be reached. Without --node-id, the node is the one "
        "whose heartbeat names this host.",
    )
    health.add_argument(
        "--node-id", help="the node to check (env MESH_NODE_ID; default: this host's)"
    )
    health.set_defaults(command=commands.health)


def _add_audit(subparsers: Any) -> None:
    audit = subparsers.add_parser(
        "audit",
        parents=[_common()],
        help="check the security posture from inside the running environment",
        description="Checks, from inside, what the sandbox promises: not root, "
        "no-new-privileges, no capabilities, seccomp, a read-only root, a "
        "size-limited tmpfs workspace, memory, CPU and pids limits, the API key "
        "from a file and nowhere else, the configuration, and egress only "
        "through the proxy to the allowed hosts. Prints a table; exit 1 when a "
        "required check fails.",
    )
    audit.add_argument("--json", action="store_true", help="print one JSON object")
    audit.set_defaults(command=commands.audit)


def _add_simulate(subparsers: Any) -> None:
    sim = subparsers.add_parser(
        "simulate-api",
        parents=[_logging_option()],
        help="a local stand-in for the Messages API (development, tests, load)",
        description="Serves the Messages API protocol on a local port, with "
        "latency, rate limits and fault injection. Accepted keys come from "
        "MESH_SIM_API_KEYS (comma-separated); without it any key is accepted.",
    )
    sim.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)"
    )
    sim.add_argument(
        "--port",
        type=_bounded(int, 0, 65535),
        default=8787,
        help="port to bind; 0 picks a free one (default 8787)",
    )
    sim.add_argument(
        "--latency-ms",
        type=_bounded(int, 0, 3_600_000),
        default=0,
        help="added to every answer (default 0)",
    )
    sim.add_argument(
        "--latency-jitter-ms",
        type=_bounded(int, 0, 3_600_000),
        default=0,
        help="random extra latency, up to this (default 0)",
    )
    sim.add_argument(
        "--fail-rate",
        type=_bounded(float, 0, 1),
        default=0.0,
        help="share of requests answered with a random 429, 500 or "
        "529, from 0 to 1 (default 0)",
    )
    sim.add_argument(
        "--rpm",
        type=_bounded(int, 1, 10**9),
        default=None,
        help="requests per minute per key before 429 (default unlimited)",
    )
    sim.add_argument(
        "--tpm",
        type=_bounded(int, 1, 10**12),
        default=None,
        help="tokens per minute per key before 429 (default unlimited)",
    )
    sim.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="serve HTTPS with this certificate chain (with --tls-key)",
    )
    sim.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    sim.set_defaults(command=commands.simulate)
