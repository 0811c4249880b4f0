"""What this worker has taken from its queue and not finished: ``pixq:reserved:{name}`` (a SET).

Celery's consumer takes messages ahead of the job threads (prefetch), and after a broker
reconnect kombu does not lower that prefetch again, so a busy worker can hold messages it is not
running. Their jobs are ``queued`` and have no lease. This set tells the reaper's reconciliation
(``reaper.py``) that a live worker holds them; it lapses with the worker's presence
(``WORKER_KEY_TTL_S``) when the worker dies, and then those jobs are re-sent.
"""

from __future__ import annotations

import logging

import redis
from pixq.wire import RESERVED_KEY_PREFIX, WORKER_KEY_TTL_S

log = logging.getLogger(__name__)


class Reservations:
    def __init__(self, conn: redis.Redis, worker: str):
        self.conn = conn
        self.key = RESERVED_KEY_PREFIX + worker

    def add(self, job_id: str) -> None:
        try:
            pipe = self.conn.pipeline(transaction=True)
            pipe.sadd(self.key, job_id)
            pipe.expire(self.key, WORKER_KEY_TTL_S)
            pipe.execute()
        except redis.RedisError as exc:  # the reconciliation may then send it again: harmless
            log.warning("job %s: reservation not recorded: %s", job_id, exc)

    def remove(self, job_id: str) -> None:
        try:
            self.conn.srem(self.key, job_id)
        except redis.RedisError as exc:
            log.warning("job %s: reservation not cleared: %s", job_id, exc)

    def refresh(self) -> None:
        """Called with the presence beat: keeps the set while the worker lives."""
        self.conn.expire(self.key, WORKER_KEY_TTL_S)

    def clear(self) -> None:
        self.conn.delete(self.key)
