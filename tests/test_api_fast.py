"""The hot routes' fast path (pixq/api/fast.py) answers as the FastAPI routes do, on a real `pixq api`."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from pixq.records import OWNER_INDEX_PREFIX

from tests.apitools import SMALL, api_env, auth, job_keys, make_key, start_api
from tests.services import S3Endpoint, Service, pixq_argv, start_redis, start_replica
from tests.support import stack_env


@dataclass
class OwnRedisApi:
    """An API over a Redis of its own, which the test may stop or freeze; ``key`` is known to the API."""

    redis: Service
    base: str
    key: dict[str, str]


@pytest.fixture()
def own_redis_api(tmp_path: Path, s3: S3Endpoint, slow_model: str) -> Iterator[OwnRedisApi]:
    redis_svc, url = start_redis(tmp_path / "redis")
    try:
        env = api_env(stack_env(url, s3, slow_model))
        key = make_key(env, "own-redis")
        api_svc, base = start_api(env, tmp_path / "api.log")
        try:
            assert httpx.get(f"{base}/v1/jobs/{'f' * 32}", headers=auth(key)).status_code == 404  # the key is known
            yield OwnRedisApi(redis_svc, base, key)
        finally:
            api_svc.stop()
    finally:
        redis_svc.stop()


def test_submit_answers_the_record_that_a_read_returns(api: str, env_api: dict[str, str], slow_model: str) -> None:
    key = make_key(env_api, "fast-reader")
    r = httpx.post(f"{api}/v1/jobs", json={"prompt": "same record", "model_name": slow_model, **SMALL},
                   headers=auth(key))
    assert r.status_code == 201 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    assert r.headers["content-type"] == "application/json"
    read = httpx.get(f"{api}{r.headers['location']}", headers=auth(key))
    assert read.status_code == 200 and read.json() == r.json()
    assert read.json()["owner"] == key["id"] and read.json()["request"]["seed"] >= 0
    assert httpx.get(f"{api}{r.headers['location']}", headers=auth(key)).json() == r.json()  # the kept answer
    assert httpx.post(f"{api}{r.headers['location']}/cancel", headers=auth(key)).status_code == 200
    changed = httpx.get(f"{api}{r.headers['location']}", headers=auth(key)).json()
    assert changed["state"] == "canceled" and changed["finished_at"]  # the record changed: so does the answer
    metrics = httpx.get(f"{api}/metrics").text
    assert 'pixq_api_requests_total{code="201",method="POST",route="/v1/jobs"}' in metrics
    assert 'pixq_api_requests_total{code="200",method="GET",route="/v1/jobs/{job_id}"}' in metrics


def test_refusals_on_the_fast_path(api: str, env_api: dict[str, str], slow_model: str,
                                   raw_redis: redis.Redis) -> None:
    owner, other = make_key(env_api, "fast-owner"), make_key(env_api, "fast-other")
    admin = make_key(env_api, "fast-admin", "--scope", "admin")
    body = {"prompt": "refusals", "model_name": slow_model, **SMALL}
    job_id = httpx.post(f"{api}/v1/jobs", json=body, headers=auth(owner)).json()["id"]
    assert httpx.get(f"{api}/v1/jobs/{job_id}", headers=auth(other)).status_code == 404
    assert httpx.get(f"{api}/v1/jobs/{job_id}", headers=auth(admin)).status_code == 200
    assert httpx.get(f"{api}/v1/jobs/{'f' * 32}", headers=auth(owner)).status_code == 404
    wrong = {"Authorization": f"Bearer pixq_{owner['id']}_{'x' * 43}"}  # the right id, a wrong secret
    r = httpx.get(f"{api}/v1/jobs/{job_id}", headers=wrong)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    before = job_keys(raw_redis)
    assert httpx.post(f"{api}/v1/jobs", json=body, headers=wrong).status_code == 401
    assert httpx.post(f"{api}/v1/jobs", json={**body, "width": 7}, headers=auth(owner)).status_code == 422
    assert job_keys(raw_redis) == before
    # The key was seen (and is known to this process); revoked, it is refused by the next request.
    out = subprocess.run(pixq_argv("keys", "revoke", "fast-owner"), env=env_api, capture_output=True, timeout=60)
    assert out.returncode == 0
    r = httpx.get(f"{api}/v1/jobs/{job_id}", headers=auth(owner))
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    index = raw_redis.zcard(OWNER_INDEX_PREFIX + owner["id"])
    r = httpx.post(f"{api}/v1/jobs", json=body, headers=auth(owner))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert job_keys(raw_redis) == before and raw_redis.zcard(OWNER_INDEX_PREFIX + owner["id"]) == index


def test_idempotency_keys_on_the_fast_path(api: str, env_api: dict[str, str], slow_model: str,
                                          raw_redis: redis.Redis) -> None:
    key = make_key(env_api, "fast-idem", "--max-in-flight", "2")
    body = {"prompt": "once only", "model_name": slow_model, **SMALL}
    first = httpx.post(f"{api}/v1/jobs", json=body, headers={**auth(key), "Idempotency-Key": "i-1"})
    again = httpx.post(f"{api}/v1/jobs", json={**body, "idempotency_key": "i-1"}, headers=auth(key))
    assert (first.status_code, again.status_code) == (201, 200) and again.json() == first.json()
    before = job_keys(raw_redis)
    r = httpx.post(f"{api}/v1/jobs", json={**body, "idempotency_key": "i-2"},
                   headers={**auth(key), "Idempotency-Key": "i-3"})
    assert r.status_code == 422 and r.json()["fields"][0]["field"] == "idempotency_key"
    r = httpx.post(f"{api}/v1/jobs", json=body, headers={**auth(key), "Idempotency-Key": "x" * 201})
    assert r.status_code == 422
    assert job_keys(raw_redis) == before
    assert httpx.post(f"{api}/v1/jobs", json=body, headers=auth(key)).status_code == 201  # 2 in flight now
    r = httpx.post(f"{api}/v1/jobs", json=body, headers={**auth(key), "Idempotency-Key": "i-4"})
    assert r.status_code == 429 and not raw_redis.exists(f"pixq:idem:{key['id']}/i-4")  # the quota: nothing kept
    out = subprocess.run(pixq_argv("keys", "revoke", "fast-idem"), env=env_api, capture_output=True, timeout=60)
    assert out.returncode == 0
    r = httpx.post(f"{api}/v1/jobs", json=body, headers={**auth(key), "Idempotency-Key": "i-1"})
    assert r.status_code == 401  # the earlier job is not handed to a revoked key


def test_a_client_gone_mid_body_submits_nothing(api: str, env_api: dict[str, str], raw_redis: redis.Redis) -> None:
    key = make_key(env_api, "fast-gone")
    before = job_keys(raw_redis)
    host, port = api.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "half a request"}).encode()  # valid JSON: only the length says more comes
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key['key']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body) + 50}\r\n\r\n").encode()
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(head + body)
        time.sleep(0.5)
    time.sleep(1.0)
    assert job_keys(raw_redis) == before


@pytest.mark.slow
def test_submit_waits_for_the_replica_it_must_reach(tmp_path: Path, s3: S3Endpoint, slow_model: str) -> None:
    primary, url = start_redis(tmp_path / "primary")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    replica, replica_port = start_replica(tmp_path / "replica", port)
    env = api_env(stack_env(url, s3, slow_model), PIXQ_REDIS_MIN_REPLICAS="1", PIXQ_REDIS_WAIT_TIMEOUT_MS="300")
    api_svc = None
    try:
        key = make_key(env, "durable")
        api_svc, base = start_api(env, tmp_path / "api.log")
        body = {"prompt": "on two servers", **SMALL}
        r = httpx.post(f"{base}/v1/jobs", json=body, headers=auth(key))
        assert r.status_code == 201, r.text
        with redis.Redis(port=replica_port) as conn:
            assert conn.hget(f"pixq:job:{r.json()['id']}", "state") == b"queued"  # on the replica when told done
        replica.stop()
        conn = redis.Redis.from_url(url)
        before = job_keys(conn)
        r = httpx.post(f"{base}/v1/jobs", json=body, headers=auth(key), timeout=30)
        assert r.status_code == 503 and r.json()["error"] == "unavailable", r.text
        assert "replica" in r.json()["message"]
        assert job_keys(conn) == before  # not reported done, and no record left behind
    finally:
        if api_svc is not None:
            api_svc.stop()
        replica.stop()
        primary.stop()



@pytest.mark.slow
def test_redis_down_on_a_first_message_template_answers_503(own_redis_api: OwnRedisApi) -> None:
    own_redis_api.redis.stop()
    # The process's first job: its message is built through Celery (kombu connects), on a Redis that is down.
    r = httpx.post(f"{own_redis_api.base}/v1/jobs", json={"prompt": "down", **SMALL}, headers=auth(own_redis_api.key),
                   timeout=60)
    assert r.status_code == 503 and r.json()["error"] == "unavailable", r.text
    assert int(r.headers["retry-after"]) >= 1


@pytest.mark.slow
def test_a_stuck_redis_answers_503_not_never(own_redis_api: OwnRedisApi) -> None:
    jobs, headers = f"{own_redis_api.base}/v1/jobs", auth(own_redis_api.key)
    assert httpx.post(jobs, json={"prompt": "up", **SMALL}, headers=headers).status_code == 201
    own_redis_api.redis.signal(signal.SIGSTOP)  # alive, connected, answering nothing
    try:
        r = httpx.post(jobs, json={"prompt": "stuck", **SMALL}, headers=headers, timeout=60)
    finally:
        own_redis_api.redis.signal(signal.SIGCONT)
    assert r.status_code == 503 and r.json()["error"] == "unavailable", r.text
    assert "outcome is unknown" in r.json()["message"]  # the create was sent; the undo could not run either
