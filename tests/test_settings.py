"""Settings: four sources in a fixed order, one clear error naming a bad key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mesh_node.errors import ConfigError
from mesh_node.settings import load_settings, resolve_api_key

from .support import FAKE_KEY


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A configuration file that sets concurrency and a seed key."""
    path = tmp_path / "security-config.json"
    path.write_text(
        json.dumps({"concurrency": 3, "rateLimiting": {"maxRequestsPerMinute": 7}})
    )
    return path


def test_flag_beats_environment_beats_file_beats_default(config_file: Path) -> None:
    """Each source overrides the ones below it, key by key."""
    env = {"MESH_CONCURRENCY": "5"}
    assert load_settings({"concurrency": 9}, env, str(config_file)).concurrency == 9
    assert load_settings({}, env, str(config_file)).concurrency == 5
    from_file = load_settings({}, {}, str(config_file))
    assert from_file.concurrency == 3
    assert from_file.rate_limiting.max_requests_per_minute == 7
    assert from_file.rate_limiting.max_requests_per_hour == 100
    assert load_settings({}, {}, None).concurrency == 16


def test_config_path_from_environment(config_file: Path) -> None:
    """MESH_CONFIG names the configuration file when no flag does."""
    settings = load_settings({}, {"MESH_CONFIG": str(config_file)})
    assert settings.concurrency == 3


def test_seed_variables_keep_their_meaning() -> None:
    """The original container's variables set the matching seed keys."""
    env = {
        "CLAUDE_SANDBOX_MODE": "false",
        "CLAUDE_NETWORK_RESTRICTED": "false",
        "CLAUDE_FILESYSTEM_READONLY": "false",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:9",
    }
    settings = load_settings({}, env)
    assert settings.sandbox_mode is False
    assert settings.network_restricted is False
    assert settings.read_only_mode is False
    assert settings.api_base_url == "http://127.0.0.1:9"


def test_unknown_key_is_named(tmp_path: Path) -> None:
    """A misspelt key fails with its name and the file it is in."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"maxMemoryMb": 512}))
    with pytest.raises(ConfigError) as caught:
        load_settings({}, {}, str(path))
    assert (
        str(caught.value) == f"configuration error: maxMemoryMb ({path}): unknown key"
    )


def test_bad_nested_value_is_named(tmp_path: Path) -> None:
    """A bad value deep in the file names its full key path."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"rateLimiting": {"maxRequestsPerMinute": 0}}))
    with pytest.raises(ConfigError) as caught:
        load_settings({}, {}, str(path))
    assert str(caught.value) == (
        f"configuration error: rateLimiting.maxRequestsPerMinute ({path}): "
        "Input should be greater than or equal to 1"
    )


def test_bad_environment_value_names_the_variable() -> None:
    """A bad value from the environment names the variable it came from."""
    with pytest.raises(ConfigError, match=r"sandboxMode \(CLAUDE_SANDBOX_MODE\)"):
        load_settings({}, {"CLAUDE_SANDBOX_MODE": "maybe"})


@pytest.mark.parametrize(
    ("content", "problem"),
    [("{not json", "not valid JSON"), ("[1]", "must hold a JSON object")],
)
def test_unreadable_config_file_is_named(
    tmp_path: Path, content: str, problem: str
) -> None:
    """A configuration file that is not a JSON object fails naming the file."""
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=f"configuration file {path}: {problem}"):
        load_settings({}, {}, str(path))


def test_missing_explicit_config_file_fails(tmp_path: Path) -> None:
    """A configuration file that was asked for must exist."""
    with pytest.raises(ConfigError, match="cannot read it"):
        load_settings({}, {}, str(tmp_path / "absent.json"))


def test_api_key_sources(tmp_path: Path) -> None:
    """The key comes from a secret file first, then either variable."""
    key_file = tmp_path / "key"
    key_file.write_text(FAKE_KEY + "-file\n")
    both = {"ANTHROPIC_API_KEY": FAKE_KEY, "ANTHROPIC_API_KEY_FILE": str(key_file)}
    assert resolve_api_key(both).get_secret_value() == FAKE_KEY + "-file"
    assert resolve_api_key({"CLAUDE_API_KEY": FAKE_KEY}).get_secret_value() == FAKE_KEY
    assert FAKE_KEY not in repr(resolve_api_key({"ANTHROPIC_API_KEY": FAKE_KEY}))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {},
            "no API key: set ANTHROPIC_API_KEY, CLAUDE_API_KEY or "
            "ANTHROPIC_API_KEY_FILE",
        ),
        ({"ANTHROPIC_API_KEY": "   "}, "no API key"),
        (
            {"ANTHROPIC_API_KEY_FILE": "/nonexistent/key"},
            "cannot read /nonexistent/key",
        ),
    ],
)
def test_missing_api_key_is_a_config_error(env: dict[str, str], message: str) -> None:
    """No usable key anywhere is a configuration error that says where to put one."""
    with pytest.raises(ConfigError, match=message):
        resolve_api_key(env)


def test_empty_key_file_is_a_config_error(tmp_path: Path) -> None:
    """An empty secret file is refused rather than sent as an empty key."""
    key_file = tmp_path / "key"
    key_file.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        resolve_api_key({"ANTHROPIC_API_KEY_FILE": str(key_file)})
