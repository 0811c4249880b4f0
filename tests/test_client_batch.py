"""Client.submit_many (one pipelined round trip) and Client.jobs() on the session's real worker."""

from __future__ import annotations

import pytest
import redis
from pixq.client import Client
from pixq.errors import InvalidRequest
from pixq.records import JobState
from pixq.worker.ops.stack import Service

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
