"""Redis with an ACL user (the default user off) and TLS: the whole job path still works."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis
from pixq.client import Client
from pixq.records import JobState
from pixq.settings import Settings

from tests.services import S3Endpoint, Service, free_port, start_worker
from tests.support import make_certs, stack_env

pytestmark = pytest.mark.slow  # its own TLS Redis with an ACL user and a worker


def test_tls_and_an_acl_user(tmp_path: Path, s3: S3Endpoint, tiny_model: str) -> None:
    make_certs(tmp_path)
    port = free_port()
    svc = Service("redis-tls", [
        "redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--tls-cert-file", str(tmp_path / "server.crt"), "--tls-key-file", str(tmp_path / "server.key"),
        "--tls-ca-cert-file", str(tmp_path / "ca.crt"), "--tls-auth-clients", "no", "--dir", str(tmp_path),
        # An ACL user with a password; the passwordless default user is switched off.
        "--user", "default", "off", "--user", "pixq", "on", ">acl-secret-9f2", "~*", "&*", "+@all",
    ], tmp_path / "redis.log").start()
    url = f"rediss://pixq:acl-secret-9f2@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={tmp_path}/ca.crt"
    try:
        def answers() -> bool:
            with redis.Redis.from_url(url, socket_connect_timeout=1) as conn:
                return bool(conn.ping())

        svc.wait_until(answers, 20)
        plain = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
        try:
            plain.ping()
            raise AssertionError("a plaintext connection was accepted")
        except redis.RedisError:
            pass
        finally:
            plain.close()

        env = stack_env(url, s3, tiny_model, PIXQ_S3_PREFIX=f"tls-{uuid.uuid4().hex[:6]}")
        worker = start_worker(env, tiny_model, tmp_path / "worker.log", name="tls@test")
        client = Client(Settings.from_env(env))
        try:
            record = client.wait(client.submit("over TLS", width=128, height=128, num_inference_steps=2).id,
                                 timeout_s=60)
            assert record.state is JobState.succeeded and len(record.images) == 1
            assert "acl-secret-9f2" not in (tmp_path / "worker.log").read_text()
        finally:
            client.close()
            worker.stop()
    finally:
        svc.stop()
