"""One way to Redis (issue 15): URL forms, Sentinel settings for Celery, the eviction-policy check, WAIT."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from pixq.client import CLI_WRITE_RETRIES, CLIENT_RETRIES, READ_RETRIES, Client
from pixq.console import CLI_CONNECT_TIMEOUT_S, client_from_env
from pixq.durable import Durability
from pixq.errors import BrokerUnavailable, ConfigError, NotDurable
from pixq.redisconn import RedisEndpoint, check_memory_policy
from pixq.settings import Settings
from pixq.wire import celery_config
from redis.backoff import ExponentialWithJitterBackoff

from tests.apitools import api_limiter_hits
from tests.services import (
    S3Endpoint,
    Service,
    free_port,
    free_ports,
    pixq_argv,
    start_redis,
    start_sentinel,
)
from tests.support import make_certs, stack_env


def test_sentinel_url_is_parsed_for_records_and_celery() -> None:
    e = RedisEndpoint.parse("redis+sentinel://pixq:s%40cret@10.0.0.1:26379,10.0.0.2/mymaster/3")
    assert e.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379))
    assert (e.master_name, e.db, e.username, e.password) == ("mymaster", 3, "pixq", "s@cret")
    conf = celery_config(Settings(redis_url=e.url))
    assert conf["broker_url"] == ("sentinel://pixq:s%40cret@10.0.0.1:26379/3;"
                                  "sentinel://pixq:s%40cret@10.0.0.2:26379/3")
    assert conf["result_backend"] == conf["broker_url"]
    assert conf["broker_transport_options"]["master_name"] == "mymaster"
    assert conf["broker_transport_options"]["visibility_timeout"] > 0  # ours kept beside Sentinel's
    assert conf["result_backend_transport_options"]["master_name"] == "mymaster"
    tls = RedisEndpoint.parse("rediss+sentinel://h:26380/m?ssl_cert_reqs=required&sentinel_password=x")
    assert tls.tls == {"ssl_cert_reqs": "required"} and tls.sentinel_auth == {"password": "x"} and tls.db == 0
    assert celery_config(Settings(redis_url=tls.url))["broker_use_ssl"] == {"ssl_cert_reqs": "required"}
    plain = celery_config(Settings(redis_url="redis://:pw@h:6379/0"))
    assert plain["broker_url"] == "redis://:pw@h:6379/0" and "master_name" not in plain["broker_transport_options"]


@pytest.mark.parametrize("url, rule", [
    ("redis+sentinel://h1:26379/", "mastername"),
    ("redis+sentinel://h1:x/m/0", "is not host:port"),
    ("redis+sentinel://h1/m/zero", "mastername"),
    ("rediss+sentinel://h1/m/0", "ssl_cert_reqs"),
    ("http://h1/0", "must start with"),
])
def test_bad_redis_urls_name_the_variable(url: str, rule: str) -> None:
    with pytest.raises(ConfigError, match=rf"PIXQ_REDIS_URL.*{rule}"):
        Settings.from_env({"PIXQ_REDIS_URL": url})


def test_min_replicas_setting() -> None:
    assert Settings.from_env({}).redis_min_replicas is None
    assert Settings.from_env({"PIXQ_REDIS_MIN_REPLICAS": "1"}).redis_min_replicas == 1
    with pytest.raises(ConfigError, match="PIXQ_REDIS_MIN_REPLICAS"):
        Settings.from_env({"PIXQ_REDIS_MIN_REPLICAS": "-1"})


def test_wait_without_replicas_refuses_when_replicas_are_required(raw_redis: redis.Redis) -> None:
    assert Durability(raw_redis).required() == 0  # no replica connected: the default is 0
    assert Durability(raw_redis).run("a write", lambda p: p.set("pixq:test:durable", "1")) == [True]
    with pytest.raises(NotDurable, match=r"did not confirm a write on 1 replica\(s\) within 50 ms \(0 did\)"):
        Durability(raw_redis, min_replicas=1, timeout_ms=50).run("a write", lambda p: p.set("pixq:test:durable", "2"))
    raw_redis.delete("pixq:test:durable")


def test_an_evicting_redis_is_refused(tmp_path: Path, s3: S3Endpoint, tiny_model: str) -> None:
    svc, url = start_redis(tmp_path / "redis")
    try:
        conn = redis.Redis.from_url(url)
        check_memory_policy(conn)  # noeviction: fine
        conn.config_set("maxmemory-policy", "allkeys-lru")
        with pytest.raises(ConfigError, match="maxmemory-policy is 'allkeys-lru'.*set it to noeviction"):
            check_memory_policy(conn)
        # The worker refuses to start, one line, exit 2, before loading anything.
        done = subprocess.run(pixq_argv("worker", "--model", tiny_model), env=stack_env(url, s3, tiny_model),
                              capture_output=True, text=True, timeout=120)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode == ConfigError.exit_code, done.stderr
        assert len(errors) == 1 and "maxmemory-policy is 'allkeys-lru'" in errors[0], done.stderr
        assert "Traceback" not in done.stderr
        conn.close()
    finally:
        svc.stop()


@contextmanager
def unanswered_port() -> Iterator[int]:
    """A loopback port whose connects hang, as to a host behind a firewall that drops packets: its
    one-place accept queue is filled and never accepted from, so the kernel ignores further SYNs."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            yield port


def test_the_connect_timeout_is_the_callers_not_the_retry_counts() -> None:
    with unanswered_port() as port:
        client = Client(Settings.from_env({"PIXQ_REDIS_URL": f"redis://127.0.0.1:{port}/0"}), retries=0,
                        connect_timeout_s=0.3)
        start = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="Redis unreachable"):
            client.status("f" * 32)
        took = time.monotonic() - start
        client.close()
    assert 0.25 <= took < 1.5, took  # one attempt of 0.3 s (it was 2 s for any retries <= 3)


def test_commands_keep_their_short_budget_and_the_library_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    def budget(client: Client) -> tuple[int, float]:
        kwargs = client.conn.connection_pool.connection_kwargs
        return client.conn.get_retry().get_retries(), kwargs["socket_connect_timeout"]  # type: ignore[union-attr]

    monkeypatch.setenv("PIXQ_REDIS_URL", "redis://127.0.0.1:1/0")
    assert CLI_CONNECT_TIMEOUT_S == 2
    assert budget(client_from_env(read_only=True)) == (READ_RETRIES, 2) == (1, 2)
    assert budget(client_from_env()) == (CLI_WRITE_RETRIES, 2)
    settings = Settings.from_env({"PIXQ_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert budget(Client(settings, retries=READ_RETRIES)) == (1, 5)  # fewer retries, the same connect timeout


@contextmanager
def closing_server() -> Iterator[tuple[int, list[bytes]]]:
    """A loopback port that accepts each connection, reads what the client sends first and closes it:
    a TCP proxy in front of a Redis that is down. Yields the port and what each connection sent."""
    sent: list[bytes] = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)

        def serve() -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return  # closed: the test is over
                with conn:
                    conn.settimeout(0.5)
                    try:
                        sent.append(conn.recv(65536))
                    except OSError:
                        sent.append(b"")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield server.getsockname()[1], sent
        server.shutdown(socket.SHUT_RDWR)
    thread.join(5)


def test_a_client_reports_a_closed_port_within_one_retry_budget() -> None:
    """Issue 23: ``Client.submit`` on a closed port took 26 s: its replica count (``INFO``), the
    message's ``PING`` and an undo of a submit that had written nothing each spent the whole retry
    budget. Now one budget, of ``CLIENT_RETRIES`` jittered steps capped at 3 s (redisconn.py)."""
    settings = Settings.from_env({"PIXQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})  # nothing listens
    client = Client(settings)
    retry = client.conn.get_retry()
    assert retry is not None and retry.get_retries() == CLIENT_RETRIES == 4
    # At most 0.4 + 0.8 + 1.6 + 3 = 5.8 s of backoff in all, about 3 s on average.
    assert retry._backoff == ExponentialWithJitterBackoff(base=0.2, cap=3.0)
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=r"Redis unreachable: .*Connection refused.*; job not submitted"):
        client.submit("a closed port", width=128, height=128, num_inference_steps=2)
    took = time.monotonic() - start
    client.close()
    assert took < 15, f"{took:.1f} s"  # a loose regression guard: it was 26 s


def test_a_submit_to_a_dead_redis_behind_a_proxy_tries_once_per_retry_step() -> None:
    """Each attempt connects once and sends only the handshake; no write reaches the wire. Before, redis-py
    retried the connect's health-check PING inside each attempt of the command's retry with the same
    budget, (1 + 4) × (1 + 4) = 25 connections, and the failed submit's undo spent more."""
    with closing_server() as (port, sent):
        client = Client(Settings.from_env({"PIXQ_REDIS_URL": f"redis://127.0.0.1:{port}/0"}))
        with pytest.raises(BrokerUnavailable, match="Redis unreachable: Connection closed by server"):
            client.submit("behind a proxy", width=128, height=128, num_inference_steps=2)
        client.close()
        attempts = list(sent)
    assert len(attempts) == CLIENT_RETRIES + 1, attempts
    commands = {line.upper() for first in attempts for line in first.split(b"\r\n")[2:3]}
    assert commands <= {b"PING", b"HELLO", b"AUTH", b"SELECT", b"CLIENT"}, commands


@pytest.mark.parametrize("via", ["plain", "sentinel"])
def test_an_async_client_with_a_wrong_password_fails_at_once(via: str, tmp_path: Path) -> None:
    """A refused login is not retried (redis-py makes AuthenticationError a ConnectionError, which the
    API's asyncio clients retry through Sentinel): before, it was said after 6 backoff steps, 8 s."""
    redis_svc, url = start_redis(tmp_path / "redis", password="the-right-one")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    services: list[Service] = [redis_svc]
    try:
        if via == "plain":
            url = f"redis://:wrong@127.0.0.1:{port}/0"
        else:
            sentinel, sentinel_port = start_sentinel(tmp_path / "sentinel", port, password="the-right-one", quorum=1)
            services.append(sentinel)
            url = f"redis+sentinel://:wrong@127.0.0.1:{sentinel_port}/pixq/0"

        async def log_in() -> float:
            aconn = RedisEndpoint.parse(url).async_client(socket_timeout_s=5)  # as the API's request path
            start = time.monotonic()
            try:
                with pytest.raises(redis.AuthenticationError, match="invalid username-password pair"):
                    await aconn.ping()
                return time.monotonic() - start
            finally:
                await aconn.aclose()
                if via == "sentinel":  # the sentinels' connections too: left open, they warn in a later test's loop
                    for sentinel_conn in aconn.connection_pool.sentinel_manager.sentinels:
                        await sentinel_conn.aclose()

        took = asyncio.run(log_in())
    finally:
        for svc in reversed(services):
            svc.stop()
    assert took < 0.5, f"a refused login took {took:.1f} s"


def test_the_api_rate_limiter_logs_in_to_sentinels_that_ask_their_own_password(tmp_path: Path) -> None:
    """The API's rate limiter (the ``limits`` library) reaches the primary through sentinels with a
    password of their own (``?sentinel_password=``), in the URL's database. Before, it sent the data
    servers' password to the sentinels: every rate-limited submit answered 503 (MasterNotFoundError)."""
    redis_svc, url = start_redis(tmp_path / "redis", password="data-pw")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    services: list[Service] = [redis_svc]
    try:
        sentinel, sentinel_port = start_sentinel(tmp_path / "sentinel", port, password="data-pw", quorum=1,
                                                 sentinel_password="sentinel-pw")
        services.append(sentinel)
        sentinel_url = f"redis+sentinel://:data-pw@127.0.0.1:{sentinel_port}/pixq/2?sentinel_password=sentinel-pw"
        assert api_limiter_hits(sentinel_url, 3) == [True, True, False]
        with redis.Redis(port=port, password="data-pw", db=2) as conn:
            assert conn.keys("LIMITS:*"), "the limiter's window is not in the URL's database"
    finally:
        for svc in reversed(services):
            svc.stop()


def test_the_api_rate_limiter_speaks_tls_to_a_tls_sentinel_set(tmp_path: Path) -> None:
    """``rediss+sentinel://``: the limiter used plain TCP to TLS sentinels (MasterNotFoundError, a 503)."""
    make_certs(tmp_path)
    tls = [("tls-cert-file", tmp_path / "server.crt"), ("tls-key-file", tmp_path / "server.key"),
           ("tls-ca-cert-file", tmp_path / "ca.crt"), ("tls-auth-clients", "no")]
    port, sentinel_port = free_ports(2)
    argv = ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--dir", str(tmp_path), "--requirepass", "data-pw"]
    services = [Service("redis-tls", argv + [f"{x}" for k, v in tls for x in (f"--{k}", v)],
                        tmp_path / "redis.log").start()]
    try:
        conf = tmp_path / "sentinel.conf"
        conf.write_text("\n".join([
            "port 0", f"tls-port {sentinel_port}", "bind 127.0.0.1", f"dir {tmp_path}", "tls-replication yes",
            *(f"{k} {v}" for k, v in tls),
            f"sentinel monitor pixq 127.0.0.1 {port} 1", "sentinel auth-pass pixq data-pw"]) + "\n")
        services.append(Service("sentinel-tls", ["redis-server", str(conf), "--sentinel"],
                                tmp_path / "sentinel.log").start())
        url = (f"rediss+sentinel://:data-pw@127.0.0.1:{sentinel_port}/pixq/0"
               f"?ssl_cert_reqs=required&ssl_ca_certs={tmp_path}/ca.crt")

        def answers() -> bool:  # the records client reaches the primary through the sentinel
            with RedisEndpoint.parse(url).client(retries=0, connect_timeout_s=1) as conn:
                return bool(conn.ping())

        services[-1].wait_until(answers, 20)
        assert api_limiter_hits(url, 3) == [True, True, False]
    finally:
        for svc in reversed(services):
            svc.stop()
