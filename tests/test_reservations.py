"""The worker's reservation set is rewritten from its memory at every beat (worker/pixq/worker/jobs/reservations.py)."""

from __future__ import annotations

import os

import redis
from pixq.wire import RESERVED_KEY_PREFIX
from pixq.worker.jobs.reservations import Reservations


def test_a_beat_writes_the_set_again_from_memory(raw_redis: redis.Redis) -> None:
    reservations = Reservations(raw_redis, f"res-{os.getpid()}@test")
    key = RESERVED_KEY_PREFIX + f"res-{os.getpid()}@test"
    try:
        reservations.add("a")
        reservations.add("b")
        reservations.remove("a")
        assert raw_redis.smembers(key) == {b"b"}
        # A removal lost with a cut-off primary's tail: the new primary still lists "a".
        raw_redis.sadd(key, "a")
        reservations.refresh()
        assert raw_redis.smembers(key) == {b"b"}
        assert raw_redis.ttl(key) > 0
        reservations.remove("b")
        raw_redis.sadd(key, "b")
        reservations.refresh()  # nothing held: no set, not a stale one
        assert not raw_redis.exists(key)
    finally:
        reservations.clear()
