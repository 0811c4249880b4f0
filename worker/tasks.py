"""The Celery side of the worker: the app and the one task, by name."""

from __future__ import annotations

from celery import Celery
from celery.exceptions import Reject

from producer.settings import Settings
from producer.wire import RENDER_TASK, make_celery
from worker.broker import TRANSPORT
from worker.runner import GiveBack, JobRunner


def create_app(settings: Settings) -> Celery:
    app = make_celery(settings, name="pixq-worker")
    if settings.require_redis().startswith(("redis://", "rediss://")):
        app.conf.broker_transport = TRANSPORT  # survives a broker reconnect (worker/broker.py)
    return app


def register_render_task(app: Celery, runner: JobRunner) -> None:
    """``pixq.render(job_id)`` runs the job through ``runner``; nothing else is accepted."""

    @app.task(name=RENDER_TASK, bind=True, typing=True)
    def render_job(self, job_id: str) -> None:  # type: ignore[no-untyped-def]
        if not isinstance(job_id, str) or not job_id.isalnum() or len(job_id) > 64:
            raise Reject(f"malformed job id {job_id!r}", requeue=False)

        def report(step: int, total: int) -> None:
            # Celery's task state, for Flower and `AsyncResult`; the job record has it too.
            self.update_state(state="PROGRESS", meta={"job_id": job_id, "step": step, "total_steps": total})

        try:
            runner.run(job_id, on_progress=report)
        except GiveBack:
            raise Reject("worker stopping before the job started", requeue=True) from None
