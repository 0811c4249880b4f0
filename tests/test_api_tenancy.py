"""What each key sees across tenants, on a real `pixq api` (issue 23, items 5, 8, 11): queues show a
tenant counts and its own jobs only, an admin key lists every tenant's jobs (``tenant`` filters), and
an open event stream ends once its key is revoked."""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import pytest
from pixq.api.events import KEY_RECHECK_S

from tests.apitools import SMALL, auth, make_key
from tests.services import Service, pixq_argv

TENANT_QUEUE_FIELDS = {"model", "depth", "oldest_age_s", "running_count", "worker_count", "own_running"}


@pytest.fixture(scope="module")
def keys(env_api: dict[str, str]) -> dict[str, dict[str, str]]:
    return {name: make_key(env_api, name, *extra) for name, extra in
            (("alice", ()), ("bob", ()), ("ops", ("--scope", "admin")))}


def submit(api: str, key: dict[str, str], model: str, prompt: str = "queued") -> str:
    r = httpx.post(f"{api}/v1/jobs", json={"prompt": prompt, "model_name": model, **SMALL}, headers=auth(key))
    assert r.status_code == 201, r.text
    return r.json()["id"]  # type: ignore[no-any-return]


def test_queues_show_a_tenant_counts_and_its_own_jobs_only(api: str, keys: dict[str, dict[str, str]],
                                                           worker: Service, tiny_model: str, slow_model: str) -> None:
    bobs = submit(api, keys["bob"], slow_model)  # a model path only bob named; no worker serves it: it waits
    admin = httpx.get(f"{api}/v1/queues", headers=auth(keys["ops"])).json()
    assert slow_model in json.dumps(admin)  # the operator sees everything: workers, paths, ids
    served = next(q for q in admin if q["model"] == tiny_model)
    assert served["workers"] and served["workers"][0]["pid"]

    seen = httpx.get(f"{api}/v1/queues", headers=auth(keys["alice"]))
    assert seen.status_code == 200
    text = seen.text
    assert bobs not in text and slow_model not in text, text
    assert served["workers"][0]["name"] not in text and "pid" not in text, text
    assert all(set(q) == TENANT_QUEUE_FIELDS for q in seen.json()), seen.json()
    mine = next(q for q in seen.json() if q["model"] == tiny_model)
    assert mine["worker_count"] == len(served["workers"]) and mine["own_running"] == []


def test_an_admin_key_lists_every_tenants_jobs_and_filters_by_tenant(api: str, keys: dict[str, dict[str, str]],
                                                                     slow_model: str) -> None:
    made = [submit(api, keys[name], slow_model, f"listed {i}") for i, name in enumerate(("alice", "bob", "alice"))]
    ops = auth(keys["ops"])
    seen: list[str] = []
    cursor = None
    for _ in range(3):  # newest first, a job a page, across both tenants' indexes
        page = httpx.get(f"{api}/v1/jobs", params={"limit": 1, **({"cursor": cursor} if cursor else {})},
                         headers=ops).json()
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
    assert seen == made[::-1]
    bobs = httpx.get(f"{api}/v1/jobs", params={"tenant": "bob", "limit": 100}, headers=ops).json()["jobs"]
    assert made[1] in [j["id"] for j in bobs] and not {made[0], made[2]} & {j["id"] for j in bobs}
    assert {j["owner"] for j in bobs} == {keys["bob"]["id"]}
    r = httpx.get(f"{api}/v1/jobs", params={"tenant": "nobody-has-this-name"}, headers=ops)
    assert r.status_code == 422 and [f["field"] for f in r.json()["fields"]] == ["tenant"], r.text
    # A tenant's own listing is unchanged, and it may not ask for another's.
    alices = httpx.get(f"{api}/v1/jobs", params={"limit": 100}, headers=auth(keys["alice"])).json()["jobs"]
    assert made[1] not in [j["id"] for j in alices] and {made[0], made[2]} <= {j["id"] for j in alices}
    r = httpx.get(f"{api}/v1/jobs", params={"tenant": "bob"}, headers=auth(keys["alice"]))
    assert r.status_code == 403 and "tenant" in r.json()["message"]


@pytest.mark.slow  # at least KEY_RECHECK_S (5 s)
def test_an_open_event_stream_ends_once_its_key_is_revoked(api: str, env_api: dict[str, str],
                                                           slow_model: str) -> None:
    key = make_key(env_api, "followed-then-revoked")
    job_id = submit(api, key, slow_model)  # stays queued: its stream would run until the job expires
    bound_s = KEY_RECHECK_S + 25  # the re-check interval, and room for a loaded machine
    lines: list[str] = []
    with httpx.stream("GET", f"{api}/v1/jobs/{job_id}/events", headers=auth(key), timeout=bound_s) as response:
        assert response.status_code == 200
        deadline = None
        for line in response.iter_lines():
            lines.append(line)
            if deadline is None and line.startswith("event: queued"):
                out = subprocess.run(pixq_argv("keys", "revoke", key["name"]), env=env_api, capture_output=True,
                                     text=True, timeout=60)
                assert out.returncode == 0, out.stderr
                deadline = time.monotonic() + bound_s
            assert deadline is None or time.monotonic() < deadline, "the stream outlived its key's revocation"
    assert ": key revoked" in lines, lines
    assert httpx.get(f"{api}/v1/jobs/{job_id}/events", headers=auth(key)).status_code == 401
