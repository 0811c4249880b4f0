"""Running one job: claim it, render with progress and cancel checks, store, record the end.

Kept apart from Celery (``tasks.py``) so the in-process path and the queue path are the same
code, and so a benchmark can time it without a broker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from producer.errors import JobNotFound
from producer.records import JobError, JobRecord, JobState, RecordStore
from worker.render import encode, render
from worker.storage import Storage

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


class JobCanceled(Exception):
    """Raised from the step callback when the job's cancel flag is set."""


class JobRunner:
    """Runs jobs for one loaded pipeline; one instance per worker process."""

    def __init__(self, records: RecordStore, pipe: Any, storage: Storage, worker_name: str, model_name: str):
        self.records = records
        self.pipe = pipe
        self.storage = storage
        self.worker_name = worker_name
        self.model_name = model_name

    def run(self, job_id: str, on_progress: ProgressFn | None = None) -> JobRecord | None:
        """Run the job if it is still to be run; returns its final record (``None`` if skipped)."""
        record = self._claim(job_id)
        if record is None:
            return None
        log.info("job %s: running (attempt %d)", job_id, record.attempts)
        try:
            self._render_and_store(record, on_progress)
        except JobCanceled:
            self._finish(job_id, JobState.canceled)
            log.info("job %s: canceled while running", job_id)
        except Exception as exc:  # an ordinary error fails this job, not the worker
            self._release_memory()
            self._finish(job_id, JobState.failed, error=JobError(type=type(exc).__name__, message=str(exc)))
            log.warning("job %s: failed: %s: %s", job_id, type(exc).__name__, exc)
        return self.records.get(job_id)

    def _claim(self, job_id: str) -> JobRecord | None:
        try:
            record = self.records.get(job_id)
        except JobNotFound:
            log.warning("job %s: no record (expired or never written); message dropped", job_id)
            return None
        if record.request.model_name != self.model_name:
            self._finish(
                job_id,
                JobState.failed,
                error=JobError(
                    type="WrongModel",
                    message=f"worker {self.worker_name} serves {self.model_name}, not {record.request.model_name}",
                ),
            )
            return None
        claimed, state = self.records.transition(
            job_id,
            (JobState.queued, JobState.running),
            state=JobState.running,
            started_at=time.time(),
            worker=self.worker_name,
            attempts=record.attempts + 1,
            step=0,
        )
        if not claimed:
            log.info("job %s: already %s; message dropped", job_id, state.value if state else "gone")
            return None
        return self.records.get(job_id)

    def _render_and_store(self, record: JobRecord, on_progress: ProgressFn | None) -> None:
        request = record.request
        total = request.num_inference_steps

        def on_step(step: int) -> None:
            still_running = self.records.set_progress(record.id, step)
            if not still_running or self.records.cancel_requested(record.id):
                raise JobCanceled()
            if on_progress is not None:
                on_progress(step, total)

        images = render(self.pipe, request, on_step)
        stored = [
            self.storage.put_image(record.id, index, encode(image, request.output_format), request, seed)
            for index, (image, seed) in enumerate(zip(images, request.image_seeds(), strict=True))
        ]
        done, state = self.records.transition(
            record.id,
            (JobState.running,),
            state=JobState.succeeded,
            finished_at=time.time(),
            step=total,
            images=stored,
        )
        if done:
            log.info("job %s: succeeded, %d image(s)", record.id, len(stored))
        else:
            log.info("job %s: finished rendering but is now %s", record.id, state)

    def _finish(self, job_id: str, state: JobState, error: JobError | None = None) -> None:
        fields: dict[str, Any] = {"state": state, "finished_at": time.time()}
        if error is not None:
            fields["error"] = error
        self.records.transition(job_id, (JobState.queued, JobState.running), **fields)

    def _release_memory(self) -> None:
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # pragma: no cover - best effort after a failure
            pass
