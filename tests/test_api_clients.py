"""Non-Python clients: curl (tests/clients/curl_client.sh) and Node's fetch (tests/clients/fetch_client.mjs)
against `python -m pixq api` and the session's real worker: submit, follow SSE to the end, download the
image through the redirect, and (Node) receive a webhook and verify its signature."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.apitools import api_env, make_key, start_api
from tests.services import Service

CLIENTS = Path(__file__).parent / "clients"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(env: dict[str, str], worker: Service, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[str, dict[str, str], dict[str, str]]]:
    env_api = api_env(env)
    svc, base = start_api(env_api, tmp_path_factory.mktemp("clients") / "api.log")
    yield base, make_key(env_api, "clients"), env_api
    svc.stop()


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_client(live: tuple[str, dict[str, str], dict[str, str]], tmp_path: Path) -> None:
    base, key, env = live
    out = subprocess.run(["bash", str(CLIENTS / "curl_client.sh")], env={**env, "API": base, "KEY": key["key"],
                         "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=200)
    assert out.returncode == 0 and out.stdout.startswith("ok "), out.stdout + out.stderr


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node 18+")
def test_node_fetch_client(live: tuple[str, dict[str, str], dict[str, str]]) -> None:
    base, key, env = live
    out = subprocess.run(["node", str(CLIENTS / "fetch_client.mjs")],
                         env={**env, "API": base, "KEY": key["key"], "SECRET": key["webhook_secret"]},
                         capture_output=True, text=True, timeout=200)
    assert out.returncode == 0 and out.stdout.startswith("ok "), out.stdout + out.stderr
