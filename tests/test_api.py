"""The HTTP API on real processes: `python -m pixq api` over the session's Redis, S3 and worker."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import httpx
import pytest
import redis
from pixq.api.cli import openapi_document
from pixq.client import Client
from pixq.errors import InvalidRequest, NoWorkerWarning
from pixq.records import OWNER_INDEX_PREFIX
from pixq.schema import parse_request
from pixq.settings import Settings
from standardwebhooks.webhooks import Webhook

from tests.apitools import SMALL, Receiver, auth, job_keys, make_key, sse_events
from tests.services import Service, pixq_argv

REPO = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def key_a(env_api: dict[str, str]) -> dict[str, str]:
    return make_key(env_api, "tenant-a")


@pytest.fixture(scope="module")
def key_b(env_api: dict[str, str]) -> dict[str, str]:
    return make_key(env_api, "tenant-b")


def test_openapi_document_matches_the_committed_file() -> None:
    committed = json.loads((REPO / "docs" / "openapi.json").read_text())
    assert committed == json.loads(json.dumps(openapi_document())), "run: pixq api --export-openapi"
    assert committed["openapi"].startswith("3.1")
    assert "JobRequest" in committed["components"]["schemas"]


def test_keys_are_stored_as_hashes_only(env_api: dict[str, str], raw_redis: redis.Redis) -> None:
    key = make_key(env_api, "hash-only", "--scope", "read")
    assert key["key"].startswith("pixq_") and key["webhook_secret"].startswith("whsec_")
    stored = b"".join(v if isinstance(v, bytes) else v.encode() for k in raw_redis.scan_iter("pixq:apikey*") for v in
                      (raw_redis.hvals(k) if raw_redis.type(k) == b"hash" else []))
    assert key["key"].encode() not in stored
    listed = subprocess.run(pixq_argv("keys", "list", "--json"), env=env_api, capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0 and key["key"] not in listed.stdout
    assert {"name": "hash-only", "scopes": ["read"]}.items() <= next(
        k for k in json.loads(listed.stdout) if k["name"] == "hash-only").items()
    again = subprocess.run(pixq_argv("keys", "create", "hash-only"), env=env_api, capture_output=True, text=True,
                           timeout=60)
    # Exit codes as the README's table: 1 is a failed job's; a NAME taken is an operation refused (3), a bad
    # value or an unknown NAME a usage error (2).
    assert again.returncode == 3 and again.stderr.count("\n") == 1 and "exists already" in again.stderr
    for args, words in ((("create", "x", "--rate", "fast"), "--rate"), (("create", "x", "--scope", "root"), "--scope"),
                        (("create", "bad name!"), "NAME"),
                        (("create", "x", "--max-in-flight", "-1"), "--max-in-flight"),
                        (("revoke", "no-such-key"), "no key named"),
                        (("rotate-webhook-secret", "no-such-key"), "no key named")):
        bad = subprocess.run(pixq_argv("keys", *args), env=env_api, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and words in bad.stderr, (args, bad.returncode, bad.stderr)
        assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_auth_is_required_and_scopes_are_checked(api: str, env_api: dict[str, str], key_a: dict[str, str]) -> None:
    assert httpx.get(f"{api}/healthz").status_code == 200
    assert httpx.get(f"{api}/v1/jobs").status_code == 401
    r = httpx.get(f"{api}/v1/jobs", headers={"Authorization": "Bearer pixq_0123456789abcdef_" + "x" * 40})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
    reader = make_key(env_api, "reader-only", "--scope", "read")
    r = httpx.post(f"{api}/v1/jobs", json={"prompt": "x"}, headers=auth(reader))
    assert r.status_code == 403 and "submit" in r.json()["message"]
    doomed = make_key(env_api, "doomed")
    assert httpx.get(f"{api}/v1/jobs", headers=auth(doomed)).status_code == 200
    out = subprocess.run(pixq_argv("keys", "revoke", "doomed"), env=env_api, capture_output=True, timeout=60)
    assert out.returncode == 0
    assert httpx.get(f"{api}/v1/jobs", headers=auth(doomed)).status_code == 401  # at once


def test_bad_input_is_refused_with_the_clients_messages(api: str, key_a: dict[str, str],
                                                        raw_redis: redis.Redis) -> None:
    before = job_keys(raw_redis)
    h = auth(key_a)
    body = {"prompt": "  ", "width": 100, "steps": 3}
    r = httpx.post(f"{api}/v1/jobs", json=body, headers=h)
    with pytest.raises(InvalidRequest) as direct:
        parse_request(body)
    assert r.status_code == 422
    assert [(f["field"], f["message"]) for f in r.json()["fields"]] == direct.value.errors
    assert r.json()["message"] == str(direct.value)
    r = httpx.post(f"{api}/v1/jobs", content=b'{"prompt": ', headers={**h, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "malformed_json"
    r = httpx.post(f"{api}/v1/jobs", content=b"prompt=x", headers={**h, "content-type": "text/plain"})
    assert r.status_code == 415
    r = httpx.post(f"{api}/v1/jobs", content=b"[" + b"1," * 5_000_000 + b"1]",
                   headers={**h, "content-type": "application/json"})
    assert r.status_code == 413
    r = httpx.post(f"{api}/v1/jobs", json=[1, 2], headers=h)
    assert r.status_code == 422
    for url in ("https://169.254.169.254/latest/meta-data", "https://10.0.0.1/hook", "http://8.8.8.8/hook"):
        r = httpx.post(f"{api}/v1/jobs", json={"prompt": "x", "webhook": {"url": url}}, headers=h)
        assert r.status_code == 422 and r.json()["fields"][0]["field"] == "webhook.url", r.text
    r = httpx.post(f"{api}/v1/jobs", json={"prompt": "x", "webhook": {"url": "https://a.example/", "events": ["x"]}},
                   headers=h)
    assert r.status_code == 422 and r.json()["fields"][0]["field"].startswith("webhook.events")
    assert job_keys(raw_redis) == before  # nothing written by any refusal


def test_tenants_see_only_their_own_jobs(api: str, key_a: dict[str, str], key_b: dict[str, str],
                                         slow_model: str) -> None:
    # A model no worker serves: the job stays queued.
    r = httpx.post(f"{api}/v1/jobs", json={"prompt": "mine", "model_name": slow_model, **SMALL}, headers=auth(key_a))
    assert r.status_code == 201 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    job_id = r.json()["id"]
    for method, path in (("GET", ""), ("POST", "/cancel"), ("GET", "/events"), ("GET", "/images/0"),
                         ("GET", "/deliveries")):
        other = httpx.request(method, f"{api}/v1/jobs/{job_id}{path}", headers=auth(key_b))
        assert other.status_code == 404, (path, other.text)
    assert job_id not in [j["id"] for j in httpx.get(f"{api}/v1/jobs", headers=auth(key_b)).json()["jobs"]]
    mine = httpx.get(f"{api}/v1/jobs", params={"state": "queued"}, headers=auth(key_a)).json()["jobs"]
    assert job_id in [j["id"] for j in mine]
    assert httpx.get(f"{api}/v1/jobs/{job_id}", headers=auth(key_a)).json()["state"] == "queued"
    r = httpx.post(f"{api}/v1/jobs/{job_id}/cancel", headers=auth(key_a))
    assert r.status_code == 200 and r.json()["state"] == "canceled"


def test_idempotency_key_header_returns_the_same_job(api: str, key_a: dict[str, str], key_b: dict[str, str],
                                                     slow_model: str) -> None:
    body = {"prompt": "once", "model_name": slow_model, **SMALL}
    first = httpx.post(f"{api}/v1/jobs", json=body, headers={**auth(key_a), "Idempotency-Key": "k-1"})
    again = httpx.post(f"{api}/v1/jobs", json=body, headers={**auth(key_a), "Idempotency-Key": "k-1"})
    other = httpx.post(f"{api}/v1/jobs", json=body, headers={**auth(key_b), "Idempotency-Key": "k-1"})
    assert (first.status_code, again.status_code, other.status_code) == (201, 200, 201)
    assert first.json()["id"] == again.json()["id"] != other.json()["id"]  # keys are per tenant


def test_listing_pages_newest_first(api: str, env_api: dict[str, str], slow_model: str) -> None:
    key = make_key(env_api, "lister")
    ids = [httpx.post(f"{api}/v1/jobs", json={"prompt": f"p{i}", "model_name": slow_model, **SMALL},
                      headers=auth(key)).json()["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        page = httpx.get(f"{api}/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})},
                         headers=auth(key)).json()
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ids[::-1]
    assert httpx.get(f"{api}/v1/jobs", params={"cursor": "!!"}, headers=auth(key)).status_code == 422


def test_quotas_refuse_with_429_and_write_nothing(api: str, env_api: dict[str, str], slow_model: str,
                                                  raw_redis: redis.Redis) -> None:
    capped = make_key(env_api, "capped", "--max-in-flight", "1")
    body = {"prompt": "one at a time", "model_name": slow_model, **SMALL}
    assert httpx.post(f"{api}/v1/jobs", json=body, headers=auth(capped)).status_code == 201
    before, index = job_keys(raw_redis), raw_redis.zcard(OWNER_INDEX_PREFIX + capped["id"])
    r = httpx.post(f"{api}/v1/jobs", json=body, headers=auth(capped))
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"] == "quota_exceeded" and "max-in-flight" in r.json()["message"]
    assert job_keys(raw_redis) == before and raw_redis.zcard(OWNER_INDEX_PREFIX + capped["id"]) == index
    limited = make_key(env_api, "limited", "--rate", "2/min")
    codes = [httpx.post(f"{api}/v1/jobs", json=body, headers=auth(limited)).status_code for _ in range(3)]
    assert codes[:2] == [201, 201]
    r = httpx.post(f"{api}/v1/jobs", json=body, headers=auth(limited))
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
    assert r.json()["error"] == "rate_limited"
    assert raw_redis.zcard(OWNER_INDEX_PREFIX + limited["id"]) == 2


def test_health_ready_metrics_queues_schema(api: str, key_a: dict[str, str]) -> None:
    assert httpx.get(f"{api}/readyz").json() == {"status": "ok", "redis": "ok", "s3": "ok"}
    assert httpx.get(f"{api}/v1/schema", headers=auth(key_a)).json()["title"] == "JobRequest"
    assert isinstance(httpx.get(f"{api}/v1/queues", headers=auth(key_a)).json(), list)
    metrics = httpx.get(f"{api}/metrics").text
    assert 'pixq_api_requests_total{code="200",method="GET",route="/v1/schema"}' in metrics
    assert "pixq_api_request_seconds_bucket" in metrics and "pixq_webhook_outbox_entries" in metrics


def test_job_end_to_end_sse_image_redirect_and_signed_webhook(api: str, key_a: dict[str, str],
                                                              worker: Service) -> None:
    receiver = Receiver()
    try:
        body = {"prompt": "a red square", "seed": 3, **SMALL,
                "webhook": {"url": receiver.url, "events": ["running", "succeeded"]}}
        r = httpx.post(f"{api}/v1/jobs", json=body, headers=auth(key_a))
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        # Live: the job's state when the stream opens, then what follows. The tiny model's 4 steps can all be
        # done before the stream opens (then it starts at "running, step 4"), so this checks a consistent tail.
        events = sse_events(api, job_id, auth(key_a))
        kinds = [e[1] for e in events]
        assert kinds[-1] == "succeeded" and set(kinds[:-1]) <= {"queued", "running"}
        live = [e[2]["step"] for e in events if e[1] == "running"]
        assert live and live == sorted(live) and live[-1] == 4, events
        final = events[-1][2]
        assert final["state"] == "succeeded" and len(final["image_urls"]) == 1
        # From the stream's start (Last-Event-ID 0-0): every event the job had, each step once, in order.
        replay = sse_events(api, job_id, {**auth(key_a), "Last-Event-ID": "0-0"})
        assert [e[1] for e in replay][0] == "queued" and replay[-1][1] == "succeeded", replay
        assert [e[2]["step"] for e in replay if e[1] == "running"][-4:] == [1, 2, 3, 4], replay
        # Resume from the second event: the same tail, no duplicates.
        resumed = sse_events(api, job_id, {**auth(key_a), "Last-Event-ID": replay[1][0]})
        assert [e[0] for e in resumed] == [e[0] for e in replay[2:]]
        image = httpx.get(final["image_urls"][0], headers=auth(key_a))
        assert image.status_code == 302
        data = httpx.get(image.headers["location"]).content
        assert hashlib.sha256(data).hexdigest() == final["images"][0]["sha256"]
        hits = receiver.wait(lambda h: len({x.headers["webhook-id"] for x in h if x.answered == 200}) == 2, 30,
                             "two webhooks")
        ids = [h.headers["webhook-id"] for h in hits]
        assert ids == [f"{job_id}:running", f"{job_id}:succeeded"]  # in order
        for hit in hits:
            payload = Webhook(key_a["webhook_secret"]).verify(hit.body, hit.headers)
            assert payload["data"]["id"] == job_id
        last = json.loads(hits[-1].body)
        assert last["type"] == "job.succeeded" and last["data"]["images"][0]["sha256"] == final["images"][0]["sha256"]
        assert last["data"]["image_urls"] == final["image_urls"]
        deliveries = httpx.get(f"{api}/v1/jobs/{job_id}/deliveries", headers=auth(key_a)).json()
        assert {d["event"]: d["state"] for d in deliveries} == {"running": "delivered", "succeeded": "delivered"}
    finally:
        receiver.close()


def test_python_client_takes_a_webhook(settings: Settings, slow_model: str) -> None:
    client = Client(settings.model_copy(update={"webhook_allow": ("127.0.0.1/32",)}))
    try:
        with pytest.warns(NoWorkerWarning):  # no worker serves slow_model: the job just waits
            job = client.submit("hooked", model_name=slow_model, **SMALL, webhook={"url": "http://127.0.0.1:9/hook"})
        webhook = client.status(job.id).request.webhook
        assert webhook is not None and webhook.url == "http://127.0.0.1:9/hook"
        for url in ("https://10.0.0.1/hook", "https://169.254.169.254/", "http://8.8.8.8/hook"):
            with pytest.raises(InvalidRequest, match="webhook.url"):
                client.submit("hooked", model_name=slow_model, webhook={"url": url})
    finally:
        client.close()


def test_redelivering_a_delivery_that_never_failed_is_not_found(env_api: dict[str, str]) -> None:
    """Exit 4 as any missing thing (1 is the README's code for a failed job)."""
    out = subprocess.run(pixq_argv("webhooks", "redeliver", "f" * 32, "succeeded"), env=env_api, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 4, out.stderr
    assert out.stderr.strip() == f"error: job {'f' * 32} has no failed succeeded delivery"
