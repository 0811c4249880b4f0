"""The reaper: every live worker re-queues running jobs whose lease lapsed (their worker died).

Re-queueing counts an attempt; a job out of attempts ends ``failed`` on the dead list.
"""

from __future__ import annotations

import logging
import threading

import redis
from celery import Celery
from pixq.errors import JobNotFound
from pixq.records import RecordStore
from pixq.wire import send_job

log = logging.getLogger(__name__)


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


class Reaper:
    def __init__(self, records: RecordStore, app: Celery, max_attempts: int, interval_s: float):
        self.records = records
        self.app = app
        self.max_attempts = max_attempts
        self.interval_s = interval_s
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
            except redis.RedisError as exc:
                log.warning("reaper: %s", exc)
            except Exception:  # keep reaping whatever one pass hit
                log.exception("reaper pass failed")
