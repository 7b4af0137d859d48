"""What an operator can configure, merged from four sources and validated once.

Precedence, highest first: command-line flags, environment variables, the JSON
configuration file (`config/security-config.json` when present), defaults. The
original container's keys and variables keep their names and meaning. The API
key is not a setting: it never sits in a file the node reads as configuration,
and `resolve_api_key` reads it from the environment or a secret file.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from . import constants as c
from .errors import ConfigError

_SECTION = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RateLimiting(BaseModel):
    """Requests the node may send per window, for its API key."""

    model_config = _SECTION

    max_requests_per_minute: int = Field(20, alias="maxRequestsPerMinute", ge=1)
    max_requests_per_hour: int = Field(100, alias="maxRequestsPerHour", ge=1)
    max_input_tokens_per_minute: int | None = Field(
        None, alias="maxInputTokensPerMinute", ge=1
    )
    max_output_tokens_per_minute: int | None = Field(
        None, alias="maxOutputTokensPerMinute", ge=1
    )
    on_long_wait: Literal["fail", "release"] = Field("fail", alias="onLongWait")


class ModelPrice(BaseModel):
    """What one model costs, in dollars per million tokens."""

    model_config = _SECTION

    input_per_mtok: float = Field(alias="inputPerMTok", ge=0)
    output_per_mtok: float = Field(alias="outputPerMTok", ge=0)


class Budget(BaseModel):
    """Caps on what the node may spend; none by default."""

    model_config = _SECTION

    tokens_per_hour: int | None = Field(None, alias="tokensPerHour", ge=1)
    tokens_per_day: int | None = Field(None, alias="tokensPerDay", ge=1)
    usd_per_hour: float | None = Field(None, alias="usdPerHour", gt=0)
    usd_per_day: float | None = Field(None, alias="usdPerDay", gt=0)
    on_exceeded: Literal["hold", "fail"] = Field("hold", alias="onExceeded")
    prices: dict[str, ModelPrice] = Field(default_factory=dict, alias="prices")

    @model_validator(mode="after")
    def _costs_need_prices(self) -> Budget:
        if (self.usd_per_hour or self.usd_per_day) and not self.prices:
            raise ValueError("a dollar budget needs 'prices' for the models it covers")
        return self


class Retry(BaseModel):
    """How hard the node tries one API call before the task fails."""

    model_config = _SECTION

    max_attempts: int = Field(c.DEFAULT_MAX_ATTEMPTS, alias="maxAttempts", ge=1, le=20)
    max_total_s: float = Field(c.DEFAULT_RETRY_MAX_TOTAL_S, alias="maxTotalS", gt=0)


class Settings(BaseModel):
    """The node's validated configuration; field aliases are the file's keys."""

    model_config = _SECTION

    # The original container's keys.
    max_memory_mb: int = Field(512, alias="maxMemoryMB", ge=64)
    max_execution_time_ms: int = Field(
        c.DEFAULT_MAX_EXECUTION_TIME_MS, alias="maxExecutionTimeMs", ge=100
    )
    allowed_apis: tuple[str, ...] = Field(("api.anthropic.com",), alias="allowedApis")
    workspace_dir: str = Field("/tmp/claude-work", alias="workspaceDir")  # noqa: S108
    read_only_mode: bool = Field(True, alias="readOnlyMode")
    network_restricted: bool = Field(True, alias="networkRestricted")
    sandbox_mode: bool = Field(True, alias="sandboxMode")
    rate_limiting: RateLimiting = Field(
        default_factory=RateLimiting, alias="rateLimiting"
    )

    # Where the node works.
    redis_url: str = Field(c.DEFAULT_REDIS_URL, alias="redisUrl", min_length=1)
    prefix: str = Field(c.DEFAULT_PREFIX, alias="prefix", max_length=64)
    group: str = Field(c.DEFAULT_GROUP, alias="group", min_length=1, max_length=128)
    node_id: str = Field(default_factory=lambda: default_node_id(), alias="nodeId")
    concurrency: int = Field(c.DEFAULT_CONCURRENCY, alias="concurrency", ge=1, le=4096)
    api_base_url: str | None = Field(None, alias="apiBaseUrl")

    # What a task may ask for.
    default_model: str = Field(c.DEFAULT_MODEL, alias="defaultModel", min_length=1)
    allowed_models: tuple[str, ...] = Field((), alias="allowedModels")
    default_max_tokens: int = Field(
        c.DEFAULT_MAX_TOKENS, alias="defaultMaxTokens", ge=1
    )
    max_output_tokens: int = Field(
        c.DEFAULT_MAX_OUTPUT_TOKENS, alias="maxOutputTokens", ge=1
    )
    max_task_bytes: int = Field(c.DEFAULT_MAX_TASK_BYTES, alias="maxTaskBytes", ge=64)
    max_prompt_bytes: int = Field(
        c.DEFAULT_MAX_PROMPT_BYTES, alias="maxPromptBytes", ge=1
    )

    # How results and retries behave.
    result_retention_s: int = Field(
        c.DEFAULT_RESULT_RETENTION_S, alias="resultRetentionS", ge=1
    )
    results_max_len: int = Field(c.DEFAULT_RESULTS_MAX_LEN, alias="resultsMaxLen", ge=0)
    dead_max_len: int = Field(c.DEFAULT_DEAD_MAX_LEN, alias="deadLettersMaxLen", ge=0)
    retry: Retry = Field(default_factory=Retry, alias="retry")
    budget: Budget = Field(default_factory=Budget, alias="budget")
    grace_period_s: float = Field(c.DEFAULT_GRACE_PERIOD_S, alias="gracePeriodS", ge=0)
    max_deliveries: int = Field(
        c.DEFAULT_MAX_DELIVERIES, alias="maxDeliveries", ge=1, le=1000
    )
    claim_timeout_ms_setting: int | None = Field(None, alias="claimTimeoutMs", ge=100)

    # What the node tells its operator (the exporters are set by OTEL_*).
    trace_context: Literal["parent", "link"] = Field("parent", alias="traceContext")
    record_content: bool = Field(False, alias="recordContent")
    audit_log: str | None = Field(None, alias="auditLog", min_length=1)

    # The sandbox (`mesh-node audit`, docs/security.md).
    egress_proxy: str | None = Field(None, alias="egressProxy", min_length=1)
    audit_on_start: Literal["off", "warn", "enforce"] = Field(
        "off", alias="auditOnStart"
    )
    max_response_bytes: int = Field(
        c.DEFAULT_MAX_RESPONSE_BYTES, alias="maxResponseBytes", ge=1
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return url

    @field_validator("egress_proxy")
    @classmethod
    def _egress_form(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "unix:///")):
            raise ValueError("must be http://HOST:PORT or unix:///PATH")
        return url

    @model_validator(mode="after")
    def _no_key_in_clear(self) -> Settings:
        if (
            self.egress_proxy is not None
            and self.api_base_url is not None
            and self.api_base_url.startswith("http://")
        ):
            # A proxy forwards a plain-HTTP request as it is, headers and
            # all: the key would cross it in clear.
            raise ValueError(
                "apiBaseUrl: an http:// URL through the egress proxy would send "
                "the API key in clear; use https://"
            )
        return self

    @property
    def claim_timeout_ms(self) -> int:
        """How long an entry sits idle before another consumer may claim it.

        A running task's holder keeps its claim fresh, so this bounds only how
        long the tasks of a node that died wait to be picked up. By default a
        tenth of `maxExecutionTimeMs`, kept between 5 s and 60 s.
        """
        if self.claim_timeout_ms_setting is not None:
            return self.claim_timeout_ms_setting
        derived_ms = self.max_execution_time_ms // 10
        return max(c.MIN_CLAIM_TIMEOUT_MS, min(c.MAX_CLAIM_TIMEOUT_MS, derived_ms))


# Environment variables and the setting each one sets (design.md, "Configuration").
ENVIRONMENT = {
    "REDIS_URL": "redisUrl",
    "MESH_PREFIX": "prefix",
    "MESH_GROUP": "group",
    "MESH_NODE_ID": "nodeId",
    "MESH_CONCURRENCY": "concurrency",
    "MESH_DEFAULT_MODEL": "defaultModel",
    "ANTHROPIC_BASE_URL": "apiBaseUrl",
    "MESH_TRACE_CONTEXT": "traceContext",
    "MESH_RECORD_CONTENT": "recordContent",
    "MESH_AUDIT_LOG": "auditLog",
    "MESH_EGRESS_PROXY": "egressProxy",
    "MESH_AUDIT_ON_START": "auditOnStart",
    "CLAUDE_SANDBOX_MODE": "sandboxMode",
    "CLAUDE_NETWORK_RESTRICTED": "networkRestricted",
    "CLAUDE_FILESYSTEM_READONLY": "readOnlyMode",
}

API_KEY_VARIABLES = ("ANTHROPIC_API_KEY", "CLAUDE_API_KEY")
API_KEY_FILE_VARIABLE = "ANTHROPIC_API_KEY_FILE"


def default_node_id() -> str:
    """The host name and process id: unique per process on one Redis."""
    return f"{socket.gethostname()}-{os.getpid()}"


def load_settings(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    config_path: str | None = None,
) -> Settings:
    """Merges every source and validates the result once.

    Args:
        flags: settings given on the command line, keyed by file key; None
            values mean "not given".
        environ: the process environment.
        config_path: an explicit configuration file; None means the default
            file when it exists.

    Returns:
        The validated settings.

    Raises:
        ConfigError: a source is unreadable, a key is unknown or a value is bad;
            the message names the key and the source it came from.
    """
    path, file_values = _read_config_file(config_path, environ)
    env_values = {
        key: environ[name] for name, key in ENVIRONMENT.items() if environ.get(name)
    }
    flag_values = {key: value for key, value in flags.items() if value is not None}
    merged = _deep_merge(_deep_merge(file_values, env_values), flag_values)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(
            _describe(exc, path=path, env=env_values, flags=flag_values)
        ) from None


def _read_config_file(
    config_path: str | None, environ: Mapping[str, str]
) -> tuple[str | None, dict[str, Any]]:
    explicit = config_path or environ.get("MESH_CONFIG")
    path = Path(explicit or c.DEFAULT_CONFIG_PATH)
    if not explicit and not path.is_file():
        return None, {}
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(
            f"configuration file {path}: cannot read it ({exc.strerror})"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"configuration file {path}: not valid JSON ({exc})"
        ) from None
    if not isinstance(values, dict):
        raise ConfigError(f"configuration file {path}: must hold a JSON object")
    return str(path), values


def _deep_merge(low: Mapping[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(low)
    for key, value in high.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(
    exc: ValidationError,
    *,
    path: str | None,
    env: Mapping[str, Any],
    flags: Mapping[str, Any],
) -> str:
    """One line per problem, naming the key and where its value came from."""
    env_names = {key: name for name, key in ENVIRONMENT.items()}
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        top = str(error["loc"][0]) if error["loc"] else ""
        if top in flags:
            source = "command line"
        elif top in env:
            source = env_names[top]
        else:
            source = path or "defaults"
        problem = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        problem = problem.removeprefix("Value error, ")
        if not key:
            # A rule across keys names its keys in its own message.
            lines.append(f"configuration error: {problem}")
            continue
        lines.append(f"configuration error: {key} ({source}): {problem}")
    return "\n".join(lines)


def resolve_api_key(environ: Mapping[str, str]) -> SecretStr:
    """Finds the node owner's API key.

    A key file (`ANTHROPIC_API_KEY_FILE`, as container secrets provide) wins
    over the variables, so that a key mounted as a secret is not shadowed by a
    stale variable.

    Raises:
        ConfigError: no key anywhere, or the file is unreadable or empty. The
            message never contains any part of a key.
    """
    key_file = environ.get(API_KEY_FILE_VARIABLE)
    if key_file:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise ConfigError(
                f"configuration error: {API_KEY_FILE_VARIABLE}: cannot read "
                f"{key_file} ({reason})"
            ) from None
        if not key:
            raise ConfigError(
                f"configuration error: {API_KEY_FILE_VARIABLE}: {key_file} is empty"
            )
        return _checked(key, API_KEY_FILE_VARIABLE)
    for name in API_KEY_VARIABLES:
        if environ.get(name, "").strip():
            return _checked(environ[name].strip(), name)
    raise ConfigError(
        "configuration error: no API key: set ANTHROPIC_API_KEY, CLAUDE_API_KEY "
        "or ANTHROPIC_API_KEY_FILE"
    )


def _checked(key: str, source: str) -> SecretStr:
    """Refuses a key that could never be sent as a header (two lines, a tab),
    and one too short to be a key, which logs could not keep redacted."""
    if len(key) < 8:
        raise ConfigError(f"configuration error: {source}: too short to be an API key")
    if any(ch.isspace() or not ch.isprintable() for ch in key):
        raise ConfigError(
            f"configuration error: {source}: the key holds whitespace or control "
            "characters"
        )
    return SecretStr(key)
