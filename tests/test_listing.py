"""Listing's index reads on a real Redis: ties on created_at past a batch, and the merge of several
owners' indexes newest first (the admin listing of issue 23, item 11)."""

from __future__ import annotations

import heapq
import uuid

import redis
from pixq.listing import BATCH, _newest_first


def test_more_ties_than_a_batch_are_each_read_once(raw_redis: redis.Redis) -> None:
    index = f"test-listing:{uuid.uuid4().hex}"
    members = [f"{i:04d}" for i in range(2 * BATCH + 50)]  # one submit_many can create that many at one time
    raw_redis.zadd(index, dict.fromkeys(members, 1796000000.5))
    raw_redis.zadd(index, {"older": 1796000000.0})
    try:
        read = [job_id for _, job_id, _ in _newest_first(raw_redis, index, None)]
        assert read == sorted(members, reverse=True) + ["older"]
        after = (1796000000.5, members[BATCH])  # a cursor inside the ties
        read = [job_id for _, job_id, _ in _newest_first(raw_redis, index, after)]
        assert read == sorted(members[:BATCH], reverse=True) + ["older"]
    finally:
        raw_redis.delete(index)


def test_several_indexes_merge_newest_first(raw_redis: redis.Redis) -> None:
    a, b = (f"test-listing:{uuid.uuid4().hex}" for _ in range(2))
    raw_redis.zadd(a, {"a1": 1.0, "a3": 3.0, "a5": 5.0})
    raw_redis.zadd(b, {"b2": 2.0, "b4": 4.0, "b5": 5.0})
    try:
        merged = heapq.merge(_newest_first(raw_redis, a, None), _newest_first(raw_redis, b, None), reverse=True)
        assert [job_id for _, job_id, _ in merged] == ["b5", "a5", "b4", "a3", "b2", "a1"]
        after = heapq.merge(_newest_first(raw_redis, a, (5.0, "b5")), _newest_first(raw_redis, b, (5.0, "b5")),
                            reverse=True)
        assert [job_id for _, job_id, _ in after] == ["a5", "b4", "a3", "b2", "a1"]
    finally:
        raw_redis.delete(a, b)
