"""What this worker has taken from its queue and not finished: ``pixq:reserved:{name}`` (a SET).

Celery's consumer takes messages ahead of the job threads (prefetch), and after a broker
reconnect kombu does not lower that prefetch again, so a busy worker can hold messages it is not
running. Their jobs are ``queued`` and have no lease. This set tells the reaper's reconciliation
(``reaper.py``) that a live worker holds them; it lapses with the worker's presence
(``WORKER_KEY_TTL_S``) when the worker dies, and then those jobs are re-sent.

The worker's own memory is the truth, and every presence beat writes the whole set again from it
(not only its TTL): a removal written to a primary that was then cut off and demoted is lost with
that primary's tail, and a set that kept the finished job would tell the reaper forever that a live
worker holds its message (found by the partition test: a job stayed ``queued`` past 120 s).
"""

from __future__ import annotations

import logging
import threading

import redis
from pixq.wire import RESERVED_KEY_PREFIX, WORKER_KEY_TTL_S

log = logging.getLogger(__name__)


class Reservations:
    def __init__(self, conn: redis.Redis, worker: str):
        self.conn = conn
        self.key = RESERVED_KEY_PREFIX + worker
        self._held: set[str] = set()
        self._lock = threading.Lock()  # held across the write, so a beat never drops a newer add

    def add(self, job_id: str) -> None:
        with self._lock:
            self._held.add(job_id)
            try:
                pipe = self.conn.pipeline(transaction=True)
                pipe.sadd(self.key, job_id)
                pipe.expire(self.key, WORKER_KEY_TTL_S)
                pipe.execute()
            except redis.RedisError as exc:  # the reconciliation may then send it again: harmless
                log.warning("job %s: reservation not recorded: %s", job_id, exc)

    def remove(self, job_id: str) -> None:
        with self._lock:
            self._held.discard(job_id)
            try:
                self.conn.srem(self.key, job_id)
            except redis.RedisError as exc:  # the next beat writes the set again
                log.warning("job %s: reservation not cleared: %s", job_id, exc)

    def refresh(self) -> None:
        """Called with the presence beat: the set again from memory, with its TTL, while the worker lives."""
        with self._lock:
            pipe = self.conn.pipeline(transaction=True)
            pipe.delete(self.key)
            if self._held:
                pipe.sadd(self.key, *sorted(self._held))
                pipe.expire(self.key, WORKER_KEY_TTL_S)
            pipe.execute()

    def clear(self) -> None:
        with self._lock:
            self._held.clear()
            self.conn.delete(self.key)
