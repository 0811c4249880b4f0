"""The Celery side of the worker: the app and the one task, by name.

The task ends in the Celery state that says what the job is once this delivery is done, so Flower
and other event consumers see jobs as they are (its Failed filter, its failed count): the job record
is written first, then

* succeeded: SUCCESS, the result ``"succeeded: 2 image(s)"``;
* failed or timed out: FAILURE with the job's error (``JobFailedError("TimedOut: timed out after ...")``),
  an expected exception (``throws``: one log line, no traceback); with late ack the message is
  acknowledged on failure (``task_acks_on_failure_or_timeout``), never redelivered, and
  ``task_reject_on_worker_lost`` applies only to a worker process that dies;
* canceled (running or while queued): CANCELED, a custom state, through a ``task-canceled`` event
  (Result ``"canceled"``), then ``Ignore`` so that no success follows; acknowledged. Not REVOKED:
  monitors merge a state of lower precedence into the current one (celery.events.state), and REVOKED
  ranks below the custom PROGRESS a running job is in, so a job canceled while running would stay
  PROGRESS; a custom state after a custom state replaces it;
* back in the queue (given back by a stopping worker or one whose storage is down, or re-queued): RETRY;
  the new message has the job id as its task id too (``pixq.wire.send_job``), so Flower follows one task per job;
* held by another worker: no state of its own (``Ignore``): the holder's events tell.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.exceptions import Ignore, Reject, Retry
from pixq.errors import NotDurable
from pixq.records import JobRecord, JobState, RecordStore
from pixq.settings import Settings
from pixq.wire import RENDER_TASK, make_celery
from pixq.worker.jobs.broker import SENTINEL_TRANSPORT, TRANSPORT, unix_broker_url
from pixq.worker.jobs.reservations import Reservations
from pixq.worker.jobs.runner import GiveBack, JobRunner

log = logging.getLogger(__name__)

PROGRESS_EVENT = "task-progress"  # Flower: the task's state reads PROGRESS, its Result "step 7/20"
CANCELED_EVENT = "task-canceled"  # Flower: the task's state reads CANCELED
PROGRESS_INTERVAL_S = 0.25  # at most ~4 progress messages a second, plus the first and last step


def create_app(settings: Settings) -> Celery:
    app = make_celery(settings, name="pixq-worker")
    endpoint = settings.redis_endpoint()
    # Transports that survive a broker reconnect or failover (worker/pixq/worker/jobs/broker.py).
    if endpoint.is_sentinel:
        app.conf.broker_transport = SENTINEL_TRANSPORT
    elif endpoint.is_unix:
        app.conf.broker_url = unix_broker_url(app.conf.broker_url)
    elif endpoint.url.startswith(("redis://", "rediss://")):
        app.conf.broker_transport = TRANSPORT
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


class JobFailedError(Exception):
    """A failed (or timed-out) job's task ends with this, after its record is written; the message is
    the job's error, ``TYPE: message``."""


class JobRequeued(Exception):
    """Why a task ended in RETRY: its job waits in the queue for another delivery (same task id)."""


def outcome(record: JobRecord) -> str:
    """What Flower shows as a succeeded task's result (and the text of a failed one's error)."""
    if record.error is not None:
        return f"{record.state.value}: {record.error.type}: {record.error.message}"
    if record.images:
        return f"{record.state.value}: {len(record.images)} image(s)"
    return record.state.value


def current(records: RecordStore, job_id: str) -> JobRecord | None:
    """The job's record now (``None``: expired, or Redis away: the message is handled either way)."""
    try:
        return records.get(job_id)
    except Exception:
        return None


def announce_canceled(task: Any, job_id: str, result: str) -> None:
    """A ``task-canceled`` event: Flower shows the task in state CANCELED with ``result`` as its Result."""
    try:
        task.send_event(CANCELED_EVENT, result=result, job_id=job_id, retry=False)
    except Exception as exc:  # the broker is away: the job record says canceled all the same
        log.warning("job %s: could not report the cancel to monitors: %s", job_id, exc)


def finish(task: Any, job_id: str, record: JobRecord | None, ran_here: bool) -> str:
    """End the task in the state of ``record`` (the job after this delivery): return its result or raise."""
    if record is None:
        return "not run here"
    if record.state is JobState.failed:
        error = record.error
        raise JobFailedError(f"{error.type}: {error.message}" if error is not None else "failed")
    if record.state is JobState.canceled:
        announce_canceled(task, job_id, "canceled" if ran_here else "canceled (not run here)")
        raise Ignore()
    if record.state is JobState.queued and not ran_here:
        raise Retry("job back in the queue", JobRequeued("the job waits in the queue for another delivery"))
    if record.state is JobState.running and not ran_here:
        raise Ignore()  # another worker holds it: its events tell
    return outcome(record) + ("" if ran_here else " (not run here)")


def register_render_task(app: Celery, runner: JobRunner, reservations: Reservations | None = None) -> None:
    """``pixq.render(job_id)`` runs the job through ``runner``; nothing else is accepted.

    With ``reservations``, every message the consumer takes (prefetched ones too) is recorded
    there until its task returns (``reservations.py``).
    """

    @app.task(name=RENDER_TASK, bind=True, typing=True, throws=(JobFailedError,))
    def render_job(self, job_id: str) -> str:  # type: ignore[no-untyped-def]
        try:
            if not isinstance(job_id, str) or not job_id.isalnum() or len(job_id) > 64:
                raise Reject(f"malformed job id {job_id!r}", requeue=False)
            try:
                record = runner.run(job_id, on_progress=progress_reporter(self, job_id))
            except GiveBack as exc:  # stopping, or the store is down: not claimed, the message goes back
                raise Reject(f"{str(exc) or 'worker stopping'} before the job started", requeue=True) from None
            except NotDurable as exc:
                # The end is on the primary but not confirmed on replicas: the message comes again;
                # its next delivery finds the job settled, or (after a failover lost the end) runs it.
                log.error("job %s: %s; message left for redelivery", job_id, exc)
                raise Reject(str(exc), requeue=True) from None
            ran_here = record is not None
            return finish(self, job_id, record if ran_here else current(runner.records, job_id), ran_here)
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
