"""The compose stack's wiring: node to collector to Jaeger, the node's hardening,
and an API key that reaches the node only as a secret file.

These read the files alone; running the stack needs a Docker engine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from mesh_node.constants import DEFAULT_GRACE_PERIOD_S

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = ROOT / "docker"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"
SIM_OVERRIDE = COMPOSE_DIR / "compose.sim.yml"
COLLECTOR = ROOT / "config" / "otel-collector.yaml"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"

BASH = shutil.which("bash") or "/bin/bash"
SECRET = "anthropic_api_key"
WORKSPACE = "/tmp/claude-work"

Doc = dict[str, Any]


def _load(path: Path) -> Doc:
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict), f"{path.name} does not hold a mapping"
    return loaded


@pytest.fixture(scope="module")
def compose() -> Doc:
    """The main compose file."""
    return _load(COMPOSE)


@pytest.fixture(scope="module")
def sim() -> Doc:
    """The override that points the node at the simulator."""
    return _load(SIM_OVERRIDE)


@pytest.fixture(scope="module")
def collector() -> Doc:
    """The collector's configuration."""
    return _load(COLLECTOR)


def _service(doc: Doc, name: str) -> Doc:
    services = doc.get("services") or {}
    assert name in services, f"no service {name!r}"
    service = services[name]
    assert isinstance(service, dict)
    return service


def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping, from either compose syntax."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (str(item).partition("=") for item in raw)
        return {name: value for name, _, value in pairs}
    return {str(k): "" if v is None else str(v) for k, v in raw.items()}


def _networks(service: Mapping[str, Any]) -> set[str]:
    return set(service.get("networks") or ["default"])


def _host_and_port(address: str) -> tuple[str, int]:
    """The host and port of `host:port` or of a URL."""
    split = urlsplit(address if "//" in address else f"//{address}")
    assert split.hostname is not None, address
    assert split.port is not None, address
    return split.hostname, split.port


def _published(port: Any) -> tuple[str, str, int]:
    """The host address, host port and container port of one `ports` entry."""
    if isinstance(port, dict):
        return (
            str(port.get("host_ip", "")),
            str(port.get("published", "")),
            int(port["target"]),
        )
    parts = str(port).split("/")[0].rsplit(":", 2)
    padded = ["", "", *parts][-3:]
    return padded[0], padded[1], int(padded[2])


def _key_leaks(environment: Mapping[str, str]) -> list[str]:
    """The variables that hold an API key, by name or by the look of the value."""
    return [
        name
        for name, value in environment.items()
        if (name.upper().endswith("API_KEY") and value) or value.startswith("sk-")
    ]


def _exporter_targets(collector: Doc, pipeline: str) -> list[tuple[str, int]]:
    names = collector["service"]["pipelines"][pipeline]["exporters"]
    targets = []
    for name in names:
        assert name in collector["exporters"], f"exporter {name!r} is not defined"
        endpoint = (collector["exporters"][name] or {}).get("endpoint")
        if endpoint:
            targets.append(_host_and_port(endpoint))
    return targets


def test_node_exports_to_the_collector_over_otlp_http(
    compose: Doc, collector: Doc
) -> None:
    """The node's OTLP endpoint is the collector service's HTTP receiver, 4318."""
    env = _environment(_service(compose, "node"))
    host, port = _host_and_port(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert host == "otel-collector"
    assert port == 4318
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert env["OTEL_SERVICE_NAME"] == "mesh-node"

    protocols = collector["receivers"]["otlp"]["protocols"]
    assert _host_and_port(protocols["http"]["endpoint"]) == ("0.0.0.0", 4318)
    assert _host_and_port(protocols["grpc"]["endpoint"]) == ("0.0.0.0", 4317)
    assert _networks(_service(compose, host)) & _networks(_service(compose, "node"))


def test_collector_sends_traces_to_jaeger(compose: Doc, collector: Doc) -> None:
    """The traces pipeline ends in Jaeger's OTLP gRPC port, on a shared network."""
    traces = collector["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"]
    assert _exporter_targets(collector, "traces") == [("jaeger", 4317)]
    (name,) = traces["exporters"]
    assert name.split("/")[0] == "otlp"
    assert collector["exporters"][name]["tls"]["insecure"] is True

    jaeger = _service(compose, "jaeger")
    assert _networks(jaeger) & _networks(_service(compose, "otel-collector"))
    image = jaeger["image"]
    takes_otlp = image.startswith("jaegertracing/jaeger:2.") or (
        _environment(jaeger).get("COLLECTOR_OTLP_ENABLED") == "true"
    )
    assert takes_otlp, image


def test_metrics_go_to_the_debug_exporter(collector: Doc) -> None:
    """Metrics, which Jaeger does not take, end in the debug exporter only."""
    metrics = collector["service"]["pipelines"]["metrics"]
    assert metrics["exporters"] == ["debug"]
    assert "debug" in collector["exporters"]
    assert _exporter_targets(collector, "metrics") == []


@pytest.mark.parametrize("pipeline", ["traces", "metrics"])
def test_pipelines_limit_memory_before_batching(collector: Doc, pipeline: str) -> None:
    """memory_limiter comes first, so data is refused before batch holds it."""
    processors = collector["service"]["pipelines"][pipeline]["processors"]
    assert processors == ["memory_limiter", "batch"]
    limiter = collector["processors"]["memory_limiter"]
    assert limiter["limit_mib"] > limiter["spike_limit_mib"] > 0


def test_collector_reads_the_repository_config(compose: Doc) -> None:
    """The collector mounts config/otel-collector.yaml where its command looks."""
    service = _service(compose, "otel-collector")
    mounts = {}
    for volume in service["volumes"]:
        source, target = str(volume).split(":")[:2]
        mounts[target] = (COMPOSE_DIR / source).resolve()
    (config_arg,) = [a for a in service["command"] if a.startswith("--config=")]
    assert mounts[config_arg.removeprefix("--config=")] == COLLECTOR


def test_jaeger_ui_is_published_on_loopback_only(compose: Doc, sim: Doc) -> None:
    """16686 is published on 127.0.0.1, and no service publishes anything wider."""
    jaeger_ports = [_published(p) for p in _service(compose, "jaeger")["ports"]]
    assert ("127.0.0.1", "16686", 16686) in jaeger_ports
    for doc in (compose, sim):
        for name, service in doc["services"].items():
            for port in service.get("ports", []):
                assert _published(port)[0] == "127.0.0.1", (name, port)


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("read_only", True),
        ("user", "1000:1000"),
        ("cap_drop", ["ALL"]),
        ("mem_limit", "512m"),
        ("pids_limit", 128),
        ("restart", "unless-stopped"),
        ("command", ["serve"]),
    ],
)
def test_node_hardening(compose: Doc, setting: str, expected: object) -> None:
    """Each hardening setting of the node has its value."""
    assert _service(compose, "node").get(setting) == expected


def test_node_limits_cpu_and_privileges(compose: Doc) -> None:
    """Half a CPU, and no privilege gained through setuid binaries."""
    node = _service(compose, "node")
    assert float(node["cpus"]) == 0.5
    assert "no-new-privileges:true" in node["security_opt"]


def test_node_workspace_is_a_small_tmpfs_it_owns(compose: Doc) -> None:
    """The one writable place is a 100 MiB tmpfs owned by uid and gid 1000."""
    mounts = dict(
        str(m).partition(":")[::2] for m in _service(compose, "node")["tmpfs"]
    )
    assert set(mounts) == {WORKSPACE}
    options = dict(o.partition("=")[::2] for o in mounts[WORKSPACE].split(","))
    assert options["size"] == "100m"
    assert options["uid"] == "1000"
    assert options["gid"] == "1000"


def test_node_outlives_its_grace_period_on_stop(compose: Doc) -> None:
    """Docker waits longer than the node's grace period before SIGKILL."""
    grace = str(_service(compose, "node")["stop_grace_period"])
    assert grace.endswith("s")
    assert float(grace.removesuffix("s")) > DEFAULT_GRACE_PERIOD_S


def test_inner_services_are_on_an_internal_network_only(compose: Doc) -> None:
    """Redis, the node and the collector have no route out; Jaeger shares theirs."""
    networks = compose["networks"]
    internal = {name for name, net in networks.items() if (net or {}).get("internal")}
    assert internal
    for name in ("redis", "node", "otel-collector", "simulator"):
        assert _networks(_service(compose, name)) <= internal, name
    assert _networks(_service(compose, "jaeger")) & internal
    assert _networks(_service(compose, "node")) == {"mesh"}


def test_no_environment_holds_an_api_key(compose: Doc, sim: Doc) -> None:
    """No variable of any service, nor any build argument, carries a key."""
    for doc in (compose, sim):
        for name, service in doc["services"].items():
            assert "env_file" not in service, name
            assert _key_leaks(_environment(service)) == [], name
            build = service.get("build")
            args = build.get("args", {}) if isinstance(build, dict) else {}
            assert _key_leaks(_environment({"environment": args})) == [], name


def test_key_leak_check_catches_keys() -> None:
    """The check above flags a key by its variable name or by its value."""
    env = {
        "ANTHROPIC_API_KEY": "anything",
        "TOKEN": "sk-ant-api03-x",
        "ANTHROPIC_API_KEY_FILE": "/run/secrets/anthropic_api_key",
        "CLAUDE_API_KEY": "",
    }
    assert _key_leaks(env) == ["ANTHROPIC_API_KEY", "TOKEN"]


def test_key_arrives_as_a_secret_file(compose: Doc) -> None:
    """The node reads the key from a compose secret backed by secrets/ on the host."""
    node = _service(compose, "node")
    assert SECRET in node["secrets"]
    secret = compose["secrets"][SECRET]
    assert set(secret) == {"file"}
    assert (COMPOSE_DIR / secret["file"]).resolve() == ROOT / "secrets" / SECRET
    env = _environment(node)
    assert env["ANTHROPIC_API_KEY_FILE"] == f"/run/secrets/{SECRET}"


def test_secrets_stay_out_of_git_and_the_image() -> None:
    """The secrets folder is ignored by git and left out of the build context."""
    gitignore = (ROOT / ".gitignore").read_text(encoding="utf-8").split()
    dockerignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert "secrets/" in gitignore
    assert "secrets" in dockerignore


def test_simulator_runs_in_the_sim_profile_only(compose: Doc, sim: Doc) -> None:
    """The simulator needs `--profile sim`, and only the override points at it."""
    simulator = _service(compose, "simulator")
    node = _service(compose, "node")
    assert simulator["profiles"] == ["sim"]
    assert simulator["build"] == node["build"]
    command = simulator["command"]
    assert command[:3] == ["simulate-api", "--host", "0.0.0.0"]
    port = int(command[command.index("--port") + 1])

    assert "ANTHROPIC_BASE_URL" not in _environment(node)
    override = _service(sim, "node")
    base_url = _environment(override)["ANTHROPIC_BASE_URL"]
    assert urlsplit(base_url).scheme == "http"
    assert _host_and_port(base_url) == ("simulator", port)
    assert "simulator" in override["depends_on"]


def test_images_are_pinned(compose: Doc) -> None:
    """Every pulled image names a version, never `latest`."""
    for name, service in compose["services"].items():
        if "image" not in service:
            continue
        _, _, tag = service["image"].rpartition(":")
        assert tag != "latest", name
        assert any(ch.isdigit() for ch in tag), name


def test_image_user_and_workspace_match_the_compose_file(compose: Doc) -> None:
    """The image's final stage runs as the compose user, in the tmpfs workspace."""
    final_stage = DOCKERFILE.read_text(encoding="utf-8").rsplit("\nFROM ", 1)[1]
    instructions = [line.split(None, 1) for line in final_stage.splitlines()]
    last = {words[0]: words[1] for words in instructions if len(words) == 2}
    node = _service(compose, "node")
    assert last["USER"] == node["user"]
    assert last["WORKDIR"] == WORKSPACE
    assert last["ENTRYPOINT"] == '["mesh-node"]'
    assert last["CMD"] == '["serve"]'


def test_the_node_goes_out_only_through_the_egress_proxy(compose: Doc) -> None:
    """The node's proxy is the egress service, its only service with a way out."""
    node = _service(compose, "node")
    environment = node["environment"]
    assert environment["MESH_EGRESS_PROXY"] == "http://egress:3128"
    assert environment["MESH_AUDIT_ON_START"] == "enforce"
    # No DNS beyond the stack's own names, and IPv6 closed as well as IPv4.
    assert node["dns"] == ["127.0.0.1"]
    assert node["sysctls"]["net.ipv6.conf.all.disable_ipv6"] == 1
    egress = _service(compose, "egress")
    networks = compose["networks"]
    outside = {n for n, net in networks.items() if not (net or {}).get("internal")}
    assert _networks(egress) == {"mesh", "outbound"}
    assert networks["outbound"]["enable_ipv6"] is False
    for name, service in compose["services"].items():
        if name not in ("egress", "jaeger"):
            assert not _networks(service) & outside, name
    assert egress["read_only"] is True
    assert egress["cap_drop"] == ["ALL"]
    assert egress["security_opt"] == ["no-new-privileges:true"]


def test_the_proxy_allows_connect_to_the_allowed_apis_only() -> None:
    """The stack's Squid policy is current with allowedApis, and says no to the rest."""
    fresh = subprocess.run(
        [BASH, str(ROOT / "scripts" / "egress-config.sh"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert fresh.returncode == 0, fresh.stderr
    rules = [
        line
        for line in (ROOT / "config" / "squid.compose.conf").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    allowed = json.loads((ROOT / "config" / "security-config.json").read_text())
    assert f"acl allowed_apis dstdomain -n {' '.join(allowed['allowedApis'])}" in rules
    access = [line for line in rules if line.startswith("http_access")]
    assert access == [
        "http_access allow CONNECT api_port allowed_apis",
        "http_access deny all",
    ]
    assert "acl api_port port 443" in rules
    assert "cache deny all" in rules


def test_the_sim_overlay_takes_the_node_off_the_proxy(sim: Doc) -> None:
    environment = _service(sim, "node")["environment"]
    assert environment["MESH_EGRESS_PROXY"] == ""
    assert environment["ANTHROPIC_BASE_URL"] == "http://simulator:8787"
