"""Configuration: every key documented, unknown PAYLAB_* keys stop the start (with a
suggestion and an escape hatch), and link settings per upstream."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shared.errors import ConfigError
from shared.ops.settings import Settings, load_settings, unknown_keys
from shared.server.service import breaker_config, pool_config, retry_policy

ROOT = Path(__file__).resolve().parent.parent


def test_every_key_is_documented() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    missing = [k for k in Settings.model_fields if f"| `PAYLAB_{k.upper()}` |" not in doc]
    assert not missing, f"not in docs/configuration.md's table: {missing}"


def test_unknown_keys_are_named_with_the_closest_key() -> None:
    names = ["PAYLAB_HEARTBEAT_INTERVALL", "PAYLAB_LOG_LEVEL", "paylab_log_level", "HOME"]
    names += ["PAYLAB_TEST_POSTGRES_URL", "PAYLAB_LOAD_BILLS", "PAYLAB_ZZZZZZ"]
    found = unknown_keys(names)
    assert found == [
        "PAYLAB_HEARTBEAT_INTERVALL; did you mean PAYLAB_HEARTBEAT_INTERVAL?",
        "PAYLAB_ZZZZZZ",
    ]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for key in list(os.environ):
        if key.upper().startswith("PAYLAB_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_typo_in_the_environment_stops_the_start(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAYLAB_HEARTBEAT_INTERVALL", "3")
    with pytest.raises(ConfigError, match="did you mean PAYLAB_HEARTBEAT_INTERVAL") as exc:
        load_settings()
    assert "(environment)" in str(exc.value)
    assert "PAYLAB_ALLOW_UNKNOWN_KEYS" in str(exc.value)
    monkeypatch.setenv("PAYLAB_ALLOW_UNKNOWN_KEYS", "true")
    assert load_settings().heartbeat_interval == Settings.model_fields[
        "heartbeat_interval"
    ].get_default(call_default_factory=True)


def test_a_typo_in_the_env_file_stops_the_start(clean_env: Path) -> None:
    (clean_env / ".env").write_text("PAYLAB_LOG_LEVEL=warning\nPAYLAB_BREAKER_OPEN_WIAT=5\n")
    with pytest.raises(ConfigError, match=r"PAYLAB_BREAKER_OPEN_WIAT; did you mean") as exc:
        load_settings()
    assert "PAYLAB_BREAKER_OPEN_WAIT? (.env)" in str(exc.value)
    (clean_env / ".env").write_text("PAYLAB_LOG_LEVEL=warning\nPAYLAB_ALLOW_UNKNOWN_KEYS=1\n")
    assert load_settings().log_level == "warning"


def test_the_command_line_says_it_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PAYLAB_")}
    env["PAYLAB_HEARTBEAT_INTERVALL"] = "3"
    r = subprocess.run(
        [sys.executable, "-m", "shared.cli", "config"],
        env={**env, "COLUMNS": "300"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "did you mean PAYLAB_HEARTBEAT_INTERVAL?" in r.stderr
    assert "Traceback" not in r.stderr


def lab(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_link_settings_per_upstream() -> None:
    s = lab(
        breaker_open_wait=30,
        retry_max_attempts=3,
        upstream_hsm={"retry_max_attempts": 2, "breaker_open_wait": 5, "pool_min_connections": 1},
        upstream_gateway={"heartbeat_interval": 7},
    )
    hsm = s.for_upstream("hsm")
    assert (breaker_config(hsm).open_wait, retry_policy(hsm).max_attempts) == (5, 2)
    assert pool_config(hsm).min_connections == 1
    billing = s.for_upstream("billing")
    assert (breaker_config(billing).open_wait, retry_policy(billing).max_attempts) == (30, 3)
    assert pool_config(s.for_upstream("gateway")).heartbeat_interval == 7
    assert pool_config(billing).heartbeat_interval == s.heartbeat_interval


def test_upstream_overrides_from_the_environment(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAYLAB_UPSTREAM_BILLING", '{"breaker_window": 50}')
    assert load_settings().for_upstream("billing").breaker_window == 50


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"retry_max_atempts": 2}, "did you mean retry_max_attempts"),
        ({"gateway_timeout": 5}, "not a pool, heartbeat, reconnect, retry or breaker setting"),
        ({"retry_max_attempts": 99}, "retry_max_attempts=99"),
        ({"breaker_failure_rate": 2}, "breaker_failure_rate=2"),
    ],
)
def test_bad_upstream_overrides_stop_the_start(override: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        lab(upstream_hsm=override)


def test_the_shipped_files_set_no_unknown_key() -> None:
    """The compose file, the Kubernetes manifests and the labs' env file would stop the
    start with a misspelt key: none has one."""
    files = [*(ROOT / "deploy").rglob("*.y*ml"), ROOT / "docs" / "labs" / "lab.env"]
    names: set[str] = set()
    for path in files:
        text = path.read_text()
        names |= set(re.findall(r"\b(PAYLAB_[A-Z0-9_]+)\s*[:=]", text))
        names |= set(re.findall(r"name:\s*(PAYLAB_[A-Z0-9_]+)", text))
    assert len(names) >= 10
    assert unknown_keys(sorted(names)) == []
