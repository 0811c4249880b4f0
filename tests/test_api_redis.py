"""Redis stops and comes back under a running `pixq api`: requests answer 503 (nothing written),
health stays up, and a webhook pending across the restart is delivered afterwards (slow)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import redis
from standardwebhooks.webhooks import Webhook

from tests.apitools import Receiver, api_env, auth, make_key, start_api
from tests.services import S3Endpoint, start_redis
from tests.support import stack_env

pytestmark = pytest.mark.slow


def test_redis_down_503_then_webhook_delivered_after_restart(tmp_path, s3: S3Endpoint, slow_model: str) -> None:  # type: ignore[no-untyped-def]
    redis_svc, url = start_redis(tmp_path / "redis", password="restart-pw-77a1", persist=True)
    # Attempts every second for a minute: the delivery must outlast the restart, not exhaust before it.
    env = api_env(stack_env(url, s3, slow_model), PIXQ_WEBHOOK_SCHEDULE_S=",".join(["1"] * 60))
    api_svc = None
    up = threading.Event()
    receiver = Receiver(plan=lambda n: 200 if up.is_set() else 500)
    try:
        key = make_key(env, "restart")
        api_svc, base = start_api(env, tmp_path / "api.log")
        r = httpx.post(f"{base}/v1/jobs", json={"prompt": "across a restart", "width": 128, "height": 128,
                                                "webhook": {"url": receiver.url, "events": ["canceled"]}},
                       headers=auth(key))
        job_id = r.json()["id"]
        httpx.post(f"{base}/v1/jobs/{job_id}/cancel", headers=auth(key))
        receiver.wait(lambda h: len(h) >= 1, 30, "a first (refused) attempt")

        redis_svc.stop()
        down = httpx.post(f"{base}/v1/jobs", json={"prompt": "while down"}, headers=auth(key), timeout=30)
        assert down.status_code == 503 and int(down.headers["retry-after"]) >= 1, down.text
        assert httpx.get(f"{base}/v1/jobs/{job_id}", headers=auth(key), timeout=30).status_code == 503
        assert httpx.get(f"{base}/readyz", timeout=30).status_code == 503
        assert httpx.get(f"{base}/healthz").status_code == 200

        redis_svc.proc = None
        redis_svc.start()
        conn = redis.Redis.from_url(url, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if conn.ping():
                    break
            except redis.RedisError:
                time.sleep(0.2)
        assert conn.dbsize() > 0  # the append-only file brought the data back
        assert not [k for k in conn.scan_iter("pixq:job:*") if conn.hget(k, "request") and
                    b"while down" in conn.hget(k, "request")]  # the refused submit wrote nothing
        up.set()
        hits = receiver.wait(lambda h: any(x.answered == 200 for x in h), 90, "the delivery after the restart")
        assert {h.headers["webhook-id"] for h in hits} == {f"{job_id}:canceled"}
        Webhook(key["webhook_secret"]).verify(hits[-1].body, hits[-1].headers)
        assert httpx.get(f"{base}/v1/jobs/{job_id}", headers=auth(key)).status_code == 200
    finally:
        receiver.close()
        if api_svc is not None:
            api_svc.stop()
        redis_svc.stop()
