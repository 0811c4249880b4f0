"""Shared fixtures: real redis-server, SeaweedFS and worker processes on loopback.

Expensive services are per session; tests that kill or restart a service start their own.

Tiers (markers, pyproject.toml): ``integration`` is added here to every test that uses a real service
(one of ``tests/support.py: SERVICE_FIXTURES``); ``slow`` (load, faults, browser, image builds, whole stacks, anything
over ~5 s) and ``gpu`` are marked in the test files. ``pytest -m "not slow"`` is the developer loop,
``pytest -m "not slow and not integration"`` the unit tests alone; CI runs everything.

Fixtures only: plain helpers (``wait_for``, ``stack_env``...) are in ``tests/support.py``. No test module
imports this one (tests/test_layout.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from pixq.client import Client
from pixq.settings import Settings

from tests.services import S3Endpoint, Service, start_redis, start_seaweedfs, start_worker
from tests.support import SERVICE_FIXTURES, stack_env

# Fixtures a few modules share, each a plugin module of its own (registered here: the top conftest).
pytest_plugins = ["tests.fixtures.api", "tests.fixtures.cluster"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from pixq.worker.gpu.testmodel import make_test_model

    return str(make_test_model(tmp_path_factory.mktemp("tiny-model")).resolve())


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same kind of pipeline with more layers: about 40 ms a step on one core."""
    from pixq.worker.gpu.testmodel import make_test_model

    return str(make_test_model(tmp_path_factory.mktemp("slow-model"), layers=8, heads=8).resolve())


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    svc, url = start_redis(tmp_path_factory.mktemp("redis"), password="test-redis-password-5d1e")
    yield url
    svc.stop()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    svc, endpoint = start_seaweedfs(tmp_path_factory.mktemp("s3"), bucket="pixq-test")
    yield endpoint
    svc.stop()


@pytest.fixture(scope="session")
def env(redis_url: str, s3: S3Endpoint, tiny_model: str) -> dict[str, str]:
    return stack_env(redis_url, s3, tiny_model)


@pytest.fixture(scope="session")
def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


@pytest.fixture(scope="session")
def worker(env: dict[str, str], tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    # Exact mode warms up before serving, fast mode while serving (tests/test_end_to_end.py checks the order).
    svc = start_worker(env, tiny_model, log, name="cpu-main@test", extra=("--warmup", "128x128"))
    yield svc
    svc.stop()


@pytest.fixture()
def client(settings: Settings) -> Iterator[Client]:
    c = Client(settings)
    yield c
    c.close()


@pytest.fixture(scope="session")
def s3_client(s3: S3Endpoint):  # type: ignore[no-untyped-def]
    from tests.services import s3_client_for

    client = s3_client_for(s3)
    yield client
    client.close()


@pytest.fixture()
def raw_redis(redis_url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()

