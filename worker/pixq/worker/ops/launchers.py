"""Our own processes as local services: ``pixq worker``, Flower and ``pixq api``, each started through
the ``pixq`` CLI and returned once it serves.

The API's key is made the way an operator makes one, with ``pixq keys create`` in a child process: no
worker module imports the API's key store (``pixq.api`` is the producer's ``[api]`` extra).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import cast

from pixq.settings import Settings
from pixq.wire import WORKER_KEY_PREFIX
from pixq.worker.ops.argv import pixq_argv
from pixq.worker.ops.flower import FlowerOptions, flower_argv, flower_env
from pixq.worker.ops.service import Service, StackError, free_port, write_private


def start_worker(
    env: dict[str, str], model: str, log_path: Path, device: str = "cpu", name: str | None = None,
    extra: tuple[str, ...] = (), timeout_s: float = 120,
) -> Service:
    """``pixq worker`` as a child process; returns once it has loaded and consumes its queue."""
    args = ["worker", "--model", model, "--device", device, *extra]
    if name:
        args += ["--name", name]
    svc = Service(f"worker {name or device}", pixq_argv(*args), log_path, env=env).start()
    conn = Settings.from_env(env).redis_endpoint().client(retries=0, connect_timeout_s=1)

    def announced() -> bool:
        for key in conn.scan_iter(WORKER_KEY_PREFIX + "*"):
            seen = json.loads(cast("bytes | None", conn.get(key)) or "{}")
            if seen.get("pid") == svc.pid and seen.get("serving", True):
                return True
        return False

    try:
        svc.wait_until(announced, timeout_s)
    finally:
        conn.close()
    return svc


def start_flower(env: dict[str, str], port: int, user: str, password: str, log_path: Path) -> Service:
    """Flower on loopback with basic auth, as ``pixq flower`` runs it; credentials travel by
    environment, not argv."""
    options = FlowerOptions(port=port, address="127.0.0.1", basic_auth=f"{user}:{password}")
    svc = Service("flower", flower_argv(), log_path, env=flower_env(Settings.from_env(env), env, options)).start()

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
                return False  # open without a login: not the Flower we started
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code == 401

    svc.wait_until(answers, 60)
    return svc


def start_api(env: dict[str, str], root: Path) -> tuple[Service, str, str]:
    """``pixq api`` on loopback with a pepper kept in ``root`` (keys outlive a restart of the stack)
    and one fresh key with every scope (``pixq keys create``); returns the service, its URL and the key."""
    pepper_file = root / "api-pepper"  # it also derives the key that seals webhook secrets (api/secretbox.py)
    if not pepper_file.exists():
        write_private(pepper_file, secrets.token_hex(24))
    pepper_file.chmod(0o600)
    env.update({"PIXQ_API_KEY_PEPPER": pepper_file.read_text().strip()})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    svc = Service("api", pixq_argv("api", "--host", "127.0.0.1", "--port", str(port)), root / "api.log",
                  env=env).start()

    def answers() -> bool:
        with urllib.request.urlopen(url + "/healthz", timeout=1) as response:
            return bool(response.status == 200)

    svc.wait_until(answers, 60)
    return svc, url, create_api_key(env, f"up-{secrets.token_hex(3)}")


def create_api_key(env: dict[str, str], name: str) -> str:
    """A new API key with every scope, made by ``pixq keys create`` (what an operator runs)."""
    made = subprocess.run(pixq_argv("keys", "create", name, "--scope", "submit,read,admin", "--json"), env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if made.returncode != 0:
        last = (made.stderr.strip().splitlines() or ["nothing on stderr"])[-1]
        raise StackError(f"api: pixq keys create exited {made.returncode}: {last}")
    return str(json.loads(made.stdout)["key"])
