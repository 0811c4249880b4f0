"""Every ``PIXQ_REDIS_URL`` form the README lists, against a real redis-server (issue 23, item 3).

One redis-server listens on a TCP port, a TLS port and a unix socket; a sentinel watches the TCP
port and a TLS sentinel the TLS port. Each form runs the real command line: ``pixq status`` (an
unknown id), ``pixq queue``, ``pixq submit``, ``pixq cancel`` and ``pixq retry`` (a message sent
through Celery's broker connection), and the job lands in the URL's database. Before the fix
every ``unix://`` command ended in a ``TypeError … socket_keepalive`` traceback, exit 1.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from pixq.errors import ConfigError, JobNotFound

from tests.apitools import api_limiter_hits
from tests.services import S3Endpoint, Service, free_ports, pixq_argv, redis_argv, start_sentinel, start_worker
from tests.support import env_without_pixq, make_certs, stack_env, wait_for

pytestmark = pytest.mark.slow

PASSWORD = "url-forms-pw-3c1"
UNKNOWN_ID = "f" * 32


@dataclass
class Servers:
    root: Path
    port: int
    tls_port: int
    socket: Path
    sentinel_port: int
    tls_sentinel_port: int

    def urls(self) -> dict[str, tuple[str, int]]:
        """Form → (URL, the database it names)."""
        ca = f"ssl_cert_reqs=required&ssl_ca_certs={self.root}/ca.crt"
        return {
            "redis": (f"redis://:{PASSWORD}@127.0.0.1:{self.port}/1", 1),
            "rediss": (f"rediss://:{PASSWORD}@127.0.0.1:{self.tls_port}/2?{ca}", 2),
            "unix": (f"unix://:{PASSWORD}@{self.socket}?db=3", 3),
            "redis+sentinel": (f"redis+sentinel://:{PASSWORD}@127.0.0.1:{self.sentinel_port}/pixq/4", 4),
            "rediss+sentinel": (f"rediss+sentinel://:{PASSWORD}@127.0.0.1:{self.tls_sentinel_port}/pixqtls/5?{ca}",
                                5),
        }

    def db(self, n: int) -> redis.Redis:
        return redis.Redis(port=self.port, password=PASSWORD, db=n, socket_connect_timeout=2)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    root = tmp_path_factory.mktemp("urls")
    make_certs(root)
    port, tls_port, tls_sentinel_port = free_ports(3)
    tls = [("tls-cert-file", root / "server.crt"), ("tls-key-file", root / "server.key"),
           ("tls-ca-cert-file", root / "ca.crt"), ("tls-auth-clients", "no")]
    sock = root / "redis.sock"
    argv = redis_argv(port, root, PASSWORD) + ["--unixsocket", str(sock), "--unixsocketperm", "700",
                                               "--tls-port", str(tls_port)]
    argv += [x for k, v in tls for x in (f"--{k}", str(v))]
    services = [Service("redis url forms", argv, root / "redis.log").start()]
    try:
        services[0].wait_until(lambda: bool(redis.Redis(unix_socket_path=str(sock), password=PASSWORD).ping()), 20)
        sentinel, sentinel_port = start_sentinel(root / "sentinel", port, password=PASSWORD, quorum=1)
        services.append(sentinel)
        conf = root / "sentinel-tls.conf"
        conf.write_text("\n".join([
            "port 0", f"tls-port {tls_sentinel_port}", "bind 127.0.0.1", f"dir {root}", "tls-replication yes",
            *(f"{k} {v}" for k, v in tls),
            f"sentinel monitor pixqtls 127.0.0.1 {tls_port} 1", f"sentinel auth-pass pixqtls {PASSWORD}"]) + "\n")
        services.append(Service("sentinel-tls", ["redis-server", str(conf), "--sentinel"],
                                root / "sentinel-tls.log").start())
        yield Servers(root, port, tls_port, sock, sentinel_port, tls_sentinel_port)
    finally:
        for svc in reversed(services):
            svc.stop()


def pixq(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(pixq_argv(*args), env={**env_without_pixq(), "PIXQ_REDIS_URL": url},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("form", ["redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel"])
def test_the_command_line_works_with_every_listed_url_form(servers: Servers, form: str) -> None:
    url, db = servers.urls()[form]
    if form == "rediss+sentinel":  # the TLS sentinel has found its primary
        wait_for(lambda: pixq(url, "queue").returncode == 0, 30, "the TLS sentinel to answer", poll_s=0.5)

    status = pixq(url, "status", UNKNOWN_ID)
    assert status.returncode == JobNotFound.exit_code, status.stderr
    assert status.stderr.splitlines() == [f"error: no job {UNKNOWN_ID!r} (never submitted, or expired)"]

    queue = pixq(url, "queue")
    assert queue.returncode == 0 and "Traceback" not in queue.stderr, queue.stderr

    submit = pixq(url, "submit", f"a {form} job", "--width", "128", "--height", "128", "--steps", "2")
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip()
    with servers.db(db) as conn:  # in the database the URL names
        assert conn.hget(f"pixq:job:{job_id}", "state") == b"queued"
        assert any(conn.llen(key) for key in conn.scan_iter("pixq.*")), "no message on a queue"

    assert pixq(url, "cancel", job_id).returncode == 0
    retry = pixq(url, "retry", job_id)  # sends its message through Celery's broker connection
    assert retry.returncode == 0, retry.stderr
    with servers.db(db) as conn:
        assert conn.hget(f"pixq:job:{job_id}", "state") == b"queued"


@pytest.mark.parametrize("url, rule", [
    ("rediss://127.0.0.1:6380/0", "must say how to check the server's certificate"),
    ("unix://", "has no socket path"),
    ("unix:///run/redis.sock?db=x", "Invalid value for 'db'"),
])
def test_incomplete_urls_are_refused_in_one_line(url: str, rule: str) -> None:
    done = pixq(url, "queue")
    assert done.returncode == ConfigError.exit_code, done.stderr
    assert len(done.stderr.splitlines()) == 1 and rule in done.stderr and "PIXQ_REDIS_URL" in done.stderr


def test_the_api_rate_limiter_works_over_a_unix_socket(servers: Servers) -> None:
    url, db = servers.urls()["unix"]
    assert api_limiter_hits(url, 3) == [True, True, False]
    with servers.db(db) as conn:
        assert conn.keys("LIMITS:*"), "the limiter's window is not in the URL's database"


def test_a_worker_renders_over_a_unix_socket(servers: Servers, s3: S3Endpoint, tiny_model: str,
                                             tmp_path: Path) -> None:
    url, db = servers.urls()["unix"]
    env = stack_env(url, s3, tiny_model, PIXQ_S3_PREFIX="unix-url")
    worker = start_worker(env, tiny_model, tmp_path / "worker.log", name="unix@urls")
    try:
        done = subprocess.run(pixq_argv("submit", "over a unix socket", "--width", "128", "--height", "128",
                                        "--steps", "2", "--wait", "--timeout", "120", "--json"),
                              env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        record = json.loads(done.stdout)
        assert (record["state"], record["worker"]) == ("succeeded", "unix@urls"), record
    finally:
        worker.stop()
    with servers.db(db) as conn:  # the record in the URL's database says so too
        assert conn.hget(f"pixq:job:{record['id']}", "state") == b"succeeded"


def test_a_worker_on_a_unix_socket_uses_the_reconnect_safe_transport(servers: Servers, s3: S3Endpoint,
                                                                     tiny_model: str) -> None:
    """kombu takes a ``redis+socket://`` URL's transport from the URL and ignores ``broker_transport``: the worker
    names its own (jobs/broker.py), or a Redis restart under a unix-socket worker stops it (celery#8030)."""
    from pixq.settings import Settings
    from pixq.worker.jobs.broker import Channel, Transport
    from pixq.worker.jobs.tasks import create_app

    url, db = servers.urls()["unix"]
    app = create_app(Settings.from_env(stack_env(url, s3, tiny_model)))
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        assert isinstance(conn.transport, Transport) and isinstance(channel, Channel)
        kwargs = channel.client.connection_pool.connection_kwargs
        assert (kwargs["path"], kwargs["db"]) == (str(servers.socket), db)
        assert channel.client.ping()
