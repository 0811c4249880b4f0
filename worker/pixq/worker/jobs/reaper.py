"""The reaper: every live worker re-queues jobs whose worker died, and jobs with no message.

Two passes, both cheap when nothing is wrong:

- **Lapsed leases**: a ``running`` job whose lease lapsed (its worker died) goes back to
  ``queued`` with a new message, counting an attempt; out of attempts it ends ``failed`` on the
  dead list.
- **Reconciliation**: a ``queued`` job with no message in its model's queue lists and none
  reserved by a live worker (``wire.RESERVED_KEY_PREFIX``) gets a new message. That is a job whose
  message a dead worker had prefetched (it sits in kombu's ``unacked`` hash until the visibility
  timeout; kombu does not lower a consumer's prefetch after a reconnect, so a busy worker can hold
  more than it can run), a message lost with a failed-over primary's tail, or a re-queue whose
  send failed. A job must still be orphaned one pass interval after a pass first found it so
  before it is re-sent (a message between a worker's pop and its reservation is not orphaned); a
  second delivery is harmless, since claims are conditional (``recordscripts.CLAIM``). One worker at a
  time does this pass (``pixq:reconcile`` lock), since it reads every waiting message.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import cast

import redis
from celery import Celery
from pixq.errors import JobNotFound
from pixq.queues import message_job_id
from pixq.records import JobState, RecordStore
from pixq.wire import RESERVED_KEY_PREFIX, queue_lists, send_job

log = logging.getLogger(__name__)

RECONCILE_LOCK_KEY = "pixq:reconcile"
ORPHANS_KEY = "pixq:orphans"  # ZSET job id -> when a pass first found it queued with no message


def reap_once(records: RecordStore, app: Celery, max_attempts: int) -> list[tuple[str, str]]:
    """One pass over the running set; returns ``(job_id, outcome)`` for each job it changed."""
    changed = []
    for job_id in records.running_ids():
        outcome, detail = records.reap(job_id, max_attempts)  # "alive" while its lease is held
        if outcome == "requeued":
            try:
                send_job(app, job_id, records.get(job_id).request)
            except JobNotFound:
                continue
            log.warning("job %s: its worker's lease lapsed; re-queued", job_id)
        elif outcome == "dead":
            log.error("job %s: %s; moved to the dead list", job_id, detail)
        if outcome in ("requeued", "dead"):
            changed.append((job_id, outcome))
    return changed


@dataclass
class Reconciler:
    """Finds queued jobs with no message anywhere and re-sends them (see the module docstring)."""

    records: RecordStore
    app: Celery
    grace_s: float  # a job queued more recently than this is not looked at (its message may be in flight)
    confirm_s: float  # re-sent once still orphaned this long after a pass first found it so

    def reconcile_once(self, now: float | None = None) -> list[str]:
        """One pass; returns the ids of the jobs it re-sent."""
        now = time.time() if now is None else now
        conn = self.records.conn
        waiting: dict[str, str] = {}  # job id -> model, for queued jobs past the grace period
        for job_id in self.records.queued_before(now - self.grace_s):
            try:
                record = self.records.get(job_id)
            except JobNotFound:
                self.records.unindex_queued(job_id)
                continue
            if record.state is not JobState.queued:
                self.records.unindex_queued(job_id)  # claimed, canceled or ended meanwhile
                continue
            waiting[job_id] = record.request.model_name
        if not waiting:
            conn.delete(ORPHANS_KEY)
            return []
        present = self._reserved(conn)
        for model in set(waiting.values()):
            for name in queue_lists(model):
                present.update(filter(None, (message_job_id(m) for m in cast(list[bytes], conn.lrange(name, 0, -1)))))
        orphans = set(waiting) - present
        seen: dict[str, float] = {}
        for member, score in conn.zrange(ORPHANS_KEY, 0, -1, withscores=True):  # type: ignore[str-unpack,union-attr,unused-ignore]
            seen[member.decode() if isinstance(member, bytes) else str(member)] = float(score)
        if stale := set(seen) - orphans:
            conn.zrem(ORPHANS_KEY, *stale)
        if new := orphans - set(seen):
            conn.zadd(ORPHANS_KEY, dict.fromkeys(new, now), nx=True)
        resend = {j for j in orphans & set(seen) if seen[j] <= now - self.confirm_s}
        sent = []
        for job_id in sorted(resend):
            try:
                record = self.records.get(job_id)
            except JobNotFound:
                continue
            if record.state is not JobState.queued:
                continue
            send_job(self.app, job_id, record.request)
            self.records.mark_queued(job_id)
            conn.zrem(ORPHANS_KEY, job_id)
            log.warning("job %s: queued with no message in its queue and none held by a live worker; re-sent",
                        job_id)
            sent.append(job_id)
        return sent

    @staticmethod
    def _reserved(conn: redis.Redis) -> set[str]:
        held: set[str] = set()
        for key in conn.scan_iter(match=RESERVED_KEY_PREFIX + "*", count=1000):
            held.update(m.decode() if isinstance(m, bytes) else str(m) for m in cast(set[bytes], conn.smembers(key)))
        return held


class Reaper:
    def __init__(self, records: RecordStore, app: Celery, max_attempts: int, interval_s: float):
        self.records = records
        self.app = app
        self.max_attempts = max_attempts
        self.interval_s = interval_s
        self.reconciler = Reconciler(records, app, grace_s=reconcile_grace_s(interval_s), confirm_s=interval_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pixq-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                reap_once(self.records, self.app, self.max_attempts)
                # One reconciler at a time across workers; the lock lapses by itself.
                if self.records.conn.set(RECONCILE_LOCK_KEY, "1", nx=True, px=int(self.interval_s * 900)):
                    self.reconciler.reconcile_once()
            except redis.RedisError as exc:
                log.warning("reaper: %s", exc)
            except Exception:  # keep reaping whatever one pass hit
                log.exception("reaper pass failed")


def reconcile_grace_s(interval_s: float) -> float:
    """How long a queued job is left alone before its message is looked for."""
    return max(2.0, 2 * interval_s)
