"""Webhook delivery faults, on real processes: `python -m pixq api` (its relay) or `pixq webhooks`
relays, and a receiver on loopback. A queued job that is canceled ends at once, so each test needs
no worker: the `canceled` event is the webhook under test."""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import pytest

from tests.apitools import Receiver, auth, canceled_job, delivery, make_key, verified
from tests.services import pixq_argv

pytestmark = pytest.mark.slow




@pytest.fixture(scope="module")
def key(env_api: dict[str, str]) -> dict[str, str]:
    return make_key(env_api, "hooks")


def test_500_three_times_then_200(api: str, key: dict[str, str], slow_model: str) -> None:
    receiver = Receiver(plan=lambda n: 500 if n < 3 else 200)
    try:
        job_id = canceled_job(api, key, receiver.url, slow_model)
        hits = receiver.wait(lambda h: any(x.answered == 200 for x in h), 30, "a 200")
        assert [h.answered for h in hits] == [500, 500, 500, 200]
        for hit in hits:
            verified(hit, key, job_id)  # duplicates carry the same webhook-id, each signed
        assert {h.body for h in hits} == {hits[0].body}
        time.sleep(0.5)
        d = delivery(api, key, job_id)
        assert d["state"] == "delivered" and d["attempts"] == 4 and len(receiver.hits) == 4
    finally:
        receiver.close()


def test_timeout_then_success_and_retry_after(api: str, key: dict[str, str], slow_model: str) -> None:
    receiver = Receiver(plan=lambda n: [(200, 2.5, {}), (503, 0.0, {"Retry-After": "2"}), 200][min(n, 2)])
    try:
        job_id = canceled_job(api, key, receiver.url, slow_model)
        hits = receiver.wait(lambda h: len(h) >= 3, 30, "three attempts")
        for hit in hits:
            verified(hit, key, job_id)
        assert hits[2].at - hits[1].at >= 1.9  # Retry-After: 2 honoured (the schedule's wait is 0.3 s)
        assert "ReadTimeout" in str(httpx.get(f"{api}/v1/jobs/{job_id}/deliveries", headers=auth(key)).json()) \
            or delivery(api, key, job_id)["state"] == "delivered"
        time.sleep(0.3)
        assert delivery(api, key, job_id)["state"] == "delivered"
    finally:
        receiver.close()


def test_410_stops_and_redeliver_sends_again(api: str, key: dict[str, str], slow_model: str) -> None:
    answers = {"status": 410}
    receiver = Receiver(plan=lambda n: answers["status"])
    try:
        job_id = canceled_job(api, key, receiver.url, slow_model)
        receiver.wait(lambda h: len(h) == 1, 30, "one attempt")
        time.sleep(1.5)
        assert len(receiver.hits) == 1 and delivery(api, key, job_id)["state"] == "gone"
        answers["status"] = 200
        r = httpx.post(f"{api}/v1/jobs/{job_id}/deliveries/canceled/redeliver", headers=auth(key))
        assert r.status_code == 200, r.text
        hits = receiver.wait(lambda h: len(h) == 2, 30, "the redelivery")
        verified(hits[1], key, job_id)
    finally:
        receiver.close()


def test_exhausted_deliveries_are_listed_and_redeliverable(api: str, key: dict[str, str], slow_model: str,
                                                           env_api: dict[str, str]) -> None:
    answers = {"status": 500}
    receiver = Receiver(plan=lambda n: answers["status"])
    try:
        job_id = canceled_job(api, key, receiver.url, slow_model)
        receiver.wait(lambda h: len(h) == 5, 30, "five attempts (the test schedule has four waits)")
        time.sleep(1.0)
        assert len(receiver.hits) == 5 and delivery(api, key, job_id)["state"] == "failed"
        listed = subprocess.run(pixq_argv("webhooks", "failed", "--json"), env=env_api, capture_output=True,
                                text=True, timeout=60)
        assert f"{job_id}:canceled" in [d["webhook_id"] for d in json.loads(listed.stdout)]
        answers["status"] = 200
        again = subprocess.run(pixq_argv("webhooks", "redeliver", job_id, "canceled"), env=env_api,
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr
        receiver.wait(lambda h: h[-1].answered == 200, 30, "the redelivery")
    finally:
        receiver.close()



@pytest.mark.parametrize("url", ["https://[64:ff9b::a9fe:a9fe]/latest/meta-data",  # NAT64 to the metadata service
                                 "https://[2002:a00:1::]/hook",  # 6to4 to 10.0.0.1
                                 "https://[::ffff:0:a9fe:a9fe]/",  # IPv4-translated
                                 "https://8.8.8.8\x00.example.com/hook"])  # a NUL: the resolver reads 8.8.8.8
def test_a_webhook_url_reaching_a_private_address_or_with_a_nul_is_refused_naming_the_field(
        url: str, api: str, key: dict[str, str], slow_model: str) -> None:
    r = httpx.post(f"{api}/v1/jobs", json={"prompt": "no", "model_name": slow_model, "webhook": {"url": url}},
                   headers=auth(key))
    assert r.status_code == 422, r.text
    (field,) = r.json()["fields"]
    assert field["field"] == "webhook.url" and ("embeds" in field["message"] or "U+0000" in field["message"])
