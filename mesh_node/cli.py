"""The `mesh-node` command: parses arguments, sets up logging, runs a command.

This is the only module that configures logging. Exit codes: 0 done, 1 runtime
failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, BinaryIO, cast
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from . import constants as c
from . import logs
from .errors import ConfigError
from .producer import read_payloads, stream_end, submit, wait_for_results
from .redis_link import RedisLink, connect
from .settings import Settings, load_settings, resolve_api_key

if TYPE_CHECKING:
    import anthropic

    from .executor import Executor
    from .intake import Intake
    from .sink import Sink
    from .worker import Worker

log = logging.getLogger("mesh_node")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
LOG_LEVELS = ("debug", "info", "warning", "error")

Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command and returns its exit code."""
    # A stop request that comes while the node is still starting (importing
    # the SDK takes a second or two) is noted and honoured once the loop runs:
    # raising from the handler could land anywhere, half-way through an import.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _note_stop)
    args = build_parser().parse_args(argv)
    command: Command = args.command
    if command is _submit:
        # A producer has nothing to drain: a signal ends it as usual.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        logs.configure(_log_level(args.log_level))
        return asyncio.run(command(args))
    except ConfigError as exc:
        print(f"mesh-node: {'; '.join(str(exc).splitlines())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILURE


def _log_level(level: str) -> str:
    if level not in LOG_LEVELS:
        choices = ", ".join(LOG_LEVELS)
        raise ConfigError(
            f"configuration error: MESH_LOG_LEVEL: must be one of {choices}"
        )
    return level


_stop_noted: list[int] = []


def _note_stop(signum: int, _frame: object) -> None:
    _stop_noted.append(signum)


def _on_stop_signals(stop: Callable[[], None]) -> None:
    """Routes SIGTERM and SIGINT to `stop`, and calls it for one that came early."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    if _stop_noted:
        stop()


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
    parser.set_defaults(log_level=os.environ.get("MESH_LOG_LEVEL", "info"))
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    _add_serve(commands)
    _add_interactive(commands)
    _add_batch(commands)
    _add_submit(commands)
    _add_simulate(commands)
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
        default=os.environ.get("MESH_LOG_LEVEL", "info"),
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
        help=f"prefix of every Redis key (env MESH_PREFIX; default {c.DEFAULT_PREFIX})",
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


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        parents=[_common(), _redis_options(), _node_options()],
        help="consume the task stream until SIGTERM",
        description="Consumes the task stream through a consumer group and "
        "publishes one result per task, until SIGTERM or SIGINT.",
    )
    serve.add_argument(
        "--group", help=f"consumer group (env MESH_GROUP; default {c.DEFAULT_GROUP})"
    )
    serve.set_defaults(command=_serve)


def _add_interactive(commands: Any) -> None:
    interactive = commands.add_parser(
        "interactive",
        parents=[_common(), _node_options()],
        help="tasks as JSON lines on stdin, results on stdout",
        description="Reads tasks as JSON lines on stdin and writes each result to "
        "stdout as one JSON line as soon as it is ready, until end of input.",
    )
    interactive.set_defaults(command=_interactive)


def _add_batch(commands: Any) -> None:
    batch = commands.add_parser(
        "batch",
        parents=[_common(), _node_options()],
        help="run a file of tasks, one result line per task",
        description="Runs every task of a JSON-lines file or JSON array and "
        "writes one result line per task as each finishes.",
    )
    batch.add_argument("file", metavar="FILE", help="tasks file, or - for stdin")
    batch.add_argument(
        "--output", metavar="FILE", help="write results here instead of stdout"
    )
    batch.set_defaults(command=_batch)


def _add_submit(commands: Any) -> None:
    submit_cmd = commands.add_parser(
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
        help="with --wait, how long to wait in seconds (default 60)",
    )
    submit_cmd.set_defaults(command=_submit)


def _add_simulate(commands: Any) -> None:
    sim = commands.add_parser(
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
    sim.set_defaults(command=_simulate)


def _settings(args: argparse.Namespace) -> Settings:
    flags = {
        "redisUrl": getattr(args, "redis_url", None),
        "prefix": getattr(args, "prefix", None),
        "group": getattr(args, "group", None),
        "nodeId": getattr(args, "node_id", None),
        "concurrency": getattr(args, "concurrency", None),
    }
    return load_settings(flags, os.environ, args.config)


def _executor(
    settings: Settings, redis: tuple[aioredis.Redis, RedisLink] | None = None
) -> tuple[Executor, anthropic.AsyncAnthropic]:
    """The executor, with a limiter shared through Redis when there is one."""
    # The node's own modules import the SDK, which is slow to import; only the
    # commands that call the API pay for it.
    import anthropic

    from .executor import Executor
    from .ratelimit import LimitBackend
    from .ratelimit.limiter import limiter_for
    from .ratelimit.memory import MemoryLimitBackend
    from .ratelimit.redis_backend import RedisLimitBackend
    from .retrying import RetryPolicy

    key = resolve_api_key(os.environ).get_secret_value()
    client = anthropic.AsyncAnthropic(
        api_key=key, base_url=settings.api_base_url, max_retries=0
    )
    policy = RetryPolicy(
        max_attempts=settings.retry.max_attempts, max_total_s=settings.retry.max_total_s
    )
    backend: LimitBackend = MemoryLimitBackend()
    if redis is not None:
        backend = RedisLimitBackend(redis[0], redis[1], settings.prefix, key)
    limiter = limiter_for(settings, backend)
    return Executor(client, settings, policy, limiter), client


async def _run_worker(
    settings: Settings,
    intake: Intake,
    sink: Sink,
    executor: Executor,
    stopping: asyncio.Event | None = None,
) -> Worker:
    from .admission import Limits
    from .worker import Worker

    worker = Worker(
        intake,
        sink,
        executor,
        Limits.from_settings(settings),
        concurrency=settings.concurrency,
        grace_period_s=settings.grace_period_s,
        max_deliveries=settings.max_deliveries,
        stopping=stopping,
        hold=executor.limiter.budget_wait_s,
    )
    _on_stop_signals(worker.stop)
    log.info(
        "node.started",
        extra={"node": settings.node_id, "concurrency": settings.concurrency},
    )
    await worker.run()
    log.info("node.stopped", extra={"node": settings.node_id, **worker.counts})
    return worker


async def _serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    resolve_api_key(os.environ)
    from .intake.redis_stream import RedisStreamIntake
    from .sink.redis_stream import RedisStreamSink

    # Every task in flight may settle at once, plus the reader and the keeper.
    client = connect(settings.redis_url, max_connections=settings.concurrency + 8)
    keys = c.Keys(settings.prefix)
    stopping = asyncio.Event()
    api: anthropic.AsyncAnthropic | None = None
    try:
        await client.ping()
        intake = RedisStreamIntake(
            client,
            keys,
            group=settings.group,
            consumer=settings.node_id,
            claim_timeout_ms=settings.claim_timeout_ms,
            stopping=stopping,
        )
        sink = RedisStreamSink(
            client,
            intake.link,
            keys,
            group=settings.group,
            node_id=settings.node_id,
            retention_s=settings.result_retention_s,
            claim_timeout_ms=settings.claim_timeout_ms,
        )
        executor, api = _executor(settings, (client, intake.link))
        await _run_worker(settings, intake, sink, executor, stopping)
    except RedisError as exc:
        log.error(
            "redis.failed",
            extra={"url": redact_url(settings.redis_url), "error": str(exc)},
        )
        return EXIT_FAILURE
    finally:
        await client.aclose()
        if api is not None:
            await api.close()
    return EXIT_OK


async def _interactive(args: argparse.Namespace) -> int:
    settings = _settings(args)
    executor, api = _executor(settings)
    from .intake.lines import LineIntake
    from .sink.lines import LineSink

    intake = LineIntake(sys.stdin.fileno(), max_line_bytes=settings.max_task_bytes)
    try:
        worker = await _run_worker(
            settings, intake, LineSink(sys.stdout.buffer), executor
        )
    finally:
        await api.close()
    return EXIT_FAILURE if worker.output_closed else EXIT_OK


async def _batch(args: argparse.Namespace) -> int:
    settings = _settings(args)
    executor, api = _executor(settings)
    from .intake.lines import LineIntake
    from .sink.lines import LineSink

    with ExitStack() as stack:
        source = _open(stack, args.file, "rb", sys.stdin.buffer)
        target = _open(stack, args.output, "wb", sys.stdout.buffer)
        intake = LineIntake(
            source.fileno(), max_line_bytes=settings.max_task_bytes, allow_array=True
        )
        try:
            worker = await _run_worker(settings, intake, LineSink(target), executor)
        finally:
            await api.close()
    if worker.output_closed:
        return EXIT_FAILURE
    if not intake.exhausted:
        log.error(
            "batch.interrupted",
            extra={
                "reason": "stopped before the end of "
                "the file; later tasks have no result"
            },
        )
        return EXIT_FAILURE
    return EXIT_OK


def _open(stack: ExitStack, path: str | None, mode: str, default: BinaryIO) -> BinaryIO:
    if path is None or path == "-":
        return default
    try:
        stream = cast(BinaryIO, stack.enter_context(open(path, mode)))  # noqa: SIM115
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    return stream


async def _submit(args: argparse.Namespace) -> int:
    settings = _settings(args)
    client = connect(settings.redis_url, max_connections=4)
    keys = c.Keys(settings.prefix)
    with ExitStack() as stack:
        source = _open(stack, args.file, "rb", sys.stdin.buffer)
        try:
            after = await stream_end(client, keys)
            payloads = read_payloads(source.fileno(), args.file)
            submitted = await submit(client, keys, payloads)
            if not args.wait:
                return EXIT_OK
            missing = await wait_for_results(
                client,
                keys,
                submitted,
                sys.stdout.buffer,
                after=after,
                timeout_s=args.timeout,
            )
        except RedisError as exc:
            log.error(
                "redis.failed",
                extra={"url": redact_url(settings.redis_url), "error": str(exc)},
            )
            return EXIT_FAILURE
        finally:
            await client.aclose()
    if missing:
        log.error(
            "submit.timeout",
            extra={
                "missing": len(missing),
                "first_missing": [m.task_id or m.entry_id for m in missing[:5]],
            },
        )
        return EXIT_FAILURE
    return EXIT_OK


async def _simulate(args: argparse.Namespace) -> int:
    from .simulator import SimulatorConfig, keys_from_env, serve_forever

    config = SimulatorConfig(
        host=args.host,
        port=args.port,
        latency_ms=args.latency_ms,
        latency_jitter_ms=args.latency_jitter_ms,
        fail_rate=args.fail_rate,
        rpm=args.rpm,
        tpm=args.tpm,
        api_keys=keys_from_env(os.environ),
    )
    stop = asyncio.Event()
    _on_stop_signals(stop.set)
    try:
        await serve_forever(config, stop)
    except OSError as exc:
        log.error("simulator.failed", extra={"port": args.port, "error": str(exc)})
        return EXIT_FAILURE
    return EXIT_OK


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
