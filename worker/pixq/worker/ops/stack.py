"""A whole local stack on loopback: Redis, SeaweedFS (S3), a worker, Flower and the HTTP API.

What ``pixq up`` and ``pixq demo`` run, and what the tests' fixtures start piece by piece
(tests/services.py), so what newcomers run is what the tests run. Every service is a real process in
its own process group (``service.Service``), stopped (TERM, then KILL) in reverse order; what they
write is owner-only. The pieces: ``redisserver``, ``seaweedfs``, ``launchers`` (worker, Flower, API),
``stacklock`` (one stack per ``--dir``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pixq.worker.ops.launchers import start_api, start_flower, start_worker
from pixq.worker.ops.redisserver import start_redis
from pixq.worker.ops.seaweedfs import start_seaweedfs
from pixq.worker.ops.service import Service, free_port


@dataclass
class Stack:
    """What ``pixq up`` started: endpoints, credentials and the processes."""

    root: Path
    env: dict[str, str]
    model: str
    device: str
    flower_url: str = ""
    flower_user: str = "admin"
    flower_password: str = ""
    api_url: str = ""  # the HTTP API, when the api extra is installed
    api_key: str = ""
    services: list[Service] = field(default_factory=list)

    def stop(self) -> None:
        for svc in reversed(self.services):
            svc.stop()
        self.services.clear()


@contextlib.contextmanager
def local_stack(
    root: Path, model: str, device: str = "cpu", with_flower: bool = True, say: Callable[[str], None] = print,
    with_api: bool = True,
) -> Iterator[Stack]:
    root.mkdir(parents=True, exist_ok=True)
    stack = Stack(root=root, env={}, model=model, device=device)
    try:
        redis_password = secrets.token_urlsafe(18)
        svc, redis_url = start_redis(root / "redis", password=redis_password, persist=True)
        stack.services.append(svc)
        say(f"redis      {redis_url.replace(redis_password, '***')}")
        svc, endpoint = start_seaweedfs(root / "s3")
        stack.services.append(svc)
        say(f"s3         {endpoint.url} bucket {endpoint.bucket}")
        env = {**os.environ, "PIXQ_REDIS_URL": redis_url, "PIXQ_MODEL": model, **endpoint.env()}
        stack.env = env
        say(f"worker     loading {model} on {device} ...")
        stack.services.append(start_worker(env, model, root / "worker.log", device=device))
        if with_flower:
            stack.flower_password = secrets.token_urlsafe(12)
            port = free_port()
            stack.services.append(
                start_flower(env, port, stack.flower_user, stack.flower_password, root / "flower.log")
            )
            stack.flower_url = f"http://127.0.0.1:{port}/"
        if with_api and importlib.util.find_spec("fastapi") is not None:
            svc, stack.api_url, stack.api_key = start_api(env, root)
            stack.services.append(svc)
        yield stack
    finally:
        stack.stop()
