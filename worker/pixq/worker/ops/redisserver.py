"""A ``redis-server`` on loopback, for ``pixq up`` (and the tests, which add replicas and Sentinels:
tests/services.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import redis
from pixq.worker.ops.service import Service, StackError, free_port, owner_only_dir


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise StackError("redis-server is not on PATH (Debian: apt-get install redis-server)")
    return binary


def redis_argv(port: int, data_dir: Path, password: str | None = None, persist: bool = False) -> list[str]:
    argv = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--save", ""]
    argv += ["--appendonly", "yes" if persist else "no", "--protected-mode", "yes"]
    if password:
        argv += ["--requirepass", password]
    return argv


def start_redis(
    data_dir: Path, port: int | None = None, password: str | None = None, persist: bool = False
) -> tuple[Service, str]:
    port = port or free_port()
    owner_only_dir(data_dir)  # the AOF and RDB files: every job record
    svc = Service("redis", redis_argv(port, data_dir, password, persist), data_dir / "redis.log").start()
    auth = f":{password}@" if password else ""
    url = f"redis://{auth}127.0.0.1:{port}/0"

    def answers() -> bool:
        with redis.Redis.from_url(url, socket_connect_timeout=1) as conn:
            return bool(conn.ping())

    svc.wait_until(answers, 20)
    return svc, url
