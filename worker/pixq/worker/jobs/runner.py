"""Running one job: claim it, render with progress, cancel and deadline checks, store, record.

Kept apart from Celery (``tasks.py``) so the in-process path and the queue path are the same
code, and so a benchmark can time it without a broker.

Job threads (Celery's, one per message) share one pipeline: each claims its job and hands it to
the ``Batcher`` (``batcher.py``), whose one GPU thread renders the waiting compatible jobs in one
pipeline call under ``gpu_lock``; encoding and upload happen in the job's own thread, so the GPU
starts the next batch while the last one is stored. While a job waits for its images its thread
writes its progress, reads its cancel flag and checks its deadline (no Redis round trip on the
GPU's path). A job is acknowledged only after its images are stored and its record says so.

A store that stops taking this worker's uploads (``storagewatch.py``) sends the job back to the queue, an
attempt counted, rather than failing it; while the store is down the worker takes no job and gives back those
that wait for the GPU (they have not started: no attempt counted).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from pixq.errors import NotDurable
from pixq.records import ImageRecord, JobError, JobRecord, JobState, RecordStore, RenderInfo
from pixq.wire import send_job
from pixq.worker.gpu.batch import BatchPolicy
from pixq.worker.gpu.png import threads_for
from pixq.worker.gpu.render import encode
from pixq.worker.jobs.batcher import Batcher, Pending
from pixq.worker.jobs.lease import HeldJob, Leases
from pixq.worker.jobs.metrics import WorkerMetrics
from pixq.worker.jobs.storage import Storage, StorageDown, StorageError
from pixq.worker.jobs.storagewatch import StorageWatch

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


class JobStopped(Exception):
    """Raised from the step callback to stop a render; says what the record becomes."""


class JobCanceled(JobStopped):
    pass


class LeaseLost(JobStopped):
    """Another worker holds the job now: touch nothing."""


class DeadlineExceeded(JobStopped):
    pass


class GiveBack(JobStopped):
    """The worker is stopping now: put the job back for another worker."""


@dataclass
class Shutdown:
    """Two-stage stop: the first signal drains (finish the running job, take no new one),
    the second gives running jobs back to the queue at their next step."""

    draining: threading.Event = field(default_factory=threading.Event)
    now: threading.Event = field(default_factory=threading.Event)

    def request(self) -> None:
        if self.draining.is_set():
            self.now.set()
        self.draining.set()


@dataclass(frozen=True)
class RunnerConfig:
    worker_name: str
    model_name: str
    job_timeout_s: float = 600
    lease_ttl_s: float = 15
    max_attempts: int = 3
    # PNG encoding threads while the GPU is idle (0: min(8, cores)); one while another job renders.
    encode_threads: int = 0
    batch: BatchPolicy = field(default_factory=BatchPolicy)
    progress_every_s: float = 0.05  # how often a job's thread writes its step and reads its cancel flag


class JobRunner:
    """Runs jobs for one loaded pipeline; one instance per worker process."""

    def __init__(
        self,
        records: RecordStore,
        pipe: Any,
        storage: Storage,
        config: RunnerConfig,
        leases: Leases,
        app: Celery,
        shutdown: Shutdown | None = None,
        metrics: WorkerMetrics | None = None,
        storage_watch: StorageWatch | None = None,
    ):
        self.records = records
        self.pipe = pipe
        self.storage = storage
        self.config = config
        self.leases = leases
        self.app = app
        self.shutdown = shutdown or Shutdown()
        self.storage_watch = storage_watch or StorageWatch(storage.probe)
        self.gpu_lock = threading.Lock()
        self._active = 0  # jobs inside run(): claimed, waiting for the GPU, rendering or storing
        self._active_lock = threading.Lock()
        self._last_active = time.monotonic()
        # Unserved unless the worker starts its server: the runner reports either way.
        self.metrics = metrics or WorkerMetrics(config.model_name, config.worker_name)
        self.batcher = Batcher(pipe, self.gpu_lock, config.batch, before_batch=self._before_batch,
                               stop_now=self._stop_now, on_step=self.metrics.step, on_batch=self._on_batch,
                               after_batch=lambda: self.metrics.rendering(0))

    @property
    def worker_name(self) -> str:
        return self.config.worker_name

    def idle_for(self) -> float:
        """Seconds since the last job left ``run`` (0 while one is inside it)."""
        with self._active_lock:
            return 0.0 if self._active else time.monotonic() - self._last_active

    def touch(self) -> None:
        """Count now as activity (``idle_for`` restarts from 0)."""
        with self._active_lock:
            self._last_active = time.monotonic()

    def run(self, job_id: str, on_progress: ProgressFn | None = None) -> JobRecord | None:
        """Run the job if it is still to be run; returns its final record (``None`` if skipped)."""
        with self._active_lock:
            self._active += 1
        try:
            return self._run(job_id, on_progress)
        finally:
            with self._active_lock:
                self._active -= 1
                self._last_active = time.monotonic()

    def _run(self, job_id: str, on_progress: ProgressFn | None) -> JobRecord | None:
        if self.shutdown.draining.is_set():
            raise GiveBack("worker is stopping")  # not claimed: the message goes back as it is
        if self.storage_watch.down:  # a message taken just before the pause: back as it is, for another worker
            raise GiveBack(f"storage unavailable: {self.storage_watch.down}")
        try:
            outcome, detail = self.records.claim(
                job_id, self.worker_name, self.config.lease_ttl_s, self.config.max_attempts
            )
        except NotDurable as exc:
            # Claimed on the primary only: give it back untouched and let the message come again.
            log.warning("job %s: %s; giving it back", job_id, exc)
            self.records.release(job_id, self.worker_name, attempts_delta=-1, state=JobState.queued,
                                 step=0, worker="")
            time.sleep(1.0)  # the replicas are away: no hot loop of redeliveries
            raise GiveBack(str(exc)) from None
        if outcome != "claimed":
            log.info("job %s: not run (%s %s)", job_id, outcome, detail)
            return None
        log.info("job %s: running (attempt %s)", job_id, detail)
        with self.leases.hold(job_id) as held:
            try:
                record = self.records.get(job_id)
                self.metrics.job_claimed(time.time() - record.created_at)
                if record.request.model_name != self.config.model_name:
                    raise ValueError(f"worker {self.worker_name} serves {self.config.model_name}, "
                                     f"not {record.request.model_name}")
                images, info = self._render(record, held, on_progress)
                stored = self._store(record, images, held)
            except LeaseLost:
                self.metrics.job_finished("lease_lost")
                log.warning("job %s: lease lost; left to the worker that holds it", job_id)
                return None
            except GiveBack as exc:
                self.metrics.job_finished("given_back")
                self._release_memory()
                if self.records.release(job_id, self.worker_name, attempts_delta=-1, state=JobState.queued,
                                        step=0, worker=""):
                    send_job(self.app, job_id, self.records.get(job_id).request)
                    log.warning("job %s: given back to the queue (%s)", job_id, str(exc) or "worker stopping")
                return None
            except StorageDown as exc:
                # The store's fault, not the job's: back to the queue with this attempt counted (a store that
                # never comes back cannot loop a job for ever); images already stored stay, and the next
                # attempt keeps them (Storage.put_image never overwrites).
                self.metrics.job_finished("storage_unavailable")
                self._release_memory()
                if self.records.release(job_id, self.worker_name, state=JobState.queued, step=0, worker=""):
                    send_job(self.app, job_id, self.records.get(job_id).request)
                    log.warning("job %s: given back to the queue: %s", job_id, exc)
                return None
            except JobCanceled:
                self.metrics.job_finished("canceled")
                self._release_memory()
                self._end(job_id, JobState.canceled)
                log.info("job %s: canceled while running", job_id)
            except DeadlineExceeded as exc:
                self.metrics.job_finished("timed_out")
                self._release_memory()
                self._end(job_id, JobState.failed, JobError(type="TimedOut", message=str(exc)))
                log.warning("job %s: %s", job_id, exc)
            except Exception as exc:  # an ordinary error fails this job, not the worker
                self.metrics.job_finished("failed")
                self._release_memory()
                self._end(job_id, JobState.failed, JobError(type=type(exc).__name__, message=str(exc)))
                log.warning("job %s: failed: %s: %s", job_id, type(exc).__name__, exc)
            else:
                ended = self._end(job_id, JobState.succeeded, images=stored, render=info,
                                  step=record.request.num_inference_steps)
                self.metrics.job_finished("succeeded", render_s=info.render_s, width=record.request.width,
                                          height=record.request.height, images=len(stored))
                if ended:
                    log.info("job %s: succeeded, %d image(s)", job_id, len(stored))
        return self.records.get(job_id)

    def _render(
        self, record: JobRecord, held: HeldJob, on_progress: ProgressFn | None
    ) -> tuple[list[Any], RenderInfo]:
        """Queue the job for the GPU and wait for its images, minding its progress, cancel and deadline."""
        total = record.request.num_inference_steps
        timeout = self.config.job_timeout_s
        pending = Pending(record, held)
        self.batcher.submit(pending)
        reported = 0
        next_check = 0.0
        while not pending.done.wait(self.config.progress_every_s):
            now = time.monotonic()
            started, step = pending.started, pending.step
            if started is None:
                held.beat()  # waiting for the GPU counts as life
            moved = started is not None and step != reported
            try:
                if moved or now >= next_check:  # a moved step at once, else twice a second (a cancel)
                    next_check = now + 0.5
                    answer = self.records.progress(record.id, self.worker_name, step,
                                                   batch=pending.batch_images or None)
                    if answer == "lost":
                        raise LeaseLost()
                    if answer == "cancel":
                        raise JobCanceled()
                    if moved:
                        reported = step
                        if on_progress is not None:
                            on_progress(step, total)
                if held.lost.is_set():
                    raise LeaseLost()
                if started is not None and now - started > timeout:
                    raise DeadlineExceeded(f"timed out after {timeout:.0f} s (at step {step}/{total})")
            except JobStopped as exc:
                # Out of the queue if it has not started; else its rows ride along and are dropped.
                self.batcher.withdraw(pending)
                pending.stop(exc)
                raise
        if pending.error is not None:
            raise pending.error
        if pending.images is None or pending.info is None:
            raise RuntimeError("the render ended without images")  # pragma: no cover - a batcher bug
        if reported < total:
            # The last steps can end between two progress writes: one more, so the record and the event
            # stream name every step (the end decides the rest; its answer changes nothing now).
            self.records.progress(record.id, self.worker_name, total, batch=pending.batch_images or None)
        if on_progress is not None:
            on_progress(total, total)
        return pending.images, pending.info

    def _before_batch(self, batch: list[Pending]) -> BaseException | None:
        if self.shutdown.draining.is_set():
            return GiveBack()  # they waited behind the job being finished: not started, so back they go
        if self.storage_watch.down:  # their images could not be stored: not started, so back they go
            return GiveBack(f"storage unavailable: {self.storage_watch.down}")
        self.metrics.rendering(len(batch))
        return None

    def _stop_now(self) -> BaseException | None:
        return GiveBack() if self.shutdown.now.is_set() else None

    def _on_batch(self, batch: list[Pending], seconds: float) -> None:
        self.metrics.batch_rendered(len(batch), sum(p.images_wanted for p in batch))

    def _store(self, record: JobRecord, images: list[Any], held: HeldJob) -> list[ImageRecord]:
        request = record.request

        def keep_going() -> bool:
            held.beat()
            return not held.lost.is_set()

        stored = []
        for index, (image, seed) in enumerate(zip(images, request.image_seeds(), strict=True)):
            threads = threads_for(gpu_busy=self.gpu_lock.locked(), configured=self.config.encode_threads)
            data = encode(image, request.output_format, threads=threads)
            if held.lost.is_set():
                raise LeaseLost()
            try:
                stored.append(self.storage.put_image(record.id, index, data, request, seed, keep_going=keep_going,
                                                     store_answers=self.storage_watch.check))
            except StorageError:
                if held.lost.is_set():
                    raise LeaseLost() from None  # given up because another worker holds the job now
                raise
        return stored

    def _end(self, job_id: str, state: JobState, error: JobError | None = None, **fields: Any) -> bool:
        if error is not None:
            fields["error"] = error
        ended = self.records.release(job_id, self.worker_name, state=state, finished_at=time.time(), **fields)
        if not ended:
            log.warning("job %s: could not record %s: no longer held by this worker", job_id, state.value)
        return ended

    def _release_memory(self) -> None:
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # pragma: no cover - best effort after a failure
            pass
