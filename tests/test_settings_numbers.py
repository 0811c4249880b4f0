"""Every numeric setting refuses NaN and infinity with the one-line ConfigError (issue 23, item 16):
``float("nan")`` passes every ``<`` check, and ``int(float("inf"))`` raises deep inside a command."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from pixq.api.config import API_ENV_VARS, ApiSettings
from pixq.errors import ConfigError
from pixq.settings import ENV_VARS, Settings

from tests.services import free_port

NOT_FINITE = ("nan", "NaN", "inf", "-inf", "Infinity", "1e999")


def numeric_vars(names: tuple[str, ...], build: Callable[[Mapping[str, str]], Any]) -> list[str]:
    """The variables whose value is a number (or numbers): found by setting each to a number, so that
    a setting added later is covered without listing it here."""
    default = build({}).model_dump()
    found = []
    for name in names:
        for probe in ("5", "5000"):  # some have a minimum
            try:
                changed = {k: v for k, v in build({name: probe}).model_dump().items() if v != default[k]}
            except ConfigError:
                continue
            values = [x for v in changed.values() for x in (v if isinstance(v, tuple) else (v,))]
            if values and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values):
                found.append(name)
            break
    return found


SETTINGS_NUMBERS = numeric_vars(ENV_VARS, Settings.from_env)
API_NUMBERS = numeric_vars(API_ENV_VARS, ApiSettings.from_env)


def test_the_numeric_settings_are_found() -> None:
    assert {"PIXQ_RETENTION_S", "PIXQ_LEASE_TTL_S", "PIXQ_REDIS_WAIT_TIMEOUT_MS"} <= set(SETTINGS_NUMBERS)
    assert {"PIXQ_API_MAX_BODY_BYTES", "PIXQ_WEBHOOK_TIMEOUT_S", "PIXQ_WEBHOOK_SCHEDULE_S",
            "PIXQ_API_REQUEST_TIMEOUT_S"} <= set(API_NUMBERS)


@pytest.mark.parametrize("value", NOT_FINITE)
@pytest.mark.parametrize(("var", "build"), [(v, Settings.from_env) for v in SETTINGS_NUMBERS]
                         + [(v, ApiSettings.from_env) for v in API_NUMBERS])
def test_a_numeric_setting_refuses_nan_and_infinity(var: str, build: Callable[[Mapping[str, str]], Any],
                                                    value: str) -> None:
    with pytest.raises(ConfigError) as info:
        build({var: value})
    assert str(info.value).startswith(f"{var}: ") and "\n" not in str(info.value)


def pixq(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pixq", *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("var", "value", "command"), [
    ("PIXQ_LEASE_TTL_S", "nan", ("status", "some-job")),
    ("PIXQ_API_MAX_BODY_BYTES", "nan", ("api", "--port", "0")),
    ("PIXQ_API_MAX_BODY_BYTES", "inf", ("api", "--port", "0")),
    ("PIXQ_WEBHOOK_TIMEOUT_S", "nan", ("keys", "list")),
    ("PIXQ_WEBHOOK_SCHEDULE_S", "5,inf", ("webhooks", "failed")),
])
def test_each_family_of_settings_stops_the_command_with_one_line(var: str, value: str, command: tuple[str, ...],
                                                                 env: dict[str, str]) -> None:
    """One command a family reads its settings in (the producer's, the API's), through the real CLI."""
    args = [a if a != "0" else str(free_port()) for a in command]
    done = pixq(*args, env={**env, "PIXQ_API_KEY_PEPPER": "p" * 16, var: value})
    assert done.returncode == ConfigError.exit_code, done.stderr
    assert done.stderr.strip().splitlines() == [f"error: {var}: {value!r} is not a finite number"] or (
        done.stderr.strip().startswith(f"error: {var}: ") and done.stderr.count("\n") == 1), done.stderr
    assert "Traceback" not in done.stderr and "serving on" not in done.stderr
