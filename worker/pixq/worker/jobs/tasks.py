"""The Celery side of the worker: the app and the one task, by name."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.exceptions import Reject
from pixq.records import JobRecord, RecordStore
from pixq.settings import Settings
from pixq.wire import RENDER_TASK, make_celery
from pixq.worker.jobs.broker import TRANSPORT
from pixq.worker.jobs.reservations import Reservations
from pixq.worker.jobs.runner import GiveBack, JobRunner

log = logging.getLogger(__name__)

PROGRESS_EVENT = "task-progress"  # Flower: the task's state reads PROGRESS, its Result "step 7/20"
PROGRESS_INTERVAL_S = 0.25  # at most ~4 progress messages a second, plus the first and last step


def create_app(settings: Settings) -> Celery:
    app = make_celery(settings, name="pixq-worker")
    if settings.require_redis().startswith(("redis://", "rediss://")):
        app.conf.broker_transport = TRANSPORT  # survives a broker reconnect (worker/pixq/worker/jobs/broker.py)
    return app


def progress_reporter(
    task: Any, job_id: str, interval_s: float = PROGRESS_INTERVAL_S, clock: Callable[[], float] = time.monotonic
) -> Callable[[int, int], None]:
    """The step callback that shows a running task's progress to monitors.

    Flower builds a task's state from events only, and its pages show a fixed set of fields,
    so the step travels as a custom ``task-progress`` event whose ``result`` field is
    ``"step 7/20"`` (for a custom state Celery's ``AsyncResult.result`` is the progress too);
    ``step`` and ``total_steps`` ride along for other event consumers. The result backend
    gets the same through ``update_state``. Throttled: a fast GPU does dozens of steps a
    second. Monitoring never fails a render: errors are logged and the job goes on.
    """
    last = [float("-inf")]
    warned = [False]

    def report(step: int, total: int) -> None:
        now = clock()
        if step not in (1, total) and now - last[0] < interval_s:
            return
        last[0] = now
        try:
            task.send_event(PROGRESS_EVENT, result=f"step {step}/{total}", step=step, total_steps=total,
                            job_id=job_id, retry=False)
            task.update_state(state="PROGRESS", meta={"job_id": job_id, "step": step, "total_steps": total})
        except Exception as exc:  # the broker is away: the job record still has the step
            if not warned[0]:
                log.warning("job %s: could not report progress to monitors: %s", job_id, exc)
                warned[0] = True

    return report


def outcome(record: JobRecord) -> str:
    """What Flower shows as the task's result: the job's own outcome.

    The Celery task succeeds whenever the message was handled, also for a job that failed
    or was canceled; this line tells them apart.
    """
    if record.error is not None:
        return f"{record.state.value}: {record.error.type}: {record.error.message}"
    if record.images:
        return f"{record.state.value}: {len(record.images)} image(s)"
    return record.state.value


def not_run(records: RecordStore, job_id: str) -> str:
    """The result of a message whose job this worker did not run to its end: what the job is now
    (canceled while queued, ended by another delivery, or held by another worker)."""
    try:
        return f"{records.get(job_id).state.value} (not run here)"
    except Exception:  # expired, or Redis away: the message is handled either way
        return "not run here"


def register_render_task(app: Celery, runner: JobRunner, reservations: Reservations | None = None) -> None:
    """``pixq.render(job_id)`` runs the job through ``runner``; nothing else is accepted.

    With ``reservations``, every message the consumer takes (prefetched ones too) is recorded
    there until its task returns (``reservations.py``).
    """

    @app.task(name=RENDER_TASK, bind=True, typing=True)
    def render_job(self, job_id: str) -> str:  # type: ignore[no-untyped-def]
        try:
            if not isinstance(job_id, str) or not job_id.isalnum() or len(job_id) > 64:
                raise Reject(f"malformed job id {job_id!r}", requeue=False)
            try:
                record = runner.run(job_id, on_progress=progress_reporter(self, job_id))
            except GiveBack:
                raise Reject("worker stopping before the job started", requeue=True) from None
            return outcome(record) if record is not None else not_run(runner.records, job_id)
        finally:
            if reservations is not None and isinstance(job_id, str):
                reservations.remove(job_id)

    if reservations is not None:
        from celery.signals import task_received

        def on_received(request: Any = None, **_: object) -> None:
            job_id = (getattr(request, "kwargs", None) or {}).get("job_id")
            if getattr(request, "name", None) == RENDER_TASK and isinstance(job_id, str):
                reservations.add(job_id)

        task_received.connect(on_received, weak=False)
