"""Plain helpers the tests import: a child's environment, waiting on a condition, files kept after a run,
test certificates, and reading a Prometheus page.

Fixtures live in ``tests/conftest.py`` and the fixture plugins under ``tests/fixtures/`` (registered there
with ``pytest_plugins``); a test module imports helpers from here or ``tests/apitools.py``, never from another
test module nor from a conftest (tests/test_layout.py checks it).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.services import S3Endpoint

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

# The conftest fixtures that start (or need) real Redis, SeaweedFS or worker processes: a test that uses one is
# marked ``integration`` (conftest.py), and none is used under tests/unit/ (tests/test_layout.py).
SERVICE_FIXTURES = frozenset({"redis_url", "s3", "env", "settings", "worker", "client", "s3_client", "raw_redis",
                              "cluster"})


# -- a child process's environment ---------------------------------------------------------------


def env_without_pixq() -> dict[str, str]:
    """This process's environment less its ``PIXQ_`` settings: for a child that must take only the test's."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PIXQ_")}


def stack_env(redis_url: str, s3: S3Endpoint, model: str, **extra: str) -> dict[str, str]:
    """The environment of a worker, client or API on ``redis_url`` and ``s3`` serving ``model`` (no ``PIXQ_``
    or ``AWS_`` setting of this process leaks in); ``extra`` adds or overrides settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIXQ_", "AWS_"))}
    env.update(s3.env())
    env.update({"PIXQ_REDIS_URL": redis_url, "PIXQ_MODEL": model, "PIXQ_S3_PREFIX": "jobs",
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


# -- waiting and keeping ----------------------------------------------------------------------------


def wait_for(predicate: Any, timeout_s: float, what: str, poll_s: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned), or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


def write_artifact(name: str, data: bytes) -> Path:
    """Keep a file a person may want to look at after the run (tests/artifacts is git-ignored)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    path.write_bytes(data)
    return path


# -- TLS ------------------------------------------------------------------------------------------------


def make_certs(d: Path) -> None:
    """A test CA (``ca.crt``) and a server certificate for 127.0.0.1 and localhost (``server.crt``/``.key``)."""
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=pixq-test-ca")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")


# -- Prometheus pages --------------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """A metrics page's samples, by name and labels."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape(port: int, host: str = "127.0.0.1") -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        return str(answer.read().decode())


def http(url: str, auth: str | None = None, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
    """GET (or POST a JSON body); `auth` is "user:password" (basic) or an API key (bearer)."""
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode())
    if body is not None:
        request.add_header("Content-Type", "application/json")
    if auth and ":" in auth:
        request.add_header("Authorization", "Basic " + b64encode(auth.encode()).decode())
    elif auth:
        request.add_header("Authorization", f"Bearer {auth}")
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()
