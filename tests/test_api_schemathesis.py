"""schemathesis against the live server's OpenAPI document: no 500s, responses match the document,
for every route, with and without a key (a bounded number of examples per route)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.apitools import api_env, make_key, start_api

pytestmark = pytest.mark.slow
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@pytest.fixture(scope="module")
def live(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    env_api = api_env(env)
    svc, base = start_api(env_api, tmp_path_factory.mktemp("schemathesis") / "api.log", "--no-relay")
    yield base, make_key(env_api, "schemathesis", "--scope", "submit,read")
    svc.stop()


@pytest.mark.parametrize("with_key", [True, False], ids=["with-key", "without-key"])
def test_schemathesis_finds_nothing(live: tuple[str, dict[str, str]], with_key: bool, tmp_path: Path) -> None:
    base, key = live
    auth = ["-H", f"Authorization: Bearer {key['key']}"] if with_key else []
    out = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run", f"{base}/openapi.json", "--checks", CHECKS,
         "--max-examples", "15", "--workers", "1", "--seed", "12", "--generation-database", "none",
         "--phases", "examples,fuzzing", "--request-timeout", "20", *auth],
        capture_output=True, text=True, timeout=280, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "13 selected" in out.stdout  # every route was tried
