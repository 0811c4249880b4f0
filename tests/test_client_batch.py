"""Client.submit_many (one script for the batch, pixq/batch.py) and Client.jobs() on the session's real worker."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from pixq.checkpoints import DEFAULT_MODEL
from pixq.client import Client
from pixq.errors import InvalidRequest
from pixq.records import NO_OWNER, OWNER_INDEX_PREFIX, QUEUED_KEY, JobState
from pixq.schema import parse_request
from pixq.submitplan import plan_batch
from pixq.wire import broker_priority, queue_lists

from tests.services import Service

SMALL = {"width": 128, "height": 128, "num_inference_steps": 2}


def test_submit_many_jobs_are_rendered_by_the_unchanged_worker(client: Client, worker: Service) -> None:
    jobs = client.submit_many([{"prompt": f"batch {i}", "seed": i, **SMALL} for i in range(3)]
                              + [{"prompt": "urgent", "priority": 9, **SMALL}])
    records = [job.wait(timeout_s=120) for job in jobs]
    assert [r.state for r in records] == [JobState.succeeded] * 4, [r.error for r in records]
    assert [r.request.seed for r in records[:3]] == [0, 1, 2]
    listed = [r.id for r, _ in zip(client.jobs(page_size=2), range(4), strict=False)]
    assert listed == [j.id for j in jobs][::-1]  # newest first, across pages


def test_submit_many_is_all_or_nothing(client: Client, raw_redis: redis.Redis) -> None:
    before = set(raw_redis.scan_iter("pixq:job:*", count=1000))
    with pytest.raises(InvalidRequest) as caught:
        client.submit_many([{"prompt": "fine", **SMALL}, {"prompt": " ", **SMALL}, {"prompt": "x", "width": 7}])
    fields = [f for f, _ in caught.value.errors]
    assert "1.prompt" in fields and "2.width" in fields
    with pytest.raises(InvalidRequest, match="0.idempotency_key"):
        client.submit_many([{"prompt": "x", "idempotency_key": "k"}])
    assert set(raw_redis.scan_iter("pixq:job:*", count=1000)) == before


# Jobs on a model no test worker serves, so their records and messages stay as written.
IDLE = {"model_name": DEFAULT_MODEL, **SMALL}


@pytest.fixture()
def idle_queue(raw_redis: redis.Redis) -> Iterator[list[str]]:
    """The idle model's queue lists, emptied after the test (with the jobs it wrote)."""
    lists = queue_lists(DEFAULT_MODEL)
    before = set(raw_redis.scan_iter("pixq:job:*", count=1000))
    yield lists
    made = [k.decode().removeprefix("pixq:job:") for k in set(raw_redis.scan_iter("pixq:job:*", count=1000)) - before]
    raw_redis.delete(*lists)
    for job_id in made:
        raw_redis.delete(f"pixq:job:{job_id}", f"pixq:events:{job_id}")
        raw_redis.zrem(QUEUED_KEY, job_id)
        raw_redis.zrem(OWNER_INDEX_PREFIX + NO_OWNER, job_id)


def _written(raw_redis: redis.Redis, job_id: str) -> dict[str, Any]:
    """What a job's create wrote, with its own id, time and message ids taken out."""
    raw = {k.decode(): v.decode() for k, v in raw_redis.hgetall(f"pixq:job:{job_id}").items()}
    created = raw.pop("created_at")
    assert raw.pop("id") == job_id
    events = [fields for _, fields in raw_redis.xrange(f"pixq:events:{job_id}")]
    return {"fields": raw, "events": events, "ttl": raw_redis.ttl(f"pixq:job:{job_id}") // 10,
            "events_ttl": raw_redis.ttl(f"pixq:events:{job_id}") // 10,
            "indexed": [raw_redis.zscore(QUEUED_KEY, job_id), raw_redis.zscore(OWNER_INDEX_PREFIX + NO_OWNER, job_id)]
            == [float(created)] * 2}


def _message(raw: bytes, job_id: str) -> dict[str, Any]:
    message = json.loads(raw)
    message["body"] = base64.b64decode(message["body"]).decode()
    message["properties"].pop("delivery_tag")  # kombu draws a fresh one per message
    return json.loads(json.dumps(message).replace(job_id, "JOB"))  # type: ignore[no-any-return]


def test_a_batch_writes_each_job_as_submit_does(client: Client, raw_redis: redis.Redis,
                                                idle_queue: list[str]) -> None:
    fields = {"prompt": "written the same", "seed": 11, "priority": 3, **IDLE}
    one = client.submit_request(parse_request(fields))  # the per-job create script
    many = client.submit_many([fields, {**fields, "priority": 0}])  # the batch script
    assert _written(raw_redis, one.id) == _written(raw_redis, many[0].id)
    assert _written(raw_redis, one.id)["indexed"]
    urgent = raw_redis.lrange(idle_queue[broker_priority(3)], 0, -1)
    assert len(urgent) == 2 and _message(urgent[1], one.id) == _message(urgent[0], many[0].id)
    assert raw_redis.llen(idle_queue[broker_priority(0)]) == 1


def test_a_batch_refused_half_way_writes_nothing(client: Client, raw_redis: redis.Redis,
                                                 idle_queue: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    taken = client.submit_request(parse_request({"prompt": "first", **IDLE})).id
    planned = iter([uuid.uuid4(), uuid.UUID(hex=taken), uuid.uuid4()])  # the batch's second job id is taken
    real = uuid.uuid4
    monkeypatch.setattr(uuid, "uuid4", lambda: next(planned, None) or real())
    depth = client.queue_depth(DEFAULT_MODEL)
    before = set(raw_redis.scan_iter("pixq:*", count=1000))
    with pytest.raises(RuntimeError, match="existed already"):
        client.submit_many([{"prompt": f"batch {i}", **IDLE} for i in range(3)])
    assert set(raw_redis.scan_iter("pixq:*", count=1000)) == before
    assert client.queue_depth(DEFAULT_MODEL) == depth
    assert client.status(taken).request.prompt == "first"


def test_a_batch_run_again_after_a_lost_reply_writes_it_once(client: Client, raw_redis: redis.Redis,
                                                             idle_queue: list[str]) -> None:
    request = parse_request({"prompt": "again", **IDLE})
    plan = plan_batch([request] * 3, retention_s=client.settings.retention_s, templates=client.messages)
    client.records.write_many(plan)
    client.records.write_many(plan)  # the same call again: it is done already
    assert client.queue_depth(DEFAULT_MODEL) == 3
    assert [len(raw_redis.xrange(f"pixq:events:{job_id}")) for job_id in plan.job_ids] == [1, 1, 1]


def test_a_batch_larger_than_one_redis_call_takes_is_written_whole(client: Client, raw_redis: redis.Redis,
                                                                   idle_queue: list[str]) -> None:
    jobs = client.submit_many([{"prompt": f"many {i}", **IDLE} for i in range(4001)])  # the script's chunks: 4,000
    assert client.queue_depth(DEFAULT_MODEL) == 4001
    scores = raw_redis.zmscore(QUEUED_KEY, [j.id for j in jobs])
    assert None not in scores and scores == sorted(scores)
    assert client.status(jobs[-1].id).request.prompt == "many 4000"
