"""The three submit paths execute one plan (pixq/submitplan.py): a job submitted by ``Client.submit``, by
the API's fast path (a real ``pixq api``) and by ``Client.submit_many`` has the same hash, event and
message, on the session's real Redis."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from pixq.client import Client
from pixq.jobrecord import EVENTS_PREFIX, KEY_PREFIX, JobRecord
from pixq.schema import DEFAULT_MODEL, parse_request
from pixq.wire import broker_priority, queue_lists

from tests.apitools import api_env, auth, make_key, start_api

# A model no test worker serves: the jobs, their records and messages stay as written.
FIELDS = {"prompt": "one plan", "seed": 21, "priority": 4, "width": 128, "height": 128, "num_inference_steps": 3,
          "model_name": DEFAULT_MODEL}


@pytest.fixture(scope="module")
def api_and_key(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    env_api = api_env(env)
    key = make_key(env_api, "submit-paths")
    svc, base = start_api(env_api, tmp_path_factory.mktemp("submit-paths") / "api.log")
    yield base, key
    svc.stop()


def _written(raw_redis: redis.Redis, job_id: str) -> dict[str, Any]:
    """A job's hash and events, with what differs between two jobs (id, time, owner) taken out."""
    stored: dict[bytes, bytes] = raw_redis.hgetall(KEY_PREFIX + job_id)  # type: ignore[assignment]
    raw = {k.decode(): v.decode() for k, v in stored.items()}
    assert raw.pop("id") == job_id
    raw.pop("created_at")
    raw.pop("owner", None)
    events: list[tuple[bytes, dict[bytes, bytes]]] = raw_redis.xrange(EVENTS_PREFIX + job_id)  # type: ignore[assignment]
    return {"fields": raw, "events": [f for _, f in events],
            "ttl": raw_redis.ttl(KEY_PREFIX + job_id) // 10}


def _message(raw: bytes, job_id: str) -> dict[str, Any]:
    message = json.loads(raw)
    message["body"] = base64.b64decode(message["body"]).decode()
    message["properties"].pop("delivery_tag")  # kombu draws a fresh one per message
    message["headers"].pop("origin")  # the sending process (pid@host): the API is another process
    return json.loads(json.dumps(message).replace(job_id, "JOB"))  # type: ignore[no-any-return]


def test_client_api_and_batch_write_the_same_job(client: Client, raw_redis: redis.Redis,
                                                 api_and_key: tuple[str, dict[str, str]]) -> None:
    base, key = api_and_key
    lists = queue_lists(DEFAULT_MODEL)
    raw_redis.delete(*lists)
    try:
        by_client = client.submit_request(parse_request(FIELDS), owner=key["id"]).id
        posted = httpx.post(f"{base}/v1/jobs", json=FIELDS, headers=auth(key))
        assert posted.status_code == 201, posted.text
        by_api = posted.json()["id"]
        (by_batch,) = [job.id for job in client.submit_many([FIELDS])]

        written = [_written(raw_redis, job_id) for job_id in (by_client, by_api, by_batch)]
        assert written[0] == written[1] == written[2]
        names: list[bytes] = raw_redis.hkeys(KEY_PREFIX + by_client)  # type: ignore[assignment]
        assert {k.decode() for k in names} >= {
            name for name, field in JobRecord.model_fields.items()
            if field.is_required() or field.default not in (None, [])}  # every field a new record has
        owners = [raw_redis.hget(KEY_PREFIX + job_id, "owner") for job_id in (by_client, by_api, by_batch)]
        assert owners == [key["id"].encode(), key["id"].encode(), None]
        assert posted.json()["request"] == client.status(by_api).to_json_dict()["request"]  # answered as written

        pushed: list[bytes] = raw_redis.lrange(lists[broker_priority(4)], 0, -1)  # type: ignore[assignment]
        queued = pushed[::-1]  # LPUSH: the oldest last
        assert len(queued) == 3
        messages = [_message(m, job_id) for m, job_id in zip(queued, (by_client, by_api, by_batch), strict=True)]
        assert messages[0] == messages[1] == messages[2]
    finally:
        raw_redis.delete(*lists)

