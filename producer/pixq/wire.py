"""What travels between producer and worker through Celery: task name, queues, serialization.

The producer enqueues by task *name* (``send_task``) and never imports the worker. The broker
is treated as lossy; the job record in Redis is the truth (see ``records.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pixq.schema import JobRequest
from pixq.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

RENDER_TASK = "pixq.render"
QUEUE_PREFIX = "pixq."

# Kombu's Redis transport keeps one list per priority step: ``name`` for step 0, then
# ``name:1`` ... ``name:9``; it serves lower steps first. Requests say 9 for most urgent.
PRIORITY_STEPS = list(range(10))
PRIORITY_SEP = ":"

# A live worker keeps ``pixq:worker:{name}`` (JSON: model, device, pid, ...) with a short TTL.
WORKER_KEY_PREFIX = "pixq:worker:"
WORKER_KEY_TTL_S = 15
# A live worker keeps ``pixq:reserved:{name}`` (SET of job ids): every message it has taken from a
# queue and not yet finished, prefetched ones too. Same TTL, renewed with its presence, so a dead
# worker's set lapses and the reaper's reconciliation re-sends what it held (reaper.py).
RESERVED_KEY_PREFIX = "pixq:reserved:"


def queue_name(model_name: str) -> str:
    """The queue a model's jobs travel on: only workers serving that model consume it."""
    return QUEUE_PREFIX + model_name


def queue_lists(model_name: str) -> list[str]:
    """The Redis lists that hold the model's waiting messages, most urgent first."""
    name = queue_name(model_name)
    return [name] + [f"{name}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS[1:]]


def broker_priority(priority: int) -> int:
    return 9 - priority


def celery_config(settings: Settings) -> dict[str, Any]:
    access = settings.redis_endpoint().celery_settings()  # plain or Sentinel (redisconn.py)
    visibility = settings.effective_visibility_timeout_s
    # Sweep for overdue unacked messages a few times per visibility timeout (kombu's default
    # sweep is every 100 s, which a short timeout would outpace).
    sweep_s = min(100.0, visibility / 4)
    restore_interval = min(10, max(1, int(sweep_s)))
    transport = {
        # Longer than the longest allowed job, so Redis does not hand a running job's message to
        # a second worker; leases (worker/pixq/worker/jobs/lease.py) catch dead workers much sooner.
        "visibility_timeout": visibility,
        "unacked_restore_interval": restore_interval,
        "unacked_restore_throttle": max(1, round(sweep_s / restore_interval)),
        "priority_steps": PRIORITY_STEPS,
        "sep": PRIORITY_SEP,
        "queue_order_strategy": "priority",
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
        "socket_keepalive": True,
        "health_check_interval": 10,
        "retry_on_timeout": True,
        **access["broker_transport_options"],
    }
    return {
        "broker_url": access["broker_url"],
        "result_backend": access["result_backend"],  # only for task progress (update_state); the record is the truth
        "result_expires": 24 * 3600,
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],  # a pickle message is refused, never executed
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        # Off: the threads pool cannot terminate a job (Celery's terminate_job raises NotImplementedError
        # before anything else happens), so "on" only logged a traceback per running job at every broker
        # reconnect. A running job keeps going either way; its lease and record decide who finishes it.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_deduplicate_successful_tasks": False,
        "task_track_started": True,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # keep reconnecting after a Redis restart
        "broker_heartbeat": 0,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": settings.effective_visibility_timeout_s,
                                             "retry_policy": {"timeout": 5.0},
                                             **access["result_backend_transport_options"]},
        **{k: v for k, v in access.items() if k in ("broker_use_ssl", "redis_backend_use_ssl")},
        "redis_socket_connect_timeout": 5,
        "redis_socket_timeout": 30,
        "redis_retry_on_timeout": True,
        "redis_backend_health_check_interval": 10,
        # Publishing retries briefly, then the caller gets a clear error.
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
    }


def make_celery(settings: Settings, name: str = "pixq") -> Celery:
    from celery import Celery  # here: commands that only read records need no Celery

    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def kwargs_repr(job_id: str, request: JobRequest) -> str:
    """What Flower shows as a job's task arguments: no secrets, a shortened prompt."""
    prompt = request.prompt if len(request.prompt) <= 60 else request.prompt[:57] + "..."
    return repr({"size": f"{request.width}x{request.height}", "prompt": prompt, "model": request.model_name,
                 "job_id": job_id})


def send_job(app: Celery, job_id: str, request: JobRequest, task_id: str | None = None) -> None:
    """Put one message for ``job_id`` on its model's queue (the worker reads the record).

    The Celery task id is the job id (``task_id`` unless given), also for a job given back or re-queued,
    so Flower finds a job by its id and follows it as one task.
    """
    app.send_task(
        RENDER_TASK,
        kwargs={"job_id": job_id},
        queue=queue_name(request.model_name),
        priority=broker_priority(request.priority),
        task_id=task_id or job_id,
        # The job record is the result: no Celery result to wait for, so no subscription to the result
        # backend per job (send_task by name does not know the task's ignore_result).
        ignore_result=True,
        # What Flower shows as the arguments: no secrets, a shortened prompt.
        kwargsrepr=kwargs_repr(job_id, request),
    )


class _Batch:
    """Collects what kombu's Redis channel would LPUSH (its ``_publish_batch`` hook)."""

    def __init__(self) -> None:
        self.pushes: list[tuple[str, Any]] = []

    def add(self, command: str, *args: Any) -> None:
        if command == "lpush":
            self.pushes.append((args[0], args[1]))


def job_messages(app: Celery, jobs: list[tuple[str, JobRequest]]) -> list[tuple[str, Any]]:
    """The (Redis list, message) pairs ``send_job`` would push for each ``(job_id, request)``, built by
    Celery's own protocol-v2 builder and kombu's Redis channel, for the caller to LPUSH in its own
    pipeline (``Client.submit_many``: one round trip for a batch). No ``task-sent`` event is sent."""
    from kombu.serialization import dumps

    batch = _Batch()
    with app.producer_or_acquire() as producer:  # a pooled connection: no connect per call
        channel = producer.channel
        for job_id, request in jobs:
            msg = app.amqp.as_task_v2(job_id, RENDER_TASK, kwargs={"job_id": job_id}, ignore_result=True,
                                      kwargsrepr=kwargs_repr(job_id, request))
            content_type, encoding, body = dumps(msg.body, serializer="json")
            message = channel.prepare_message(body, broker_priority(request.priority), content_type, encoding,
                                              msg.headers, dict(msg.properties))
            channel.basic_publish(message, "", queue_name(request.model_name), _publish_batch=batch)
    return batch.pushes
