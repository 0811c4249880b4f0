"""The Celery side of the worker: the app and the one task, by name."""

from __future__ import annotations

from celery import Celery

from producer.settings import Settings
from producer.wire import RENDER_TASK, make_celery
from worker.runner import JobRunner


def create_app(settings: Settings, runner: JobRunner) -> Celery:
    """A Celery app whose ``pixq.render`` task runs jobs through ``runner``."""
    app = make_celery(settings, name="pixq-worker")

    @app.task(name=RENDER_TASK, bind=True)
    def render_job(self, job_id: str) -> None:  # type: ignore[no-untyped-def]
        def report(step: int, total: int) -> None:
            # Celery's task state, for Flower and `AsyncResult`; the job record has it too.
            self.update_state(state="PROGRESS", meta={"job_id": job_id, "step": step, "total_steps": total})

        runner.run(job_id, on_progress=report)

    return app
