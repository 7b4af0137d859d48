"""What each command does, once `cli` has parsed its arguments.

Every command takes the parsed arguments and returns its exit code; a
`ConfigError` becomes exit 2 in `cli.main`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, BinaryIO, cast
from urllib.parse import urlsplit, urlunsplit

import orjson
from redis.exceptions import RedisError

from . import constants as c
from . import logs
from .egress import EgressProxy
from .errors import ConfigError
from .producer import read_payloads, stream_end, wait_for_results
from .producer import submit as submit_tasks
from .redis_link import (
    REDIS_FAILURES,
    Client,
    RedisLink,
    open_redis,
    open_redis_once,
)
from .settings import API_KEY_VARIABLES, Settings, load_settings, resolve_api_key

if TYPE_CHECKING:
    from .executor import Executor
    from .intake import Intake
    from .observe import Destination
    from .sdk import PendingClient
    from .sink import Sink
    from .worker import Worker

log = logging.getLogger("mesh_node")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
HEALTH_TIMEOUT_S = 3.0
STATUS_TIMEOUT_S = 10.0

_stop_noted: list[int] = []


def note_stop(signum: int, _frame: object) -> None:
    _stop_noted.append(signum)


def on_stop_signals(stop: Callable[[], None]) -> None:
    """Routes SIGTERM and SIGINT to `stop`, and calls it for one that came early."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    if _stop_noted:
        stop()


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
    settings: Settings,
    destination: Destination,
    redis: tuple[Client, RedisLink] | None = None,
) -> tuple[Executor, PendingClient]:
    """The executor, with its telemetry, and a limiter shared through Redis
    when there is one. `_close` undoes it.

    The SDK client is built in a thread (see `sdk`): the caller goes on
    starting up meanwhile, and the first API call waits for it.
    """
    from . import telemetry
    from .executor import Executor
    from .keys import RotatingKey
    from .observe import Observer
    from .ratelimit import LimitBackend
    from .ratelimit.limiter import limiter_for
    from .ratelimit.memory import MemoryLimitBackend
    from .ratelimit.redis_backend import RedisLimitBackend
    from .retrying import RetryPolicy
    from .sdk import PendingClient, build

    rotating = RotatingKey(os.environ)
    key = rotating.value
    logs.redact(key)
    # Read once; no child process (a scanner, a shell) inherits it after.
    for name in API_KEY_VARIABLES:
        os.environ.pop(name, None)
    if settings.audit_log is not None:
        try:
            logs.route_audit(settings.audit_log)
        except OSError as exc:
            raise ConfigError(
                f"configuration error: auditLog: cannot open {settings.audit_log} "
                f"({exc.strerror})"
            ) from None
    observer = Observer(
        telemetry.from_environment(
            os.environ,
            node_id=settings.node_id,
            record_content=settings.record_content,
            trace_context=settings.trace_context,
        ),
        destination,
        settings.node_id,
    )
    egress = _egress(settings)
    client = PendingClient(
        functools.partial(
            build,
            api_key=key,
            base_url=settings.api_base_url,
            concurrency=settings.concurrency,
            open_telemetry=observer.telemetry.sdk_option(),
            egress=egress,
        )
    )
    policy = RetryPolicy(
        max_attempts=settings.retry.max_attempts, max_total_s=settings.retry.max_total_s
    )
    backend: LimitBackend = MemoryLimitBackend()
    if redis is not None:
        backend = RedisLimitBackend(redis[0], redis[1], settings.prefix, key)
    limiter = limiter_for(settings, backend)
    return Executor(client, settings, policy, limiter, observer, rotating), client


def _lost(executor: Executor) -> dict[str, int]:
    counts = executor.observer.telemetry.counts
    return {"spans_dropped": counts.spans_dropped, "spans_failed": counts.spans_failed}


async def _close(executor: Executor | None, api: PendingClient | None) -> None:
    if api is not None:
        await api.close()
    if executor is not None:
        # Off the loop, which keeps answering signals (a second SIGTERM is
        # a request, not a kill) while the flush runs its bounded course.
        await asyncio.to_thread(executor.observer.telemetry.shutdown)


def _worker(
    settings: Settings,
    intake: Intake,
    sink: Sink,
    executor: Executor,
    stopping: asyncio.Event | None = None,
) -> Worker:
    """The worker, with SIGTERM and SIGINT routed to its stop."""
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
        ready=lambda: _started(settings),
    )
    on_stop_signals(worker.stop)
    return worker


def _started(settings: Settings) -> None:
    """Logs that the node takes tasks now, and what it runs on."""
    from .sdk import transport_name

    log.info(
        "node.started",
        extra={
            "node": settings.node_id,
            "concurrency": settings.concurrency,
            "http_transport": transport_name(_egress(settings)),
            "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
            "startup_s": _since_process_start_s(),
        },
    )


def _since_process_start_s() -> float | None:
    """Seconds since the kernel started this process, interpreter start-up
    included; None where /proc does not say."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            # The fields after the command name, which may hold spaces;
            # the start time is the 22nd field of the line.
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as uptime:
            uptime_s = float(uptime.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return round(uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"), 2)


async def _run(settings: Settings, worker: Worker) -> Worker:
    await worker.run()
    log.info("node.stopped", extra={"node": settings.node_id, **worker.counts})
    return worker


async def serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    resolve_api_key(os.environ)
    if not await _audit_on_start(settings):
        return EXIT_FAILURE
    from .heartbeat import Heartbeat
    from .intake.redis_stream import RedisStreamIntake
    from .observe import Destination
    from .ratelimit.limiter import windows_for
    from .sink.redis_stream import RedisStreamSink

    keys = c.Keys(settings.prefix)
    stopping = asyncio.Event()
    client: Client | None = None
    executor: Executor | None = None
    api: PendingClient | None = None
    beating: asyncio.Task[None] | None = None
    try:
        # Every task in flight may settle at once, plus the reader, the keeper
        # and the heartbeat.
        client = await open_redis(
            settings.redis_url,
            prefix=settings.prefix,
            max_connections=settings.concurrency + 8,
        )
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
            results_max_len=settings.results_max_len,
            dead_max_len=settings.dead_max_len,
        )
        destination = Destination(keys.tasks, "redis", settings.group)
        executor, api = _executor(settings, destination, (client, intake.link))
        worker = _worker(settings, intake, sink, executor, stopping)
        heartbeat = Heartbeat(
            client,
            keys,
            node_id=settings.node_id,
            group=settings.group,
            report=lambda: {**worker.report(), **_lost(executor)},
            stream=executor.observer.stream,
            limits={w.name: w.limit for w in windows_for(settings)},
        )
        beating = asyncio.create_task(heartbeat.run(stopping))
        await _run(settings, worker)
    except RedisError as exc:
        return _redis_failed(settings, exc)
    finally:
        stopping.set()
        if beating is not None:
            await beating
        if client is not None:
            await client.aclose()
        await _close(executor, api)
    return EXIT_OK


async def interactive(args: argparse.Namespace) -> int:
    from .observe import Destination

    settings = _settings(args)
    executor, api = _executor(settings, Destination("stdin"))
    from .intake.lines import LineIntake
    from .sink.lines import LineSink

    intake = LineIntake(sys.stdin.fileno(), max_line_bytes=settings.max_task_bytes)
    try:
        worker = _worker(settings, intake, LineSink(sys.stdout.buffer), executor)
        await _run(settings, worker)
    finally:
        await _close(executor, api)
    return EXIT_FAILURE if worker.output_closed else EXIT_OK


async def batch(args: argparse.Namespace) -> int:
    from .observe import Destination

    settings = _settings(args)
    if args.resume and args.output in (None, "-"):
        raise ConfigError("--resume needs --output FILE: the results it reads back")
    _refuse_same_file(args.file, args.output)
    done = None
    if args.resume:
        from .sink.lines import NotResultsError, answered

        try:
            done = answered(args.output)
        except OSError as exc:
            raise ConfigError(f"{args.output}: {exc.strerror}") from None
        except NotResultsError as exc:
            raise ConfigError(
                f"{args.output}: {exc}; --resume appends only to the output of "
                "an earlier batch run"
            ) from None
    name = "stdin" if args.file == "-" else os.path.basename(args.file)
    executor, api = _executor(settings, Destination(name))
    from .intake.lines import LineIntake
    from .progress import Progress, count_tasks
    from .sink.lines import LineSink

    with ExitStack() as stack:
        source = _open(stack, args.file, "rb", sys.stdin.buffer)
        target = _open(
            stack, args.output, "ab" if args.resume else "wb", sys.stdout.buffer
        )
        progress = None
        if args.progress_bar:
            progress = Progress(count_tasks(source))
            stack.callback(progress.close)
            stack.enter_context(progress.logs_above())
        sink = LineSink(
            target,
            ordered=args.ordered,
            # Room for results that overtake a slow task: enough that the
            # node keeps every slot busy past one straggler, bounded so that
            # memory does not grow with the file.
            window=4 * settings.concurrency,
            done=done,
            progress=progress,
        )
        intake = LineIntake(
            source.fileno(),
            max_line_bytes=settings.max_task_bytes,
            allow_array=True,
            on_finished=sink.finished,
        )
        try:
            worker = _worker(settings, intake, sink, executor)
            await _run(settings, worker)
        finally:
            await _close(executor, api)
    if worker.output_closed:
        return EXIT_FAILURE
    if not intake.exhausted:
        log.error(
            "batch.interrupted",
            extra={
                "reason": "stopped before the end of the file; later tasks "
                "have no result (--resume with the same --output finishes them)"
            },
        )
        return EXIT_FAILURE
    return EXIT_OK


def _refuse_same_file(source: str, output: str | None) -> None:
    """Refuses an output that is the tasks file itself: writing would empty
    it before it is read, and appending would feed results back in as tasks."""
    if output is None or output == "-":
        return
    try:
        target = os.stat(output)
        tasks = os.fstat(sys.stdin.fileno()) if source == "-" else os.stat(source)
    except (OSError, ValueError):
        # Whichever is missing or unreadable is reported when it is opened.
        return
    if (target.st_dev, target.st_ino) == (tasks.st_dev, tasks.st_ino):
        raise ConfigError(
            f"{output}: is the tasks file itself; write the results elsewhere"
        )


def _open(stack: ExitStack, path: str | None, mode: str, default: BinaryIO) -> BinaryIO:
    if path is None or path == "-":
        return default
    try:
        stream = cast(BinaryIO, stack.enter_context(open(path, mode)))  # noqa: SIM115
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    return stream


async def submit(args: argparse.Namespace) -> int:
    settings = _settings(args)
    keys = c.Keys(settings.prefix)
    client: Client | None = None
    with ExitStack() as stack:
        source = _open(stack, args.file, "rb", sys.stdin.buffer)
        try:
            client = await open_redis(
                settings.redis_url, prefix=settings.prefix, max_connections=4
            )
            after = await stream_end(client, keys)
            payloads = read_payloads(source.fileno(), args.file)
            submitted = await submit_tasks(
                client, keys, payloads, outage_s=args.timeout
            )
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
        except REDIS_FAILURES as exc:
            return _redis_failed(settings, exc)
        finally:
            if client is not None:
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


async def status(args: argparse.Namespace) -> int:
    from . import status as mesh_status
    from .ratelimit.limiter import windows_for

    settings = _settings(args)
    client: Client | None = None
    keys = c.Keys(settings.prefix)
    windows = windows_for(settings)
    stop = asyncio.Event()
    if args.watch:
        on_stop_signals(stop.set)
    clear = args.watch and not args.json and sys.stdout.isatty()
    try:
        while True:
            try:
                if client is None:
                    client = await open_redis_once(
                        settings.redis_url,
                        prefix=settings.prefix,
                        timeout_s=STATUS_TIMEOUT_S,
                    )
                report = await mesh_status.gather(client, keys, settings.group, windows)
            except REDIS_FAILURES as exc:
                if not args.watch:
                    return _redis_failed(settings, exc)
                # A watch outlives an outage: it says so and looks again.
                report = {"error": f"Redis unreachable ({type(exc).__name__})"}
            text = _status_text(report, as_json=args.json, url=settings.redis_url)
            # Home and clear: a watched terminal shows one report, not a scroll.
            separator = "" if args.json or clear or not args.watch else "\n"
            if not _print(("\x1b[H\x1b[2J" if clear else "") + text + separator):
                return EXIT_OK
            if not args.watch:
                return EXIT_OK
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.watch)
            if stop.is_set():
                return EXIT_OK
    finally:
        if client is not None:
            await client.aclose()


def _status_text(report: dict[str, Any], *, as_json: bool, url: str) -> str:
    from . import status as mesh_status

    if as_json:
        return orjson.dumps(report).decode()
    if "error" in report:
        return f"{report['error']} at {redact_url(url)}"
    return mesh_status.render(report)


def _print(text: str) -> bool:
    """Prints to stdout; False once the reader has gone (`status | head`)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Nothing more can be said; and the interpreter's own flush at exit
        # must not fail on the same pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return False
    return True


async def health(args: argparse.Namespace) -> int:
    import socket

    from . import status as mesh_status

    settings = _settings(args)
    node_id = args.node_id or os.environ.get("MESH_NODE_ID") or None
    # A health check must answer within the container's HEALTHCHECK timeout,
    # however Redis is doing.
    client: Client | None = None
    try:
        client = await open_redis_once(
            settings.redis_url, prefix=settings.prefix, timeout_s=HEALTH_TIMEOUT_S
        )
        healthy, line = await mesh_status.health(
            client, c.Keys(settings.prefix), node_id=node_id, host=socket.gethostname()
        )
    except REDIS_FAILURES as exc:
        healthy, line = (
            False,
            (
                f"unhealthy: cannot reach Redis at {redact_url(settings.redis_url)} "
                f"({type(exc).__name__}: {exc})"
            ),
        )
    finally:
        if client is not None:
            await client.aclose()
    print(line, flush=True)
    return EXIT_OK if healthy else EXIT_FAILURE


async def audit(args: argparse.Namespace) -> int:
    from .audit import Check, Status, run_audit

    try:
        settings = _settings(args)
        egress = _egress(settings)
        configuration = Check("configuration", Status.PASS, True, "valid")
    except ConfigError as exc:
        # The other checks still say what they find, under the defaults.
        settings, egress = Settings(), None
        found = "; ".join(str(exc).splitlines())
        configuration = Check("configuration", Status.FAIL, True, found)
    report = await asyncio.to_thread(run_audit, settings, egress=egress)
    report.checks.insert(0, configuration)
    print(
        orjson.dumps(report.as_dict()).decode() if args.json else report.render(),
        flush=True,
    )
    return EXIT_OK if report.passed else EXIT_FAILURE


def _egress(settings: Settings) -> EgressProxy | None:
    if settings.egress_proxy is None:
        return None
    return EgressProxy.parse(settings.egress_proxy)


async def _audit_on_start(settings: Settings) -> bool:
    """Runs the audit before serving when told to; False to refuse to start."""
    if settings.audit_on_start == "off":
        return True
    from .audit import Status, run_audit

    report = await asyncio.to_thread(run_audit, settings, egress=_egress(settings))
    failed = [c for c in report.checks if c.status is Status.FAIL]
    if not failed:
        log.info("audit.passed", extra={"checks": len(report.checks)})
        return True
    log.error(
        "audit.failed",
        extra={
            "refusing_to_start": settings.audit_on_start == "enforce",
            "failed": {c.name: c.found for c in failed},
        },
    )
    return settings.audit_on_start != "enforce"


async def simulate(args: argparse.Namespace) -> int:
    from .simulator import SimulatorConfig, keys_from_env, serve_forever

    try:
        config = SimulatorConfig(
            host=args.host,
            port=args.port,
            latency_ms=args.latency_ms,
            latency_jitter_ms=args.latency_jitter_ms,
            fail_rate=args.fail_rate,
            rpm=args.rpm,
            tpm=args.tpm,
            api_keys=keys_from_env(os.environ),
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
    except ValueError as exc:
        raise ConfigError(f"simulate-api: {exc}") from None
    stop = asyncio.Event()
    on_stop_signals(stop.set)
    try:
        await serve_forever(config, stop)
    except OSError as exc:
        log.error("simulator.failed", extra={"port": args.port, "error": str(exc)})
        return EXIT_FAILURE
    return EXIT_OK


def _redis_failed(settings: Settings, error: Exception) -> int:
    log.error(
        "redis.failed",
        extra={"url": redact_url(settings.redis_url), "error": str(error)},
    )
    return EXIT_FAILURE


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
