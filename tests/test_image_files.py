"""The image's files: the Dockerfile's promises, the lock's hashes, and an API
key that run-container.sh never puts where `ps` or `inspect` could show it.

These read the files, and run run-container.sh against a stand-in engine that
records what it is asked; building and running the image is
scripts/verify-container.sh's job.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "docker-compose.yml"
RUNTIME_LOCK = ROOT / "requirements" / "runtime.lock"
TOOLS_LOCK = ROOT / "requirements" / "tools.lock"
RUN_CONTAINER = ROOT / "scripts" / "run-container.sh"
IMAGE_LIB = ROOT / "scripts" / "image-lib.sh"
LOCK_FOR_TARGET = ROOT / "scripts" / "lock_for_target.py"
DOCKERIGNORE = ROOT / ".dockerignore"

KEY_IN_CONTAINER = "/run/secrets/anthropic_api_key"
FAKE_KEY = "sk-ant-test-0123456789-never-on-a-command-line"
BASH = shutil.which("bash") or "/bin/bash"
SHA256 = re.compile(r"--hash=sha256:[0-9a-f]{64}\b")


@dataclass(frozen=True, slots=True)
class Instruction:
    """One Dockerfile instruction, its continuation lines joined."""

    keyword: str
    arguments: str


def _instructions(text: str) -> list[Instruction]:
    found: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        found.append(Instruction(keyword.upper(), " ".join(arguments.split())))
        pending = ""
    return found


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions."""
    return _instructions(DOCKERFILE.read_text(encoding="utf-8"))


def _runtime_stage(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions of the last stage, the one that ships."""
    starts = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    assert len(starts) >= 2, "the Dockerfile is not multi-stage"
    return instructions[starts[-1] :]


def _only(stage: list[Instruction], keyword: str) -> Instruction:
    matching = [ins for ins in stage if ins.keyword == keyword]
    assert len(matching) == 1, f"{len(matching)} {keyword} instructions"
    return matching[0]


def _runs(instructions: list[Instruction]) -> list[str]:
    return [ins.arguments for ins in instructions if ins.keyword == "RUN"]


def test_base_image_is_an_argument_with_a_slim_python_default(
    dockerfile: list[Instruction],
) -> None:
    """Every stage starts from BASE_IMAGE, python:3.12-slim unless told."""
    assert dockerfile[0] == Instruction("ARG", "BASE_IMAGE=python:3.12-slim")
    froms = [ins.arguments for ins in dockerfile if ins.keyword == "FROM"]
    assert froms
    assert all(arguments.startswith("${BASE_IMAGE}") for arguments in froms)


def test_runtime_stage_runs_as_uid_1000_in_the_workspace(
    dockerfile: list[Instruction],
) -> None:
    """The shipped stage runs as 1000:1000 in a workspace it creates itself."""
    stage = _runtime_stage(dockerfile)
    assert _only(stage, "USER").arguments == "1000:1000"
    assert _only(stage, "WORKDIR").arguments == "/tmp/claude-work"
    assert any(
        "install -d -o 1000 -g 1000 -m 0700 /tmp/claude-work" in run
        for run in _runs(stage)
    )


def test_runtime_stage_writes_nothing_at_run_time(
    dockerfile: list[Instruction],
) -> None:
    """No byte code is written, and temporary files go to the workspace."""
    env = " ".join(
        ins.arguments for ins in _runtime_stage(dockerfile) if ins.keyword == "ENV"
    )
    assert "PYTHONDONTWRITEBYTECODE=1" in env.split()
    assert "TMPDIR=/tmp/claude-work" in env.split()


def test_healthcheck_runs_mesh_node_health(dockerfile: list[Instruction]) -> None:
    """The health check is `mesh-node health`, exec form, with bounded timing."""
    healthcheck = _only(_runtime_stage(dockerfile), "HEALTHCHECK").arguments
    options, _, command = healthcheck.partition(" CMD ")
    assert json.loads(command) == ["mesh-node", "health"]
    for option in ("--interval=", "--timeout=", "--start-period=", "--retries="):
        assert option in options, f"HEALTHCHECK sets no {option.rstrip('=')}"


def test_entrypoint_is_mesh_node_serving_by_default(
    dockerfile: list[Instruction],
) -> None:
    """`mesh-node` is the entrypoint and `serve` its default command."""
    stage = _runtime_stage(dockerfile)
    assert json.loads(_only(stage, "ENTRYPOINT").arguments) == ["mesh-node"]
    assert json.loads(_only(stage, "CMD").arguments) == ["serve"]


def test_installs_come_only_from_the_wheelhouse_by_hash(
    dockerfile: list[Instruction],
) -> None:
    """Every pip install is offline and hash-checked; nothing is downloaded."""
    runs = _runs(dockerfile)
    installs = [
        part
        for run in runs
        for part in run.split("&&")
        if re.search(r"\bpip install\b", part)
    ]
    assert len(installs) >= 2, "the lock and the project wheel install apart"
    for install in installs:
        for flag in ("--no-index", "--require-hashes", "--only-binary=:all:"):
            assert flag in install, f"{flag} missing from: {install}"
    assert any("--requirement /tmp/runtime.lock" in i for i in installs)
    assert any("--no-deps" in i and "project.lock" in i for i in installs)
    fetchers = re.compile(r"\b(curl|wget|pip download|pip wheel|apt-get|apk)\b")
    assert not [run for run in runs if fetchers.search(run)]


def test_runtime_venv_loses_pip(dockerfile: list[Instruction]) -> None:
    """pip and setuptools are uninstalled from the venv that ships."""
    assert any(
        re.search(r"pip uninstall .*--yes pip setuptools", run)
        for run in _runs(dockerfile)
    )


def test_dockerignore_lets_only_the_wheelhouse_out_of_build() -> None:
    """The build context carries the wheelhouse but not the tools or secrets."""
    patterns = DOCKERIGNORE.read_text(encoding="utf-8").split()
    assert "build/*" in patterns
    assert "!build/wheelhouse" in patterns
    assert "secrets" in patterns


def _requirements(lock: Path) -> Iterator[str]:
    """A lock file's requirements, each joined from its continuation lines."""
    pending = ""
    for raw in lock.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        yield pending + line
        pending = ""
    assert not pending, f"{lock.name} ends inside a requirement"


def _name(requirement: str) -> str:
    match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==\S+", requirement)
    assert match, f"not pinned with ==: {requirement[:80]}"
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


@pytest.mark.parametrize("lock", [RUNTIME_LOCK, TOOLS_LOCK], ids=lambda p: p.name)
def test_every_locked_package_is_pinned_with_a_hash(lock: Path) -> None:
    """Each requirement in the lock pins one version and carries its hashes."""
    requirements = list(_requirements(lock))
    assert requirements, f"{lock.name} is empty"
    for requirement in requirements:
        _name(requirement)
        assert SHA256.search(requirement), f"no sha256: {requirement[:80]}"
        leftover = SHA256.sub("", requirement.split(";", 1)[-1])
        assert "--" not in leftover.replace("--hash", ""), requirement[:80]
    names = [_name(r) for r in requirements]
    assert len(names) == len(set(names)), "a package is locked twice"


def test_runtime_lock_covers_the_projects_dependencies() -> None:
    """Every dependency in pyproject.toml is in the runtime lock."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    wanted = {
        re.sub(r"[-_.]+", "-", re.split(r"[\s<>=!~;\[]", dep, maxsplit=1)[0]).lower()
        for dep in project["project"]["dependencies"]
    }
    locked = {_name(r) for r in _requirements(RUNTIME_LOCK)}
    assert wanted <= locked, f"missing from the lock: {sorted(wanted - locked)}"


def _lock_for(lock: Path, python: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(LOCK_FOR_TARGET), str(lock), python, "x86_64"],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.splitlines()


def test_wheelhouse_requirements_follow_the_targets_markers(tmp_path: Path) -> None:
    """A back-port behind a version marker is fetched only for the Python
    that needs it, and a package for another platform never."""
    hashed = " --hash=sha256:" + "0" * 64
    lock = tmp_path / "runtime.lock"
    lock.write_text(
        "# comment\n"
        f"plain==1.0 \\\n   {hashed}\n"
        f"backport==2.0 ; python_full_version < '3.11.3' \\\n   {hashed}\n"
        f"browser==3.0 ; sys_platform == 'emscripten' \\\n   {hashed}\n"
        "    # via plain\n",
        encoding="utf-8",
    )

    debian = _lock_for(lock, "3.11.2")
    slim = _lock_for(lock, "3.12.8")

    assert [line.split()[0] for line in debian] == ["plain==1.0", "backport==2.0"]
    assert [line.split()[0] for line in slim] == ["plain==1.0"]
    assert all(line.endswith(hashed) for line in debian + slim)


def _shell_array(name: str, engine: str) -> list[str]:
    done = subprocess.run(
        [
            BASH,
            "-c",
            f'repo_root="$1"; source "$2"; mapfile -t f < <({name} "$3");'
            ' printf "%s\\n" "${f[@]}"',
            "-",
            str(ROOT),
            str(IMAGE_LIB),
            engine,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.splitlines()


def _compose_node() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    node = loaded["services"]["node"]
    assert isinstance(node, dict)
    return node


def test_scripts_run_the_image_with_the_compose_files_restrictions() -> None:
    """The scripts' run flags say what the compose file's node service says."""
    node = _compose_node()
    assert node["read_only"] is True
    (tmpfs,) = node["tmpfs"]
    no_new_privileges = [o for o in node["security_opt"] if "no-new-privileges" in o]
    expected = [
        "--read-only",
        f"--tmpfs {tmpfs}",
        f"--user {node['user']}",
        *(f"--cap-drop {cap}" for cap in node["cap_drop"]),
        *(["--security-opt no-new-privileges"] if no_new_privileges else []),
        f"--memory {node['mem_limit']}",
        f"--cpus {node['cpus']}",
        f"--pids-limit {node['pids_limit']}",
    ]

    flags = " ".join(_shell_array("hardening_flags", "docker"))

    for flag in expected:
        assert flag in flags, f"{flag!r} missing from the scripts' run flags"


def test_podman_gets_the_same_workspace_in_its_own_words() -> None:
    """podman's tmpfs flag differs from Docker's only in how it names the owner."""
    docker = _shell_array("hardening_flags", "docker")
    podman = _shell_array("hardening_flags", "/usr/bin/podman")
    changed = [(d, p) for d, p in zip(docker, podman, strict=True) if d != p]
    assert changed == [
        (
            "/tmp/claude-work:size=100m,uid=1000,gid=1000,mode=0700",
            "/tmp/claude-work:size=100m,mode=0700,U",
        )
    ]


def test_run_container_source_puts_no_key_in_an_environment_flag() -> None:
    """No --env or -e in run-container.sh names a key variable but the file's."""
    text = RUN_CONTAINER.read_text(encoding="utf-8")
    env_flags = re.findall(r"(?:--env|\s-e)\s+(\S+)", text)
    assert env_flags, "run-container.sh passes no environment at all"
    for value in env_flags:
        if "API_KEY" in value:
            assert value.startswith('"ANTHROPIC_API_KEY_FILE='), value
    passed = re.search(r"passed_through=\(([^)]*)\)", text)
    assert passed, "no passed_through list"
    assert "KEY" not in passed.group(1)


STUB_ENGINE = """#!{python}
import json, os, stat, sys

args = sys.argv[1:]
if args[:1] == ["--runtime"]:
    args = args[2:]
record = {{"argv": args, "env_has_key": {key!r} in "\\0".join(os.environ.values())}}
if args[:1] == ["info"]:
    print("false" if os.getuid() == 0 else "true")
elif args[:1] == ["run"]:
    for i, arg in enumerate(args):
        if arg in ("--volume", "-v") and args[i + 1].endswith(":{target}:ro"):
            source = args[i + 1].rsplit(":", 2)[0]
            status = os.stat(source)
            record["key_file"] = source
            record["key_mode"] = stat.S_IMODE(status.st_mode)
            record["key_uid"] = status.st_uid
            with open(source, encoding="utf-8") as key:
                record["key_matches"] = key.read() == {key!r}
    if "--interactive" in args:
        record["stdin"] = sys.stdin.read()
with open(os.environ["STUB_LOG"], "a", encoding="utf-8") as log:
    log.write(json.dumps(record) + "\\n")
"""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What run-container.sh did, as the stand-in engine saw it."""

    status: int
    stderr: str
    calls: list[dict[str, Any]]

    def run_call(self) -> dict[str, Any]:
        runs = [call for call in self.calls if call["argv"][:1] == ["run"]]
        assert len(runs) == 1, self.stderr
        return runs[0]


def _run_container(
    tmp_path: Path, *args: str, env: dict[str, str], stdin: str = ""
) -> Outcome:
    engine = tmp_path / "bin" / "podman"
    engine.parent.mkdir(exist_ok=True)
    engine.write_text(
        STUB_ENGINE.format(
            python=sys.executable, key=FAKE_KEY, target=KEY_IN_CONTAINER
        ),
        encoding="utf-8",
    )
    engine.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    base = {
        k: v
        for k, v in os.environ.items()
        if "API_KEY" not in k and not k.startswith(("MESH_", "REDIS_", "OTEL_"))
    }
    done = subprocess.run(
        [BASH, str(RUN_CONTAINER), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={
            **base,
            "CONTAINER_ENGINE": str(engine),
            "STUB_LOG": str(log),
            "TMPDIR": str(tmp_path),
            "MESH_OCI_RUNTIME": "runc",
            **env,
        },
        timeout=60,
        check=False,
    )
    calls = (
        [json.loads(line) for line in log.read_text().splitlines()]
        if log.exists()
        else []
    )
    return Outcome(done.returncode, done.stderr, calls)


@pytest.mark.parametrize("variable", ["ANTHROPIC_API_KEY", "CLAUDE_API_KEY"])
def test_key_reaches_the_container_only_as_a_read_only_file(
    tmp_path: Path, variable: str
) -> None:
    """The key goes into a 0600 file mounted read-only, never into an argument
    or the engine's environment, and the file is gone after the run."""
    outcome = _run_container(tmp_path, "interactive", env={variable: FAKE_KEY})

    assert outcome.status == 0, outcome.stderr
    for call in outcome.calls:
        assert not any(FAKE_KEY in arg for arg in call["argv"]), call["argv"]
        assert not call["env_has_key"], "the engine inherited the key"
    run = outcome.run_call()
    assert run["key_matches"] is True
    assert run["key_mode"] == 0o600
    if os.getuid() == 0:
        assert run["key_uid"] == 1000, "uid 1000 in the container could not read it"
    else:
        assert "keep-id:uid=1000,gid=1000" in run["argv"]
    assert f"ANTHROPIC_API_KEY_FILE={KEY_IN_CONTAINER}" in run["argv"]
    assert not Path(run["key_file"]).exists(), "the key file outlived the run"


def test_hardened_run_has_no_network_by_default(tmp_path: Path) -> None:
    """interactive runs read-only, unprivileged and without a network."""
    outcome = _run_container(
        tmp_path, "interactive", env={"ANTHROPIC_API_KEY": FAKE_KEY}
    )

    argv = " ".join(outcome.run_call()["argv"])
    for flag in (
        "--network none",
        "--read-only",
        "--user 1000:1000",
        "--cap-drop ALL",
        "--security-opt no-new-privileges",
        "--pids-limit 128",
    ):
        assert flag in argv, f"{flag!r} missing from: {argv}"


def test_batch_sends_the_file_on_stdin(tmp_path: Path) -> None:
    """batch FILE feeds the file to `mesh-node batch -` and mounts nothing of it."""
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"id": "1", "prompt": "Hello Claude!"}\n', encoding="utf-8")

    outcome = _run_container(
        tmp_path, "batch", str(tasks), env={"ANTHROPIC_API_KEY": FAKE_KEY}
    )

    run = outcome.run_call()
    assert run["argv"][-2:] == ["batch", "-"]
    assert run["stdin"] == tasks.read_text(encoding="utf-8")
    assert not any(str(tasks) in arg for arg in run["argv"])


def test_a_run_without_a_key_stops_before_the_engine_runs(tmp_path: Path) -> None:
    """With no key anywhere, interactive exits 2 and starts no container."""
    outcome = _run_container(tmp_path, "interactive", env={})

    assert outcome.status == 2
    assert "no API key" in outcome.stderr
    assert not [call for call in outcome.calls if call["argv"][:1] == ["run"]]
