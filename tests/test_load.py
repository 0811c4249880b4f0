"""A bounded load: 500 jobs over 3 workers with the tiny model. All succeed, 500 objects, none twice."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from pixq.client import Client
from pixq.records import JobState
from pixq.settings import Settings

from tests.services import S3Endpoint, start_redis, start_worker
from tests.support import stack_env

pytestmark = pytest.mark.slow  # a 500-job load over three workers

JOBS = 500
WORKERS = 3


def test_500_jobs_over_3_workers(tmp_path: Path, s3: S3Endpoint, s3_client, tiny_model: str) -> None:
    redis_svc, url = start_redis(tmp_path / "redis", password="load-pw")
    prefix = f"load-{uuid.uuid4().hex[:8]}"
    env = stack_env(url, s3, tiny_model, PIXQ_S3_PREFIX=prefix)
    workers = [start_worker(env, tiny_model, tmp_path / f"w{i}.log", name=f"load{i}@test") for i in range(WORKERS)]
    client = Client(Settings.from_env(env))
    try:
        started = time.monotonic()
        ids = [client.submit(f"load {i}", width=64, height=64, num_inference_steps=2, seed=i).id
               for i in range(JOBS)]
        deadline = time.monotonic() + 400  # bounded: the loop ends by itself
        pending = set(ids)
        while pending and time.monotonic() < deadline:
            pending = {j for j in pending if not client.status(j).state.is_terminal}
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        assert not pending, f"{len(pending)} jobs unfinished after {elapsed:.0f} s"

        records = [client.status(j) for j in ids]
        assert Counter(r.state for r in records) == {JobState.succeeded: JOBS}
        assert all(r.attempts == 1 for r in records)
        served = Counter(r.worker for r in records)
        assert set(served) == {f"load{i}@test" for i in range(WORKERS)}  # all three took work

        keys: list[str] = []
        for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=f"{prefix}/"):
            keys += [o["Key"] for o in page.get("Contents", [])]
        assert len(keys) == len(set(keys)) == JOBS  # one object per image, none twice
        assert set(keys) == {r.images[0].key for r in records}
        print(f"\n{JOBS} jobs over {WORKERS} workers in {elapsed:.1f} s ({JOBS / elapsed:.1f} jobs/s); "
              f"per worker {dict(served)}")
    finally:
        client.close()
        for w in workers:
            w.stop()
        redis_svc.stop()
