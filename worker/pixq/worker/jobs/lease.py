"""Leases: a running job is held by one worker, which renews its lease every few seconds.

When a worker dies its leases lapse within ``lease_ttl_s`` and any live worker's reaper
(``reaper.py``) re-queues those jobs. A worker that finds its lease taken stops the job, and
a job that makes no progress past the hard limit ends the whole process (a hung GPU call
cannot be interrupted from Python); its lease then lapses like any dead worker's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import redis
from pixq.records import RecordStore

log = logging.getLogger(__name__)

HUNG_EXIT_CODE = 70


@dataclass
class HeldJob:
    job_id: str
    started: float = field(default_factory=time.monotonic)
    last_beat: float = field(default_factory=time.monotonic)  # last sign of life: a step, an upload try
    lost: threading.Event = field(default_factory=threading.Event)

    def beat(self) -> None:
        self.last_beat = time.monotonic()


def exit_hung_process(job_id: str) -> None:
    log.critical("job %s: no progress past the hard limit; ending this worker process", job_id)
    logging.shutdown()
    os._exit(HUNG_EXIT_CODE)


class Leases:
    """Renews the leases of the jobs this worker holds, from one background thread."""

    def __init__(
        self,
        records: RecordStore,
        worker: str,
        ttl_s: float,
        hard_limit_s: float,
        on_hung: Callable[[str], None] = exit_hung_process,
    ):
        self.records = records
        self.worker = worker
        self.ttl_s = ttl_s
        self.hard_limit_s = hard_limit_s
        self.on_hung = on_hung
        self._held: dict[str, HeldJob] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pixq-leases", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @contextlib.contextmanager
    def hold(self, job_id: str) -> Iterator[HeldJob]:
        """Renew ``job_id``'s lease (taken by ``claim``) until the block ends."""
        held = HeldJob(job_id)
        with self._lock:
            self._held[job_id] = held
        try:
            yield held
        finally:
            with self._lock:
                self._held.pop(job_id, None)

    def _run(self) -> None:
        interval = max(self.ttl_s / 4, 0.2)
        while not self._stop.wait(interval):
            with self._lock:
                held = list(self._held.values())
            for job in held:
                self._renew(job)

    def _renew(self, job: HeldJob) -> None:
        try:
            if not self.records.renew_lease(job.job_id, self.worker, self.ttl_s):
                if not job.lost.is_set():
                    log.warning("job %s: lease lost (another worker took it over)", job.job_id)
                job.lost.set()
        except redis.RedisError as exc:
            log.warning("job %s: lease not renewed: %s", job.job_id, exc)
        if time.monotonic() - job.last_beat > self.hard_limit_s:
            self.on_hung(job.job_id)
