"""`mesh-node audit`: the node's security posture, checked from inside.

Every check reads what the kernel says about this very process (its
credentials, capabilities, seccomp mode, mounts, cgroup limits, routes) or
tries the thing it guards against (a write to the root filesystem, a
connection through the egress proxy). Nothing is taken from configuration
alone: a container started without `--read-only` fails the read-only check
whatever `readOnlyMode` says. Each check reports what it found.

The checks aim nothing at the outside world: egress is judged by asking the
configured proxy for CONNECTs it must allow or refuse, and by the routing
table, never by trying a direct connection.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .egress import EgressProxy, ProxyError
from .errors import ConfigError
from .settings import (
    API_KEY_FILE_VARIABLE,
    API_KEY_VARIABLES,
    Settings,
    resolve_api_key,
)

# A host that no allowlist holds, asked of the proxy to prove it refuses.
DISALLOWED_PROBE = ("example.com", 443)
# Mount points whose size limit proves the workspace cannot fill the host.
MAX_WORKSPACE_BYTES = 1 << 30
DEFAULT_API_URL = "https://api.anthropic.com"


class Status(enum.StrEnum):
    """How a check came out."""

    PASS = "pass"  # noqa: S105 - a check's outcome, not a password
    FAIL = "fail"
    WARN = "warn"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class Check:
    """One check's outcome.

    Args:
        name: stable identifier.
        status: pass, fail, warn (a non-required check failed) or skip.
        required: a failed required check fails the audit.
        found: what the check saw, in one line.
    """

    name: str
    status: Status
    required: bool
    found: str


@dataclass
class Report:
    """Every check, in order."""

    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """No required check failed."""
        return not any(c.status is Status.FAIL for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "checks": [{**asdict(c), "status": str(c.status)} for c in self.checks],
        }

    def render(self) -> str:
        width = max(len(c.name) for c in self.checks)
        lines = [f"{'check':<{width}}  result  found"]
        for check in self.checks:
            status = (
                check.status.upper() if check.status is Status.FAIL else check.status
            )
            lines.append(f"{check.name:<{width}}  {status:<6}  {check.found}")
        verdict = "passed" if self.passed else "FAILED: a required check failed"
        lines.append(f"audit {verdict}")
        return "\n".join(lines)


class Environment:
    """Where the checks read the facts; tests point it at files of their own.

    Args:
        proc: the procfs of this process's view (`/proc`).
        cgroup_root: the cgroup filesystem (`/sys/fs/cgroup`).
        environ: the process environment.
    """

    def __init__(
        self,
        proc: Path = Path("/proc"),
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.proc = proc
        self.cgroup_root = cgroup_root
        self.environ = os.environ if environ is None else environ

    def status_field(self, name: str) -> str | None:
        for line in (self.proc / "self" / "status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == name:
                return value.strip()
        return None

    def mounts(self) -> list[tuple[str, str, str, str]]:
        """(mount point, fs type, mount options, super options) of each mount."""
        mounts = []
        for line in (self.proc / "self" / "mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            parts, rest = left.split(), right.split()
            if len(parts) >= 6 and len(rest) >= 3:
                point = parts[4].replace("\\040", " ")
                mounts.append((point, rest[0], parts[5], rest[2]))
        return mounts


def run_audit(
    settings: Settings,
    env: Environment | None = None,
    *,
    egress: EgressProxy | None = None,
) -> Report:
    """Runs every check; never raises for what it finds."""
    env = env or Environment()
    report = Report()
    checks: list[tuple[str, Callable[[], Check]]] = [
        ("not_root", _not_root),
        ("no_new_privileges", partial(_no_new_privileges, env)),
        ("no_capabilities", partial(_no_capabilities, env)),
        ("seccomp", partial(_seccomp, env)),
        ("read_only_root", partial(_read_only_root, env, settings.read_only_mode)),
        ("workspace_tmpfs", partial(_workspace, env, settings.workspace_dir)),
        ("memory_limit", partial(_cgroup_limit, env, "memory", settings)),
        ("cpu_limit", partial(_cgroup_limit, env, "cpu", settings)),
        ("pids_limit", partial(_cgroup_limit, env, "pids", settings)),
        ("api_key", partial(_api_key, env)),
        ("api_host_allowed", partial(_api_host_allowed, settings)),
        (
            "no_direct_route",
            partial(_no_default_route, env, settings.network_restricted),
        ),
        *_egress_checks(settings, egress),
        ("vulnerability_scan", _vulnerability_scan),
    ]
    for name, check in checks:
        try:
            outcome = check()
        except Exception as exc:
            outcome = Check(
                name,
                Status.FAIL,
                True,
                f"the check itself failed: {type(exc).__name__}",
            )
        if not settings.sandbox_mode and outcome.required:
            # Outside a sandbox (sandboxMode false, for development) the
            # checks still say what they find, and fail nothing.
            status = Status.WARN if outcome.status is Status.FAIL else outcome.status
            outcome = Check(outcome.name, status, False, outcome.found)
        report.checks.append(outcome)
    return report


def _not_root() -> Check:
    uid, gid = os.geteuid(), os.getegid()
    ok = uid != 0
    return Check("not_root", _ok(ok), True, f"uid {uid}, gid {gid}")


def _no_new_privileges(env: Environment) -> Check:
    value = env.status_field("NoNewPrivs")
    return Check("no_new_privileges", _ok(value == "1"), True, f"NoNewPrivs {value}")


def _no_capabilities(env: Environment) -> Check:
    # A non-root process has no effective capabilities anyway; the bounding
    # set is what `--cap-drop ALL` empties, and what exec of a setuid or
    # file-capability binary could otherwise draw on.
    effective = env.status_field("CapEff") or ""
    bounding = env.status_field("CapBnd") or ""
    none = _is_zero_mask(effective) and _is_zero_mask(bounding)
    found = f"effective {effective or '?'}, bounding {bounding or '?'}"
    return Check("no_capabilities", _ok(none), True, found)


def _seccomp(env: Environment) -> Check:
    mode = env.status_field("Seccomp")
    names = {"0": "off", "1": "strict", "2": "filter"}
    found = f"seccomp {names.get(mode or '', mode or '?')}"
    return Check("seccomp", _ok(mode in ("1", "2")), True, found)


def _read_only_root(env: Environment, required: bool) -> Check:
    root = [m for m in env.mounts() if m[0] == "/"]
    options = root[-1][2].split(",") if root else []
    probe = _write_probe(Path("/"))
    ok = "ro" in options and probe == "refused: read-only file system"
    return Check(
        "read_only_root",
        _ok(ok, required),
        required,
        f"/ mounted {'ro' if 'ro' in options else 'rw'}; write probe {probe}",
    )


def _write_probe(directory: Path) -> str:
    target = directory / f".mesh-audit-{os.getpid()}"
    try:
        fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        if exc.errno == errno.EROFS:
            return "refused: read-only file system"
        return f"refused: {os.strerror(exc.errno or 0).lower()}"
    os.close(fd)
    with contextlib.suppress(OSError):
        target.unlink()
    return "succeeded"


def _workspace(env: Environment, workspace: str) -> Check:
    mounts = [m for m in env.mounts() if m[0] == workspace]
    if not mounts:
        return Check("workspace_tmpfs", Status.FAIL, True, f"{workspace} is no mount")
    _point, fstype, _options, super_options = mounts[-1]
    size = _option(super_options, "size")
    total = _statvfs_bytes(workspace)
    ok = fstype == "tmpfs" and total is not None and total <= MAX_WORKSPACE_BYTES
    writable = _write_probe(Path(workspace)) == "succeeded"
    size_text = f"{total / 1_048_576:.0f} MiB" if total is not None else "unknown size"
    return Check(
        "workspace_tmpfs",
        _ok(ok and writable),
        True,
        f"{workspace}: {fstype}, {size_text} (size={size or 'unset'}), "
        f"{'writable' if writable else 'not writable'}",
    )


def _statvfs_bytes(path: str) -> int | None:
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_blocks * stats.f_frsize


def _cgroup_limit(env: Environment, resource: str, settings: Settings) -> Check:
    limit = _cgroup_v2_limit(env, resource) or _cgroup_v1_limit(env, resource)
    name = f"{resource}_limit"
    if limit is None:
        return Check(name, Status.FAIL, True, f"no {resource} limit in the cgroup")
    if resource == "memory":
        cap = settings.max_memory_mb
        limit_bytes = _memory_limit_bytes(env)
        if limit_bytes is not None and limit_bytes > cap * 1_048_576:
            return Check(name, Status.FAIL, True, f"{limit}, above maxMemoryMB ({cap})")
    return Check(name, Status.PASS, True, limit)


def _memory_limit_bytes(env: Environment) -> int | None:
    for path, name in (
        (_own_cgroup(env, ""), "memory.max"),
        (_own_cgroup(env, "memory"), "memory.limit_in_bytes"),
    ):
        value = _read(path / name) if path is not None else None
        if value is not None and value.isdigit():
            return int(value)
    return None


def _api_host_allowed(settings: Settings) -> Check:
    host = urlsplit(settings.api_base_url or DEFAULT_API_URL).hostname or "?"
    required = settings.network_restricted
    ok = host in settings.allowed_apis
    found = f"{host} {'is' if ok else 'is not'} in allowedApis"
    return Check("api_host_allowed", _ok(ok, required), required, found)


def _cgroup_v2_limit(env: Environment, resource: str) -> str | None:
    path = _own_cgroup(env, "")
    if path is None:
        return None
    files = {"memory": "memory.max", "cpu": "cpu.max", "pids": "pids.max"}
    value = _read(path / files[resource])
    if value is None or value.startswith("max"):
        return None
    if resource == "memory":
        return f"memory.max {int(value) / 1_048_576:.0f} MB (cgroup v2)"
    if resource == "cpu":
        quota, period = (int(part) for part in value.split())
        return f"cpu.max {quota / period:g} CPU (cgroup v2)"
    return f"pids.max {value} (cgroup v2)"


def _cgroup_v1_limit(env: Environment, resource: str) -> str | None:
    controller = {"memory": "memory", "cpu": "cpu", "pids": "pids"}[resource]
    path = _own_cgroup(env, controller)
    if path is None:
        return None
    if resource == "memory":
        value = _read(path / "memory.limit_in_bytes")
        # v1 says "no limit" with a number near 2**63.
        if value is None or int(value) >= 1 << 60:
            return None
        return f"memory.limit_in_bytes {int(value) / 1_048_576:.0f} MB (cgroup v1)"
    if resource == "cpu":
        quota, period = (
            _read(path / "cpu.cfs_quota_us"),
            _read(path / "cpu.cfs_period_us"),
        )
        if quota is None or period is None or int(quota) <= 0:
            return None
        return f"cpu.cfs_quota_us {int(quota) / int(period):g} CPU (cgroup v1)"
    value = _read(path / "pids.max")
    if value is None or value == "max":
        return None
    return f"pids.max {value} (cgroup v1)"


def _own_cgroup(env: Environment, controller: str) -> Path | None:
    """This process's cgroup directory for a v1 controller, or v2 when ''."""
    try:
        lines = (env.proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _number, controllers, path = line.split(":", 2)
        if controller == "" and controllers == "":
            unified = env.cgroup_root / "unified"
            bases = [unified if unified.is_dir() else env.cgroup_root]
        elif controller and controller in controllers.split(","):
            # v1 mounts a controller alone or with others (`cpu,cpuacct`).
            bases = [env.cgroup_root / controller, env.cgroup_root / controllers]
        else:
            continue
        for base in bases:
            # Inside a cgroup namespace the path is "/", the mount's root.
            for candidate in (base / path.lstrip("/"), base):
                if candidate.is_dir():
                    return candidate
    return None


def _api_key(env: Environment) -> Check:
    try:
        key = resolve_api_key(env.environ).get_secret_value()
    except ConfigError as exc:
        return Check(
            "api_key", Status.FAIL, True, str(exc).removeprefix("configuration error: ")
        )
    key_file = env.environ.get(API_KEY_FILE_VARIABLE)
    in_environment = any(key in value for value in env.environ.values())
    on_command_line = key.encode() in _read_bytes(env.proc / "self" / "cmdline")
    if key_file:
        named = [name for name in API_KEY_VARIABLES if env.environ.get(name)]
        ok = not in_environment and not named and not on_command_line
        found = f"from the file {key_file}"
        if named or in_environment:
            found += (
                "; also in the environment (" + (", ".join(named) or "a value") + ")"
            )
    else:
        ok = False
        found = "from the environment, not from a file (set ANTHROPIC_API_KEY_FILE)"
    if on_command_line:
        found += "; on the command line"
    return Check("api_key", _ok(ok), True, found)


def _no_default_route(env: Environment, required: bool) -> Check:
    routes = []
    for table, default in (("route", "00000000"), ("ipv6_route", "0" * 32)):
        for line in _read_lines(env.proc / "net" / table)[
            1 if table == "route" else 0 :
        ]:
            parts = line.split()
            if not parts:
                continue
            if table == "route" and parts[1] == default and parts[7] == "00000000":
                routes.append(f"IPv4 default via {parts[0]}")
            if (
                table == "ipv6_route"
                and parts[0] == default
                and parts[1] == "00"
                and parts[-1] != "lo"
            ):
                routes.append(f"IPv6 default via {parts[-1]}")
    ok = not routes
    found = "no default route (IPv4 or IPv6)" if ok else "; ".join(sorted(set(routes)))
    return Check("no_direct_route", _ok(ok, required), required, found)


def _egress_checks(
    settings: Settings, egress: EgressProxy | None
) -> list[tuple[str, Callable[[], Check]]]:
    required = settings.network_restricted
    if egress is None:
        missing = Check(
            "egress_proxy",
            _ok(False, required),
            required,
            "no egress proxy configured (egressProxy, MESH_EGRESS_PROXY)",
        )
        return [("egress_proxy", lambda: missing)]
    checks: list[tuple[str, Callable[[], Check]]] = [
        (f"egress_allows {host}:443", partial(_allowed, egress, host, required))
        for host in settings.allowed_apis
    ]
    disallowed_host, disallowed_port = DISALLOWED_PROBE
    checks.append(
        (
            f"egress_refuses {disallowed_host}:{disallowed_port}",
            partial(
                _refused, egress, disallowed_host, disallowed_port, required=required
            ),
        )
    )
    first = settings.allowed_apis[0] if settings.allowed_apis else "api.anthropic.com"
    checks.append(
        (
            f"egress_refuses {first}:80",
            partial(_refused, egress, first, 80, required=required),
        )
    )
    return checks


def _allowed(egress: EgressProxy, host: str, required: bool) -> Check:
    name = f"egress_allows {host}:443"
    try:
        status = egress.probe(host, 443)
    except ProxyError as exc:
        return Check(name, _ok(False, required), required, f"proxy {egress}: {exc}")
    return Check(
        name, _ok(status == 200, required), required, f"CONNECT answered {status}"
    )


def _refused(egress: EgressProxy, host: str, port: int, *, required: bool) -> Check:
    name = f"egress_refuses {host}:{port}"
    try:
        status = egress.probe(host, port)
    except ProxyError as exc:
        return Check(name, _ok(False, required), required, f"proxy {egress}: {exc}")
    return Check(
        name, _ok(status != 200, required), required, f"CONNECT answered {status}"
    )


def _vulnerability_scan() -> Check:
    for scanner in ("trivy", "pip-audit"):
        if shutil.which(scanner):
            return _scan(scanner)
    return Check(
        "vulnerability_scan",
        Status.SKIP,
        False,
        "no scanner installed (trivy or pip-audit): the image was not scanned",
    )


def _scan(scanner: str) -> Check:
    command = (
        ["trivy", "rootfs", "--quiet", "--exit-code", "1", "/"]
        if scanner == "trivy"
        else ["pip-audit", "--progress-spinner", "off"]
    )
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("vulnerability_scan", Status.WARN, False, f"{scanner}: {exc}")
    tail = (done.stdout or done.stderr).strip().splitlines()[-1:] or [""]
    status = Status.PASS if done.returncode == 0 else Status.WARN
    return Check("vulnerability_scan", status, False, f"{scanner}: {tail[0][:200]}")


def _ok(ok: bool, required: bool = True) -> Status:
    if ok:
        return Status.PASS
    return Status.FAIL if required else Status.WARN


def _is_zero_mask(mask: str) -> bool:
    try:
        return int(mask, 16) == 0
    except ValueError:
        return False


def _option(options: str, name: str) -> str | None:
    for option in options.split(","):
        key, _, value = option.partition("=")
        if key == name:
            return value
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _read_lines(path: Path) -> list[str]:
    text = _read(path)
    return text.splitlines() if text else []
