"""The command line: help for every option, exit codes, and no key in any output."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from mesh_node.cli import build_parser
from mesh_node.commands import redact_url

from .support import FAKE_KEY, free_port, run_command

COMMANDS = ["serve", "interactive", "batch", "submit", "simulate-api"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_command_is_listed() -> None:
    """`mesh-node --help` lists every command."""
    done = run_command("--help", env={})
    assert done.returncode == 0
    for name in COMMANDS:
        assert name in done.stdout.decode()


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help(name: str) -> None:
    """Each command's --help describes every one of its options."""
    parser = _subparsers(build_parser())[name]
    done = run_command(name, "--help", env={})
    assert done.returncode == 0
    text = done.stdout.decode()
    for action in parser._actions:
        assert action.help, (name, action.option_strings or action.dest)
        for flag in action.option_strings:
            assert flag in text, (name, flag)


def _one_error_line(stderr: bytes) -> str:
    lines = stderr.decode().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_unknown_config_key_exits_2(node_env: dict[str, str], tmp_path: Path) -> None:
    """An unknown configuration key stops the node with exit 2 and its name."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rateLimiting": {"maxRequestsPerMinut": 5}}))
    done = run_command("serve", "--config", str(bad), env=node_env)
    assert done.returncode == 2
    assert _one_error_line(done.stderr) == (
        f"mesh-node: configuration error: rateLimiting.maxRequestsPerMinut ({bad}): "
        "unknown key"
    )


def test_bad_flag_value_exits_2(node_env: dict[str, str]) -> None:
    """A bad value on the command line is a configuration error naming the key."""
    done = run_command("interactive", "--concurrency", "0", env=node_env)
    assert done.returncode == 2
    assert _one_error_line(done.stderr) == (
        "mesh-node: configuration error: concurrency (command line): "
        "Input should be greater than or equal to 1"
    )


@pytest.mark.parametrize("name", ["serve", "interactive", "batch"])
def test_missing_api_key_exits_2(node_env: dict[str, str], name: str) -> None:
    """A node without an API key refuses to start, whatever the mode."""
    env = {k: v for k, v in node_env.items() if k != "ANTHROPIC_API_KEY"}
    args = [name, "-"] if name == "batch" else [name]
    done = run_command(*args, env=env)
    assert done.returncode == 2
    assert "no API key" in _one_error_line(done.stderr)


def test_unreachable_redis_exits_1_without_password(node_env: dict[str, str]) -> None:
    """Serve against a closed port fails with exit 1; the log hides the password."""
    url = f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0"
    done = run_command("serve", env={**node_env, "REDIS_URL": url})
    assert done.returncode == 1
    assert b"hunter2-secret" not in done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines()]
    assert events[-1]["event"] == "redis.failed"


def test_redact_url_hides_only_the_password() -> None:
    """Redaction keeps host, port, user and database, and masks the password."""
    assert redact_url("redis://u:pw@h:1/2") == "redis://u:***@h:1/2"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


def test_api_key_never_reaches_output(node_env: dict[str, str]) -> None:
    """Neither stdout nor stderr carries the key, on success or on a 401."""
    tasks = [
        {"id": "ok", "prompt": "hello"},
        {"id": "denied", "prompt": "[[sim:status=401]] nope"},
        {"id": "bad", "prompt": 5},
    ]
    stdin = b"".join(json.dumps(task).encode() + b"\n" for task in tasks)
    done = run_command("interactive", "--log-level", "debug", env=node_env, stdin=stdin)
    assert done.returncode == 0
    assert len(done.stdout.splitlines()) == 3
    for stream in (done.stdout, done.stderr):
        assert FAKE_KEY.encode() not in stream
        assert FAKE_KEY[-12:].encode() not in stream
